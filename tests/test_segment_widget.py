"""The Segment widget end to end in a real viewer: segment → paint → corrections saved → fine-tune → re-run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

MPP = 2.0


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_pathsam2):
    """A random-init toy Path-SAM2 saved as a segmentation checkpoint (64 px tiles at 2 µm/px)."""
    from napari_pathfm.widgets._gl_safety import keep_triton_out

    keep_triton_out()  # this process shows napari canvases: Triton must not load next to Mesa's GL (see _gl_safety)
    from napari_pathfm.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("pathsam2", num_classes=2, **tiny_pathsam2)
    card = {
        "family": "segment",
        "classes": ["background", "gland"],
        "num_classes": 2,
        "input_mpp": MPP,
        "tile_size": 64,
    }
    return save_checkpoint(model, tmp_path / "models" / "toy-pathsam2", card)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _wait(qtbot, widget, timeout=240_000):
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=timeout)
    assert widget.runner.last_error is None, widget.runner.last_error


def test_segment_paint_finetune_rerun(make_napari_viewer, qtbot, cmu_small, tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    import napari_pathfm.checkpoints as ck

    monkeypatch.setattr(ck, "_EXTRA", [])  # the fine-tune registers its run folder; keep that out of later tests
    from napari_pathfm.widgets.segment_widget import SegmentWidget

    slide_path = tmp_path / "slides" / cmu_small.name
    slide_path.parent.mkdir()
    shutil.copy(cmu_small, slide_path)
    viewer = make_napari_viewer()
    viewer.open(str(slide_path), plugin="napari-pathfm")
    widget = SegmentWidget(viewer)
    widget.checkpoint.set_path(tiny_checkpoint)
    before_sha = _sha(tiny_checkpoint)

    _wait(qtbot, widget) if widget.run() is not None else pytest.fail(widget.status.text())
    layer = widget.labels_layer
    slide_layer = viewer.layers[0]
    assert layer.data.shape == slide_layer.data[0].shape[:2], "the mask has the slide's level-0 size"
    np.testing.assert_allclose(layer.scale, slide_layer.scale)
    assert list(layer.features["class"]) == ["background", "gland"]
    first = np.asarray(layer.data).copy()

    # the legend names the classes in the mask's colours, and the GeoJSON saved from the layer has the same colours
    (entry,) = widget.legend.entries
    assert entry["kind"] == "classes" and [name for name, _ in entry["classes"]] == ["gland"]
    out = tmp_path / "mask.geojson"
    layer.save(str(out), plugin="napari-pathfm")
    for feature in json.loads(out.read_text())["features"]:
        cls = feature["properties"]["classification"]
        assert cls["name"] == "gland" and tuple(cls["color"]) == tuple(entry["classes"][0][1])

    # paint a block of tissue as "gland" (class 1) with napari's brush, as a user would
    box = (slice(1200, 1700), slice(700, 1200))
    layer.brush_size = 60
    layer.selected_label = 1
    with layer.block_history():  # one stroke
        for y in range(box[0].start, box[0].stop, 40):
            for x in range(box[1].start, box[1].stop, 40):
                layer.paint((y, x), 1, refresh=False)
    qtbot.waitUntil(lambda: widget.recorder is not None and not widget.recorder.pending and bool(widget.recorder.saved))
    folder = widget.corrections_folder()
    from napari_pathfm import userdata

    assert folder == userdata.corrections_dir(slide_path), "corrections live in the per-user data folder"
    assert sorted(p.name for p in slide_path.parent.iterdir()) == [slide_path.name], "nothing beside the slide"
    saved = sorted(p.name for p in (folder / "masks").glob("*.png"))
    assert saved and sorted(p.name for p in (folder / "images").glob("*.png")) == saved

    widget.epochs.setValue(12)
    widget.lr.setValue(3e-3)
    _wait(qtbot, widget) if widget.finetune() is not None else pytest.fail(widget.status.text())
    new = widget.checkpoint.path()
    assert new and new != str(tiny_checkpoint) and userdata.finetune_dir(slide_path) in Path(new).parents
    assert list(Path(new).parent.glob("best-*.ckpt")), (
        "several corrected tiles: a validation split picks the best epoch"
    )
    assert json.loads(Path(new).with_suffix(".json").read_text())["metrics"]["monitor"]
    assert _sha(tiny_checkpoint) == before_sha, "the old checkpoint is never overwritten"

    _wait(qtbot, widget) if widget.run() is not None else pytest.fail(widget.status.text())
    second = np.asarray(widget.labels_layer.data)
    inside_before = float((first[box] == 1).mean())
    inside_after = float((second[box] == 1).mean())
    assert inside_after > inside_before + 0.3, (inside_before, inside_after)


def test_segment_dock_shows_one_object_per_gland(make_napari_viewer, qtbot, cmu_small, tmp_path):
    """A model whose card names object settings: the class layer's regions are the objects, and a hidden
    '<slide> objects' layer holds one id per object, named by class in its features; a re-run without
    objects removes that layer."""
    from scipy import ndimage

    from napari_pathfm.models import save_checkpoint
    from napari_pathfm.models.checkpoint import load_checkpoint
    from napari_pathfm.pipelines.segment_model import default_segment_checkpoint
    from napari_pathfm.widgets._gl_safety import keep_triton_out
    from napari_pathfm.widgets.segment_widget import SegmentWidget

    keep_triton_out()
    model, card = load_checkpoint(default_segment_checkpoint())
    card = {k: v for k, v in card.items() if k not in ("sha256", "weights_file", "created")}
    objects = save_checkpoint(model, tmp_path / "with-objects", {**card, "objects": {"split_um": 35}})
    plain = save_checkpoint(model, tmp_path / "without", {k: v for k, v in card.items() if k != "objects"})
    viewer = make_napari_viewer()
    viewer.open(str(cmu_small), plugin="napari-pathfm")
    widget = SegmentWidget(viewer)
    widget.checkpoint.set_path(objects)
    _wait(qtbot, widget) if widget.run() is not None else pytest.fail(widget.status.text())
    name = f"{viewer.layers[0].name} objects"
    layer = viewer.layers[name]
    n = int(layer.data.max())
    assert n > 0 and not layer.visible and "objects" in widget.status.text()
    assert list(layer.features["class"])[1:] == ["gland"] * n
    np.testing.assert_allclose(layer.scale, widget.labels_layer.scale)
    regions = ndimage.label(np.asarray(widget.labels_layer.data) > 0, structure=np.ones((3, 3)))[1]
    assert regions == n, "every region of the class layer is one object"
    widget.checkpoint.set_path(plain)
    _wait(qtbot, widget) if widget.run() is not None else pytest.fail(widget.status.text())
    assert name not in viewer.layers
