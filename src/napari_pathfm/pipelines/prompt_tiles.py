"""A prompted object across tiles: which grid tiles it needs, what each is prompted with, one mask from them.

A prompt is answered on the grid tile nearest to it (:class:`~napari_pathfm.pipelines.prompt.PromptSession`),
but a gland is often larger than the part of a tile where the tile sees it best, or than the tile.
A box prompt's object is therefore grown the way ``pathfm segment`` stitches a slide: every level-0
pixel is decided by the tile whose centre is nearest to it (the tile seeing the most context around that
pixel), and a tile of the box that the object reaches into is prompted too.
Pure NumPy/SciPy on level-0 windows; the model calls stay in :mod:`napari_pathfm.pipelines.prompt`.

- :func:`nearest_tiles` — for each pixel of a window, which of some tiles decides it.
- :func:`tiles_needed` — the grid tiles that decide the pixels of a mask; :func:`tiles_within` those a
  box reaches.
- :func:`carried_prompt` — the prompt a neighbouring tile gets: the user's clicks in it and the box
  clipped to it, else a click well inside the object's part in it, nearest the prompt (SAM's
  training prompts are a click well inside the object's part in the crop, and often its box).
- :func:`stitch_logits` — the tiles' level-0 logits joined, each pixel from its nearest tile.
- :func:`reaches_uncovered` — whether the object touches the edge of the tiles asked (may be cut).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["carried_prompt", "nearest_tiles", "reaches_uncovered", "stitch_logits", "tiles_needed", "tiles_within"]


def _window_of(grid: Any, tiles: Any) -> tuple[int, int, int, int]:
    """Level-0 ``(y0, x0, y1, x1)`` covered by ``tiles``, clipped to the slide."""
    h0, w0 = grid.level0_shape
    side = int(round(grid.level0_size))
    yx = grid.tiles[np.asarray(list(tiles), int)]
    return (
        int(yx[:, 0].min()),
        int(yx[:, 1].min()),
        min(h0, int(yx[:, 0].max()) + side),
        min(w0, int(yx[:, 1].max()) + side),
    )


def nearest_tiles(grid: Any, tiles: Any, window: tuple[int, int, int, int]) -> np.ndarray:
    """For each level-0 pixel of ``window`` (y0, x0, y1, x1): the position in ``tiles`` of the tile that
    covers it with its centre nearest, or -1 where none covers it. On a regular grid the tiles' parts
    are squares that meet half-way across each overlap.

    Ties go to the earlier tile, so the result does not depend on float noise between equal tiles.
    """
    y0, x0, y1, x1 = window
    side = int(round(grid.level0_size))
    best = np.full((y1 - y0, x1 - x0), np.inf, np.float32)
    owner = np.full(best.shape, -1, np.int32)
    for k, i in enumerate(tiles):
        ty, tx = (int(v) for v in grid.tiles[int(i)])
        ry0, rx0, ry1, rx1 = max(y0, ty), max(x0, tx), min(y1, ty + side), min(x1, tx + side)
        if ry0 >= ry1 or rx0 >= rx1:
            continue
        dy = np.abs(np.arange(ry0, ry1) + 0.5 - (ty + side / 2))
        dx = np.abs(np.arange(rx0, rx1) + 0.5 - (tx + side / 2))
        d = np.add.outer(dy**2, dx**2).astype(np.float32)
        view = (slice(ry0 - y0, ry1 - y0), slice(rx0 - x0, rx1 - x0))
        closer = d < best[view]
        best[view][closer] = d[closer]
        owner[view][closer] = k
    return owner


def tiles_needed(grid: Any, mask: np.ndarray, y0: int, x0: int) -> set[int]:
    """Grid tiles that decide the pixels of ``mask`` (bool, placed at level-0 ``(y0, x0)``)."""
    if not mask.any():
        return set()
    h, w = mask.shape
    side = grid.level0_size
    ty, tx = grid.tiles[:, 0], grid.tiles[:, 1]
    touching = np.flatnonzero((ty < y0 + h) & (ty + side > y0) & (tx < x0 + w) & (tx + side > x0))
    owner = nearest_tiles(grid, touching, (y0, x0, y0 + h, x0 + w))
    return {int(touching[k]) for k in np.unique(owner[mask]) if k >= 0}


def stitch_logits(grid: Any, logits: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One level-0 logit image from tiles' level-0 logits (``{tile: (h, w)}``, clipped to the slide).

    Returns ``(logits, covered, y0, x0)``: each pixel's logit from its nearest tile, where any tile covers it.
    """
    tiles = list(logits)
    window = _window_of(grid, tiles)
    wy0, wx0 = window[:2]
    owner = nearest_tiles(grid, tiles, window)
    out = np.zeros(owner.shape, np.float32)
    for k, i in enumerate(tiles):
        ty, tx = (int(v) for v in grid.tiles[i])
        part = logits[i]
        sl = (slice(ty - wy0, ty - wy0 + part.shape[0]), slice(tx - wx0, tx - wx0 + part.shape[1]))
        mine = owner[sl] == k
        out[sl][mine] = part[mine]
    return out, owner >= 0, wy0, wx0


def carried_prompt(
    prompt: Any, grid: Any, tile: int, mask: np.ndarray, y0: int, x0: int, *, min_depth: float = 2.0
) -> Any:
    """The prompt tile ``tile`` gets for the object ``mask`` (bool at level-0 ``(y0, x0)``) found so far.

    The user's clicks inside the tile and the box clipped to it; without a positive click of the user's
    inside it, a positive click on the object's part in the tile, at least half as deep (from both the
    object's and the tile's edges) as its deepest pixel and nearest the prompt's centre. None when the
    object is nowhere at least ``min_depth`` model pixels deep in the tile: that tile has nothing of
    it to be asked about.
    """
    h0, w0 = grid.level0_shape
    side = int(round(grid.level0_size))
    ty, tx = (int(v) for v in grid.tiles[tile])
    ty1, tx1 = min(h0, ty + side), min(w0, tx + side)

    def inside(x: float, y: float) -> bool:
        return tx <= x < tx1 and ty <= y < ty1

    kept = [(p, v) for p, v in zip(prompt.points, prompt.labels, strict=True) if inside(*p)]
    box = None
    if prompt.box is not None:
        bx0, by0, bx1, by1 = prompt.box
        bx0, by0, bx1, by1 = max(bx0, tx), max(by0, ty), min(bx1, tx1), min(by1, ty1)
        box = (bx0, by0, bx1, by1) if bx1 > bx0 and by1 > by0 else None
    if not any(v for _, v in kept):
        part = np.zeros((ty1 - ty, tx1 - tx), bool)
        sy0, sx0 = max(ty, y0), max(tx, x0)
        sy1, sx1 = min(ty1, y0 + mask.shape[0]), min(tx1, x0 + mask.shape[1])
        if sy0 < sy1 and sx0 < sx1:
            part[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx] = mask[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        depth = ndimage.distance_transform_edt(np.pad(part, 1))[1:-1, 1:-1]
        if depth.max() < min_depth * grid.scale:
            return None
        ys, xs = np.nonzero(depth >= 0.5 * depth.max())  # well inside it, as SAM's training clicks
        px, py = prompt.center()  # nearest the prompt: on the prompted gland, not one it ran into
        k = int(np.argmin((xs + tx + 0.5 - px) ** 2 + (ys + ty + 0.5 - py) ** 2))
        cy, cx = ys[k], xs[k]
        kept.append(((tx + cx + 0.5, ty + cy + 0.5), 1))
    return type(prompt)(points=tuple(p for p, _ in kept), labels=tuple(v for _, v in kept), box=box)


def tiles_within(grid: Any, box: Any) -> set[int]:
    """Grid tiles that overlap the level-0 box ``(x0, y0, x1, y1)``."""
    x0, y0, x1, y1 = box
    side = grid.level0_size
    ty, tx = grid.tiles[:, 0], grid.tiles[:, 1]
    return {int(i) for i in np.flatnonzero((ty < y1) & (ty + side > y0) & (tx < x1) & (tx + side > x0))}


def reaches_uncovered(mask: np.ndarray, covered: np.ndarray, y0: int, x0: int, level0_shape: Any) -> bool:
    """Whether ``mask`` (at level-0 ``(y0, x0)``, same shape as ``covered``) touches the edge of what the
    tiles covered, where the slide goes on: the object may be cut there."""
    if not mask.any():
        return False
    h0, w0 = level0_shape
    h, w = mask.shape
    outside = np.pad(~covered, 1, constant_values=False)
    outside[0, :], outside[-1, :] = y0 > 0, y0 + h < h0
    outside[:, 0], outside[:, -1] = x0 > 0, x0 + w < w0
    near = ndimage.binary_dilation(outside, np.ones((3, 3), bool))[1:-1, 1:-1]
    return bool((mask & near).any())
