"""A checkpoint chooser shared by the inference widgets: a list of known checkpoints plus Browse.

The list holds the checkpoints of one family found by
:func:`napari_pathfm.checkpoints.find_checkpoints` (bundled models, the user's
model folder, and run folders registered at run time, so a model fine-tuned a
minute ago shows up); Browse adds any other ``.safetensors`` with its card.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QPushButton, QWidget

from ._compact import compact_combo

__all__ = ["CheckpointPicker", "refresh_all_pickers"]

# every live picker, held weakly, so a finished training run can refresh them all at once
_PICKERS: weakref.WeakSet[CheckpointPicker] = weakref.WeakSet()


def refresh_all_pickers() -> int:
    """Re-list the checkpoints in every open :class:`CheckpointPicker`; returns how many were refreshed.

    Pickers whose Qt widget was already deleted (closed dock widgets) are skipped.
    """
    n = 0
    for picker in list(_PICKERS):
        try:
            picker.refresh()
        except RuntimeError:  # the C++ widget is gone; the Python wrapper lingers until collected
            _PICKERS.discard(picker)
            continue
        n += 1
    return n


class CheckpointPicker(QWidget):
    """Combo box of ``family`` checkpoints + a browse button; :meth:`path` is the chosen file."""

    def __init__(self, family: str, parent=None):
        super().__init__(parent)
        self.family = family
        self.combo = compact_combo(QComboBox())
        browse = QPushButton("…")
        browse.setToolTip("Choose a checkpoint (.safetensors with its .json card)")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.combo, 1)
        row.addWidget(browse)
        self.refresh()
        _PICKERS.add(self)

    def refresh(self) -> None:
        """Re-list the checkpoints of the family, keeping the current choice."""
        from ..checkpoints import find_checkpoints

        current = self.path()
        self.combo.clear()
        for weights, card in find_checkpoints(self.family):
            classes = ", ".join(map(str, card.get("classes") or card.get("channels") or []))
            self.combo.addItem(f"{card.get('name')} · {classes} · {weights.parent.name}/{weights.name}", str(weights))
        if current:
            self.set_path(current)

    def set_path(self, path: str | Path) -> None:
        """Select ``path``, adding it to the list when it is not there."""
        path = str(path)
        index = self.combo.findData(path)
        if index < 0:
            self.combo.addItem(Path(path).name, path)
            index = self.combo.count() - 1
        self.combo.setCurrentIndex(index)

    def path(self) -> str | None:
        return self.combo.currentData()

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, f"{self.family} checkpoint", "", "Checkpoints (*.safetensors)")
        if path:
            self.set_path(path)
