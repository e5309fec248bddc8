"""The Segment dock's *From annotations* button: opened QuPath/ASAP annotations become corrections.

The annotation layers the reader opened on the slide (``metadata["pathfm_kind"] == "annotations"``),
as the user may have edited them, are traced back to level-0 objects
(:func:`napari_pathfm.io.annotations.labels_to_annotations`) and drawn into the segmentation by class
name, every tile they touch saved as a corrected tile
(:func:`napari_pathfm.pipelines.corrections_seed.seed_corrections`), all in the dock's worker; the
dock's *Fine-tune* then trains on them like on painted strokes.
"""

from __future__ import annotations

import numpy as np


def start_corrections_from_annotations(dock):
    """Start the job on ``dock`` (a SegmentWidget); returns the worker, or None with the reason in the status."""
    from .._writer import _geometry
    from ..io.annotations import labels_to_annotations
    from ..pipelines.corrections_seed import seed_corrections

    recorder, mask = dock.recorder, dock.labels_layer
    found = [la for la in dock.viewer.layers if (la.metadata or {}).get("pathfm_kind") == "annotations"]
    if recorder is None or mask is None or not found:
        need = "Segment the slide with 'Record corrections' on" if recorder is None else "Open a QuPath/ASAP file"
        dock.status.setText(f"{need} first: annotations become corrections of a segmentation being recorded.")
        return None
    # copies taken on the GUI thread: the worker never reads a layer the user may be editing
    shapes = [(np.array(la.data), dict(la.metadata["classes"]), la.as_layer_data_tuple()[1]) for la in found]

    def job(progress, cancel):
        saved = []
        for data, classes, attrs in shapes:
            ds, _mpp, offset = _geometry(attrs)
            saved += seed_corrections(recorder, labels_to_annotations(data, classes, downsample=ds, offset=offset))
        return saved

    def done(names) -> None:
        mask.refresh()
        dock.status.setText(f"{len(names)} tiles under the annotations saved as corrections in {recorder.folder}.")

    return dock.start_task(job, description="Corrections from annotations", on_done=done)
