"""Tile grids at a target resolution.

Models are trained at a fixed physical resolution (µm per pixel), and slides
are scanned at many. A :class:`TileGrid` fixes, once, which pyramid level to read,
how many level pixels make one model tile, and where every tile sits on level 0,
so that segmentation, classification, MIL and heatmaps all agree on geometry.

Tile order is row-major: top to bottom, and left to right within a row. Tiles
removed by the tissue filter leave gaps but never change the order of the rest.
MIL bags and heatmaps rely on this order.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from .tissue import TissueMask

__all__ = ["TileGrid", "choose_level", "tile_grid"]


@dataclass
class TileGrid:
    """Positions and geometry of the tiles of one slide.

    Attributes
    ----------
    tiles : ndarray int64 (N, 2)
        Level-0 (y, x) of each tile's top-left corner, row-major order.
    tile_index : ndarray int64 (N, 2)
        (row, col) of each tile in the full grid.
    level : int
        Pyramid level the tiles are read from.
    level_downsample : float
        Level-0 pixels per pixel of ``level``.
    read_size : int
        Tile side in pixels of ``level``; resized to ``tile_size`` after reading.
    tile_size : int
        Tile side in output (model) pixels.
    overlap : int
        Overlap of neighbouring tiles in output pixels; ``stride = tile_size - overlap``.
    scale : float
        Level-0 pixels per output pixel (exact: ``level_downsample * read_size / tile_size``).
    mpp : float or None
        µm per output pixel actually obtained (close to ``target_mpp``).
    target_mpp : float or None
        The µm per pixel that was asked for.
    grid_shape : (int, int)
        Rows and columns of the full grid, before tissue filtering.
    level0_shape : (int, int)
        (height, width) of level 0.
    tissue_fraction : ndarray float (N,) or None
        Tissue fraction of each tile when a tissue mask was used.
    """

    tiles: np.ndarray
    tile_index: np.ndarray
    level: int
    level_downsample: float
    read_size: int
    tile_size: int
    overlap: int
    scale: float
    mpp: float | None
    target_mpp: float | None
    grid_shape: tuple[int, int]
    level0_shape: tuple[int, int]
    tissue_fraction: np.ndarray | None = None
    slide_path: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tiles = np.asarray(self.tiles, np.int64).reshape(-1, 2)
        self.tile_index = np.asarray(self.tile_index, np.int64).reshape(-1, 2)
        if self.tissue_fraction is not None:
            self.tissue_fraction = np.asarray(self.tissue_fraction, np.float64)
        self.grid_shape = (int(self.grid_shape[0]), int(self.grid_shape[1]))
        self.level0_shape = (int(self.level0_shape[0]), int(self.level0_shape[1]))

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def stride(self) -> int:
        """Distance between neighbouring tile origins in output pixels."""
        return self.tile_size - self.overlap

    @property
    def level0_size(self) -> float:
        """Side of one tile in level-0 pixels (may be fractional)."""
        return self.tile_size * self.scale

    @property
    def level_coords(self) -> np.ndarray:
        """(N, 2) top-left (y, x) of each tile in pixels of ``level``."""
        return np.rint(self.tiles / self.level_downsample).astype(np.int64)

    @property
    def output_coords(self) -> np.ndarray:
        """(N, 2) top-left (y, x) of each tile on the output canvas (``output_shape``)."""
        return self.tile_index * self.stride

    @property
    def output_shape(self) -> tuple[int, int]:
        """(height, width) of the whole slide at the output resolution."""
        h0, w0 = self.level0_shape
        return (max(1, math.ceil(h0 / self.scale - 1e-9)), max(1, math.ceil(w0 / self.scale - 1e-9)))

    @property
    def output_scale(self) -> tuple[float, float]:
        """napari ``scale`` of an output-canvas layer in level-0 pixels (µm: multiply by slide mpp)."""
        return (self.scale, self.scale)

    def read_box(self, i: int) -> tuple[int, int, int, int, int]:
        """``(level, y, x, h, w)`` to pass to ``slide.read`` for tile ``i``."""
        # level coordinates of one tile (computing them for all tiles per call made reading O(N^2))
        y, x = (int(v) for v in np.rint(self.tiles[i] / self.level_downsample))
        return self.level, y, x, self.read_size, self.read_size

    def subset(self, keep: Any) -> TileGrid:
        """A grid with only the tiles selected by ``keep`` (bool mask or indices), order kept."""
        keep = np.asarray(keep)
        if keep.dtype != bool:
            keep = np.sort(keep)
        tf = None if self.tissue_fraction is None else self.tissue_fraction[keep]
        return _replace(self, tiles=self.tiles[keep], tile_index=self.tile_index[keep], tissue_fraction=tf)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _SCALARS}
        d["grid_shape"] = list(self.grid_shape)
        d["level0_shape"] = list(self.level0_shape)
        d["tiles"] = self.tiles.tolist()
        d["tile_index"] = self.tile_index.tolist()
        d["tissue_fraction"] = None if self.tissue_fraction is None else self.tissue_fraction.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TileGrid:
        kw = {k: d.get(k) for k in _SCALARS}
        return cls(
            tiles=np.asarray(d["tiles"], np.int64).reshape(-1, 2),
            tile_index=np.asarray(d["tile_index"], np.int64).reshape(-1, 2),
            grid_shape=tuple(d["grid_shape"]),
            level0_shape=tuple(d["level0_shape"]),
            tissue_fraction=d.get("tissue_fraction"),
            **kw,
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON text, and write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), default=_json_default)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> TileGrid:
        """Load a grid from JSON text or from a file written by :meth:`to_json`."""
        if isinstance(text_or_path, Path) or not str(text_or_path).lstrip().startswith("{"):
            text_or_path = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text_or_path))

    def to_csv(self, path: str | Path) -> None:
        """Write one row per tile: index, row, col, level-0 y, x, size and tissue fraction."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "row", "col", "y0", "x0", "size0", "tissue_fraction"])
            size0 = f"{self.level0_size:.6g}"
            for i, ((y, x), (r, c)) in enumerate(zip(self.tiles, self.tile_index)):
                tf = "" if self.tissue_fraction is None else f"{self.tissue_fraction[i]:.4f}"
                w.writerow([i, int(r), int(c), int(y), int(x), size0, tf])


_SCALARS = (
    "level",
    "level_downsample",
    "read_size",
    "tile_size",
    "overlap",
    "scale",
    "mpp",
    "target_mpp",
    "slide_path",
    "meta",
)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _replace(grid: TileGrid, **changes: Any) -> TileGrid:
    d = {k: getattr(grid, k) for k in grid.__dataclass_fields__}
    d.update(changes)
    return TileGrid(**d)


def choose_level(slide: Any, target_mpp: float, tolerance: float = 0.01) -> int:
    """Coarsest level whose pixels are no larger than ``target_mpp * (1 + tolerance)``.

    Reading from it and shrinking keeps all detail; when even level 0 is coarser
    than the target, level 0 is used and tiles are enlarged.
    """
    best = 0
    for lvl, ds in enumerate(slide.level_downsamples):
        if slide.mpp * ds <= target_mpp * (1 + tolerance) and ds >= slide.level_downsamples[best]:
            best = lvl
    return best


def tile_grid(
    slide: Any,
    tile_size: int = 256,
    *,
    mpp: float | None = None,
    level: int | None = None,
    overlap: int = 0,
    tissue: TissueMask | None = None,
    min_tissue: float = 0.25,
) -> TileGrid:
    """Lay a grid of square tiles over a slide at a target resolution.

    Parameters
    ----------
    slide : Slide
        From :func:`napari_pathfm.io.open_slide`.
    tile_size : int
        Tile side in output pixels (what the model sees).
    mpp : float, optional
        Target µm per output pixel. The coarsest level at most 1 % finer than the
        target is read, ``read_size = round(tile_size * mpp / level_mpp)`` level
        pixels per tile, then resized to ``tile_size``. Needs a known slide mpp.
    level : int, optional
        Read tiles from this level as they are (no resizing). Give at most one of
        ``mpp`` and ``level``; with neither, level 0 is used.
    overlap : int
        Overlap between neighbouring tiles in output pixels (for blending).
    tissue : TissueMask, optional
        Keep only tiles whose tissue fraction is at least ``min_tissue``.
    min_tissue : float
        Minimum tissue fraction (0..1) of a kept tile; the part of a border tile
        outside the slide counts as background.

    Returns
    -------
    TileGrid
        Tiles in row-major order. Border tiles that only partly overlap the slide
        are kept; reading them pads with the slide's background colour.
    """
    tile_size = int(tile_size)
    overlap = int(overlap)
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap}")
    if mpp is not None and level is not None:
        raise ValueError("give either mpp or level, not both")
    slide_mpp = getattr(slide, "mpp", None)
    if mpp is not None:
        if not slide_mpp:
            raise SlideError(
                getattr(slide, "path", "slide"),
                "has no pixel size (µm/px) in its metadata, so a target mpp cannot be honoured.",
                "Choose a pyramid level instead (level=...).",
            )
        level = choose_level(slide, mpp)
        level_mpp = slide_mpp * slide.level_downsamples[level]
        read_size = max(1, int(round(tile_size * mpp / level_mpp)))
    else:
        level = 0 if level is None else int(level)
        if not 0 <= level < slide.level_count:
            raise ValueError(f"level {level} does not exist; the slide has {slide.level_count} levels")
        read_size = tile_size
    level_ds = float(slide.level_downsamples[level])
    scale = level_ds * read_size / tile_size
    h0, w0 = (int(v) for v in slide.level_shapes[0])

    out_h, out_w = math.ceil(h0 / scale - 1e-9), math.ceil(w0 / scale - 1e-9)
    stride = tile_size - overlap
    rows = math.ceil(max(out_h - tile_size, 0) / stride) + 1
    cols = math.ceil(max(out_w - tile_size, 0) / stride) + 1
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    index = np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)
    level_yx = np.rint(index * stride * (read_size / tile_size)).astype(np.int64)
    tiles = np.rint(level_yx * level_ds).astype(np.int64)

    fractions = None
    if tissue is not None:
        fractions = tissue.fractions(tiles[:, 0], tiles[:, 1], tile_size * scale, tile_size * scale)
        keep = fractions >= min_tissue
        tiles, index, fractions = tiles[keep], index[keep], fractions[keep]

    return TileGrid(
        tiles=tiles,
        tile_index=index,
        level=level,
        level_downsample=level_ds,
        read_size=read_size,
        tile_size=tile_size,
        overlap=overlap,
        scale=scale,
        mpp=slide_mpp * scale if slide_mpp else None,
        target_mpp=mpp,
        grid_shape=(rows, cols),
        level0_shape=(h0, w0),
        tissue_fraction=fractions,
        slide_path=str(getattr(slide, "path", "")) or None,
    )
