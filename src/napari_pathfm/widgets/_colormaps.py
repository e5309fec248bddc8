"""napari colormap objects built from :mod:`napari_pathfm.colors`, for the docks' layers.

``colors`` holds the class palette and the continuous overlays' control points as plain data,
shared with the exports (GeoJSON, OME-Zarr) that must not import napari; the napari objects
made from them live here, beside the only code that shows them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..colors import CONTINUOUS, class_colors, normalize_class_names

__all__ = ["heatmap_look", "label_colormap", "napari_colormap"]


def label_colormap(class_names: Mapping[int, str] | Sequence[str] | None, pinned=None, opacity: float = 1.0):
    """napari ``DirectLabelColormap`` with :func:`~napari_pathfm.colors.class_colors`; background, unknown values clear."""
    from napari.utils.colormaps import DirectLabelColormap

    clear = np.zeros(4, np.float32)
    color_dict = {None: clear, 0: clear}
    names = normalize_class_names(class_names)
    for value in names:
        color_dict.setdefault(value, clear)
    for value, rgb in class_colors(names, pinned).items():
        color_dict[value] = np.array([*(c / 255.0 for c in rgb), opacity], np.float32)
    return DirectLabelColormap(color_dict=color_dict)


def napari_colormap(kind: str):
    """napari ``Colormap`` of a continuous overlay kind (``probability``, ``gradcam``, ``attention``)."""
    from napari.utils.colormaps import Colormap

    colors, controls = CONTINUOUS[kind]
    return Colormap(colors, controls=controls, name=f"pathfm-{kind}")


def heatmap_look(mpp: float | None, cell: float, limits) -> dict:
    """napari ``add_image`` arguments of a MIL patch heatmap over a slide: one pixel per patch of
    ``cell`` level-0 pixels, the attention colormap, ``limits`` as contrast (the MIL dock and its review)."""
    from ..coords import layer_transform, layer_units

    scale, translate = layer_transform(mpp, cell)
    return {
        "scale": scale,
        "translate": translate,
        "units": layer_units(mpp),
        "opacity": 0.6,
        "blending": "translucent",
        "interpolation2d": "nearest",
        "colormap": napari_colormap("attention"),
        "contrast_limits": tuple(limits),
    }
