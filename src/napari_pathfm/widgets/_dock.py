"""The one dock base: a task on a worker with the dock's own progress bar, Cancel, a status line,
a note line, the single error path, and result layers that a re-run replaces.

Every napari-pathfm dock (Slide, Segment, Classify, MIL, Translate) is a :class:`TaskDock`; the
Train panel (a ``QProcess``, not a worker) uses the same status and note pieces (:class:`DockLines`).

Error policy (the same in every dock): a failed task is mapped once by the runner through
:func:`napari_pathfm.error_boundary.describe` (issue 8's mapping, shared with the CLI) and shown as
ONE line in the dock's status — ``Failed: <message>`` or, for a cancelled task, ``Stopped.`` — and
napari shows NO notification on top of it: the dock that was clicked is where the user looks, and a
toast would say the same thing twice. Unexpected failures are logged with their traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from qtpy.QtWidgets import QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ._runner import TaskRunner

__all__ = ["DockLines", "TaskDock", "viewer_camera"]

#: Colour of the note line (model notes: demonstration model, out of domain, …).
NOTE_STYLE = "color: #e0a040;"


class DockLines:
    """The status line and the note line of a dock (also used by the Train panel).

    ``status`` says what happened last (one line, word-wrapped); ``note`` shows a result's
    model notes (``result.notes``) and is hidden while there are none.
    """

    def __init__(self) -> None:
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.note.setStyleSheet(NOTE_STYLE)
        self.note.setVisible(False)

    def show_notes(self, notes: Iterable[str]) -> None:
        """Show ``notes`` (plain sentences) in the note line; hide it when there are none."""
        notes = [str(n) for n in notes or [] if n]
        self.note.setText(" ".join(notes))
        self.note.setVisible(bool(notes))


class TaskDock(QWidget):
    """Base of the docks: ``start_task`` runs a ``fn(progress, cancel)`` job on a worker.

    Subclasses build their own inputs, add :meth:`task_pieces` (Cancel, progress bar, note and
    status lines) to their layout, list the buttons to disable while a task runs in
    ``self.run_buttons`` and show results with :meth:`show_layer`.
    """

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.runner = TaskRunner(on_state=self._on_state, parent=self, on_progress=self._on_progress)
        lines = DockLines()
        self.status, self.note = lines.status, lines.note
        self._lines = lines
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop the running task at its next tile or batch")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.runner.cancel)
        self.run_buttons: list[QWidget] = []
        self.notes: list[str] = []

    # -- pieces ---------------------------------------------------------------------------
    def task_pieces(self) -> QWidget:
        """One widget with the progress bar, the note line and the status line (in that order)."""
        box = QWidget()
        col = QVBoxLayout(box)
        col.setContentsMargins(0, 0, 0, 0)
        col.addWidget(self.progress_bar)
        col.addWidget(self.note)
        col.addWidget(self.status)
        return box

    def show_notes(self, notes: Iterable[str]) -> None:
        """Show a result's model notes in the note line (``getattr(result, "notes", [])``)."""
        self.notes = [str(n) for n in notes or [] if n]
        self._lines.show_notes(self.notes)

    # -- tasks ----------------------------------------------------------------------------
    def start_task(self, fn: Callable[..., Any], *, description: str, on_done: Callable[[Any], None]):
        """Run ``fn(progress=..., cancel=...)`` on a worker; ``on_done(result)`` on the GUI thread.

        Failures go to :meth:`task_failed` (the one error path); returns the worker.
        """
        self.progress_bar.setRange(0, 0)  # busy until the first report
        self.progress_bar.setFormat(description)
        self.progress_bar.setVisible(True)
        return self.runner.start(fn, description=description, on_done=on_done, on_error=self.task_failed)

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))
        if message:
            self.progress_bar.setFormat(f"{message} (%p%)" if total > 0 else message)

    def task_failed(self, exc: BaseException) -> None:
        """The one message of a failed or stopped task (mapped by the runner) in the status line."""
        if self.runner.last_message and self.runner.last_error is not None and not self._stopped(exc):
            self.status.setText(f"Failed: {self.runner.last_message}{self.failure_hint()}")
        else:
            self.status.setText("Stopped." if not self.runner.last_message else f"Stopped: {self.runner.last_message}")

    @staticmethod
    def _stopped(exc: BaseException) -> bool:
        from ..errors import Cancelled

        return isinstance(exc, (Cancelled, KeyboardInterrupt))

    def failure_hint(self) -> str:
        """Extra words after a failure message (e.g. where the log is); none by default."""
        return ""

    def _on_state(self, state: str) -> None:
        running = state == "running"
        for button in self.run_buttons:
            button.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        if not running:
            self.progress_bar.setVisible(False)
        self.state_changed(state)

    def state_changed(self, state: str) -> None:
        """Hook for docks with more buttons to switch (called after the base's own updates)."""

    # -- result layers ---------------------------------------------------------------------
    def show_layer(self, name: str, data, kind: str = "image", *, features=None, **kwargs):
        """Add layer ``name`` or, when it is there, update it in place (a re-run replaces, never piles up).

        ``kind`` is ``"image"`` or ``"labels"``; ``kwargs`` are napari ``add_*`` arguments. An
        existing layer gets the new data, placement, looks and metadata (updating keeps napari
        from rebuilding the layer's visual, which removing and re-adding would).
        """
        layers = self.viewer.layers
        if name in layers:
            layer = layers[name]
            if "units" in kwargs:
                layer.units = kwargs["units"]
            for attr in ("scale", "translate"):
                if attr in kwargs:
                    setattr(layer, attr, kwargs[attr])
            layer.data = data
            for attr in ("colormap", "contrast_limits", "opacity", "blending"):
                if attr in kwargs:
                    setattr(layer, attr, kwargs[attr])
            layer.metadata.update(kwargs.get("metadata") or {})
        else:
            add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
            layer = add(data, name=name, **kwargs)
        if features is not None:
            layer.features = features
        return layer

    def remove_layers(self, layers: Iterable) -> None:
        """Remove those of ``layers`` (layers or names) still in the viewer."""
        for layer in list(layers):
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def slide_image_mpp(self, layer_name: str) -> float | None:
        """The µm/px the user entered in the Slide dock for this slide layer, or None (see :mod:`..layers`)."""
        from ..layers import entered_mpp

        layer = self.viewer.layers[layer_name] if layer_name in self.viewer.layers else None
        return entered_mpp(layer)


def viewer_camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera
