"""The "Segment" dock widget: slide → class map, painted corrections → fine-tune → re-run.

1. Pick a slide layer, a segmentation checkpoint (the bundled default model is
   listed first) and the resolution the model runs at (default: the model's
   own µm/px), press *Segment*: :func:`~napari_pathfm.pipelines.segment.segment_slide`
   runs in a worker (progress bar, Cancel) and the class map appears as a Labels
   layer over the slide, with the class names on hover.
2. With *Record corrections* on, every brush, eraser or fill stroke on that layer
   saves the tiles it touched (image + corrected mask at the model's µm/px) into
   ``<slide>.pathfm-corrections/`` next to the slide
   (:class:`~napari_pathfm.pipelines.corrections.CorrectionRecorder`).
3. *Fine-tune* continues training the checkpoint on those tiles in the
   background (progress, Stop) and saves a NEW checkpoint under the corrections
   folder; it becomes the selected checkpoint. *Segment* again re-runs the slide
   with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qtpy.QtWidgets import (
    QCheckBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget,
)  # fmt: skip

from ._checkpoint_picker import CheckpointPicker
from ._runner import TaskRunner
from .slide_widget import fill_slide_combo

__all__ = ["SegmentWidget"]


class SegmentWidget(QWidget):
    """Segment a slide, record painted corrections, fine-tune on them and re-run."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.runner = TaskRunner(on_state=self._on_state, parent=self)
        self.result = None
        self.recorder = None
        self.labels_layer = None
        self._slide = None

        from qtpy.QtWidgets import QComboBox

        self.layer_combo = QComboBox()
        self.checkpoint = CheckpointPicker("segment", self)
        self.mpp = QDoubleSpinBox()
        self.mpp.setRange(0.0, 64.0)
        self.mpp.setDecimals(3)
        self.mpp.setSingleStep(0.25)
        self.mpp.setSpecialValueText("model's µm/px")
        self.mpp.setToolTip("µm per pixel the model runs at; 0 = the resolution it was trained at")
        self.segment_btn = QPushButton("Segment")
        self.segment_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.runner.cancel)
        self.record = QCheckBox("Record corrections")
        self.record.setChecked(True)
        self.record.setToolTip("Save every painted tile (image + corrected mask) next to the slide for fine-tuning")
        self.record.toggled.connect(self._toggle_recording)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 500)
        self.epochs.setValue(5)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1e-1)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-4)
        self.lr.setToolTip("Learning rate of the fine-tuning (AdamW)")
        self.finetune_btn = QPushButton("Fine-tune")
        self.finetune_btn.setToolTip("Train the checkpoint further on the recorded corrections (new checkpoint)")
        self.finetune_btn.clicked.connect(self.finetune)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("slide", self.layer_combo)
        form.addRow("checkpoint", self.checkpoint)
        form.addRow("resolution", self.mpp)
        run_row = QHBoxLayout()
        run_row.addWidget(self.segment_btn)
        run_row.addWidget(self.cancel_btn)
        tune_row = QHBoxLayout()
        tune_row.addWidget(QLabel("epochs"))
        tune_row.addWidget(self.epochs)
        tune_row.addWidget(QLabel("lr"))
        tune_row.addWidget(self.lr)
        tune_row.addWidget(self.finetune_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(run_row)
        layout.addWidget(self.record)
        layout.addLayout(tune_row)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- inputs -----------------------------------------------------------------------
    def _refresh_layers(self, *_) -> None:
        fill_slide_combo(self.layer_combo, self.viewer)
        if self.labels_layer is not None and self.labels_layer not in self.viewer.layers:
            self._stop_recording()
            self.labels_layer = None

    # -- segment ----------------------------------------------------------------------
    def run(self):
        """Segment the chosen slide in a worker; returns the worker (None if inputs are missing)."""
        from ..pipelines.segment import segment_slide

        name, checkpoint = self.layer_combo.currentText(), self.checkpoint.path()
        if not name:
            self.status.setText("Open a slide first (File → Open, or the Slide widget).")
            return None
        if not checkpoint:
            self.status.setText("No segmentation checkpoint: train one (pathfm train training/pathsam2/…) or browse to one.")
            return None
        slide_path = self.viewer.layers[name].metadata["pathfm_path"]
        mpp = self.mpp.value() or None
        self._slide_layer_name = name

        def job(progress, cancel):
            return segment_slide(slide_path, checkpoint, mpp=mpp, progress=progress, cancel=cancel)

        return self.runner.start(job, description=f"Segment: {name}", on_done=self._show_result)

    def _show_result(self, result) -> None:
        from ..io.slide import open_slide

        self._stop_recording()
        previous, self.result = self.result, result
        kwargs = result.layer_kwargs()
        kwargs["name"] = f"{self._slide_layer_name} segmentation"
        existing = self.viewer.layers[kwargs["name"]] if kwargs["name"] in self.viewer.layers else None
        if existing is not None:
            existing.data = result.labels
            existing.metadata.update(kwargs["metadata"])
            layer = existing
        else:
            layer = self.viewer.add_labels(result.labels, opacity=0.5, **kwargs)
        self._set_class_features(layer, result.classes)
        self.labels_layer = layer
        if previous is not None:  # its temporary store (large slides) only goes once the layer holds the new map
            previous.close()
        if self._slide is not None:
            self._slide.close()
        self._slide = open_slide(self.viewer.layers[self._slide_layer_name].metadata["pathfm_path"])
        from ..tiles.cached_encoder import cache_note

        text = f"{len(result.grid)} tiles at {result.model_mpp or 0:.3g} µm/px; classes: {', '.join(result.classes)}."
        self.status.setText(" ".join(t for t in [text, cache_note(result.cache), *result.messages] if t))
        if self.record.isChecked():
            self._start_recording()

    @staticmethod
    def _set_class_features(layer, classes) -> None:
        import pandas as pd

        layer.features = pd.DataFrame({"class": list(classes)}, index=range(len(classes)))

    # -- corrections ----------------------------------------------------------------------
    def _toggle_recording(self, on: bool) -> None:
        if on:
            self._start_recording()
        else:
            self._stop_recording()

    def _start_recording(self) -> None:
        from ..models.checkpoint import read_card
        from ..pipelines.corrections import CorrectionRecorder

        if self.labels_layer is None or self.result is None or self.recorder is not None:
            return
        card = read_card(Path(self.result.checkpoint).with_suffix(".json")) if self.result.checkpoint else {}
        tile = int(card.get("tile_size") or (card.get("config") or {}).get("image_size") or 256)
        try:
            self.recorder = CorrectionRecorder(
                self._slide, self.labels_layer.data, mpp=self.result.model_mpp or self._slide.mpp,
                classes=self.result.classes, tile_size=tile, labels_downsample=1.0,
            ).attach(self.labels_layer)  # fmt: skip
        except Exception as exc:  # a corrections folder of another model: say so, keep the mask
            self.status.setText(f"Corrections are not recorded: {exc}")
            return
        self.status.setText(self.status.text() + f" Corrections go to {self.recorder.folder}.")

    def _stop_recording(self) -> None:
        if self.recorder is not None:
            self.recorder.flush()
            self.recorder.detach()
            self.recorder = None

    def corrections_folder(self) -> Optional[Path]:
        return self.recorder.folder if self.recorder is not None else None

    # -- fine-tune --------------------------------------------------------------------------
    def finetune(self):
        """Fine-tune the current checkpoint on the recorded corrections in a worker; returns the worker."""
        from ..training.finetune import finetune_from_corrections

        if self.recorder is None:
            self.status.setText("Segment a slide and paint corrections first (with 'Record corrections' on).")
            return None
        self.recorder.flush()
        if not self.recorder.saved:
            self.status.setText("No corrections yet: paint on the segmentation layer first.")
            return None
        checkpoint, folder, epochs, lr = self.checkpoint.path(), self.recorder.folder, self.epochs.value(), self.lr.value()

        def job(progress, cancel):
            return finetune_from_corrections(checkpoint, folder, epochs=epochs, lr=lr, progress=progress, cancel=cancel)

        return self.runner.start(job, description="Fine-tune on corrections", on_done=self._finetuned)

    def _finetuned(self, new_checkpoint: Path) -> None:
        from ..checkpoints import add_search_folder

        add_search_folder(Path(new_checkpoint).parent.parent)
        self.checkpoint.refresh()
        self.checkpoint.set_path(new_checkpoint)
        self.status.setText(f"New checkpoint {new_checkpoint}; press Segment to re-run with it.")

    def _on_state(self, state: str) -> None:
        running = state == "running"
        self.segment_btn.setEnabled(not running)
        self.finetune_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        if state == "cancelled":
            self.status.setText("Stopped.")
        elif state == "error" and self.runner.last_error is not None:
            self.status.setText(f"Failed: {self.runner.last_message}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self._stop_recording()
        if self._slide is not None:
            self._slide.close()
        super().closeEvent(event)
