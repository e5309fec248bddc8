"""Combo boxes that keep a dock narrow whatever the length of the names they list.

A ``QComboBox`` asks for the width of its longest item by default, so one long checkpoint or slide
name (a fine-tune folder, a TCGA barcode) widened every dock holding it to ~650 px and squeezed
napari's canvas. :func:`compact_combo` caps the box at :data:`MIN_CHARS` characters, lets Qt elide
the shown text at its end, shows the whole text as the tooltip of the box and of each item, and lets the drop-down list be as wide as its items.
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox

__all__ = ["MIN_CHARS", "compact_combo", "sync_tooltips"]

#: characters a compact combo box asks room for (its items are elided beyond that)
MIN_CHARS = 22


def sync_tooltips(combo: QComboBox) -> None:
    """Every item's full text as its tooltip, and the current item's as the box's tooltip."""
    for i in range(combo.count()):
        combo.setItemData(i, combo.itemText(i), Qt.ItemDataRole.ToolTipRole)
    combo.setToolTip(combo.currentText())
    if combo.count():
        metrics = combo.fontMetrics()
        widest = max(metrics.horizontalAdvance(combo.itemText(i)) for i in range(combo.count()))
        combo.view().setMinimumWidth(min(widest + 32, 900))


def compact_combo(combo: QComboBox, chars: int = MIN_CHARS) -> QComboBox:
    """Make ``combo`` ask for ``chars`` characters of width, not its longest item's; returns it."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    combo.currentIndexChanged.connect(lambda *_: combo.setToolTip(combo.currentText()))
    model = combo.model()
    for signal in (model.rowsInserted, model.rowsRemoved, model.modelReset):
        signal.connect(lambda *_: sync_tooltips(combo))
    return combo
