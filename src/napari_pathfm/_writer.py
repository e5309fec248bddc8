"""napari writer contributions: Labels → OME-TIFF, QuPath GeoJSON or ASAP XML; Images → pyramidal OME-TIFF.

Layers made by napari-pathfm carry ``metadata["downsample"]`` (level-0 px per layer px)
and are scaled in µm, so GeoJSON comes out in level-0 pixel coordinates of the slide,
as QuPath expects, and OME-TIFFs keep their physical pixel size. GeoJSON classes keep the colours
the layer shows in napari (QuPath's ``classification.color``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _geometry(attributes: dict) -> tuple[float, float | None, tuple[float, float]]:
    """(downsample, µm/px of the layer or None, level-0 offset) from napari layer attributes."""
    meta = attributes.get("metadata") or {}
    ds = float(meta.get("downsample", 1.0))
    scale = tuple(attributes.get("scale") or (1.0, 1.0))[-2:]
    translate = tuple(attributes.get("translate") or (0.0, 0.0))[-2:]
    units = [str(u) for u in (attributes.get("units") or ())]
    in_um = any(u in {"micrometer", "µm", "um"} for u in units) or "downsample" in meta or scale[-1] != 1.0
    mpp = float(scale[-1]) if in_um else None
    unit = float(scale[-1]) / ds
    offset = (translate[0] / unit - (ds - 1) / 2, translate[1] / unit - (ds - 1) / 2)
    return ds, mpp, offset


def _level0(data: Any):
    return data[0] if isinstance(data, (list, tuple)) else data


def _layer_colors(attributes: dict, values: list[int]) -> dict[int, tuple[int, int, int]]:
    """``{value: (r, g, b)}`` the layer's own colormap shows for ``values`` (transparent ones left out).

    So a GeoJSON written from a Labels layer carries the colours seen in napari, also when the
    user changed them; napari-pathfm's layers use :func:`napari_pathfm.widgets._colormaps.label_colormap`.
    """
    import numpy as np

    mapper = getattr(attributes.get("colormap"), "map", None)
    if mapper is None or not values:
        return {}
    try:
        rgba = np.asarray(mapper(np.asarray(values, dtype=np.int64)), dtype=float).reshape(len(values), -1)
    except (TypeError, ValueError):
        return {}
    return {
        v: tuple(int(round(c * 255)) for c in row[:3]) for v, row in zip(values, rgba) if row.size < 4 or row[3] > 0
    }


def write_labels(path: str, data: Any, attributes: dict) -> list[str]:
    """Save a Labels layer as ``.ome.tif`` (pyramidal, class names kept), ``.geojson`` (QuPath) or ``.xml`` (ASAP)."""
    import numpy as np

    from .io.geojson import write_geojson
    from .io.ome_tiff import write_ome_tiff

    labels = np.asarray(_level0(data))
    meta = attributes.get("metadata") or {}
    classes = meta.get("classes") or {int(v): f"class {int(v)}" for v in np.unique(labels) if v}
    classes = {int(k): str(v) for k, v in classes.items()}
    ds, mpp, offset = _geometry(attributes)
    if path.lower().endswith((".geojson", ".xml")):
        from .colors import class_colors
        from .io.annotations import UNCLASSIFIED, write_asap_xml

        fg = {k: v for k, v in classes.items() if k != 0}
        colors = {**class_colors(classes, meta.get("class_colors")), **_layer_colors(attributes, sorted(fg))}
        if path.lower().endswith(".xml"):
            return [str(write_asap_xml(path, labels, fg, downsample=ds, offset=offset, colors=colors))]
        # an object layer (annotations read from a file, segmentation objects): one feature per object
        objects = meta.get("pathfm_kind") in {"annotations", "segment_objects"}
        extra = {"per_value": True, "unclassified": UNCLASSIFIED} if objects else {}
        return [str(write_geojson(path, labels, fg, downsample=ds, offset=offset, colors=colors, **extra))]
    return [
        str(write_ome_tiff(path, labels, mpp=mpp, is_labels=True, class_names=classes, metadata={"downsample": ds}))
    ]


def write_image(path: str, data: Any, attributes: dict) -> list[str]:
    """Save an Image layer (grey, RGB or heatmap) as a pyramidal OME-TIFF with its µm/px."""
    from .io.ome_tiff import write_ome_tiff

    level0 = _level0(data)
    _, mpp, _ = _geometry(attributes)
    axes = "YXS" if attributes.get("rgb") else "YX"
    if len(level0.shape) > len(axes):
        raise ValueError(f"{Path(path).name}: only 2-D grey or RGB layers can be saved as OME-TIFF by napari-pathfm")
    return [str(write_ome_tiff(path, level0, mpp=mpp, axes=axes, metadata={"name": attributes.get("name")}))]
