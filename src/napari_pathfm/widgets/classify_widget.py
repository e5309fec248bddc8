"""The "Classify tiles (SLCA)" dock widget: slide → per-tile class map, class probabilities, Grad-CAM.

Pick a slide layer and a ``classify`` checkpoint (a ``slca`` or ``timm_classifier`` model trained
with a classify recipe), press *Classify*: :func:`~napari_pathfm.pipelines.classify.classify_slide`
runs in a worker (progress bar, Cancel) and the results appear over the slide:

- a Labels layer ``<slide> classes`` with one cell per tile (0 = no tissue tile, class ``k`` →
  ``k + 1``) in the class colours of :mod:`napari_pathfm.colors` (the colours GeoJSON/QuPath
  exports of the layer get), whose features hold the class names, so the status bar names the
  class under the cursor;
- one Image layer ``<slide> p(<class>)`` per class with its probability (only the first visible),
  on a colormap of its own (transparent → blue → yellow, 0–1).

A legend under the buttons names each class beside its colour and shows the colorbars (with their
ranges) of the probability and Grad-CAM layers. A re-run replaces these layers (same names, data
updated in place; probability layers of classes the new model lacks and a stale Grad-CAM are
removed), it never adds a second set.

Grad-CAM (``pytorch-grad-cam``) explains the classifier: with *Grad-CAM: click a tile* on, a click
on the canvas computes the map of the tile under the cursor; *Grad-CAM: current view* does every
classified tile in the visible part of the slide (at most
:data:`~napari_pathfm.pipelines.gradcam.MAX_TILES`; the status says when tiles were left out). The
map explains the class chosen in the *Grad-CAM class* list (default: each tile's predicted class)
and is shown as the Image layer ``<slide> Grad-CAM`` (heat colours, zero transparent, a colormap
distinct from the probabilities'). Importing
this module does not import torch.
"""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QPushButton, QSpinBox, QVBoxLayout

from ..coords import layer_transform, layer_units
from ..layers import slide_level0_shape
from ._checkpoint_picker import CheckpointPicker
from ._colormaps import label_colormap, napari_colormap
from ._compact import compact_combo
from ._dock import TaskDock
from ._legend import Legend
from .mil_widget import viewer_camera
from .slide_widget import fill_slide_combo

__all__ = ["ClassifyWidget"]

PREDICTED = "predicted class"
#: Opacity of the class map and probability layers: the tissue under them stays visible.
OVERLAY_OPACITY = 0.5


class ClassifyWidget(TaskDock):
    """Classify a slide's tiles, show class map + probabilities, and Grad-CAM on demand."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.result = None
        self.gradcam = None
        self.labels_layer = None
        self.prob_layers: list = []
        self._slide_layer_name: str | None = None
        self._checkpoint: str | None = None
        self._model = None  # (checkpoint path, (model, card)) loaded once for Grad-CAM
        self._runs = 0  # results shown so far (the legend's title names the run)
        self.legend = Legend("Legend")
        self._legend_title: str | None = None

        self.layer_combo = compact_combo(QComboBox())
        self.checkpoint = CheckpointPicker("classify", self)
        self.batch = QSpinBox()
        self.batch.setRange(1, 1024)
        self.batch.setValue(32)
        self.batch.setToolTip("Tiles per forward pass")
        self.run_btn = QPushButton("Classify")
        self.run_btn.clicked.connect(self.run)
        self.run_buttons = [self.run_btn]
        self.cam_class = compact_combo(QComboBox())
        self.cam_class.addItem(PREDICTED)
        self.click_btn = QPushButton("Grad-CAM: click a tile")
        self.click_btn.setCheckable(True)
        self.click_btn.setToolTip("While on, clicking the slide computes Grad-CAM of the tile under the cursor")
        self.click_btn.toggled.connect(self._arm_click)
        self.view_btn = QPushButton("Grad-CAM: current view")
        self.view_btn.setToolTip("Grad-CAM of every classified tile in the visible part of the slide (capped)")
        self.view_btn.clicked.connect(self.gradcam_view)

        form = QFormLayout()
        form.addRow("slide", self.layer_combo)
        form.addRow("checkpoint", self.checkpoint)
        form.addRow("batch size", self.batch)
        run_row = QHBoxLayout()
        run_row.addWidget(self.run_btn)
        run_row.addWidget(self.cancel_btn)
        cam_form = QFormLayout()
        cam_form.addRow("Grad-CAM class", self.cam_class)
        cam_row = QHBoxLayout()
        cam_row.addWidget(self.click_btn)
        cam_row.addWidget(self.view_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(run_row)
        layout.addLayout(cam_form)
        layout.addLayout(cam_row)
        layout.addWidget(self.task_pieces())
        layout.addWidget(self.legend)
        layout.addStretch(1)
        self._set_cam_enabled(False)

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- inputs -----------------------------------------------------------------------
    def _refresh_layers(self, *_) -> None:
        fill_slide_combo(self.layer_combo, self.viewer)

    def _slide_path(self) -> str:
        return self.viewer.layers[self._slide_layer_name].metadata["pathfm_path"]

    # -- classify ----------------------------------------------------------------------
    def run(self):
        """Classify the chosen slide in a worker; returns the worker (None if inputs are missing)."""
        from ..pipelines.classify import classify_slide

        name, checkpoint = self.layer_combo.currentText(), self.checkpoint.path()
        if not name:
            self.status.setText("Open a slide first (File → Open, or the Slide widget).")
            return None
        if not checkpoint:
            self.status.setText("No tile classifier: train one (pathfm train training/slca/…) or browse to one.")
            return None
        slide_path = self.viewer.layers[name].metadata["pathfm_path"]
        batch = self.batch.value()
        image_mpp = self.slide_image_mpp(name)  # the µm/px entered in the Slide dock (file has none)
        level0_shape = slide_level0_shape(self.viewer.layers[name])

        def job(progress, cancel):
            from ..layers import class_features, clip_to_slide
            from ..tiles.cached_encoder import cache_note

            result = classify_slide(
                slide_path, checkpoint, batch_size=batch, progress=progress, cancel=cancel, image_mpp=image_mpp
            )
            # per-tile maps refined to stop at the slide's edge (the last tiles hang over it)
            class_map, cell = clip_to_slide(result.class_map, result.cell, level0_shape)
            prob_maps, _ = clip_to_slide(result.prob_maps, result.cell, level0_shape)
            maps = {"class_map": class_map, "prob_maps": prob_maps, "cell": cell}
            return result, class_features(result.label_names()), cache_note(result.cache), maps

        self._slide_layer_name, self._checkpoint = name, checkpoint
        return self.start_task(job, description=f"Classify: {name}", on_done=self._show_result)

    def _show_result(self, done) -> None:
        from pathlib import Path

        result, features, note, maps = done
        self.result = result
        self._runs += 1
        base = self._slide_layer_name
        kwargs = result.layer_kwargs()
        kwargs["scale"], kwargs["translate"] = layer_transform(result.mpp, maps["cell"])
        kwargs["metadata"] = {**kwargs["metadata"], "run": self._runs, "downsample": maps["cell"]}
        names = result.label_names()
        self.labels_layer = self.show_layer(
            f"{base} classes",
            maps["class_map"],
            "labels",
            opacity=OVERLAY_OPACITY,
            features=features,
            colormap=label_colormap(names),
            **kwargs,
        )
        old_probs = [layer for layer in self.prob_layers if layer in self.viewer.layers]
        self.prob_layers = []
        prob_maps = maps["prob_maps"]
        for k, cls in enumerate(result.classes):
            layer = self.show_layer(
                f"{base} p({cls})",
                prob_maps[k],
                "image",
                colormap=napari_colormap("probability"),
                opacity=OVERLAY_OPACITY,
                contrast_limits=(0.0, 1.0),
                blending="translucent",
                interpolation2d="nearest",
                visible=k == 0,
                **{**kwargs, "metadata": {**kwargs["metadata"], "class": cls, "pathfm_kind": "classify-probability"}},
            )
            self.prob_layers.append(layer)
        # a re-run replaces, never piles up: drop what the previous run showed and this one does not
        for layer in old_probs:
            if layer not in self.prob_layers:
                self.viewer.layers.remove(layer)
        cam_name = f"{base} Grad-CAM"
        if self.gradcam is not None and cam_name in self.viewer.layers:
            self.viewer.layers.remove(cam_name)
        self.gradcam = None
        self._legend_title = f"{Path(self._checkpoint or 'model').stem}, run {self._runs}"
        self.legend.show_layers([self.labels_layer, *self.prob_layers[:1]], title=self._legend_title)
        self.cam_class.clear()
        self.cam_class.addItems([PREDICTED, *result.classes])
        fractions = ", ".join(f"{c} {f:.0%}" for c, f in result.class_fractions().items())
        notes = list(getattr(result, "notes", []) or [])
        self.show_notes(notes)
        text = f"{result.n_tiles} tiles at {result.model_mpp or 0:.3g} µm/px: {fractions}."
        others = [m for m in result.messages if m not in notes]
        self.status.setText(" ".join(t for t in [text, note, *others] if t))
        self._set_cam_enabled(result.n_tiles > 0)

    # -- Grad-CAM ----------------------------------------------------------------------
    def _target(self) -> int | None:
        i = self.cam_class.currentIndex()
        return None if i <= 0 else i - 1

    def _level0(self, world_yx) -> tuple[float, float]:
        """Level-0 pixel coordinate (continuous, pixel edges at integers) of a world (y, x) point."""
        unit = self.result.mpp or 1.0
        return float(world_yx[-2]) / unit + 0.5, float(world_yx[-1]) / unit + 0.5

    def gradcam_at(self, world_yx):
        """Grad-CAM of the classified tile at world position ``(y, x)``; returns the worker or None."""
        if self.result is None:
            self.status.setText("Classify a slide first.")
            return None
        i = self.result.tile_at(*self._level0(world_yx))
        if i is None:
            self.status.setText("No classified tile there (background): click on tissue.")
            return None
        return self._start_gradcam([i], "clicked tile")

    def visible_box(self) -> tuple[float, float, float, float]:
        """Level-0 ``(y0, x0, y1, x1)`` of the part of the slide the canvas shows."""
        from ..layers import visible_box

        camera = viewer_camera(self.viewer)
        size = getattr(getattr(self.viewer, "canvas", None), "size", (800, 600))
        return visible_box(camera.center, camera.zoom, size, self.result.mpp or 1.0)

    def gradcam_view(self):
        """Grad-CAM of the classified tiles in the current view (capped); returns the worker or None."""
        if self.result is None:
            self.status.setText("Classify a slide first.")
            return None
        box = self.visible_box()
        idx = self.result.tiles_in_box(*box)
        if not idx.size:
            self.status.setText("No classified tiles in view.")
            return None
        from ..layers import nearest_first

        # nearest the centre of the view first, so the cap keeps what the user looks at
        return self._start_gradcam(nearest_first(idx, self.result.grid.tiles, self.result.cell, box), "current view")

    def _start_gradcam(self, indices, what: str):
        from ..pipelines.classify import load_classifier
        from ..pipelines.gradcam import gradcam_tiles

        if self._slide_layer_name not in self.viewer.layers:
            self.status.setText("The classified slide's layer was closed: open it and classify again.")
            return None
        result, checkpoint, slide_path, target = self.result, self._checkpoint, self._slide_path(), self._target()
        cached = self._model

        def job(progress, cancel):
            from ..io.slide import open_slide

            model = cached[1] if cached and cached[0] == checkpoint else load_classifier(checkpoint)[:2]
            with open_slide(slide_path) as slide:
                cam = gradcam_tiles(slide, result, model, indices, target=target, progress=progress, cancel=cancel)
            return model, cam

        def done(out) -> None:
            self._model = (checkpoint, out[0])
            self._show_gradcam(out[1], what)

        return self.start_task(job, description=f"Grad-CAM: {what}", on_done=done)

    def _show_gradcam(self, cam, what: str) -> None:
        self.gradcam = cam
        image, scale, translate = cam.mosaic()
        name = f"{self._slide_layer_name} Grad-CAM"
        meta = {
            "pathfm_kind": "gradcam",
            "tiles": cam.indices.tolist(),
            "targets": cam.targets.tolist(),
            "classes": [self.result.classes[k] for k in cam.targets],
        }
        kwargs = {"scale": scale, "translate": translate, "metadata": meta}
        cam_layer = self.show_layer(
            name,
            image,
            "image",
            colormap=napari_colormap("gradcam"),
            opacity=0.6,
            contrast_limits=(0.0, 1.0),
            blending="translucent",
            units=layer_units(self.result.mpp),
            **kwargs,
        )
        shown = [self.labels_layer, *self.prob_layers[:1], cam_layer]
        self.legend.show_layers([layer for layer in shown if layer in self.viewer.layers], title=self._legend_title)
        classes = sorted(set(meta["classes"]))
        text = f"Grad-CAM of {len(cam.indices)} tile(s) ({what}) for {', '.join(classes)}."
        empty = cam.empty_tiles()
        if empty:
            text += f" {len(empty)} map(s) are all 0: no positive evidence for the class in those tiles."
        if cam.capped:
            text += (
                f" {cam.capped} more tiles in view were left out (at most {len(cam.indices)}, those nearest the "
                "centre): zoom in."
            )
        self.status.setText(text)

    def _arm_click(self, on: bool) -> None:
        callbacks = self.viewer.mouse_drag_callbacks
        if on and self._on_click not in callbacks:
            callbacks.append(self._on_click)
        elif not on and self._on_click in callbacks:
            callbacks.remove(self._on_click)

    def _on_click(self, viewer, event) -> None:
        if event.type == "mouse_press" and not self.runner.running:
            self.gradcam_at(event.position)

    def _set_cam_enabled(self, on: bool) -> None:
        for w in (self.click_btn, self.view_btn, self.cam_class):
            w.setEnabled(on)
        if not on and self.click_btn.isChecked():
            self.click_btn.setChecked(False)

    def state_changed(self, state: str) -> None:
        self.view_btn.setEnabled(state != "running" and self.result is not None and self.result.n_tiles > 0)

    def closeEvent(self, event) -> None:
        self._arm_click(False)
        super().closeEvent(event)
