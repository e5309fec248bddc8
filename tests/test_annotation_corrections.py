"""QuPath annotations seed corrections in the Segment dock: open slide → segment → open a QuPath export →
*From annotations* → the annotated objects are in the mask and their tiles are saved as corrections."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("napari")

from test_segment_widget import _wait, tiny_checkpoint  # noqa: F401 - the toy model fixture

pytestmark = pytest.mark.gui


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_qupath_annotations_become_corrections(make_napari_viewer, qtbot, cmu_small, tiny_checkpoint, tmp_path):  # noqa: F811
    from napari_pathfm.widgets.segment_widget import SegmentWidget

    slide_path = tmp_path / "slides" / cmu_small.name
    slide_path.parent.mkdir()
    shutil.copy(cmu_small, slide_path)
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-pathfm")
    widget = SegmentWidget(viewer)
    widget.checkpoint.set_path(tiny_checkpoint)
    assert widget.corrections_from_annotations() is None and "first" in widget.status.text()
    _wait(qtbot, widget) if widget.run() is not None else pytest.fail(widget.status.text())

    # a QuPath export kept elsewhere: a gland with a lumen (hole) and an unclassified region
    gland = {"type": "Polygon", "coordinates": [_square(700, 1200, 1100, 1600), _square(850, 1350, 950, 1450)]}
    other = {"type": "Polygon", "coordinates": [_square(200, 300, 400, 500)]}
    features = [
        {"type": "Feature", "geometry": gland, "properties": {"classification": {"name": "Gland", "color": [9, 9, 9]}}},
        {"type": "Feature", "geometry": other, "properties": {"classification": {"name": "Background"}}},
    ]
    path = tmp_path / "qupath" / "export.geojson"
    path.parent.mkdir()
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    viewer.open(str(path), plugin="napari-pathfm")

    worker = widget.corrections_from_annotations()
    assert worker is not None, widget.status.text()
    _wait(qtbot, widget)
    mask = np.asarray(widget.labels_layer.data)
    assert (mask[1210:1590, 710:840] == 1).all(), "the gland is class 1 in the mask"
    assert (mask[1360:1440, 860:940] == 0).all(), "its lumen (a hole) is background"
    assert (mask[310:490, 210:390] == 0).all(), "the class 'Background' is class 0"
    folder = widget.corrections_folder()
    saved = sorted(p.name for p in (folder / "masks").glob("*.png"))
    assert saved and "tiles under the annotations saved" in widget.status.text()
    manifest = json.loads((folder / "corrections.json").read_text())
    assert set(manifest["tiles"]) >= {s[:-4] for s in saved}
