"""Readers and writers: whole slides, z-stacks, OME-TIFF/OME-Zarr results, GeoJSON.

Names are resolved lazily so that ``import napari_pathfm.io`` stays cheap.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "open_slide": "slide",
    "Slide": "slide",
    "SlideSignature": "slide",
    "SLIDE_SUFFIXES": "slide",
    "open_zstack": "zstack",
    "ZStack": "zstack",
    "write_ome_tiff": "ome_tiff",
    "read_ome_tiff": "ome_tiff",
    "write_ome_zarr": "ome_zarr",
    "labels_to_geojson": "geojson",
    "write_geojson": "geojson",
    "geojson_to_labels": "geojson",
    "atomic_path": "atomic",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
