"""The "MIL" dock widget: slide-level prediction with a patch heatmap and the top patches.

Pick a slide layer and a MIL checkpoint (and optionally a feature file from
``pathfm features``), press Run: the prediction runs in a worker thread through
:func:`~napari_pathfm.pipelines.mil.mil_predict`; the class probabilities appear
in the widget, the heatmap as an Image layer over the slide, and the top-k
patches in a list — clicking one centres the view on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QPushButton,
    QSpinBox, QVBoxLayout, QWidget,
)  # fmt: skip

from ._checkpoint_picker import CheckpointPicker

from ..coords import layer_transform, layer_units
from ._runner import TaskRunner
from .slide_widget import fill_slide_combo

HEAT_COLORS = [[0, 0, 0, 0], [0.05, 0.0, 0.35, 0.75], [0.75, 0.1, 0.45, 0.85], [1.0, 0.55, 0.0, 0.9], [1.0, 1.0, 0.3, 1.0]]


def heat_colormap():
    """Inferno-like colormap whose zero is transparent, so tissue without evidence stays visible."""
    from napari.utils.colormaps import Colormap

    return Colormap(HEAT_COLORS, controls=[0.0, 0.02, 0.4, 0.75, 1.0], name="pathfm-heat")


def viewer_camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class MILWidget(QWidget):
    """Run a MIL checkpoint on a slide and show where the evidence is."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.runner = TaskRunner(on_state=self._on_state, parent=self)
        self.prediction = None
        self._slide_layer_name: Optional[str] = None

        self.layer_combo = QComboBox()
        self.checkpoint = CheckpointPicker("mil", self)
        self.features_label = QLabel("extract from the slide")
        feat_browse = QPushButton("Features…")
        feat_browse.setToolTip("Use a feature file (.zarr folder) made by `pathfm features` instead of extracting")
        feat_browse.clicked.connect(self._browse_features)
        self.features_path: Optional[Path] = None
        self.topk = QSpinBox()
        self.topk.setRange(1, 200)
        self.topk.setValue(10)
        self.class_combo = QComboBox()
        self.class_combo.currentIndexChanged.connect(self._show_class)

        self.run_btn = QPushButton("Run")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.runner.cancel)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.top_list = QListWidget()
        self.top_list.itemClicked.connect(self._goto_patch)

        feat_row = QHBoxLayout()
        feat_row.addWidget(self.features_label, 1)
        feat_row.addWidget(feat_browse)
        form = QFormLayout()
        form.addRow("slide", self.layer_combo)
        form.addRow("checkpoint", self.checkpoint)
        form.addRow("features", feat_row)
        form.addRow("top patches", self.topk)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.result_label)
        layout.addWidget(QLabel("heatmap class"))
        layout.addWidget(self.class_combo)
        layout.addWidget(QLabel("top patches (click to go there)"))
        layout.addWidget(self.top_list)

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- inputs -----------------------------------------------------------------
    def _refresh_layers(self, *_) -> None:
        fill_slide_combo(self.layer_combo, self.viewer)

    def set_checkpoint(self, path: str | Path) -> None:
        self.checkpoint.set_path(path)

    def set_features(self, path: str | Path | None) -> None:
        self.features_path = Path(path) if path else None
        self.features_label.setText(self.features_path.name if self.features_path else "extract from the slide")

    def _browse_features(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Feature file (.zarr folder)")
        self.set_features(path or None)

    # -- run --------------------------------------------------------------------
    def run(self):
        """Start the prediction in a worker; returns the worker (None if inputs are missing)."""
        from ..pipelines.mil import mil_predict

        name = self.layer_combo.currentText()
        checkpoint = self.checkpoint.path()
        if not name or not checkpoint:
            self.result_label.setText("Choose a slide layer and a MIL checkpoint first.")
            return None
        layer = self.viewer.layers[name]
        slide_path = layer.metadata["pathfm_path"]
        features = self.features_path
        self._slide_layer_name = name

        def job(progress, cancel):
            from ..io.slide import open_slide

            if features is not None:
                return mil_predict(checkpoint, features=features, progress=progress, cancel=cancel)
            with open_slide(slide_path) as slide:
                return mil_predict(checkpoint, slide=slide, progress=progress, cancel=cancel)

        return self.runner.start(job, description=f"MIL: {name}", on_done=self._show_prediction)

    def _show_prediction(self, pred) -> None:
        self.prediction = pred
        text = " | ".join(f"{c}: {p:.3f}" for c, p in zip(pred.classes, pred.probabilities))
        self.result_label.setText(f"prediction: {pred.predicted}  ({text}), {len(pred.coords)} patches")
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(pred.classes)
        self.class_combo.setCurrentIndex(int(np.argmax(pred.probabilities)))
        self.class_combo.blockSignals(False)
        self._show_class()

    def _show_class(self, *_) -> None:
        from ..pipelines.mil import heatmap_grid

        pred = self.prediction
        if pred is None or self._slide_layer_name not in self.viewer.layers:
            return
        cls = max(0, self.class_combo.currentIndex())
        grid, cell = heatmap_grid(pred, cls)
        slide_meta = self.viewer.layers[self._slide_layer_name].metadata["pathfm_slide"]
        mpp = slide_meta["mpp"]
        scale, translate = layer_transform(mpp, cell)
        name = f"{self._slide_layer_name} MIL heatmap"
        data = np.nan_to_num(grid, nan=0.0)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = data
            layer.scale, layer.translate = scale, translate
        else:
            layer = self.viewer.add_image(
                data, name=name, scale=scale, translate=translate, units=layer_units(mpp), colormap=heat_colormap(),
                opacity=0.6, contrast_limits=(0.0, 1.0), blending="translucent", interpolation2d="nearest",
            )  # fmt: skip
        layer.metadata.update({"pathfm_kind": "mil-heatmap", "class": pred.classes[cls], "downsample": cell})
        self.top_list.clear()
        unit = mpp or 1.0
        for rank, patch in enumerate(pred.top_patches(self.topk.value(), cls), start=1):
            centre = ((patch["y"] + cell / 2) * unit, (patch["x"] + cell / 2) * unit)
            item = QListWidgetItem(f"#{rank}  score {patch['score']:.3f}  at y={patch['y']}, x={patch['x']} px")
            item.setData(256, centre)
            self.top_list.addItem(item)

    def _goto_patch(self, item: QListWidgetItem) -> None:
        centre = item.data(256)
        camera = viewer_camera(self.viewer)
        camera.center = tuple(centre)
        camera.zoom = max(camera.zoom, 1.0)

    def _on_state(self, state: str) -> None:
        running = state == "running"
        self.run_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        if state == "cancelled":
            self.result_label.setText("Cancelled.")
        elif state == "error" and self.runner.last_error is not None:
            self.result_label.setText(f"Failed: {self.runner.last_message}")
