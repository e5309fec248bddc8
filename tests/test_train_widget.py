"""The "Train a model" panel in a real viewer: a real ``pathfm train`` subprocess on the Kather 2016 tiles.

One run is stopped gracefully after its first epoch (last.ckpt written, weights exported) and
resumed to the end; a broken override ends in the crashed state with the run's error shown.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_pathfm.training.recipes import schema

RECIPE = Path(__file__).resolve().parents[1] / "training" / "classify" / "crc_tiny.yaml"


@pytest.fixture
def panel(make_napari_viewer, shared_data, tmp_path, monkeypatch):
    if not (shared_data / "crc-tiles" / "kather2016").is_dir():
        pytest.skip(f"Kather 2016 tiles not found under {shared_data}/crc-tiles (see ../shared/data/README)")
    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    monkeypatch.setenv("PATHFM_MODELS", str(tmp_path / "no-user-models"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from napari_pathfm.widgets.train_widget import TrainWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-pathfm", "Train a model")  # through the manifest
    assert isinstance(widget, TrainWidget)
    widget.set_recipe(RECIPE)
    widget.out.setText(str(tmp_path / "run"))
    return widget


def test_form_follows_recipe_and_schema(panel):
    assert panel.family.currentText() == "classify"
    assert "classify/crc_tiny.yaml" in [panel.recipe.itemText(i) for i in range(panel.recipe.count())]
    editors = panel.form.editors
    assert panel.form.value("trainer.max_epochs") == 3 and panel.form.value("data.augment") is True
    assert editors["optim.lr"][0].toolTip() == schema("classify")["optim.lr"]["help"]
    assert "model.name" not in editors and "family" not in editors
    root = editors["data.root"][0]  # a path key: its row has a browse button next to the text
    assert any(b.text() == "…" for b in root.parentWidget().findChildren(type(panel.start_btn)))
    assert panel.form.overrides() == []
    panel.form.set_value("optim.lr", "0.01")
    panel.form.set_value("data.augment", False)
    assert sorted(panel.form.overrides()) == ["data.augment=false", "optim.lr=0.01"]


def test_crash_is_reported_and_panel_recovers(panel, qtbot):
    panel.extra.setText("trainer.no_such_key=1")
    panel.start()
    assert panel.state.value == "training" and not panel.start_btn.isEnabled()
    qtbot.waitUntil(lambda: panel.state.value == "crashed", timeout=60_000)
    assert "no_such_key" in panel.status.text() and "exit code 2" in panel.status.text()
    assert panel.start_btn.isEnabled() and not panel.stop_btn.isEnabled()

    # a run that does not stop in time is killed by the second press; the panel recovers again
    panel.extra.setText("")
    panel.start()
    qtbot.wait(1500)
    panel.stop()
    panel.stop()
    qtbot.waitUntil(lambda: panel.state.value == "crashed", timeout=30_000)
    assert "training killed" in panel.status.text() and panel.start_btn.isEnabled()


def test_stop_resume_and_new_checkpoint_listed(panel, qtbot, tmp_path):
    from napari_pathfm.widgets._checkpoint_picker import CheckpointPicker

    picker = CheckpointPicker("classify")
    out = tmp_path / "run"
    assert not any(str(out) in (picker.combo.itemData(i) or "") for i in range(picker.combo.count()))

    panel.form.set_value("trainer.max_epochs", 50)
    panel.start()
    qtbot.waitUntil(lambda: any(e.get("event") == "epoch" for e in panel.events), timeout=90_000)
    panel.stop()
    assert panel.state.value == "stopping" and panel.stop_btn.text() == "Kill"
    qtbot.waitUntil(lambda: panel.state.value in ("done", "crashed"), timeout=60_000)
    assert panel.state.value == "done", panel.status.text()
    assert panel.summary["cancelled"] is True and "stopped" in panel.status.text()
    assert (out / "last.ckpt").is_file() and (out / "model.safetensors").is_file()
    stopped_at = next(e for e in panel.events if e["event"] == "done")["epoch"]
    assert stopped_at < 50 and panel.resume_btn.isEnabled()

    # resume to one more epoch than the stop reached: the engine continues from last.ckpt
    panel.form.set_value("trainer.max_epochs", stopped_at + 1)
    panel.resume_btn.click()
    qtbot.waitUntil(lambda: panel.state.value in ("done", "crashed"), timeout=90_000)
    assert panel.state.value == "done", panel.status.text()
    epochs = [e["epoch"] for e in panel.events if e["event"] == "epoch"]
    assert epochs == [stopped_at], epochs  # only the remaining epoch ran
    assert panel.summary["cancelled"] is False and "finished" in panel.status.text()
    assert panel.epoch_bar.value() == panel.epoch_bar.maximum() == stopped_at + 1
    assert panel.batch_bar.value() == panel.batch_bar.maximum() > 0
    assert len(panel.curves["loss"]) >= 1 and "val_loss" in panel.curves
    assert panel.axes.lines and len(panel.axes.lines[0].get_xdata()) >= 1

    listed = [picker.combo.itemData(i) for i in range(picker.combo.count())]
    assert str((out / "model.safetensors").resolve()) in listed, listed


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import napari_pathfm.widgets.train_widget, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_corrections_from_the_viewer_join_extra_dirs(panel, tmp_path):
    import numpy as np
    from PIL import Image

    slide = tmp_path / "biopsy.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(slide)
    panel.set_recipe(RECIPE.parents[1] / "pathsam2" / "glas_tiny.yaml")
    assert panel.family.currentText() == "segment" and not panel.viewer_data.isHidden()
    assert panel.add_viewer_corrections() == []  # nothing open yet: said so, nothing changed
    assert "No corrections" in panel.status.text() and panel.form.overrides() == []

    panel.viewer.open(str(slide))
    folder = tmp_path / "biopsy.pathfm-corrections"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    assert panel.add_viewer_corrections() == [folder.resolve()]
    assert panel.add_viewer_corrections() == []  # already listed
    assert panel.form.overrides() == [f"data.extra_dirs=[{folder.resolve()}]"]
    assert ["--set", f"data.extra_dirs=[{folder.resolve()}]"] == panel.command(False)[4:6]


def test_open_zstack_becomes_the_translate_data(panel, shared_data):
    stack = shared_data / "isl-blue-sample"
    if not stack.is_dir():
        pytest.skip(f"ISL z-stack not found at {stack} (see ../shared/data/README)")
    panel.set_recipe(RECIPE.parents[1] / "translate" / "tiny_lupi.yaml")
    assert panel.viewer_data.text() == "Use the open z-stacks" and not panel.viewer_data.isHidden()
    assert panel.add_viewer_data() == [] and "No z-stack" in panel.status.text()
    panel.viewer.open(str(stack), plugin="napari-pathfm")
    assert len(panel.viewer.layers) > 1  # the stack and its target layers
    assert panel.add_viewer_data() == [stack]
    assert panel.form.overrides() == [f"data.stacks=[{stack}]"]
