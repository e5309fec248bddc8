"""The training panel's list of past runs (read by :mod:`napari_pathfm.training.runs`), with Resume."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..training.runs import RunInfo, scan_runs

__all__ = ["RunsList"]


class RunsList(QWidget):
    """Past runs under a folder: select one to see its last metrics; Resume continues a stopped one.

    Emits :attr:`resume_requested` with the run folder; the training panel does the resuming.
    """

    resume_requested = Signal(Path)

    def __init__(self, folder_fn, parent=None):
        super().__init__(parent)
        self._folder_fn = folder_fn  # callable: the runs folder (re-read, $PATHFM_DATA_DIR may change)
        self.runs: list[RunInfo] = []
        self.list = QListWidget()
        self.list.setMaximumHeight(120)
        self.list.setToolTip("Runs in the per-user runs folder, newest first. Select one to see its last metrics.")
        self.list.currentRowChanged.connect(self._show)
        self.details = QLabel("")
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.resume_btn = QPushButton("Resume selected")
        self.resume_btn.setToolTip("Continue the selected stopped (or crashed) run from its last.ckpt.")
        self.resume_btn.clicked.connect(self._resume)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(lambda: self.refresh())
        buttons = QHBoxLayout()
        buttons.addWidget(self.resume_btn)
        buttons.addWidget(refresh)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(QLabel("Past runs"))
        layout.addWidget(self.list)
        layout.addWidget(self.details)
        layout.addLayout(buttons)
        self.refresh()

    def refresh(self, running: Path | None = None) -> None:
        """Re-read the runs folder, keeping the selection."""
        current = self.selected()
        self.runs = scan_runs(self._folder_fn(), running)
        self.list.blockSignals(True)
        self.list.clear()
        for run in self.runs:
            item = QListWidgetItem(f"{run.path.name} — {run.state}")
            item.setToolTip(f"{run.path}\n{run.summary()}")
            self.list.addItem(item)
        self.list.blockSignals(False)
        rows = [i for i, r in enumerate(self.runs) if current is not None and r.path == current.path]
        self.list.setCurrentRow(rows[0] if rows else -1)
        self._show(self.list.currentRow())

    def selected(self) -> RunInfo | None:
        row = self.list.currentRow()
        return self.runs[row] if 0 <= row < len(self.runs) else None

    def select(self, folder: str | Path) -> RunInfo | None:
        """Select the run in ``folder`` (if listed) and return it."""
        for i, run in enumerate(self.runs):
            if run.path.resolve() == Path(folder).resolve():
                self.list.setCurrentRow(i)
                return run
        return None

    def _show(self, row: int) -> None:
        run = self.selected()
        self.resume_btn.setEnabled(run is not None and run.resumable)
        if run is None:
            self.details.setText("" if self.runs else "No runs yet.")
            return
        self.details.setText(f"{run.summary()}" + (f"\n{run.message}" if run.message else "") + f"\n{run.path}")

    def _resume(self) -> None:
        run = self.selected()
        if run is not None and run.resumable:
            self.resume_requested.emit(run.path)
