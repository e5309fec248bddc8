"""Channel rows of the Translate widget: one translation checkpoint per row, labelled with what it predicts.

A row is a :class:`~._checkpoint_picker.CheckpointPicker` (so ``refresh_all_pickers``
re-lists it after a training run), a label with the channel(s) the chosen checkpoint's
card names, in the colour its layer will get, and a remove button. The pure helpers
here read what a card predicts (:func:`card_targets`), give each predicted channel a
distinct colormap (:func:`channel_colormaps`) and find rows that would predict the same
target (:func:`duplicate_targets`); they import neither torch nor napari.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QWidget

from ._checkpoint_picker import CheckpointPicker

__all__ = ["ChannelRow", "card_targets", "channel_colormaps", "default_checkpoints", "duplicate_targets", "is_lupi"]

#: Colormaps handed to channels without a colour of their own, or whose colour is already taken.
SPARE_COLORMAPS = ("cyan", "yellow", "magenta", "red", "green", "blue", "bop orange", "bop purple")


def card_targets(card: dict, weights: str | Path | None = None) -> list[tuple[str, str]]:
    """``(channel name, role)`` of every channel a translation card predicts, in output order.

    Names come from the card's ``channels`` (else ``target``, else the checkpoint's file stem,
    as :func:`~napari_pathfm.pipelines.translate.translate_stack` names them); roles from
    ``channel_roles`` (else ``role``) or the name (DAPI → nuclei, BODIPY → lipids …).

    >>> card_targets({"channels": ["DAPI"], "channel_roles": ["nuclei"]})
    [('DAPI', 'nuclei')]
    >>> card_targets({"channels": ["MAP2"]})
    [('MAP2', 'MAP2')]
    """
    from ..pipelines.translate import channel_role

    names = card.get("channels") or card.get("target") or ([Path(weights).stem] if weights else [])
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    roles = card.get("channel_roles") or card.get("role") or []
    roles = [roles] if isinstance(roles, str) else list(roles)
    return [(n, channel_role(n, roles[i] if i < len(roles) else None)) for i, n in enumerate(names)]


def is_lupi(card: dict) -> bool:
    """True for a LUPI nuclei model: its second decoder gives the nuclei confidence map."""
    return bool(card.get("has_mask")) or card.get("name") == "lupi_unet"


def channel_colormaps(channels: Sequence[tuple[str, str]]) -> dict[str, str]:
    """A distinct napari colormap per channel name, from its role or its stain name.

    Roles first (nuclei blue, lipids green, cytoplasm red), then stain names (MAP2 magenta,
    NFH green …); a channel with neither, or whose colour an earlier channel already has,
    gets the first unused spare colour (gray when all are used), so additive blending
    keeps the channels apart.

    >>> channel_colormaps([("DAPI", "nuclei"), ("MAP2", "map2"), ("NFH", "nfh"), ("GFAP", "GFAP")])
    {'DAPI': 'blue', 'MAP2': 'magenta', 'NFH': 'green', 'GFAP': 'cyan'}
    """
    from ..io.zstack import TARGET_COLORMAPS
    from ..pipelines.translate import ROLE_COLORMAPS

    out: dict[str, str] = {}
    for name, role in channels:
        role = str(role).lower()
        wanted = ROLE_COLORMAPS.get(role) or TARGET_COLORMAPS.get(role) or TARGET_COLORMAPS.get(name.lower())
        if wanted is None or wanted in out.values():
            wanted = next((c for c in SPARE_COLORMAPS if c not in out.values()), "gray")
        out[name] = wanted
    return out


def duplicate_targets(rows: Sequence[list[tuple[str, str]]]) -> tuple[int, int, str] | None:
    """``(row i, row j, target)`` of the first two rows predicting the same target, else None.

    Two channels are the same target when their roles match, case aside (DAPI and Hoechst
    are both ``nuclei``; MAP2 and ``map2`` are one stain).

    >>> duplicate_targets([[("DAPI", "nuclei")], [("MAP2", "map2")], [("Hoechst", "nuclei")]])
    (0, 2, 'nuclei')
    """
    seen: dict[str, int] = {}
    for j, targets in enumerate(rows):
        for _name, role in targets:
            key = str(role).lower()
            if key in seen and seen[key] != j:
                return seen[key], j, str(role)
            seen.setdefault(key, j)
    return None


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


def default_checkpoints(found: Sequence[tuple[Path, dict]], first: Sequence[str] = (), limit: int = 3) -> list[str]:
    """Checkpoints that pre-fill the rows: one per target, at most ``limit``, roles in ``first`` first.

    ``found`` is :func:`~napari_pathfm.checkpoints.find_checkpoints` of family ``translate``
    (bundled models first). A checkpoint is skipped when one already taken predicts any of
    its targets, so the rows never start with a duplicate. With only the bundled ISL models
    this gives DAPI (LUPI), MAP2 and NFH; with HASTE nuclei/lipids/cytoplasm models, those.
    """
    def targets(item: tuple[Path, dict]) -> set[str]:
        return {r.lower() for _n, r in card_targets(item[1], item[0])}

    ordered = [item for role in first for item in found if role in targets(item)]
    ordered += [item for item in found if item not in ordered]
    taken: list[str] = []
    covered: set[str] = set()
    for item in ordered:
        keys = targets(item)
        if len(taken) < limit and keys and not keys & covered:
            taken.append(str(item[0]))
            covered |= keys
    return taken
