"""The "MIL" dock widget: slide-level prediction with a patch heatmap and the top patches.

Pick a slide layer and a MIL checkpoint (and optionally a feature file from
``pathfm features``), press Run: the prediction runs in a worker thread through
:func:`~napari_pathfm.pipelines.mil.mil_predict`; the class probabilities appear
in the widget (the predicted class with its probability first), the heatmap as an
Image layer over the slide, and the top-k patches in a list — clicking one draws its
box (a Shapes rectangle on the patch's level-0 pixels, in the slide's units) and
centres the view on it.

*Review a batch* lists the slides of a ``pathfm batch --task mil`` folder, least certain first, opens
each at its top patches and saves Agree / Disagree / label to a CSV that MIL training reads
(:mod:`napari_pathfm.widgets._mil_review`).

The heatmap has a colormap of its own (transparent → green → yellow → red, not the
classify probabilities' or Grad-CAM's) and contrast limits from the data: the 1st–99th
percentiles of the patch scores of the shown class, computed in the worker, so a map
whose scores sit in a narrow band is not flat; cells without a patch are transparent.
The dock's legend shows the colorbar with that range. A re-run replaces the heatmap
(same layer, updated) and clears the patch box; it never adds layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ..colors import CONTINUOUS
from ..coords import layer_units
from ..layers import HEAT_PERCENTILES, class_heatmaps, slide_level0_shape
from ._checkpoint_picker import CheckpointPicker
from ._colormaps import heatmap_look, napari_colormap
from ._compact import compact_combo
from ._dock import TaskDock, viewer_camera
from ._legend import Legend
from ._mil_review import ReviewPanel

__all__ = ["MILWidget", "heat_colormap", "viewer_camera"]
from .slide_widget import fill_slide_combo

HEAT_COLORS = CONTINUOUS["gradcam"][0]
#: Edge colour of the box drawn around a clicked top patch.
BOX_COLOR = "cyan"


def heat_colormap():
    """Inferno-like colormap whose zero is transparent (Grad-CAM's; the MIL heatmap has its own)."""
    return napari_colormap("gradcam")


class MILWidget(TaskDock):
    """Run a MIL checkpoint on a slide and show where the evidence is."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.prediction = None
        self.heatmaps: list = []  # per class: (grid, (lo, hi), cell) from class_heatmaps
        self.heat_layer = None
        self.box_layer = None
        self._slide_layer_name: str | None = None
        self._runs = 0
        self._legend_title: str | None = None
        self.legend = Legend("Legend")

        self.layer_combo = compact_combo(QComboBox())
        self.checkpoint = CheckpointPicker("mil", self)
        self.features_label = QLabel("extract from the slide")
        feat_browse = QPushButton("Features…")
        feat_browse.setToolTip("Use a feature file (.zarr folder) made by `pathfm features` instead of extracting")
        feat_browse.clicked.connect(self._browse_features)
        self.features_path: Path | None = None
        self.topk = QSpinBox()
        self.topk.setRange(1, 200)
        self.topk.setValue(10)
        self.class_combo = compact_combo(QComboBox())
        self.class_combo.currentIndexChanged.connect(self._show_class)

        self.run_btn = QPushButton("Run")
        self.run_btn.clicked.connect(self.run)
        self.run_buttons = [self.run_btn]
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
        layout.addWidget(self.task_pieces())
        layout.addWidget(QLabel("heatmap class"))
        layout.addWidget(self.class_combo)
        layout.addWidget(self.legend)
        layout.addWidget(QLabel("top patches (click to draw the box and go there)"))
        layout.addWidget(self.top_list)
        self.review = ReviewPanel(self)  # a MIL batch's slides, least certain first (pathfm batch --task mil)
        layout.addWidget(self.review)

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
            self.status.setText("Choose a slide layer and a MIL checkpoint first.")
            return None
        layer = self.viewer.layers[name]
        slide_path = layer.metadata["pathfm_path"]
        features = self.features_path
        image_mpp = self.slide_image_mpp(name)  # the µm/px entered in the Slide dock (file has none)
        self._slide_layer_name = name
        level0_shape = slide_level0_shape(layer)  # the heatmap stops at the slide's edge

        def job(progress, cancel):
            from ..io.slide import open_slide

            if features is not None:
                pred = mil_predict(checkpoint, features=features, progress=progress, cancel=cancel)
            else:
                with open_slide(slide_path) as slide:
                    pred = mil_predict(checkpoint, slide=slide, progress=progress, cancel=cancel, image_mpp=image_mpp)
            return pred, class_heatmaps(pred, level0_shape)

        self._legend_title = Path(checkpoint).stem

        return self.start_task(job, description=f"MIL: {name}", on_done=self._show_prediction)

    def _show_prediction(self, out) -> None:
        pred, self.heatmaps = out
        self.prediction = pred
        self._runs += 1
        best = int(np.argmax(pred.probabilities))
        others = ", ".join(
            f"{c} {p:.3f}" for i, (c, p) in enumerate(zip(pred.classes, pred.probabilities)) if i != best
        )
        self.result_label.setText(
            f"prediction: <b>{pred.predicted}</b> (probability {float(pred.probabilities[best]):.3f}; {others}), "
            f"{len(pred.coords)} patches"
        )
        self.show_notes(getattr(pred, "notes", []))
        self.status.setText("")
        if self.box_layer is not None and self.box_layer in self.viewer.layers:
            self.box_layer.data = []  # the previous run's patch box is stale
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(pred.classes)
        self.class_combo.setCurrentIndex(int(np.argmax(pred.probabilities)))
        self.class_combo.blockSignals(False)
        self._show_class()

    def _mpp(self) -> float | None:
        return self.viewer.layers[self._slide_layer_name].metadata["pathfm_slide"]["mpp"]

    def _show_class(self, *_) -> None:
        pred = self.prediction
        if pred is None or self._slide_layer_name not in self.viewer.layers:
            return
        cls = max(0, self.class_combo.currentIndex())
        data, limits, cell = self.heatmaps[cls]
        name = f"{self._slide_layer_name} MIL heatmap"
        layer = self.show_layer(name, data, "image", **heatmap_look(self._mpp(), cell, limits))
        layer.metadata.update(
            {
                "pathfm_kind": "mil-heatmap",
                "class": pred.classes[cls],
                "downsample": cell,
                "contrast_percentiles": list(HEAT_PERCENTILES),
                "run": self._runs,
            }
        )
        self.heat_layer = layer
        self.legend.show_layers([layer], title=f"{self._legend_title or 'model'}, run {self._runs}")
        self.top_list.clear()
        for rank, patch in enumerate(pred.top_patches(self.topk.value(), cls), start=1):
            item = QListWidgetItem(f"#{rank}  score {patch['score']:.3f}  at y={patch['y']}, x={patch['x']} px")
            item.setData(256, (patch["y"], patch["x"]))
            self.top_list.addItem(item)

    def patch_box(self, y: int, x: int) -> np.ndarray:
        """Level-0 pixel corners ``[[y0, x0], [y1, x1]]`` of the patch at level-0 ``(y, x)``, edges as the heatmap cell's."""
        from ..layers import patch_box

        slide = self.viewer.layers[self._slide_layer_name] if self._slide_layer_name in self.viewer.layers else None
        return patch_box(y, x, self.prediction.level0_tile_size, slide_level0_shape(slide) if slide else None)

    def _goto_patch(self, item: QListWidgetItem) -> None:
        """Draw the clicked patch's box (one rectangle, replacing the previous one) and centre the view on it."""
        if self.prediction is None or self._slide_layer_name not in self.viewer.layers:
            return
        y, x = item.data(256)
        box = self.patch_box(int(y), int(x))
        mpp = self._mpp()
        unit = mpp or 1.0
        name = f"{self._slide_layer_name} MIL top patch"
        selection = self.viewer.layers.selection.active
        layer = self.box_layer if self.box_layer is not None and self.box_layer in self.viewer.layers else None
        if layer is None and name in self.viewer.layers:
            layer = self.viewer.layers[name]
        if layer is None:
            layer = self.viewer.add_shapes(
                name=name,
                scale=(unit, unit),
                units=layer_units(mpp),
                ndim=2,
                edge_color=BOX_COLOR,
                face_color="transparent",
                metadata={"pathfm_kind": "mil-top-patch"},
            )
            if selection is not None:
                self.viewer.layers.selection.active = selection  # keep the user's layer controls
        layer.data = []
        layer.add_rectangles(
            box,
            edge_color=BOX_COLOR,
            face_color="transparent",
            edge_width=max(2.0, 0.04 * self.prediction.level0_tile_size),
        )
        layer.metadata.update({"patch": [int(y), int(x)], "level0_box": box.tolist()})
        self.box_layer = layer
        camera = viewer_camera(self.viewer)
        camera.center = tuple(float(v) for v in box.mean(axis=0) * unit)
        camera.zoom = max(camera.zoom, 1.0)
