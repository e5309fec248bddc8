"""Channel rows of the Translate widget: one translation checkpoint per row, labelled with what it predicts.

A row is a :class:`~._checkpoint_picker.CheckpointPicker` (so ``refresh_all_pickers``
re-lists it after a training run), a label with the channel(s) the chosen checkpoint's
card names, in the colour its layer will get, and a remove button. What a card predicts
and which colour a channel gets are decided in :mod:`napari_pathfm.pipelines.translate_channels`.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget

from ..pipelines.translate_channels import card_targets, is_lupi
from ._checkpoint_picker import CheckpointPicker

__all__ = ["ChannelRow"]


class ChannelRow(QWidget):
    """One channel row: what the checkpoint predicts, the checkpoint picker, a remove button.

    Attributes
    ----------
    picker : CheckpointPicker
        The ``translate`` checkpoint chooser of the row.
    card : dict or None
        The chosen checkpoint's model card (None: nothing chosen, or the card is unreadable).
    error : str or None
        Why the chosen file cannot be used (unreadable card, not a translation checkpoint).
    """

    #: Emitted when the chosen checkpoint changes (the widget re-colours and re-checks its rows).
    changed = Signal()
    #: Emitted with the row when its remove button is pressed.
    remove_requested = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.card: dict | None = None
        self.error: str | None = None
        self.label = QLabel()
        self.label.setMinimumWidth(90)
        self.picker = CheckpointPicker("translate", self)
        self.remove_btn = QPushButton("✕")
        self.remove_btn.setToolTip("Remove this channel")
        self.remove_btn.setMaximumWidth(28)
        self.remove_btn.clicked.connect(lambda: self.remove_requested.emit(self))
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.label)
        row.addWidget(self.picker, 1)
        row.addWidget(self.remove_btn)
        self.picker.combo.currentIndexChanged.connect(self._on_pick)
        self._on_pick()

    def path(self) -> str | None:
        """The chosen checkpoint file, or None."""
        return self.picker.path()

    def targets(self) -> list[tuple[str, str]]:
        """``(channel, role)`` pairs the chosen checkpoint predicts (empty when none is usable)."""
        return card_targets(self.card, self.path()) if self.card is not None else []

    def _on_pick(self, *_) -> None:
        from ..errors import CheckpointError
        from ..models.checkpoint import check_family, read_card

        self.card, self.error = None, None
        path = self.path()
        if path:
            try:
                card = read_card(path)
                check_family(card, "translate", Path(path).name)
            except CheckpointError as exc:
                self.error = str(exc)
            else:
                self.card = card
        self.changed.emit()

    def show_targets(self, colormaps: dict[str, str]) -> None:
        """Label the row with its channel names, each in the colour of its layer (``colormaps``)."""
        if self.error:
            self.label.setText('<span style="color:#e05050">unusable</span>')
            self.label.setToolTip(self.error)
            return
        targets = self.targets()
        if not targets:
            self.label.setText("<i>choose…</i>")
            self.label.setToolTip("Choose a translation checkpoint (or … to browse)")
            return
        parts = []
        for name, _role in targets:
            colour = colormaps.get(name, "gray").split()[-1]  # 'bop orange' → orange
            colour = {"green": "lime"}.get(colour, colour)  # napari's green is #00ff00, CSS green is dark
            parts.append(f'<span style="color:{colour}">■</span> {name}')
        self.label.setText(", ".join(parts))
        tip = ", ".join(f"{n} ({r})" for n, r in targets) + (" · LUPI: nuclei confidence" if is_lupi(self.card) else "")
        self.label.setToolTip(tip)
