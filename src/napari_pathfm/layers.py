"""Pure helpers that turn pipeline results and slide metadata into what napari layers need.

The docks (:mod:`napari_pathfm.widgets`) only arrange widgets; the little maths and table
building they need lives here, free of Qt, so it can run in a worker and be tested alone:
class-name feature tables, the µm/px a user entered for a slide, tile and patch boxes,
and MIL heatmaps with robust contrast limits.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

__all__ = [
    "HEAT_PERCENTILES", "class_features", "class_heatmaps", "entered_mpp", "nearest_first",
    "patch_box",
    "tile_boxes", "visible_box",
]  # fmt: skip

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


def entered_mpp(layer) -> Optional[float]:
    """The µm/px the user entered in the Slide dock for a slide layer without one in its file, else None."""
    meta = getattr(layer, "metadata", None) or {}
    if meta.get("pathfm_mpp_source") != "entered":
        return None
    mpp = (meta.get("pathfm_slide") or {}).get("mpp")
    return float(mpp) if mpp else None


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


def patch_box(y: int, x: int, cell: int) -> np.ndarray:
    """Level-0 pixel corners ``[[y0, x0], [y1, x1]]`` of the ``cell``-px patch at level-0 ``(y, x)`` (pixel edges)."""
    return np.array([[y - 0.5, x - 0.5], [y + cell - 0.5, x + cell - 0.5]], float)


def visible_box(center_yx, zoom: float, canvas_size, unit: float) -> tuple[float, float, float, float]:
    """Level-0 ``(y0, x0, y1, x1)`` (continuous, pixel edges at integers) a canvas shows.

    ``center_yx`` and ``zoom`` are the camera's (world units per ``unit`` µm or px), ``canvas_size``
    the canvas's ``(height, width)`` in screen pixels.
    """
    half = np.asarray(canvas_size, float) / (2.0 * max(float(zoom), 1e-12))
    cy, cx = (float(v) for v in center_yx[-2:])
    unit = unit or 1.0
    return ((cy - half[0]) / unit + 0.5, (cx - half[1]) / unit + 0.5,
            (cy + half[0]) / unit + 0.5, (cx + half[1]) / unit + 0.5)  # fmt: skip


def nearest_first(indices, tiles, cell: float, box) -> np.ndarray:
    """``indices`` of tiles (level-0 corners ``tiles``, side ``cell``) ordered by distance from ``box``'s centre.

    Chebyshev distance of each tile centre; a stable sort keeps grid order among ties.
    """
    indices = np.asarray(indices)
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    dist = np.abs(np.asarray(tiles)[indices] + cell / 2 - centre).max(axis=1)
    return indices[np.argsort(dist, kind="stable")]


def class_heatmaps(pred) -> list[tuple[np.ndarray, tuple[float, float]]]:
    """Per class of a MIL prediction: the heatmap grid ready to show and its robust contrast limits.

    Cells without a patch (NaN) get a value below every score, so they stay transparent
    under the colormap's transparent low end whatever limits the user picks later.
    """
    from .colors import robust_limits
    from .pipelines.mil import heatmap_grid

    out = []
    for cls in range(len(pred.classes)):
        grid, _cell = heatmap_grid(pred, cls)
        lo, hi = robust_limits(grid, *HEAT_PERCENTILES)
        finite = grid[np.isfinite(grid)]
        floor = (float(finite.min()) if finite.size else lo) - (hi - lo)
        out.append((np.nan_to_num(grid, nan=floor).astype(np.float32), (lo, hi)))
    return out
