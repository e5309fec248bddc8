"""The Segment dock's prompt row, used as a user would: a GlaS image (as an OME-TIFF at 0.62 µm/px) opened in
napari, Prompt pressed, a click on a gland, a negative click, a box, undo, and the prompted
objects turned into corrections for Fine-tune."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_prompt_slide import _box, _gland_click

GLAS_MPP = 0.62


def _wait(qtbot, row):
    qtbot.waitUntil(lambda: not row.runner.running and not row.queue, timeout=120_000)
    assert row.runner.last_error is None, row.runner.last_error


def test_click_negative_box_undo_and_corrections(make_napari_viewer, qtbot, shared_data, tmp_path, monkeypatch):
    from PIL import Image

    from napari_pathfm.widgets._gl_safety import keep_triton_out

    keep_triton_out()
    from napari_pathfm.widgets.segment_widget import SegmentWidget

    root = shared_data / "glas" / "train"
    if not root.is_dir():
        pytest.skip("GlaS not found")
    monkeypatch.setenv("PATHFM_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("PATHFM_CACHE_DIR", str(tmp_path / "cache"))
    from napari_pathfm.io.ome_tiff import write_ome_tiff

    image = tmp_path / "slides" / "train_3.ome.tif"  # the GlaS image as a slide file that records its µm/px
    image.parent.mkdir()
    write_ome_tiff(
        image, np.asarray(Image.open(root / "images" / "train_3.png").convert("RGB")), axes="YXS", mpp=GLAS_MPP
    )
    mask = np.asarray(Image.open(root / "masks" / "train_3.png")) > 0
    x, y, gland = _gland_click(mask)

    viewer = make_napari_viewer()
    viewer.open(str(image), plugin="napari-pathfm")
    dock = SegmentWidget(viewer)
    row = dock.prompts
    row.button.click()
    assert row.button.isChecked(), dock.status.text()
    qtbot.waitUntil(lambda: viewer.layers.selection.active is row.points and row.points.mode == "add")
    np.testing.assert_allclose(row.objects.scale, viewer.layers[0].scale)

    row.points.add([y, x])  # a click in add mode
    _wait(qtbot, row)
    objects = row.objects
    first = np.asarray(objects.data) == 1
    assert first.any(), dock.status.text()
    iou = (first & gland).sum() / (first | gland).sum()
    assert iou > 0.25 and (first & gland).sum() > 0.5 * first.sum(), f"the clicked gland (IoU {iou:.2f})"
    assert objects.metadata["classes"][1] == "gland" and objects.metadata["pathfm_kind"] == "annotations"

    # a negative click inside the object but away from the click refines object 1, no new label
    ys, xs = np.nonzero(first)
    far = int(np.argmax((ys - y) ** 2 + (xs - x) ** 2))
    row.negative.setChecked(True)
    row.points.add([ys[far], xs[far]])
    _wait(qtbot, row)
    refined = np.asarray(objects.data) == 1
    assert set(np.unique(objects.data)) <= {0, 1}
    assert not refined[ys[far], xs[far]] or refined.sum() != first.sum(), "the negative click changed object 1"
    row.negative.setChecked(False)

    # a box elsewhere is object 2, drawn only where nothing is yet
    others = np.nonzero((mask > 0) & ~gland)
    if len(others[0]):
        from scipy import ndimage

        parts, _ = ndimage.label((mask > 0) & ~gland)
        second = parts == parts[others[0][0], others[1][0]]
        x0, y0, x1, y1 = _box(second)
        row.boxes.add_rectangles(np.array([[y0, x0], [y1, x1]]))
        _wait(qtbot, row)
        assert (np.asarray(objects.data) == 2).any(), dock.status.text()
        objects.undo()  # Ctrl-Z takes the last object back
        assert not (np.asarray(objects.data) == 2).any()

    # the prompted objects become corrections for Fine-tune through From annotations
    dock.checkpoint.set_path(dock.checkpoint.path())
    assert dock.run() is not None, dock.status.text()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=240_000)
    assert dock.runner.last_error is None and dock.recorder is not None, dock.status.text()
    assert dock.corrections_from_annotations() is not None, dock.status.text()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=120_000)
    assert dock.runner.last_error is None, dock.status.text()
    assert dock.recorder.saved, "the tiles under the prompted object are saved as corrections"
    assert "saved as corrections" in dock.status.text()
    row.button.click()
    assert row.points is None
    row.button.click()  # on again: the objects stay, new prompts take the next free label
    qtbot.waitUntil(lambda: viewer.layers.selection.active is row.points)
    assert row.objects is objects and row.next_id == max(objects.metadata["classes"]) + 1
    row.points.add([y, x])
    _wait(qtbot, row)
    drawn = (np.asarray(objects.data) == row.next_id - 1).any()
    assert drawn or "already labelled" in dock.status.text() or "no object" in dock.status.text()
    assert (np.asarray(objects.data) == 1).sum() > 0, "the earlier object is kept"
