"""Docks take the CLI's one error path: a failed run is one message (no traceback toast, no duplicate).

A user opens the bundled slide, points the Segment dock at a file that is not a checkpoint and at
a checkpoint file that does not exist, and clicks *Segment*: the dock's status line says what is
wrong with which file (the Segment dock keeps its messages, with the log one click away), and napari
shows no notification on top of it — no traceback toast from the worker, no duplicate.
"""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")


def _failure_notifications(before: int) -> list:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [n for n in notification_manager.records[before:] if n.severity == NotificationSeverity.ERROR]


@pytest.fixture
def dock(make_napari_viewer, cmu_small, tmp_path, monkeypatch):
    import napari_pathfm.checkpoints as ck
    from napari_pathfm.widgets.segment_widget import SegmentWidget

    monkeypatch.setattr(ck, "_EXTRA", [])
    slide = tmp_path / "slides" / cmu_small.name
    slide.parent.mkdir()
    shutil.copy(cmu_small, slide)
    viewer = make_napari_viewer()
    viewer.open(str(slide), plugin="napari-pathfm")
    return SegmentWidget(viewer)


def _click_segment(qtbot, widget):
    from napari.utils.notifications import notification_manager

    before = len(notification_manager.records)
    qtbot.mouseClick(widget.segment_btn, _left())
    qtbot.waitUntil(lambda: widget.runner.last_error is not None and not widget.runner.running, timeout=60_000)
    qtbot.wait(200)  # let any queued notification arrive
    return _failure_notifications(before)


def _left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


def test_a_pickle_given_as_checkpoint_is_one_clear_message(dock, qtbot, tmp_path):
    pickle = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, pickle)
    dock.checkpoint.set_path(pickle)
    toasts = _click_segment(qtbot, dock)
    assert toasts == [], [n.message for n in toasts]
    assert dock.status.text().startswith("Failed: ") and "model.pt" in dock.status.text()
    assert "Traceback" not in dock.status.text() and dock.runner.last_message in dock.status.text()
    assert dock.segment_btn.isEnabled(), "the dock recovers for the next run"


def test_a_missing_checkpoint_file_is_one_clear_message(dock, qtbot, tmp_path):
    gone = tmp_path / "gone.safetensors"
    dock.checkpoint.set_path(gone)
    if dock.checkpoint.path() is None:
        pytest.skip("the picker refuses missing files itself")
    toasts = _click_segment(qtbot, dock)
    assert toasts == [] and "gone" in dock.status.text() and "Traceback" not in dock.status.text()
