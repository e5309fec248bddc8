"""The training panel's recipe form: one row per recipe key, labelled in words, with units and help.

Each row shows a human label and unit (:func:`napari_pathfm.training.recipe_labels.field_label`, e.g.
"Learning rate", "Batch size (tiles)", "Resolution (µm/px)"); the tooltip of the label and of
the editor holds the schema's help text and the raw recipe key (``optim.lr``), for people who
know the recipes or want to pass the same value with ``--set``. :meth:`Form.overrides` gives
``key=value`` only for the rows that were edited, so a recipe's own values are never rewritten.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..training.recipe_labels import field_label
from ..training.recipes import schema
from ._foundation_names import FoundationNames

__all__ = ["COMMON_KEYS", "SKIP_KEYS", "Form", "row_label", "row_tooltip"]

# shown for every recipe, whether or not it sets them
COMMON_KEYS = ("optim.lr", "optim.weight_decay", "trainer.max_epochs", "trainer.batch_size")
# identity of a recipe, not hyperparameters: not editable in the form
SKIP_KEYS = {"family", "description", "output", "model.name"}
# keys naming a backbone: an editable list that also offers the foundation models found on this machine
BACKBONE_KEYS = ("model.backbone", "model.uni_checkpoint", "model.sam")


def row_label(key: str, family: str | None = None) -> str:
    """``Label (unit)`` of a recipe key: ``row_label("data.input_mpp")`` → ``"Resolution (µm/px)"``."""
    label, unit = field_label(key, family)
    return f"{label} ({unit})" if unit else label


def row_tooltip(key: str, help_text: str | None) -> str:
    """The schema's help text plus the raw recipe key (what ``--set`` and the YAML file use)."""
    return f"{help_text or 'Recipe value (YAML syntax).'}\nrecipe key: {key}"


class Form(QWidget):
    """Rows of editors for recipe keys; :meth:`overrides` gives ``key=value`` for the edited ones."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.layout_ = QFormLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self.editors: dict[str, tuple[QWidget, Any]] = {}
        self.labels: dict[str, QLabel] = {}
        self.family: str | None = None
        self._fields: dict[str, dict] = {}
        self.foundation = FoundationNames(self)
        self.foundation.found.connect(self._offer_foundation_models)

    def build(self, family: str, values: dict[str, Any]) -> None:
        while self.layout_.rowCount():
            self.layout_.removeRow(0)
        self.editors.clear()
        self.labels.clear()
        self.family = family
        fields = schema(family)
        keys = [k for k in values if k not in SKIP_KEYS] + [k for k in COMMON_KEYS if k not in values]
        self._fields = fields
        for key in keys:
            self.add_row(key, values.get(key, fields.get(key, {}).get("default")))
        if any(k in self.editors for k in BACKBONE_KEYS):
            self.foundation.request()  # the names arrive later, from a thread

    def _offer_foundation_models(self, names: list) -> None:
        """Add the foundation models found offline to the backbone rows' lists (their text stays)."""
        for key in BACKBONE_KEYS:
            editor = self.editors.get(key, (None,))[0]
            if isinstance(editor, QComboBox) and editor.isEditable():
                have = {editor.itemText(i) for i in range(editor.count())}
                editor.addItems([n for n in names if n not in have])

    def add_row(self, key: str, value: Any) -> None:
        """One editor row for ``key`` showing ``value``; it is only overridden once edited."""
        field = self._fields.get(key, {})
        editor = self._backbone_editor(value) if key in BACKBONE_KEYS else self._editor(value, field)
        tip = row_tooltip(key, field.get("help"))
        editor.setToolTip(tip)
        label = QLabel(row_label(key, self.family))
        label.setToolTip(tip)
        self.labels[key] = label
        self.editors[key] = (editor, self.value(key, editor))
        self.layout_.addRow(label, self._with_browse(key, editor) if field.get("path") else editor)

    def _with_browse(self, key: str, editor: QWidget) -> QWidget:
        """``editor`` plus a ``…`` button choosing a folder (``*root``/``*dir`` keys) or a file."""
        folder = key.endswith(("root", "dir"))

        def browse() -> None:
            start = os.path.expandvars(self.value(key, editor))
            if folder:
                path = QFileDialog.getExistingDirectory(self, row_label(key, self.family), start)
            else:
                path, _ = QFileDialog.getOpenFileName(self, row_label(key, self.family), start)
            if path:
                self.set_value(key, path)

        row = QWidget()
        layout = QHBoxLayout(row)
        layout.setContentsMargins(0, 0, 0, 0)
        button = QPushButton("…")
        button.setToolTip(f"Choose the {'folder' if folder else 'file'}: {row_label(key, self.family)} ({key})")
        button.clicked.connect(browse)
        layout.addWidget(editor, 1)
        layout.addWidget(button)
        return row

    @staticmethod
    def _backbone_editor(value: Any) -> QComboBox:
        """An editable list: any timm name or file typed in, or a foundation model found offline."""
        editor = QComboBox()
        editor.setEditable(True)
        editor.addItem("" if value is None else str(value))
        return editor

    @staticmethod
    def _editor(value: Any, field: dict) -> QWidget:
        types = field.get("type") or [type(value).__name__]
        if field.get("choices") and isinstance(value, str):
            editor = QComboBox()
            editor.addItems([str(c) for c in field["choices"]])
            editor.setCurrentText(value)
        elif isinstance(value, bool) or types == ["bool"]:
            editor = QCheckBox()
            editor.setChecked(bool(value))
        elif isinstance(value, int) and types == ["int"]:
            editor = QSpinBox()
            editor.setRange(-(2**31) + 1, 2**31 - 1)
            editor.setValue(value)
        else:  # floats, strings, lists, None: YAML text keeps 1e-3, [a, b] and null readable
            editor = QLineEdit(value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True))
            editor.setText(editor.text().strip().removesuffix("...").strip())
        return editor

    def value(self, key: str, editor: QWidget | None = None) -> Any:
        editor = editor or self.editors[key][0]
        if isinstance(editor, QComboBox):
            return editor.currentText()
        if isinstance(editor, QCheckBox):
            return editor.isChecked()
        if isinstance(editor, QSpinBox):
            return editor.value()
        return editor.text()

    def set_value(self, key: str, value: Any) -> None:
        editor = self.editors[key][0]
        if isinstance(editor, QCheckBox):
            editor.setChecked(bool(value))
        elif isinstance(editor, QSpinBox):
            editor.setValue(int(value))
        elif isinstance(editor, QComboBox):
            editor.setCurrentText(str(value))
        else:
            editor.setText(str(value))

    def overrides(self) -> list[str]:
        """``key=value`` for every row whose value differs from the recipe's."""
        out = []
        for key, (editor, initial) in self.editors.items():
            value = self.value(key, editor)
            if value != initial:
                out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return out
