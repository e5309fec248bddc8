"""The pathologist's loop in a real viewer, driven by clicks: Segment → paint ONE stroke → Fine-tune → Segment again.

On the bundled slide (copied to a temporary folder), with a tiny random-init Path-SAM2 so the
whole loop takes seconds: the stroke's tile is saved in the per-user data folder (never beside the
slide), undo/redo update it, one corrected tile is enough to fine-tune (no validation split, only
the last checkpoint kept), the new model is selected and used by the next run, a new viewer on the
same slide gets the corrections back, and a fine-tune that fails says so once and leaves no folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytestqt")

from qtpy.QtCore import Qt

from napari_pathfm import userdata

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUNDLED_SLIDE = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_pathsam2):
    """A random-init toy Path-SAM2 segmentation checkpoint: 64 px tiles at 2 µm/px."""
    from napari_pathfm.widgets._gl_safety import keep_triton_out

    keep_triton_out()  # this process shows napari canvases: Triton must not load next to Mesa's GL (see _gl_safety)
    from napari_pathfm.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("pathsam2", num_classes=2, **tiny_pathsam2)
    card = {
        "family": "segment",
        "classes": ["background", "gland"],
        "num_classes": 2,
        "input_mpp": 2.0,
        "tile_size": 64,
    }
    return save_checkpoint(model, tmp_path / "models" / "toy-pathsam2", card)


@pytest.fixture
def slide_copy(tmp_path, monkeypatch):
    import napari_pathfm.checkpoints as ck

    monkeypatch.setattr(ck, "_EXTRA", [])  # fine-tunes register their folder; keep that out of later tests
    path = tmp_path / "archive" / BUNDLED_SLIDE.name
    path.parent.mkdir()
    shutil.copy(BUNDLED_SLIDE, path)
    return path


def _click(qtbot, widget, button, timeout=120_000):
    qtbot.mouseClick(button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=timeout)


def _segmented(make_napari_viewer, qtbot, slide, checkpoint):
    from napari_pathfm.widgets.segment_widget import SegmentWidget

    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-pathfm")
    widget = SegmentWidget(viewer)
    qtbot.addWidget(widget)
    widget.checkpoint.set_path(checkpoint)
    _click(qtbot, widget, widget.segment_btn)
    assert widget.runner.last_error is None, widget.status.text()
    assert widget.recorder is not None, widget.status.text()
    return viewer, widget


def _tile_box(widget):
    """A tissue tile of the correction grid (level-0 box y0, y1, x0, x1) and its grid index."""
    rec = widget.recorder
    rows, cols = rec.grid.grid_shape
    i = (rows // 2) * cols + cols // 2
    y, x = (int(v) for v in rec.grid.tiles[i])
    side = int(rec.grid.level0_size)
    return i, (y, y + side, x, x + side)


def _stroke(layer, label, y, x0, x1, brush=24):
    """One brush stroke through napari's own paint API (one undo step, one paint event)."""
    layer.brush_size = brush
    layer.selected_label = label
    with layer.block_history():
        for x in range(x0, x1, 8):
            layer.paint((y, x), label, refresh=False)


def _saved_mask(folder, name):
    from PIL import Image

    return np.asarray(Image.open(folder / "masks" / f"{name}.png"))


def test_one_stroke_finetune_rerun_reopen_and_undo(make_napari_viewer, qtbot, slide_copy, tiny_checkpoint):
    beside = sorted(p.name for p in slide_copy.parent.iterdir())
    _viewer, widget = _segmented(make_napari_viewer, qtbot, slide_copy, tiny_checkpoint)
    layer, rec = widget.labels_layer, widget.recorder
    i, (y0, y1, x0, x1) = _tile_box(widget)
    cy, cx, half = (y0 + y1) // 2, (x0 + x1) // 2, (y1 - y0) // 4
    region = np.asarray(layer.data[cy - 12 : cy + 13, cx - half : cx + half])
    label = 1 if (region == 1).mean() < 0.5 else 0  # paint the class the model did NOT predict there

    _stroke(layer, label, cy, cx - half, cx + half)
    qtbot.waitUntil(lambda: not rec.pending and bool(rec.saved), timeout=10_000)
    folder, name = widget.corrections_folder(), rec.tile_name(i)
    assert folder == userdata.corrections_dir(slide_copy)
    assert Path(os.environ["PATHFM_DATA_DIR"]) in folder.parents, "corrections live in the per-user data folder"
    assert list(rec.saved) == [name], "one short stroke inside one tile saves exactly that tile"
    assert _saved_mask(folder, name)[32, 32] == label

    # a second stroke erases part of the first; undo brings the first back in the saved tile, a second
    # undo leaves the tile as the model predicted it (no correction any more), redo saves it again
    _stroke(layer, 1 - label, cy, cx - 4, cx + half)
    qtbot.waitUntil(lambda: not rec.pending and _saved_mask(folder, name)[32, 40] == 1 - label, timeout=10_000)
    layer.undo()
    qtbot.waitUntil(lambda: not rec.pending and _saved_mask(folder, name)[32, 40] == label, timeout=10_000)
    layer.undo()
    qtbot.waitUntil(lambda: not rec.pending and name not in rec.saved, timeout=10_000)
    assert not (folder / "masks" / f"{name}.png").exists()
    assert name not in json.loads((folder / "corrections.json").read_text())["tiles"]
    layer.redo()
    qtbot.waitUntil(lambda: not rec.pending and name in rec.saved, timeout=10_000)
    saved = _saved_mask(folder, name).copy()
    assert saved[32, 32] == label

    # fine-tune on that ONE tile: no validation split, only the last checkpoint kept and exported
    widget.epochs.setValue(3)
    widget.lr.setValue(3e-3)
    _click(qtbot, widget, widget.finetune_btn)
    assert widget.runner.last_error is None, widget.status.text()
    new = Path(widget.checkpoint.path())
    assert new != Path(tiny_checkpoint) and userdata.finetune_dir(slide_copy) in new.parents
    run = new.parent
    assert (run / "last.ckpt").is_file() and not list(run.glob("best-*.ckpt"))
    card = json.loads((run / "model.json").read_text())
    assert card["metrics"]["monitor"] is None and card["epochs"] == 3
    assert "selected" in widget.status.text()

    # Segment again: the new model is the one used
    _click(qtbot, widget, widget.segment_btn)
    assert widget.runner.last_error is None, widget.status.text()
    assert Path(widget.result.checkpoint).resolve() == new.resolve()
    assert sorted(p.name for p in slide_copy.parent.iterdir()) == beside, "nothing new beside the slide"

    # a new viewer + dock on the same slide file: the saved correction is offered and restored
    _viewer2, widget2 = _segmented(make_napari_viewer, qtbot, slide_copy, new)
    assert widget2.corrections_folder() == folder and list(widget2.recorder.saved) == [name]
    assert widget2.restore_btn.isEnabled()
    _click(qtbot, widget2, widget2.restore_btn)
    assert widget2.runner.last_error is None, widget2.status.text()
    np.testing.assert_array_equal(widget2.recorder.mask_tile(i), saved)
    assert widget2.labels_layer.data[cy, cx] == label


def test_a_failing_finetune_says_so_once_and_leaves_no_folder(make_napari_viewer, qtbot, slide_copy, tiny_checkpoint):
    from napari.utils.notifications import notification_manager

    _viewer, widget = _segmented(make_napari_viewer, qtbot, slide_copy, tiny_checkpoint)
    _i, (y0, y1, x0, x1) = _tile_box(widget)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    before = np.asarray(widget.labels_layer.data[cy, cx])
    _stroke(widget.labels_layer, int(1 - before), cy, cx - 40, cx + 40)
    qtbot.waitUntil(lambda: not widget.recorder.pending and bool(widget.recorder.saved), timeout=10_000)
    corrections = sorted(p.relative_to(widget.corrections_folder()) for p in widget.corrections_folder().rglob("*"))

    Path(tiny_checkpoint).write_bytes(b"not safetensors")  # the weights go bad between Segment and Fine-tune
    n_notes = len(notification_manager.records)
    _click(qtbot, widget, widget.finetune_btn)
    assert widget.runner.last_error is not None
    status = widget.status.text()
    assert status.startswith("Failed:") and "toy-pathsam2" in status, status
    assert len(notification_manager.records) == n_notes, "the dock's status line is the one message (no toast)"
    runs = userdata.finetune_dir(slide_copy)
    assert not runs.exists() or not any(runs.iterdir()), "no half-made fine-tune folder is left"
    assert (
        sorted(p.relative_to(widget.corrections_folder()) for p in widget.corrections_folder().rglob("*"))
        == corrections
    )
    assert widget.checkpoint.path() == str(tiny_checkpoint)
    assert widget.log_btn.isEnabled()
    dialog = widget.show_log()
    assert dialog.text.isReadOnly() and "toy-pathsam2" in dialog.text.toPlainText()
