"""The "Translate z-stack (HASTE)" dock widget: brightfield planes → fluorescence layers + nuclei.

Pick a z-stack layer (the reader opens one as a ``(Z, Y, X)`` Image layer with a Z slider)
and a translation checkpoint per channel — nuclei, lipids, cytoplasm — and press Run. The
work runs in a worker thread through :func:`~napari_pathfm.pipelines.translate.translate_stack`
(the code path of ``pathfm translate``); the channels come back as Image layers named from
the model cards, coloured by role (nuclei blue, lipids green, cytoplasm red) and blended
additively, plus the nuclei mask as a Labels layer. A LUPI nuclei checkpoint also gives the
per-pixel nuclei confidence (an Image layer) and enables the threshold slider, which
re-labels the mask from the confidence map live, without running the model again: raising
it keeps only the nuclei the model is sure of.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)  # fmt: skip

from ._checkpoint_picker import CheckpointPicker
from ._runner import TaskRunner

__all__ = ["ROLES", "TranslateWidget", "zstack_layers"]

#: Channel rows of the widget, in display order.
ROLES = ("nuclei", "lipids", "cytoplasm")


def zstack_layers(viewer) -> list[str]:
    """Names of the Image layers that look like z-stacks: 3-D, one value per pixel (not RGB)."""
    from napari.layers import Image

    return [layer.name for layer in viewer.layers
            if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb and not layer.multiscale]  # fmt: skip


def layer_colormap(name: str, role: str) -> str:
    """napari colormap of a predicted channel: by role, else by stain name, else gray."""
    from ..io.zstack import TARGET_COLORMAPS
    from ..pipelines.translate import ROLE_COLORMAPS

    return ROLE_COLORMAPS.get(role) or TARGET_COLORMAPS.get(name.lower(), "gray")


class TranslateWidget(QWidget):
    """Translate a brightfield z-stack into fluorescence channels and nuclei."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.runner = TaskRunner(on_state=self._on_state, parent=self)
        self.result = None
        self.layers: dict[str, object] = {}
        self._stack_name: str | None = None

        self.layer_combo = QComboBox()
        self.use: dict[str, QCheckBox] = {}
        self.pickers: dict[str, CheckpointPicker] = {}
        form = QFormLayout()
        form.addRow("z-stack", self.layer_combo)
        for role in ROLES:
            self.use[role] = QCheckBox(role)
            self.pickers[role] = CheckpointPicker("translate", self)
            row = QHBoxLayout()
            row.addWidget(self.use[role])
            row.addWidget(self.pickers[role], 1)
            form.addRow(row)
        self._preselect()
        self.tile = QSpinBox()
        self.tile.setRange(16, 4096)
        self.tile.setSingleStep(16)
        self.tile.setValue(512)
        self.tile.setToolTip("Tile side in pixels (multiple of 16); tiles overlap by half and are blended")
        form.addRow("tile", self.tile)

        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(1, 99)
        self.threshold.setValue(50)
        self.threshold.setEnabled(False)
        self.threshold.setToolTip("Keep only pixels whose nuclei confidence is above this value (LUPI models)")
        self.threshold_label = QLabel("0.50")
        self.threshold.valueChanged.connect(self._rethreshold)
        trow = QHBoxLayout()
        trow.addWidget(self.threshold, 1)
        trow.addWidget(self.threshold_label)
        form.addRow("nuclei confidence ≥", trow)

        self.run_btn = QPushButton("Run")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.runner.cancel)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- inputs -----------------------------------------------------------------
    def _refresh_layers(self, *_) -> None:
        current = self.layer_combo.currentText()
        self.layer_combo.clear()
        names = zstack_layers(self.viewer)
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)

    def _preselect(self) -> None:
        """Tick each role whose list holds a checkpoint predicting that role, and select it."""
        from ..models.checkpoint import read_card
        from ..pipelines.translate import channel_role

        for role, picker in self.pickers.items():
            for i in range(picker.combo.count()):
                card = read_card(picker.combo.itemData(i))  # listed checkpoints have readable cards
                roles = card.get("channel_roles") or [None] * len(card.get("channels") or [])
                if any(channel_role(c, r) == role for c, r in zip(card.get("channels") or [], roles)):
                    picker.combo.setCurrentIndex(i)
                    self.use[role].setChecked(True)
                    break

    def set_checkpoint(self, role: str, path: str | Path | None) -> None:
        """Use ``path`` for the ``role`` row (None unticks the row)."""
        self.use[role].setChecked(path is not None)
        if path is not None:
            self.pickers[role].set_path(path)

    def checkpoints(self) -> list[str]:
        """Chosen checkpoint files, in row order, without repeats."""
        out: list[str] = []
        for role in ROLES:
            path = self.pickers[role].path()
            if self.use[role].isChecked() and path and path not in out:
                out.append(path)
        return out

    # -- run --------------------------------------------------------------------
    def run(self):
        """Start the translation in a worker; returns the worker (None if inputs are missing)."""
        from ..pipelines.translate import translate_stack

        name = self.layer_combo.currentText()
        checkpoints = self.checkpoints()
        if not name or not checkpoints:
            self.status.setText("Choose a z-stack layer and tick at least one channel with a checkpoint.")
            return None
        layer = self.viewer.layers[name]
        path = layer.metadata.get("path") if "plane_names" in layer.metadata else None
        data = layer.data
        tile, threshold = self.tile.value(), self.threshold.value() / 100
        self._stack_name = name

        def job(progress, cancel):
            from ..io.zstack import open_zstack

            stack = open_zstack(path) if path else data  # a file stack: errors then name its planes
            return translate_stack(stack, checkpoints, tile=tile, threshold=threshold, progress=progress,
                                   cancel=cancel)  # fmt: skip

        self.status.setText("Translating…")
        return self.runner.start(job, description=f"Translate: {name}", on_done=self._show)

    def _place(self) -> dict:
        """Scale/translate of the (Y, X) axes of the z-stack layer, so the outputs overlay it."""
        if self._stack_name in self.viewer.layers:
            src = self.viewer.layers[self._stack_name]
            return {"scale": tuple(src.scale[-2:]), "translate": tuple(src.translate[-2:])}
        return {}

    def _put(self, key: str, kind: str, data, **kwargs):
        """Create the layer ``key`` or update its data (a re-run replaces the previous result)."""
        layer = self.layers.get(key)
        if layer is not None and layer in self.viewer.layers:
            layer.data = data
            for attr in ("contrast_limits",):
                if attr in kwargs:
                    setattr(layer, attr, kwargs[attr])
            return layer
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        layer = add(data, **kwargs)
        self.layers[key] = layer
        return layer

    def _show(self, result) -> None:
        from ..io.zstack import estimate_contrast_limits

        self.result = result
        stem = self._stack_name or "stack"
        place = self._place()
        for cname, data in result.channels.items():
            role = result.roles[cname]
            self._put(f"channel:{cname}", "image", data, name=f"{stem} {cname} (predicted)",
                      colormap=layer_colormap(cname, role), blending="additive",
                      contrast_limits=estimate_contrast_limits(data),
                      metadata={"pathfm_kind": "translate", "channel": cname, "role": role,
                                "checkpoints": result.checkpoints}, **place)  # fmt: skip
        if result.confidence is not None:
            self._put("confidence", "image", result.confidence, name=f"{stem} nuclei confidence", colormap="magma",
                      blending="additive", contrast_limits=(0.0, 1.0), opacity=0.6, visible=False,
                      metadata={"pathfm_kind": "translate-confidence"}, **place)  # fmt: skip
        if result.nuclei_labels is not None:
            self._put("nuclei", "labels", result.nuclei_labels, name=f"{stem} nuclei (predicted)", opacity=0.5,
                      metadata={"pathfm_kind": "translate-nuclei", "threshold": result.threshold}, **place)
        self.threshold.setEnabled(result.confidence is not None)
        n = int(result.nuclei_labels.max()) if result.nuclei_labels is not None else 0
        channels = ", ".join(f"{c} ({result.roles[c]})" for c in result.channels)
        self.status.setText(f"{channels}; {n} nuclei" + ("; " + "; ".join(result.messages) if result.messages else ""))

    def _rethreshold(self, value: int) -> None:
        """Re-label the nuclei from the confidence map at the slider's value (no re-inference)."""
        t = value / 100
        self.threshold_label.setText(f"{t:.2f}")
        result = self.result
        if result is None or result.confidence is None:
            return
        labels = result.nuclei_mask(t)
        result.nuclei_labels, result.threshold = labels, t
        layer = self.layers.get("nuclei")
        if layer is not None and layer in self.viewer.layers:
            layer.data = labels
            layer.metadata["threshold"] = t
        self.status.setText(f"{int(labels.max())} nuclei with confidence ≥ {t:.2f}")

    def _on_state(self, state: str) -> None:
        running = state == "running"
        self.run_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        if state == "cancelled":
            self.status.setText("Cancelled.")
        elif state == "error" and self.runner.last_error is not None:
            self.status.setText(f"Failed: {self.runner.last_error}")
