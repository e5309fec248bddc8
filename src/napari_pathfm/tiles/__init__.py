"""Tissue masks, tile grids, the streaming tile loader and overlap blending.

Everything a slide-scale pipeline needs between a :class:`~napari_pathfm.io.Slide`
and a model, with no torch dependency. Names are resolved lazily so importing
``napari_pathfm.tiles`` stays cheap.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "TissueMask": "tissue",
    "tissue_mask": "tissue",
    "rgb_tissue_mask": "tissue",
    "TileGrid": "grid",
    "tile_grid": "grid",
    "choose_level": "grid",
    "Tile": "loader",
    "TileBatch": "loader",
    "read_tile": "loader",
    "resize_tile": "loader",
    "iter_tiles": "loader",
    "iter_tile_batches": "loader",
    "TileBlender": "blend",
    "pyramidal_weights": "blend",
    "gaussian_weights": "blend",
    "BandedCanvas": "canvas",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
