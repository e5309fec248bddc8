"""The MIL dock's review queue: the slides of a MIL batch, least certain first; Agree / Disagree / label.

*Batch folder…* (or :meth:`ReviewPanel.load`) reads the ``--out`` folder of ``pathfm batch --task mil``
in the dock's worker (:func:`napari_pathfm.pipelines.mil_review.review_queue`) and lists each slide
with its prediction, probability, bootstrap interval and flip rate, and the verdict given so far.
Clicking a slide opens it (unless it is open), lays its heatmap over it (read in the worker), draws
its top patches as boxes and centres the view on the strongest one. *Agree*, *Disagree* and
*Set label* save the verdict to ``review.csv`` in the batch folder
(:class:`~napari_pathfm.pipelines.mil_review.ReviewLog`, a few hundred bytes, written atomically)
and move on to the next slide; that CSV is a ``slide,label`` table MIL training reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
)

from ..coords import layer_units
from ..layers import HEAT_PERCENTILES
from ._colormaps import heatmap_look
from ._compact import compact_combo
from ._dock import viewer_camera

#: Edge colour of the top-patch boxes of a reviewed slide.
BOX_COLOR = "cyan"


class ReviewPanel(QGroupBox):
    """Review a folder of MIL batch predictions inside the MIL dock ``dock`` (a TaskDock)."""

    def __init__(self, dock):
        super().__init__("Review a batch")
        self.dock, self.viewer = dock, dock.viewer
        self.items: list = []
        self.log = None
        self.current = None
        self.folder_btn = QPushButton("Batch folder…")
        self.folder_btn.setToolTip("The --out folder of `pathfm batch --task mil`: its slides, least certain first")
        self.folder_btn.clicked.connect(self._browse)
        self.list = QListWidget()
        self.list.currentRowChanged.connect(self.open_row)
        self.agree_btn = QPushButton("Agree")
        self.disagree_btn = QPushButton("Disagree")
        self.label_combo = compact_combo(QComboBox())
        self.label_btn = QPushButton("Set label")
        self.agree_btn.clicked.connect(lambda: self.record("agree"))
        self.disagree_btn.clicked.connect(lambda: self.record("disagree"))
        self.label_btn.clicked.connect(lambda: self.record("label", self.label_combo.currentText()))
        verdicts = QHBoxLayout()
        for w in (self.agree_btn, self.disagree_btn, self.label_combo, self.label_btn):
            verdicts.addWidget(w)
        layout = QVBoxLayout(self)
        layout.addWidget(self.folder_btn)
        layout.addWidget(self.list)
        layout.addLayout(verdicts)
        self._enable(False)

    def _enable(self, on: bool) -> None:
        for w in (self.agree_btn, self.disagree_btn, self.label_combo, self.label_btn):
            w.setEnabled(on)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "MIL batch output folder")
        if folder:
            self.load(folder)

    def load(self, folder: str | Path):
        """Read the batch folder in the worker and fill the list; returns the worker."""
        from ..pipelines.mil_review import ReviewLog, review_queue

        def job(progress, cancel):
            return review_queue(folder), ReviewLog(folder)

        return self.dock.start_task(job, description="Review queue", on_done=self._show)

    def _show(self, out) -> None:
        self.items, self.log = out
        self.list.blockSignals(True)
        self.list.clear()
        for item in self.items:
            self.list.addItem(QListWidgetItem(self._text(item)))
        self.list.blockSignals(False)
        reviewed = sum(self.log.label_of(it) is not None for it in self.items)
        self.dock.status.setText(
            f"{len(self.items)} slides, least certain first; {reviewed} reviewed (verdicts in {self.log.path})."
        )
        if self.items:
            self.list.setCurrentRow(0)

    def _text(self, item) -> str:
        label = self.log.label_of(item) if self.log else None
        return f"{item.name}: {item.describe()}" + (f"  ✓ {label}" if label else "")

    # -- one slide ------------------------------------------------------------------------------
    def open_row(self, row: int):
        """Show slide ``row`` of the list: open it, its heatmap (worker), its top patches; returns the worker."""
        if not 0 <= row < len(self.items):
            return None
        item = self.current = self.items[row]
        self.label_combo.clear()
        self.label_combo.addItems(item.classes)
        self.label_combo.setCurrentText(self.log.label_of(item) or item.predicted)
        self._enable(True)
        slide_layer = next(
            (la for la in self.viewer.layers if str(la.metadata.get("pathfm_path", "")) == str(item.slide)), None
        )
        if slide_layer is None:
            if not item.slide.is_file():
                self.dock.status.setText(f"{item.slide}: slide not found (moved or renamed since the batch ran).")
                return None
            (slide_layer,) = self.viewer.open(str(item.slide), plugin="napari-pathfm")  # lazy: tiles load as shown
        heatmap = item.heatmap

        def job(progress, cancel):
            if heatmap is None:
                return None
            from ..io.ome_tiff import read_ome_tiff

            levels, _mpp, meta = read_ome_tiff(heatmap)
            return np.asarray(levels[0], np.float32), float(meta.get("downsample") or item.level0_tile_size)

        return self.dock.start_task(
            job, description=f"Review: {item.name}", on_done=lambda heat: self._show_slide(item, slide_layer, heat)
        )

    def _show_slide(self, item, slide_layer, heat) -> None:
        mpp = (slide_layer.metadata.get("pathfm_slide") or {}).get("mpp")
        unit = mpp or 1.0
        if heat is not None:
            data, cell = heat
            positive = data[data > 0]  # cells without a patch are 0; limits as the dock's own heatmap
            lo, hi = (float(v) for v in np.percentile(positive, HEAT_PERCENTILES)) if positive.size else (0.0, 1.0)
            meta = {"pathfm_kind": "mil-heatmap", "class": item.predicted, "downsample": cell}
            look = heatmap_look(mpp, cell, (lo, max(hi, lo + 1e-6)))
            self.dock.show_layer(f"{slide_layer.name} MIL heatmap", data, "image", metadata=meta, **look)
        size = item.level0_tile_size
        boxes = [np.array([[p["y"], p["x"]], [p["y"] + size, p["x"] + size]], float) for p in item.top_patches]
        name = f"{slide_layer.name} MIL top patches"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        if boxes:
            self.viewer.add_shapes(
                boxes,
                shape_type="rectangle",
                name=name,
                scale=(unit, unit),
                units=layer_units(mpp),
                edge_color=BOX_COLOR,
                face_color="transparent",
                edge_width=max(2.0, 0.04 * size),
                metadata={"pathfm_kind": "mil-top-patch"},
            )
            camera = viewer_camera(self.viewer)
            camera.center = tuple(float(v) for v in boxes[0].mean(axis=0) * unit)
        self.dock.status.setText(f"{item.name}: {item.describe()}. Agree, Disagree or set the label.")

    def record(self, verdict: str, label: str | None = None) -> dict | None:
        """Save the verdict for the current slide and go to the next one; returns the saved row."""
        if self.current is None or self.log is None:
            return None
        try:
            row = self.log.record(self.current, verdict, label)
        except Exception as exc:  # noqa: BLE001 - one message in the dock, never a traceback
            self.dock.status.setText(str(exc))
            return None
        i = self.items.index(self.current)
        self.list.item(i).setText(self._text(self.current))
        self.dock.status.setText(f"{self.current.name}: {row['label']} saved to {self.log.path.name}.")
        if i + 1 < len(self.items):
            self.list.setCurrentRow(i + 1)
        return row
