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

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QDialog,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ._checkpoint_picker import CheckpointPicker
from ._compact import compact_combo
from ._dock import TaskDock
from ._legend import Legend
from ._prompting import PromptRow
from .slide_widget import fill_slide_combo

__all__ = ["SegmentWidget"]

#: largest class map (pixels) kept as an unedited copy, so that fully undone tiles can be dropped
BASELINE_MAX_PIXELS = 256 * 2**20


class SegmentWidget(TaskDock):
    """Segment a slide, record painted corrections, fine-tune on them and re-run."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.result = None
        self.recorder = None
        self.labels_layer = None
        self._slide = None
        self._baseline = None
        self.log_lines: list[str] = []
        self.log_dialog = None

        from qtpy.QtWidgets import QComboBox

        self.layer_combo = compact_combo(QComboBox())
        self.checkpoint = CheckpointPicker("segment", self)
        self.mpp = QDoubleSpinBox()
        self.mpp.setRange(0.0, 64.0)
        self.mpp.setDecimals(3)
        self.mpp.setSingleStep(0.25)
        self.mpp.setSpecialValueText("model's µm/px")
        self.mpp.setToolTip("µm per pixel the model runs at; 0 = the resolution it was trained at")
        self.segment_btn = QPushButton("Segment")
        self.segment_btn.clicked.connect(self.run)
        self.record = QCheckBox("Record corrections")
        self.record.setChecked(True)
        self.record.setToolTip(
            "Save every painted tile (image + corrected mask) in your napari-pathfm data folder for fine-tuning"
        )
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
        self.seed_btn = QPushButton("From annotations")
        self.seed_btn.setToolTip(
            "Draw opened QuPath/ASAP annotations and prompted objects into the mask as corrections"
        )
        self.seed_btn.clicked.connect(self.corrections_from_annotations)
        self.log_btn = QPushButton("Show log")
        self.log_btn.setToolTip("What the last fine-tune reported (training events and the error, if any)")
        self.log_btn.setEnabled(False)
        self.log_btn.clicked.connect(self.show_log)
        self.prompts = PromptRow(self)  # clicks/boxes → objects (its own worker; see _prompting)
        self.run_buttons = [self.segment_btn, self.finetune_btn]
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
        corr_row = QHBoxLayout()
        corr_row.addWidget(self.record)
        corr_row.addWidget(self.restore_btn)
        corr_row.addWidget(self.seed_btn)
        layout.addWidget(self.prompts)
        layout.addLayout(corr_row)
        layout.addLayout(tune_row)
        log_row = QHBoxLayout()
        log_row.addWidget(self.task_pieces(), 1)
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
            self.status.setText(
                "No segmentation checkpoint: train one (pathfm train training/pathsam2/…) or browse to one."
            )
            return None
        slide_path = self.viewer.layers[name].metadata["pathfm_path"]
        mpp = self.mpp.value() or None
        image_mpp = self.slide_image_mpp(name)  # the µm/px entered in the Slide dock (file has none)
        self._slide_layer_name = name
        record = self.record.isChecked()

        def job(progress, cancel):
            # everything the result's display needs is made here, off the GUI thread (contract 10)
            import numpy as np

            from ..io.slide import open_slide
            from ..layers import class_features
            from ..models.checkpoint import checkpoint_paths, read_card
            from ..tiles.cached_encoder import cache_note
            from ._colormaps import label_colormap

            result = segment_slide(
                slide_path, checkpoint, mpp=mpp, progress=progress, cancel=cancel, image_mpp=image_mpp
            )
            card = read_card(checkpoint_paths(result.checkpoint or checkpoint)[1])
            labels = result.labels
            baseline = (
                np.array(labels) if isinstance(labels, np.ndarray) and labels.size <= BASELINE_MAX_PIXELS else None
            )
            slide = open_slide(slide_path)  # for the corrections recorder
            if image_mpp is not None and slide.mpp is None:
                slide.mpp = image_mpp
            look = {
                "colormap": label_colormap(result.classes),
                "features": class_features(list(result.classes)),
                "cache_note": cache_note(result.cache),
            }
            if result.object_classes is not None:  # the status bar names each object's class
                look["objects"] = class_features([result.classes[c] for c in result.object_classes])
            recorder = self._make_recorder(slide, labels, result, card, baseline) if record else None
            return result, baseline, card, slide, look, recorder

        return self.start_task(job, description=f"Segment: {name}", on_done=self._show_result)

    def _show_result(self, done) -> None:
        result, self._baseline, self._card, slide, look, recorder = done
        self._stop_recording()
        previous, self.result = self.result, result
        notes = list(getattr(result, "notes", []) or [])
        kwargs = result.layer_kwargs()
        kwargs["metadata"]["pathfm_notes"] = notes
        kwargs["metadata"]["classes"] = dict(enumerate(result.classes))  # the legend and GeoJSON writer read it
        kwargs.pop("name", None)
        layer = self.show_layer(
            f"{self._slide_layer_name} segmentation",
            result.labels,
            "labels",
            opacity=0.5,
            colormap=look["colormap"],
            features=look["features"],
            **kwargs,
        )
        self._runs += 1
        model = Path(result.checkpoint).stem if getattr(result, "checkpoint", None) else "model"
        self.legend.show_layers([layer], title=f"{model}, run {self._runs}")
        self.labels_layer = layer
        self._show_objects(result, kwargs, look.get("objects"))
        if previous is not None:  # its temporary store (large slides) only goes once the layer holds the new map
            previous.close()
        if self._slide is not None:
            self._slide.close()
        self._slide = slide
        self.show_notes(notes)
        text = f"{len(result.grid)} tiles at {result.model_mpp or 0:.3g} µm/px; classes: {', '.join(result.classes)}."
        if result.object_classes is not None:
            text += f" {len(result.object_classes) - 1} objects (layer '{self._slide_layer_name} objects')."
        others = [m for m in result.messages if m not in notes]
        self.status.setText(" ".join(t for t in [text, look["cache_note"], *others] if t))
        self.restore_btn.setEnabled(False)
        if recorder is not None and self.record.isChecked():
            self._attach_recorder(recorder)

    def _show_objects(self, result, kwargs: dict, features) -> None:
        """One label per gland (``result.instances``) in a layer of its own, hidden at first; a run
        without objects removes the previous run's layer."""
        name = f"{self._slide_layer_name} objects"
        if result.instances is None:
            self.remove_layers([name])
            return
        names = {i: result.classes[c] for i, c in enumerate(result.object_classes)}  # the GeoJSON writer's classes
        meta = {**kwargs["metadata"], "pathfm_kind": "segment_objects", "classes": names}
        layer_kw = {k: v for k, v in kwargs.items() if k != "metadata"}
        first = name not in self.viewer.layers
        layer = self.show_layer(name, result.instances, "labels", features=features, metadata=meta, **layer_kw)
        if first:
            layer.visible = False

    # -- corrections ----------------------------------------------------------------------
    def _toggle_recording(self, on: bool) -> None:
        if on:
            self._start_recording()
        else:
            self._stop_recording()

    def _start_recording(self) -> None:
        if self.labels_layer is None or self.result is None or self.recorder is not None:
            return
        recorder = self._make_recorder(
            self._slide, self.labels_layer.data, self.result, getattr(self, "_card", None), self._baseline
        )
        self._attach_recorder(recorder)

    @staticmethod
    def _make_recorder(slide, labels, result, card, baseline):
        """A corrections recorder for this result (reads the slide's saved corrections: run it in the worker).

        Returns the recorder, or the exception that says why corrections cannot be recorded.
        """
        from ..models.checkpoint import read_card
        from ..pipelines.corrections import CorrectionRecorder

        if card is None:
            card = read_card(Path(result.checkpoint).with_suffix(".json")) if result.checkpoint else {}
        tile = int(card.get("tile_size") or (card.get("config") or {}).get("image_size") or 256)
        baseline = baseline if baseline is not None and baseline.shape == labels.shape else None
        try:
            return CorrectionRecorder(
                slide,
                labels,
                mpp=result.model_mpp or slide.mpp,
                classes=result.classes,
                tile_size=tile,
                labels_downsample=1.0,
                baseline=baseline,
                schedule=lambda fn: QTimer.singleShot(0, fn),  # napari may write a stroke after its paint event
            )
        except Exception as exc:  # noqa: BLE001 - a corrections folder of another model: say so, keep the mask
            return exc

    def _attach_recorder(self, recorder) -> None:
        if isinstance(recorder, Exception):
            self.status.setText(f"Corrections are not recorded: {recorder}")
            return
        # a plugin dock gets napari's public-only proxies; the recorder wraps the layer's own undo/redo
        layer = getattr(self.labels_layer, "__wrapped__", self.labels_layer)
        recorder.labels = layer.data
        try:
            self.recorder = recorder.attach(layer)
        except Exception as exc:  # noqa: BLE001 - never let the recorder break showing the result
            self.status.setText(f"Corrections are not recorded: {exc}")
            return
        self.status.setText(self.status.text() + f" Corrections go to {self.recorder.folder}.")
        n_saved = len(self.recorder.saved)
        self.restore_btn.setEnabled(n_saved > 0)
        if n_saved:
            self.status.setText(
                self.status.text() + f" {n_saved} corrected tiles of this slide are saved: "
                "press Restore corrections to put them into the mask."
            )

    def _stop_recording(self) -> None:
        if self.recorder is not None:
            self.recorder.flush()
            self.recorder.detach()
            self.recorder = None

    def corrections_folder(self) -> Path | None:
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

        return self.start_task(job, description="Restore corrections", on_done=done)

    def corrections_from_annotations(self):
        """Opened QuPath/ASAP annotation layers drawn into the mask as corrections (worker); returns the worker."""
        from ._annotation_corrections import start_corrections_from_annotations

        return start_corrections_from_annotations(self)

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
        checkpoint, folder, epochs, lr = (
            self.checkpoint.path(),
            self.recorder.folder,
            self.epochs.value(),
            self.lr.value(),
        )
        n = len(self.recorder.saved)
        log = self.log_lines = [f"Fine-tune of {checkpoint} on {n} corrected tiles in {folder}"]

        def on_event(event: dict) -> None:  # worker thread; list.append is atomic
            import json

            log.append(json.dumps(event, default=str))

        def job(progress, cancel):
            return finetune_from_corrections(
                checkpoint, folder, epochs=epochs, lr=lr, progress=progress, cancel=cancel, on_event=on_event
            )

        self.log_btn.setEnabled(True)
        self.status.setText(
            f"Fine-tuning on {n} corrected tile{'s' * (n != 1)}"
            f"{' (no validation tile: the last epoch is kept)' if n == 1 else ''}…"
        )
        return self.start_task(job, description="Fine-tune on corrections", on_done=self._finetuned)

    def _finetuned(self, new_checkpoint: Path) -> None:
        from ..checkpoints import add_search_folder

        add_search_folder(Path(new_checkpoint).parent.parent)
        self.checkpoint.refresh()
        self.checkpoint.set_path(new_checkpoint)
        self.log_lines.append(f"New checkpoint: {new_checkpoint}")
        self.status.setText(
            f"New checkpoint {Path(new_checkpoint).parent.name} is selected; press Segment to "
            f"re-run with it. (Saved in {Path(new_checkpoint).parent}.)"
        )

    # -- errors, log -------------------------------------------------------------------------
    def task_failed(self, exc: BaseException) -> None:
        """The base's one message; a failed fine-tune also puts its traceback into the log."""
        if self.runner.last_error is not None and self.log_lines:
            import traceback

            self.log_lines.append("".join(traceback.format_exception(exc)).rstrip())
        super().task_failed(exc)

    def failure_hint(self) -> str:
        return " Show log for what the training reported." if self.log_btn.isEnabled() else ""

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

    def closeEvent(self, event) -> None:
        self._stop_recording()
        self.prompts.close()
        if self._slide is not None:
            self._slide.close()
        super().closeEvent(event)
