"""Pure helpers that turn pipeline results and slide metadata into what napari layers need.

The docks (:mod:`napari_pathfm.widgets`) only arrange widgets; the little maths and table
building they need lives here, free of Qt, so it can run in a worker and be tested alone:
class-name feature tables, the µm/px a user entered for a slide, tile and patch boxes,
and MIL heatmaps with robust contrast limits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = [
    "HEAT_PERCENTILES",
    "class_features",
    "class_heatmaps",
    "clip_to_slide",
    "entered_mpp",
    "nearest_first",
    "patch_box",
    "slide_level0_shape",
    "tile_boxes",
    "visible_box",
]

#: Percentiles of the shown class's patch scores that set the MIL heatmap's contrast limits.
HEAT_PERCENTILES = (1.0, 99.0)


def class_features(names: Mapping[int, str] | list[str]):
    """A features table (pandas) with one ``class`` column indexed by label value.

    napari shows the row of the label under the cursor, so the status bar names the class.
    Build it in a worker: importing pandas costs ~0.1 s the first time.
    """
    import pandas as pd

    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else dict(names)
    keys = sorted(names)
    return pd.DataFrame({"class": [names[k] for k in keys]}, index=keys)


def entered_mpp(layer) -> float | None:
    """The µm/px the user entered in the Slide dock for a slide layer without one in its file, else None."""
    meta = getattr(layer, "metadata", None) or {}
    if meta.get("pathfm_mpp_source") != "entered":
        return None
    mpp = (meta.get("pathfm_slide") or {}).get("mpp")
    return float(mpp) if mpp else None


def slide_level0_shape(layer) -> tuple[int, int]:
    """Level-0 ``(height, width)`` of a slide Image layer (multiscale or not, RGB or not)."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(data.shape)
    return (int(shape[0]), int(shape[1])) if getattr(layer, "rgb", False) else (int(shape[-2]), int(shape[-1]))


def tile_boxes(grid) -> list[np.ndarray]:
    """Rectangles (4 corners, level-0 pixel coordinates) of the grid's tiles, clipped to the slide.

    Corners sit on pixel edges (pixel ``j`` is centred at ``j``), so a box covers its level-0
    pixels exactly; tiles of the last row/column that overhang the slide stop at its edge.
    """
    h, w = grid.level0_shape
    s = grid.level0_size
    boxes = []
    for y, x in np.asarray(grid.tiles, float):
        y1, x1 = min(y + s, h), min(x + s, w)
        boxes.append(np.array([[y, x], [y, x1], [y1, x1], [y1, x]], float) - 0.5)
    return boxes


#: most pixels :func:`clip_to_slide` makes of a per-tile map (beyond that it refines less)
CLIP_MAX_PIXELS = 4_000_000


def clip_to_slide(
    grid_map: np.ndarray, cell: float, level0_shape, *, finest: float = 16.0, max_pixels: int = CLIP_MAX_PIXELS
) -> tuple[np.ndarray, float]:
    """A per-tile map (one pixel per ``cell`` level-0 pixels) refined so that it stops at the slide's edge.

    Tiles of the last row and column hang over the slide; drawn one pixel per tile, the map
    reached up to a tile past the slide's bottom and right edges. Each map pixel becomes ``k x k``
    pixels of ``cell / k`` level-0 pixels (``k`` makes them at most ``finest`` level-0 pixels, and
    each plane of the result at most ``max_pixels``, so maps of one grid with and
    without leading axes are refined alike), and the rows and columns that lie wholly past the edge are
    dropped, so the map ends within ``cell / k`` of the edge. Leading axes (classes) are kept.

    Returns
    -------
    refined : ndarray
        The map, ``(..., rows', cols')``; values are repeated, never interpolated.
    sub_cell : float
        Level-0 pixels per refined pixel (the downsample to place it with).

    Examples
    --------
    >>> m, sub = clip_to_slide(np.array([[1, 2], [3, 4]]), 256, (300, 400), finest=64)
    >>> m.shape, sub
    ((5, 7), 64.0)
    """
    grid_map = np.asarray(grid_map)
    rows, cols = grid_map.shape[-2:]
    by_size = math.ceil(float(cell) / finest)
    by_memory = math.floor(math.sqrt(max_pixels / max(1, rows * cols)))
    k = max(1, min(by_size, by_memory))
    sub = float(cell) / k
    h = min(rows * k, math.ceil(level0_shape[0] / sub))
    w = min(cols * k, math.ceil(level0_shape[1] / sub))
    if k > 1:
        grid_map = np.repeat(np.repeat(grid_map, k, axis=-2), k, axis=-1)
    return np.ascontiguousarray(grid_map[..., :h, :w]), sub


def patch_box(y: int, x: int, cell: int, level0_shape=None) -> np.ndarray:
    """Level-0 pixel corners ``[[y0, x0], [y1, x1]]`` of the ``cell``-px patch at level-0 ``(y, x)`` (pixel edges).

    With the slide's level-0 ``(height, width)``, a patch that hangs over the slide's edge stops there.
    """
    y1, x1 = y + cell, x + cell
    if level0_shape is not None:
        y1, x1 = min(y1, level0_shape[0]), min(x1, level0_shape[1])
    return np.array([[y - 0.5, x - 0.5], [y1 - 0.5, x1 - 0.5]], float)


def visible_box(center_yx, zoom: float, canvas_size, unit: float) -> tuple[float, float, float, float]:
    """Level-0 ``(y0, x0, y1, x1)`` (continuous, pixel edges at integers) a canvas shows.

    ``center_yx`` and ``zoom`` are the camera's (world units per ``unit`` µm or px), ``canvas_size``
    the canvas's ``(height, width)`` in screen pixels.
    """
    half = np.asarray(canvas_size, float) / (2.0 * max(float(zoom), 1e-12))
    cy, cx = (float(v) for v in center_yx[-2:])
    unit = unit or 1.0
    return (
        (cy - half[0]) / unit + 0.5,
        (cx - half[1]) / unit + 0.5,
        (cy + half[0]) / unit + 0.5,
        (cx + half[1]) / unit + 0.5,
    )


def nearest_first(indices, tiles, cell: float, box) -> np.ndarray:
    """``indices`` of tiles (level-0 corners ``tiles``, side ``cell``) ordered by distance from ``box``'s centre.

    Chebyshev distance of each tile centre; a stable sort keeps grid order among ties.
    """
    indices = np.asarray(indices)
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    dist = np.abs(np.asarray(tiles)[indices] + cell / 2 - centre).max(axis=1)
    return indices[np.argsort(dist, kind="stable")]


def class_heatmaps(pred, level0_shape=None) -> list[tuple[np.ndarray, tuple[float, float], float]]:
    """Per class of a MIL prediction: the heatmap ready to show, its robust contrast limits and its cell.

    Cells without a patch (NaN) get a value below every score, so they stay transparent
    under the colormap's transparent low end whatever limits the user picks later. With the
    slide's level-0 ``(height, width)`` the map is refined to stop at the slide's edge
    (:func:`clip_to_slide`); the cell returned is level-0 pixels per heatmap pixel.
    """
    from .colors import robust_limits
    from .pipelines.mil import heatmap_grid

    out = []
    for cls in range(len(pred.classes)):
        grid, cell = heatmap_grid(pred, cls)
        lo, hi = robust_limits(grid, *HEAT_PERCENTILES)
        finite = grid[np.isfinite(grid)]
        floor = (float(finite.min()) if finite.size else lo) - (hi - lo)
        grid = np.nan_to_num(grid, nan=floor).astype(np.float32)
        if level0_shape is not None:
            grid, cell = clip_to_slide(grid, cell, level0_shape)
        out.append((grid, (lo, hi), float(cell)))
    return out
