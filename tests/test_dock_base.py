"""Every dock stands on one base (widgets/_dock.py): same pieces, one error policy, re-runs replace layers,
and the µm/px a user enters in the Slide dock reaches the pipelines the other docks call.

Error policy under test: a failed task is ONE line in the dock's status (``Failed: <describe(exc).text>``)
and napari shows no notification for it.
"""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _no_triton():
    from napari_pathfm.widgets._gl_safety import keep_triton_out

    keep_triton_out()  # before any viewer: a later torch import next to Mesa's GL segfaults otherwise


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_pathsam2):
    """A random-init toy Path-SAM2 segmentation checkpoint (64 px tiles at 2 µm/px)."""
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


def _docks(viewer):
    from napari_pathfm.widgets.classify_widget import ClassifyWidget
    from napari_pathfm.widgets.mil_widget import MILWidget
    from napari_pathfm.widgets.segment_widget import SegmentWidget
    from napari_pathfm.widgets.slide_widget import SlideWidget
    from napari_pathfm.widgets.translate_widget import TranslateWidget

    return [cls(viewer) for cls in (SlideWidget, SegmentWidget, ClassifyWidget, MILWidget, TranslateWidget)]


def _errors(before: int) -> list:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [n for n in notification_manager.records[before:] if n.severity >= NotificationSeverity.WARNING]


def _open(viewer, path, tmp_path):
    copy = tmp_path / "slides" / path.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(path, copy)
    viewer.open(str(copy), plugin="napari-pathfm")
    return viewer.layers[-1]


def test_every_dock_is_a_task_dock_with_the_same_pieces(make_napari_viewer):
    from napari_pathfm.widgets._dock import TaskDock
    from napari_pathfm.widgets.train_widget import TrainWidget

    viewer = make_napari_viewer()
    for dock in _docks(viewer):
        assert isinstance(dock, TaskDock), type(dock).__name__
        for piece in (dock.status, dock.note, dock.cancel_btn, dock.progress_bar):
            assert dock.isAncestorOf(piece), (type(dock).__name__, piece)
        assert not dock.cancel_btn.isEnabled() and dock.note.isHidden() and dock.progress_bar.isHidden()
        assert dock.run_buttons and all(b.isEnabled() for b in dock.run_buttons)
    train = TrainWidget(viewer)
    assert train.isAncestorOf(train.status) and train.isAncestorOf(train.note) and train.note.isHidden()


def test_a_failing_task_is_one_status_line_and_no_notification_in_every_dock(make_napari_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    from napari_pathfm.error_boundary import describe
    from napari_pathfm.io.slide import open_slide

    missing = tmp_path / "gone.svs"
    viewer = make_napari_viewer()
    for dock in _docks(viewer):
        before = len(notification_manager.records)

        def job(progress, cancel):
            return open_slide(missing)  # a real failure: the file is not there

        dock.start_task(job, description="open", on_done=lambda _: pytest.fail("the task cannot succeed"))
        assert not dock.cancel_btn.isHidden() and dock.cancel_btn.isEnabled() and not dock.progress_bar.isHidden()
        qtbot.waitUntil(lambda d=dock: not d.runner.running, timeout=30_000)
        qtbot.wait(100)  # let any queued notification arrive
        name = type(dock).__name__
        assert dock.status.text() == f"Failed: {describe(dock.runner.last_error).text}", name
        assert "gone.svs" in dock.status.text() and "Traceback" not in dock.status.text(), name
        assert _errors(before) == [], (name, [n.message for n in _errors(before)])
        assert dock.progress_bar.isHidden() and not dock.cancel_btn.isEnabled()
        assert all(b.isEnabled() for b in dock.run_buttons), name


def test_reruns_replace_layers_and_the_entered_mpp_reaches_the_segment_pipeline(
    make_napari_viewer, qtbot, wsi_dir, tiny_checkpoint, tmp_path, monkeypatch
):
    import napari_pathfm.checkpoints as ck
    from napari_pathfm.widgets.segment_widget import SegmentWidget
    from napari_pathfm.widgets.slide_widget import SlideWidget

    monkeypatch.setattr(ck, "_EXTRA", [])
    viewer = make_napari_viewer()
    layer = _open(viewer, wsi_dir / "boxes.tiff", tmp_path)
    assert layer.metadata["pathfm_slide"]["mpp"] is None, "boxes.tiff has no µm/px"
    slide_dock, segment = SlideWidget(viewer), SegmentWidget(viewer)
    slide_dock.layer_combo.setCurrentText(layer.name)
    slide_dock.set_slide_mpp(1.0)
    assert layer.metadata["pathfm_mpp_source"] == "entered"
    segment.layer_combo.setCurrentText(layer.name)
    segment.checkpoint.set_path(tiny_checkpoint)
    counts = []
    for _ in range(2):
        assert segment.run() is not None, segment.status.text()
        qtbot.waitUntil(lambda: not segment.runner.running, timeout=240_000)
        assert segment.runner.last_error is None, segment.status.text()
        counts.append(len(viewer.layers))
    assert counts[0] == counts[1] == 2, [layer.name for layer in viewer.layers]
    # the Segment dock ran the pipeline at the entered µm/px: the result is in µm, at the model's 2 µm/px
    assert segment.result.mpp == pytest.approx(1.0)
    assert segment.result.model_mpp == pytest.approx(2.0, rel=0.05)
    assert tuple(segment.labels_layer.scale) == pytest.approx(tuple(layer.scale[-2:]))
    for _ in range(2):  # the Slide dock's overlays: a re-run updates them in place
        assert slide_dock.compute_tissue() is not None
        qtbot.waitUntil(lambda: not slide_dock.runner.running, timeout=60_000)
        assert slide_dock.runner.last_error is None, slide_dock.status.text()
        counts.append(len(viewer.layers))
    assert counts[2] == counts[3], [layer.name for layer in viewer.layers]
