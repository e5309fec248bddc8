"""The "Train a model" panel in a real viewer: a real ``pathfm train`` subprocess on the Kather 2016 tiles.

One run (in the default folder under ``$PATHFM_DATA_DIR/runs``) is stopped gracefully after its
first epoch (last.ckpt written, weights exported), resumed from the past-runs list, stopped again
and resumed to the end; meanwhile the live plot gets points without a matplotlib notification, and
the model is listed in a classify checkpoint picker. A broken override ends in the crashed state
with the run's error shown.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from napari_pathfm.training.recipes import load_recipe, schema

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
    return widget


def test_form_follows_recipe_and_schema(panel):
    assert panel.family.currentText() == "classify"
    assert "classify/crc_tiny.yaml" in [panel.recipe.itemText(i) for i in range(panel.recipe.count())]
    editors = panel.form.editors
    assert panel.form.value("trainer.max_epochs") == 3 and panel.form.value("data.augment") is True
    # human labels with units; the schema's help and the raw key in the tooltips
    labels = {key: label.text() for key, label in panel.form.labels.items()}
    assert labels["optim.lr"] == "Learning rate" and labels["trainer.max_epochs"] == "Epochs"
    assert labels["trainer.batch_size"] == "Batch size (tiles)" and labels["data.image_size"] == "Image size (px)"
    assert labels["data.input_mpp"] == "Resolution (µm/px)" and labels["model.backbone"] == "Backbone"
    assert not any("." in text or "_" in text for text in labels.values()), labels
    tip = schema("classify")["optim.lr"]["help"] + "\nrecipe key: optim.lr"
    assert editors["optim.lr"][0].toolTip() == tip == panel.form.labels["optim.lr"].toolTip()
    # the output goes to a new folder under the per-user runs folder, never the current folder
    out = Path(panel.out.text())
    assert out.parent == Path(os.environ["PATHFM_DATA_DIR"]) / "runs" and out.name.startswith("crc_tiny-")
    assert Path.cwd() not in out.parents
    assert panel.plot.minimumHeight() >= 200 and panel.plot.x_label == "epoch"
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


def _wait_end(panel, qtbot, timeout=90_000):
    qtbot.waitUntil(lambda: panel.state.value in ("done", "crashed"), timeout=timeout)
    assert panel.state.value == "done", panel.status.text()


def test_stop_resume_plot_runs_list_and_new_checkpoint_listed(panel, qtbot):
    from napari.utils.notifications import notification_manager

    from napari_pathfm.widgets._checkpoint_picker import CheckpointPicker

    picker = CheckpointPicker("classify")
    out = Path(panel.out.text())
    assert not any(str(out) in (picker.combo.itemData(i) or "") for i in range(picker.combo.count()))
    panel.viewer.window.show()  # the dock at its real size

    # warnings raised on the GUI thread become napari notifications (as in a napari session)
    notification_manager.install_hooks()
    try:
        before = len(notification_manager.records)
        panel.form.set_value("trainer.max_epochs", 50)
        # no early stopping (patience 10): on a busy machine the dock may read the first epoch's event only
        # after a dozen fast epochs, and the run must still be going when Stop is pressed
        panel.extra.setText("trainer.early_stopping.enabled=false")
        panel.start()
        qtbot.waitUntil(lambda: any(e.get("event") == "epoch" for e in panel.events), timeout=90_000)
        assert panel.runs.select(out).state == "running"
        panel.stop()
        assert panel.state.value == "stopping" and panel.stop_btn.text() == "Kill"
        _wait_end(panel, qtbot)
        assert panel.summary["cancelled"] is True and "stopped" in panel.status.text()
        assert (out / "last.ckpt").is_file() and (out / "model.safetensors").is_file()
        stopped_at = next(e for e in panel.events if e["event"] == "done")["epoch"]
        assert stopped_at < 50 and panel.resume_btn.isEnabled()

        # the live plot: sized to the dock, labelled, with points, redrawn cheaply and throttled
        plot = panel.plot
        assert plot.height() >= 200 and plot.width() >= 200, plot.size()
        assert len(panel.curves["loss"]) >= 1 and "val_loss" in panel.curves and plot.draws >= 1
        assert {"training loss", "validation loss"} <= set(plot.legend()) and plot.y_label == "loss"
        assert panel.curves["loss"][-1][0] <= stopped_at + 1  # x in epochs, not batches
        t0 = time.perf_counter()
        plot.redraw()
        assert time.perf_counter() - t0 < 0.1

        # the past-runs list: the run is stopped, shows its last metrics, and Resume continues it
        run = panel.runs.selected()
        assert run is not None and run.path == out and run.state == "stopped" and run.resumable
        assert "val_loss" in panel.runs.details.text() and panel.runs.resume_btn.isEnabled()
        # resume to one more epoch than the stop reached: only the remaining epoch runs
        panel.form.set_value("trainer.max_epochs", stopped_at + 1)
        panel.runs.resume_btn.click()  # the panel's own run: the form as edited, same folder
        assert panel.state.value == "training" and Path(panel.out.text()) == out
        _wait_end(panel, qtbot)
        new = notification_manager.records[before:]
    finally:
        notification_manager.restore_hooks()
    epochs = [e["epoch"] for e in panel.events if e["event"] == "epoch"]
    assert epochs == [stopped_at], epochs
    assert panel.summary["cancelled"] is False and "finished" in panel.status.text()
    assert panel.epoch_bar.value() == panel.epoch_bar.maximum() == stopped_at + 1
    assert panel.batch_bar.value() == panel.batch_bar.maximum() > 0
    assert panel.runs.selected().state == "finished" and not panel.runs.resume_btn.isEnabled()
    assert [str(r.message) for r in new] == []  # no toast at all (the plot is not matplotlib's)

    listed = [picker.combo.itemData(i) for i in range(picker.combo.count())]
    assert str((out / "model.safetensors").resolve()) in listed, listed
    # a run from elsewhere (another session) resumes with its own recipe.yaml, in its own folder
    panel.set_recipe(RECIPE)
    assert Path(panel.out.text()) != out
    panel.resume_run(out, start=False)
    assert panel.recipe.currentData() == str(out / "recipe.yaml") and Path(panel.out.text()) == out
    assert panel.form.value("trainer.max_epochs") == stopped_at + 1 and panel.resume_btn.isEnabled()
    command = panel.command(resume=True)
    assert command[3] == str(out / "recipe.yaml") and "--no-resume" not in command
    assert load_recipe(out / "recipe.yaml").get("data.image_size") == 96

    # points arriving in a burst (a fast run) cost one redraw, not one each
    from napari_pathfm.widgets._train_plot import REDRAW_MS

    drawn = panel.plot.draws
    for i in range(200):
        panel.plot.add("loss", stopped_at + 1 + i / 200, 1.0)
    qtbot.wait(3 * REDRAW_MS)
    assert panel.plot.draws == drawn + 1
    # a picker made later (another dock opened afterwards) lists it too: the runs folder is searched
    later = CheckpointPicker("classify")
    assert str((out / "model.safetensors").resolve()) in [later.combo.itemData(i) for i in range(later.combo.count())]


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
    from napari_pathfm.userdata import corrections_dir

    folder = corrections_dir(slide)  # the per-user corrections folder of the open file
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


def test_run_states_from_events_jsonl(tmp_path):
    """The past-runs list reads a run's state from the last event of its events.jsonl."""
    import json

    from napari_pathfm.training.runs import TAIL_BYTES, scan_runs

    batch = {"event": "batch", "epoch": 0, "done": 1, "total": 2, "metrics": {"loss": 1.0}, "message": "x" * 200}
    epoch = {"event": "epoch", "epoch": 0, "metrics": {"val_loss": 0.5}}
    runs = {
        "finished": [batch, epoch, {"event": "done", "epoch": 1, "message": "finished after epoch 1"}],
        "stopped": [batch, epoch, {"event": "done", "epoch": 1, "message": "cancelled after epoch 1"}],
        "error": [batch, {"event": "error", "message": "RecipeError: no data"}],
        "killed": [epoch] + [batch] * (2 * TAIL_BYTES // 300),  # the last epoch event is beyond the tail
    }
    for name, events in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        (tmp_path / name / "last.ckpt").write_bytes(b"")
    (tmp_path / "not-a-run").mkdir()
    found = {r.path.name: r for r in scan_runs(tmp_path, running=None)}
    assert {n: r.state for n, r in found.items()} == {
        "finished": "finished",
        "stopped": "stopped",
        "error": "crashed",
        "killed": "crashed",
    }
    assert found["stopped"].resumable and not found["finished"].resumable and found["error"].resumable
    assert found["stopped"].metrics == {"val_loss": 0.5} and "RecipeError" in found["error"].message
    assert found["killed"].epoch is None and "killed" in found["killed"].message
    assert {r.path.name: r.state for r in scan_runs(tmp_path, running=tmp_path / "stopped")}["stopped"] == "running"
