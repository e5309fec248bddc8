"""The "Slide" dock widget: open a slide, read its properties, overlay tissue mask and tile grid.

It only arranges things: reading is :func:`~napari_pathfm.io.open_slide`, the
work is :func:`~napari_pathfm.pipelines.tissue_tiles.compute_tissue_tiles`, run
through :class:`~napari_pathfm.widgets._runner.TaskRunner` so the GUI stays live.

Units are honest: a slide whose file has no µm/px is shown in pixels and the dock says
"pixel size unknown — enter µm/px"; the value entered moves the slide layer and all its
overlays to µm together (:func:`~napari_pathfm.coords.rescale_slide_layers`) and is used
by the dock's own tissue/tile run. The µm/px the dock reports for a tile grid is the one
actually read (the read level's own µm/px), and tile boxes are clipped to the slide.
Re-runs update the overlay layers in place instead of removing and re-adding them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..coords import layer_transform, layer_units, rescale_slide_layers
from ..layers import tile_boxes
from ._compact import compact_combo
from ._dock import TaskDock

__all__ = [
    "MAX_TILE_SHAPES",
    "SlideWidget",
    "add_tissue_tiles_layers",
    "fill_slide_combo",
    "slide_layers",
    "tile_boxes",
]

MAX_TILE_SHAPES = 5000  # beyond this many rectangles napari's Shapes layer gets sluggish


def slide_layers(viewer) -> list:
    """Image layers that napari-pathfm opened as slides (they carry the slide's metadata)."""
    return [layer for layer in viewer.layers if "pathfm_path" in getattr(layer, "metadata", {})]


def fill_slide_combo(combo, viewer) -> None:
    """List the viewer's slide layers in ``combo``, keeping the current choice when it is still there."""
    current = combo.currentText()
    combo.clear()
    combo.addItems([layer.name for layer in slide_layers(viewer)])
    if current:
        combo.setCurrentText(current)


def _pixmap(rgb: np.ndarray, max_side: int = 220) -> QPixmap:
    rgb = np.ascontiguousarray(rgb[..., :3])
    h, w = rgb.shape[:2]
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(image).scaled(max_side, max_side, Qt.AspectRatioMode.KeepAspectRatio)


class SlideWidget(TaskDock):
    """Open whole-slide images, inspect their metadata and show tissue/tiles over them."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self._slides: dict[str, object] = {}

        open_btn = QPushButton("Open slide…")
        open_btn.clicked.connect(self._choose_file)
        self.layer_combo = compact_combo(QComboBox())
        self.layer_combo.currentIndexChanged.connect(self._show_properties)

        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["property", "value"])
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().setVisible(False)

        self.mpp_note = QLabel("pixel size unknown — enter µm/px")
        self.mpp_note.setStyleSheet("color: orange")
        self.mpp_note.setToolTip(
            "The file does not say how large a pixel is. Until you enter it, all layers of "
            "this slide are in pixels, tiles are read at level 0 and no µm/px is assumed."
        )
        self.slide_mpp = QDoubleSpinBox()
        self.slide_mpp.setRange(0.0, 100.0)
        self.slide_mpp.setDecimals(4)
        self.slide_mpp.setSingleStep(0.05)
        self.slide_mpp.setSpecialValueText("unknown")
        self.slide_mpp.setToolTip("µm per level-0 pixel of this slide (e.g. 0.25 at 40x, 0.5 at 20x)")
        self.slide_mpp_btn = QPushButton("Set µm/px")
        self.slide_mpp_btn.clicked.connect(lambda: self.set_slide_mpp(self.slide_mpp.value() or None))
        self.mpp_box = QWidget()
        mpp_row = QHBoxLayout(self.mpp_box)
        mpp_row.setContentsMargins(0, 0, 0, 0)
        mpp_row.addWidget(self.mpp_note)
        mpp_row.addWidget(self.slide_mpp)
        mpp_row.addWidget(self.slide_mpp_btn)
        self.mpp_box.setVisible(False)

        self.assoc_combo = compact_combo(QComboBox())
        self.assoc_combo.currentTextChanged.connect(self._show_associated)
        self.assoc_label = QLabel()
        self.assoc_label.setAlignment(Qt.AlignmentFlag.AlignCenter)

        self.mask_mpp = self._spin(8.0, 0.5, 64.0, "Tissue mask resolution (µm/px)")
        self.tile_mpp = self._spin(0.5, 0.1, 16.0, "Tile resolution (µm/px)")
        self.tile_size = QSpinBox()
        self.tile_size.setRange(32, 4096)
        self.tile_size.setValue(256)
        self.min_tissue = self._spin(0.25, 0.0, 1.0, "Minimum tissue fraction of a kept tile")
        self.run_btn = QPushButton("Show tissue && tiles")
        self.run_btn.clicked.connect(self.compute_tissue)
        self.run_buttons = [self.run_btn]

        form = QFormLayout()
        form.addRow("mask µm/px", self.mask_mpp)
        form.addRow("tile µm/px", self.tile_mpp)
        form.addRow("tile size (px)", self.tile_size)
        form.addRow("min. tissue", self.min_tissue)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        tissue_box = QGroupBox("Tissue and tile grid")
        tissue_layout = QVBoxLayout(tissue_box)
        tissue_layout.addLayout(form)
        tissue_layout.addLayout(buttons)

        assoc_box = QGroupBox("Associated images")
        assoc_layout = QVBoxLayout(assoc_box)
        assoc_layout.addWidget(self.assoc_combo)
        assoc_layout.addWidget(self.assoc_label)

        layout = QVBoxLayout(self)
        layout.addWidget(open_btn)
        layout.addWidget(QLabel("Slide layer"))
        layout.addWidget(self.layer_combo)
        layout.addWidget(self.mpp_box)
        layout.addWidget(self.table)
        layout.addWidget(assoc_box)
        layout.addWidget(tissue_box)
        layout.addWidget(self.task_pieces())
        layout.addStretch(1)

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    @staticmethod
    def _spin(value: float, lo: float, hi: float, tip: str) -> QDoubleSpinBox:
        box = QDoubleSpinBox()
        box.setRange(lo, hi)
        box.setDecimals(3)
        box.setSingleStep(0.25)
        box.setValue(value)
        box.setToolTip(tip)
        return box

    # -- slides -----------------------------------------------------------------
    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Open slide",
            "",
            "Slides (*.svs *.ndpi *.vms *.vmu *.scn *.mrxs *.svslide *.bif *.tif *.tiff *.dcm *.png *.jpg);;All files (*)",
        )
        if path:
            self.open_path(path)

    def open_path(self, path: str | Path):
        """Open ``path`` as a slide layer (a failure is the dock's one status message, never raised into napari)."""
        from .._reader import slide_layer_data
        from ..error_boundary import describe
        from ..errors import SlideError
        from ..io.slide import open_slide

        try:
            slide = open_slide(path)
        except (SlideError, OSError) as exc:
            self.status.setText(f"Failed: {describe(exc).text}")
            return None
        data, kwargs, _ = slide_layer_data(slide)
        self._slides[str(slide.path)] = slide
        layer = self.viewer.add_image(data, **kwargs)
        self.layer_combo.setCurrentText(layer.name)
        return layer

    def current_layer(self):
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def current_slide(self):
        layer = self.current_layer()
        if layer is None:
            return None
        path = layer.metadata["pathfm_path"]
        if path not in self._slides:
            from ..io.slide import open_slide

            self._slides[path] = open_slide(path)
        slide = self._slides[path]
        if layer.metadata.get("pathfm_mpp_source") == "entered":  # the user's value, not the file's
            slide.mpp = layer.metadata["pathfm_slide"]["mpp"]
        return slide

    def set_slide_mpp(self, mpp: float | None) -> None:
        """Use ``mpp`` µm/px for the current slide (one whose file has none): every layer of it moves to µm.

        ``None`` (or 0) goes back to pixels. The value is kept in the slide layer's metadata
        (``pathfm_slide["mpp"]``, ``pathfm_mpp_source = "entered"``) so docks that read the layer see it.
        """
        layer = self.current_layer()
        if layer is None or layer.metadata.get("pathfm_mpp_source") == "file":
            return
        path = layer.metadata["pathfm_path"]
        old = layer.metadata["pathfm_slide"].get("mpp")
        mpp = float(mpp) if mpp else None
        rescale_slide_layers(self.viewer.layers, path, mpp, old)
        layer.metadata["pathfm_mpp_source"] = "entered" if mpp else "unknown"
        if path in self._slides:
            self._slides[path].mpp = mpp
        self._show_properties()
        self.status.setText(
            f"{layer.name}: {mpp:g} µm/px (entered) on all its layers."
            if mpp
            else f"{layer.name}: pixel size unknown; its layers are in pixels."
        )

    def _refresh_layers(self, *_) -> None:
        current = self.layer_combo.currentText()
        names = [layer.name for layer in slide_layers(self.viewer)]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._show_properties()

    def _show_properties(self, *_) -> None:
        layer = self.current_layer()
        self.table.setRowCount(0)
        self.assoc_combo.clear()
        self.assoc_label.clear()
        source = layer.metadata.get("pathfm_mpp_source", "file") if layer is not None else "file"
        self.mpp_box.setVisible(source != "file")
        self.mpp_note.setVisible(source == "unknown")
        for box in (self.mask_mpp, self.tile_mpp):  # without µm/px tiles come from level 0 at a fixed mask size
            box.setEnabled(source != "unknown")
        if layer is None:
            return
        meta = layer.metadata["pathfm_slide"]
        if source != "file":
            self.slide_mpp.blockSignals(True)
            self.slide_mpp.setValue(meta["mpp"] or 0.0)
            self.slide_mpp.blockSignals(False)
        mpp_text = {"file": "{:.4g}", "entered": "{:.4g} (entered)"}.get(source, "unknown").format(meta["mpp"] or 0)
        rows = [
            ("file", Path(meta["path"]).name),
            ("format", f"{meta['vendor']} ({meta['backend']})"),
            ("µm/px", mpp_text),
            ("magnification", f"{meta['objective_power']:g}x" if meta["objective_power"] else "unknown"),
            ("levels", "; ".join(f"{w}x{h}" for h, w in meta["level_shapes"])),
            ("tile size", f"{meta['tile_sizes'][0][1]}x{meta['tile_sizes'][0][0]}"),
        ]
        rows += sorted((k, v) for k, v in meta["properties"].items() if not k.startswith("openslide.level["))
        self.table.setRowCount(len(rows))
        for i, (key, value) in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(str(key)))
            self.table.setItem(i, 1, QTableWidgetItem(str(value)))
        self.assoc_combo.addItems(meta["associated_images"])

    def _show_associated(self, name: str) -> None:
        slide = self.current_slide()
        if not name or slide is None:
            self.assoc_label.clear()
            return
        self.assoc_label.setPixmap(_pixmap(slide.associated_image(name)))

    # -- tissue and tiles -------------------------------------------------------
    def compute_tissue(self):
        """Compute tissue mask + tile grid of the current slide in a worker; returns the worker."""
        from ..pipelines.tissue_tiles import compute_tissue_tiles

        slide = self.current_slide()
        if slide is None:
            self.status.setText("Open a slide first.")
            return None
        params = dict(
            tile_size=self.tile_size.value(),
            mpp=self.tile_mpp.value(),
            min_tissue=self.min_tissue.value(),
            mask_mpp=self.mask_mpp.value(),
        )
        name = self.current_layer().name

        def job(progress, cancel):
            return compute_tissue_tiles(slide, progress=progress, cancel=cancel, **params)

        return self.start_task(job, description=f"tissue & tiles: {name}", on_done=lambda r: self._add_results(name, r))

    def _add_results(self, name: str, result) -> None:
        self.status.setText(add_tissue_tiles_layers(self.viewer, name, result))


def add_tissue_tiles_layers(viewer, name: str, result) -> str:
    """Add the tissue mask (Labels) and kept tiles (Shapes) of ``result`` over slide layer ``name``.

    Both layers use the slide's level-0 scale so they overlay it exactly; returns a
    one-line summary for the user.
    """
    slide, tissue, grid = result.slide, result.tissue, result.grid
    scale, translate = layer_transform(slide.mpp, tissue.downsample)
    units = layer_units(slide.mpp)
    labels_name, tiles_name = f"{name} tissue", f"{name} tiles"
    path = str(slide.path)
    mask = tissue.mask.astype(np.uint8)
    meta = {
        "pathfm_kind": "tissue",
        "pathfm_of": path,
        "classes": {0: "Background", 1: "Tissue"},
        "downsample": tissue.downsample,
    }
    # A re-run updates the layers in place: removing a layer makes napari collect garbage and
    # rebuild its visual on the GUI thread (~0.3 s here), replacing the data does not.
    if labels_name in viewer.layers:
        tissue_layer = viewer.layers[labels_name]
        tissue_layer.units, tissue_layer.scale, tissue_layer.translate = units, scale, translate
        tissue_layer.data = mask
        tissue_layer.metadata.update(meta)
    else:
        tissue_layer = viewer.add_labels(
            mask,
            name=labels_name,
            scale=scale,
            translate=translate,
            opacity=0.8,
            units=units,
            axis_labels=("y", "x"),
            metadata=meta,
        )
        tissue_layer.contour = 1
    n = len(grid.tiles)
    boxes = tile_boxes(grid) if 0 < n <= MAX_TILE_SHAPES else []
    unit = slide.mpp or 1.0
    s = grid.level0_size
    style = dict(edge_color="royalblue", face_color="transparent", edge_width=max(2.0, s / 24))
    tiles_meta = {"pathfm_kind": "tiles", "pathfm_of": path, "grid": grid.to_dict()}
    if tiles_name in viewer.layers:
        tiles_layer = viewer.layers[tiles_name]
        tiles_layer.units, tiles_layer.scale = units, (unit, unit)
        tiles_layer.selected_data = set()
        tiles_layer.data = []
        if boxes:
            tiles_layer.add_rectangles(boxes, **style)
        tiles_layer.metadata.update(tiles_meta)
    elif boxes:
        viewer.add_shapes(
            boxes,
            shape_type="rectangle",
            name=tiles_name,
            scale=(unit, unit),
            units=units,
            axis_labels=("y", "x"),
            metadata=tiles_meta,
            **style,
        )
    level_mpp = slide.level_mpp(grid.level)
    read = (
        f"read at level {grid.level} ({level_mpp:.4g} µm/px)"
        if level_mpp
        else f"read at level {grid.level} (µm/px unknown)"
    )
    out = f", {grid.mpp:.4g} µm/px per tile pixel" if grid.mpp else ""
    return (
        f"{n} tissue tiles of {grid.tile_size} px {read}{out}; tissue covers {tissue.tissue_fraction:.0%} of the slide."
    )
