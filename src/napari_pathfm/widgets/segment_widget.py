"""The "Segment" dock widget: slide → class map, painted corrections → fine-tune → re-run.

1. Pick a slide layer, a segmentation checkpoint (the bundled default model is
   listed first) and the resolution the model runs at (default: the model's
   own µm/px), press *Segment*: :func:`~napari_pathfm.pipelines.segment.segment_slide`
   runs in a worker (progress bar, Cancel) and the class map appears as a Labels
   layer over the slide, with the class names on hover.
2. With *Record corrections* on, every brush, eraser or fill stroke on that layer
   saves the tiles it touched (image + corrected mask at the model's µm/px) into
   the slide's folder in the per-user data folder
   (:func:`napari_pathfm.userdata.corrections_dir`, never beside the slide;
   :class:`~napari_pathfm.pipelines.corrections.CorrectionRecorder`). Undo/redo
   re-save the tiles (a tile back to the model's prediction is dropped).
   *Restore corrections* writes the saved tiles of a slide (e.g. from an earlier
   session) back into the mask.
3. *Fine-tune* continues training the checkpoint on those tiles in the
   background (progress bar, Cancel) — one painted stroke is enough — and saves
   a NEW checkpoint under :func:`napari_pathfm.userdata.finetune_dir`; it becomes
   the selected checkpoint. *Segment* again re-runs the slide with it. A failed or
   stopped fine-tune says why in the status line, removes its half-made folder,
   and *Show log* shows what the training reported.

A bundled demonstration model, or a run far from the resolution the model was
trained at, is named in one line under the buttons and in the layer's metadata
(``pathfm_notes``) and ``result.messages``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox, QDialog, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar, QPushButton,
    QSpinBox, QVBoxLayout, QWidget,
)  # fmt: skip

from ._checkpoint_picker import CheckpointPicker
from ._legend import Legend
from ._runner import TaskRunner
from .slide_widget import fill_slide_combo

__all__ = ["SegmentWidget", "model_notes"]

#: a run this many times coarser/finer than the model's training µm/px is called out of domain
MPP_TOLERANCE = 1.5
#: largest class map (pixels) kept as an unedited copy, so that fully undone tiles can be dropped
BASELINE_MAX_PIXELS = 256 * 2**20


def model_notes(checkpoint, card: dict, slide_mpp: Optional[float], run_mpp: Optional[float]) -> list[str]:
    """Plain sentences about what the model is and how far this run is from its training domain.

    - a checkpoint bundled with the package is a small demonstration model;
    - the run's µm/px more than :data:`MPP_TOLERANCE` times off the card's ``input_mpp``;
    - a slide scanned more than that much coarser than the model needs (it cannot show the detail).
    """
    from importlib.resources import files

    notes = []
    bundled = Path(str(files("napari_pathfm") / "data" / "models")).resolve()
    if checkpoint and Path(checkpoint).resolve().parent == bundled:
        data = str(card.get("training_data") or "").split(" ")[0] or "a small public set"
        notes.append(f"Demonstration model ({Path(checkpoint).stem}: small, CPU-trained on {data}) — not for diagnosis.")
    trained = card.get("input_mpp")
    if trained and run_mpp and max(run_mpp / trained, trained / run_mpp) > MPP_TOLERANCE:
        notes.append(f"Out of domain: run at {run_mpp:.3g} µm/px, but the model was trained at {trained:.3g} µm/px.")
    if trained and slide_mpp and slide_mpp > MPP_TOLERANCE * trained:
        notes.append(f"Out of domain: the slide has {slide_mpp:.3g} µm/px, coarser than the {trained:.3g} µm/px "
                     "the model was trained at.")  # fmt: skip
    return notes


class _Progress(QObject):
    """Carries a worker's ``progress(done, total, message)`` to the dock's progress bar (queued to the GUI thread)."""

    progressed = Signal(int, int, str)


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
        self._baseline = None
        self.notes: list[str] = []
        self.log_lines: list[str] = []
        self.log_dialog = None
        self._progress = _Progress(self)
        self._progress.progressed.connect(self._on_progress)

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
        self.record.setToolTip("Save every painted tile (image + corrected mask) in your napari-pathfm data folder "
                               "for fine-tuning")  # fmt: skip
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
        self.restore_btn = QPushButton("Restore corrections")
        self.restore_btn.setToolTip("Put the corrections saved for this slide (earlier sessions) back into the mask")
        self.restore_btn.setEnabled(False)
        self.restore_btn.clicked.connect(self.restore_corrections)
        self.log_btn = QPushButton("Show log")
        self.log_btn.setToolTip("What the last fine-tune reported (training events and the error, if any)")
        self.log_btn.setEnabled(False)
        self.log_btn.clicked.connect(self.show_log)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: #e0a040;")
        self.note.setVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.legend = Legend("Legend")  # class names ↔ the colours of the mask (same as in its GeoJSON)
        self._runs = 0

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
        layout.addWidget(self.note)
        corr_row = QHBoxLayout()
        corr_row.addWidget(self.record)
        corr_row.addWidget(self.restore_btn)
        layout.addLayout(corr_row)
        layout.addLayout(tune_row)
        layout.addWidget(self.progress_bar)
        log_row = QHBoxLayout()
        log_row.addWidget(self.status, 1)
        log_row.addWidget(self.log_btn)
        layout.addLayout(log_row)
        layout.addWidget(self.legend)
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

        report = self._reporter()

        def job(progress, cancel):
            import numpy as np

            from ..models.checkpoint import checkpoint_paths, read_card

            result = segment_slide(slide_path, checkpoint, mpp=mpp, progress=report(progress), cancel=cancel)
            card = read_card(checkpoint_paths(result.checkpoint or checkpoint)[1])
            notes = model_notes(result.checkpoint or checkpoint, card, result.mpp, result.model_mpp)
            result.messages.extend(n for n in notes if n not in result.messages)
            labels = result.labels
            baseline = np.array(labels) if isinstance(labels, np.ndarray) and labels.size <= BASELINE_MAX_PIXELS else None
            return result, baseline, notes, card

        return self.runner.start(job, description=f"Segment: {name}", on_done=self._show_result,
                                 on_error=self._failed)  # fmt: skip

    def _show_result(self, done) -> None:
        from ..colors import label_colormap
        from ..io.slide import open_slide

        result, self._baseline, self.notes, self._card = done
        self._stop_recording()
        previous, self.result = self.result, result
        kwargs = result.layer_kwargs()
        kwargs["metadata"]["pathfm_notes"] = list(self.notes)
        kwargs["name"] = f"{self._slide_layer_name} segmentation"
        kwargs["metadata"]["classes"] = dict(enumerate(result.classes))  # the legend and GeoJSON writer read it
        colormap = label_colormap(result.classes)
        existing = self.viewer.layers[kwargs["name"]] if kwargs["name"] in self.viewer.layers else None
        if existing is not None:
            existing.data = result.labels
            existing.metadata.update(kwargs["metadata"])
            existing.colormap = colormap
            layer = existing
        else:
            layer = self.viewer.add_labels(result.labels, opacity=0.5, colormap=colormap, **kwargs)
        self._set_class_features(layer, result.classes)
        self._runs += 1
        model = Path(result.checkpoint).stem if getattr(result, "checkpoint", None) else "model"
        self.legend.show_layers([layer], title=f"{model}, run {self._runs}")
        self.labels_layer = layer
        if previous is not None:  # its temporary store (large slides) only goes once the layer holds the new map
            previous.close()
        if self._slide is not None:
            self._slide.close()
        self._slide = open_slide(self.viewer.layers[self._slide_layer_name].metadata["pathfm_path"])
        from ..tiles.cached_encoder import cache_note

        self.note.setText(" ".join(self.notes))
        self.note.setVisible(bool(self.notes))
        text = f"{len(result.grid)} tiles at {result.model_mpp or 0:.3g} µm/px; classes: {', '.join(result.classes)}."
        others = [m for m in result.messages if m not in self.notes]
        self.status.setText(" ".join(t for t in [text, cache_note(result.cache), *others] if t))
        if self.record.isChecked():
            self._start_recording()
        n_saved = len(self.recorder.saved) if self.recorder is not None else 0
        self.restore_btn.setEnabled(n_saved > 0)
        if n_saved:
            self.status.setText(self.status.text() + f" {n_saved} corrected tiles of this slide are saved: "
                                "press Restore corrections to put them into the mask.")  # fmt: skip

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
        card = getattr(self, "_card", None)
        if card is None:
            card = read_card(Path(self.result.checkpoint).with_suffix(".json")) if self.result.checkpoint else {}
        tile = int(card.get("tile_size") or (card.get("config") or {}).get("image_size") or 256)
        baseline = self._baseline if self._baseline is not None and self._baseline.shape == self.labels_layer.data.shape else None
        try:
            self.recorder = CorrectionRecorder(
                self._slide, self.labels_layer.data, mpp=self.result.model_mpp or self._slide.mpp,
                classes=self.result.classes, tile_size=tile, labels_downsample=1.0, baseline=baseline,
                schedule=lambda fn: QTimer.singleShot(0, fn),  # napari may write a stroke after its paint event
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

    def restore_corrections(self):
        """Write the saved corrected tiles of this slide into the mask (in the worker); returns the worker."""
        recorder, layer = self.recorder, self.labels_layer
        if recorder is None or layer is None or not recorder.saved:
            self.status.setText("No saved corrections for this slide and model.")
            return None

        def job(progress, cancel):
            return recorder.restore()

        def done(names) -> None:
            layer.refresh()
            self.restore_btn.setEnabled(False)
            self.status.setText(f"Restored {len(names)} corrected tiles from {recorder.folder}.")

        return self.runner.start(job, description="Restore corrections", on_done=done, on_error=self._failed)

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
        n = len(self.recorder.saved)
        report = self._reporter()
        log = self.log_lines = [f"Fine-tune of {checkpoint} on {n} corrected tiles in {folder}"]

        def on_event(event: dict) -> None:  # worker thread; list.append is atomic
            import json

            log.append(json.dumps(event, default=str))

        def job(progress, cancel):
            return finetune_from_corrections(checkpoint, folder, epochs=epochs, lr=lr, progress=report(progress),
                                             cancel=cancel, on_event=on_event)  # fmt: skip

        self.log_btn.setEnabled(True)
        self.status.setText(f"Fine-tuning on {n} corrected tile{'s' * (n != 1)}"
                            f"{' (no validation tile: the last epoch is kept)' if n == 1 else ''}…")  # fmt: skip
        return self.runner.start(job, description="Fine-tune on corrections", on_done=self._finetuned,
                                 on_error=self._failed)  # fmt: skip

    def _finetuned(self, new_checkpoint: Path) -> None:
        from ..checkpoints import add_search_folder

        add_search_folder(Path(new_checkpoint).parent.parent)
        self.checkpoint.refresh()
        self.checkpoint.set_path(new_checkpoint)
        self.log_lines.append(f"New checkpoint: {new_checkpoint}")
        self.status.setText(f"New checkpoint {Path(new_checkpoint).parent.name} is selected; press Segment to "
                            f"re-run with it. (Saved in {Path(new_checkpoint).parent}.)")  # fmt: skip

    # -- progress, errors, log -----------------------------------------------------------------
    def _reporter(self):
        """Wrap a worker's ``progress`` so the dock's own bar follows it too (through a queued signal)."""
        signal = self._progress.progressed
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setVisible(True)

        def wrap(progress):
            def both(done, total, message=""):
                signal.emit(int(done), int(total), str(message))
                progress(done, total, message)

            return both

        return wrap

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))
        if message:
            self.progress_bar.setFormat(f"{message} (%p%)" if total > 0 else message)

    def _failed(self, exc: BaseException) -> None:
        """The one message of a failed or stopped task (already mapped by the runner), in the status line."""
        text = self.runner.last_message or str(exc)
        if self.runner.last_error is not None and self.log_lines:
            import traceback

            self.log_lines.append("".join(traceback.format_exception(exc)).rstrip())
        from ..errors import Cancelled

        if isinstance(exc, (Cancelled, KeyboardInterrupt)):
            self.status.setText(f"Stopped: {text}")
        else:
            more = " Show log for what the training reported." if self.log_btn.isEnabled() else ""
            self.status.setText(f"Failed: {text}{more}")

    def show_log(self) -> QDialog:
        """Open the last fine-tune's log (training events, error) in a read-only dialog; returns it."""
        if self.log_dialog is None:
            self.log_dialog = QDialog(self)
            self.log_dialog.setWindowTitle("Fine-tune log")
            self.log_dialog.resize(720, 420)
            self.log_dialog.text = QPlainTextEdit(self.log_dialog)
            self.log_dialog.text.setReadOnly(True)
            QVBoxLayout(self.log_dialog).addWidget(self.log_dialog.text)
        self.log_dialog.text.setPlainText("\n".join(self.log_lines) or "No fine-tune has run yet.")
        self.log_dialog.show()
        return self.log_dialog

    def _on_state(self, state: str) -> None:
        running = state == "running"
        self.segment_btn.setEnabled(not running)
        self.finetune_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)
        if not running:
            self.progress_bar.setVisible(False)
        if state == "cancelled":
            self.status.setText("Stopped.")
        elif state == "error" and self.runner.last_error is not None:
            self.status.setText(f"Failed: {self.runner.last_message}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self._stop_recording()
        if self._slide is not None:
            self._slide.close()
        super().closeEvent(event)
