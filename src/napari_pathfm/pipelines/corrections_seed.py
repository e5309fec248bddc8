"""Imported annotations (QuPath GeoJSON / ASAP XML) as corrections of a segmentation.

A pathologist who has outlined glands or tumour in QuPath should not have to paint them again:
:func:`seed_corrections` draws each annotated object's class into the class map a
:class:`~napari_pathfm.pipelines.corrections.CorrectionRecorder` watches (exclusions as
background) and saves every model tile the objects touch as a corrected tile, exactly as painted
strokes are saved, so the Segment dock's *Fine-tune* trains on them. Holes (a gland's lumen) are drawn
as background. Classes are matched to the
model's by name (:func:`napari_pathfm.io.annotations.class_index`); a class the model does not have
is refused before anything is drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..io.annotations import AnnotationSet, class_index
from ..io.geojson import _fill

__all__ = ["seed_corrections"]


def seed_corrections(recorder: Any, annotations: AnnotationSet) -> list[str]:
    """Draw ``annotations`` into ``recorder.labels`` and save the tiles they touch; the tile names saved.

    Coordinates are the slide's level-0 pixels; the class map is at ``recorder.labels_downsample``.

    Raises
    ------
    PathFMError
        An object's class is not one of the model's (nothing is drawn then).
    """
    values = [
        0 if a.exclude else class_index(a.name, recorder.classes, annotations.source, "the model's classes")
        for a in annotations.items
    ]
    labels, d = recorder.labels, float(recorder.labels_downsample)
    touched: set[int] = set()
    for a, value in zip(annotations.items, values):
        for poly in a.polygons:
            rings = [np.asarray(r, np.float64) / d for r in poly]
            outline = _fill(rings[:1], tuple(labels.shape[-2:]))
            if outline is None:
                continue
            rs, cs, inside = outline
            window = np.asarray(labels[rs, cs])
            if len(rings) > 1:  # a hole (a gland's lumen) is not the object: background
                window[inside] = 0
                _, _, inside = _fill(rings, tuple(labels.shape[-2:]))
            window[inside] = value
            labels[rs, cs] = window
            touched.update(recorder.tiles_in_box(rs.start, rs.stop, cs.start, cs.stop))
    return recorder.save_tiles(touched)
