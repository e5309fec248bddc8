"""The "Translate z-stack (HASTE)" dock widget: brightfield planes → fluorescence layers + nuclei.

Pick a z-stack layer (the reader opens one as a ``(Z, Y, X)`` Image layer with a Z slider)
and one translation checkpoint per channel row — as many rows as wanted ("+ add channel",
✕ removes one). Each row shows the channel(s) its checkpoint's card predicts (DAPI, MAP2,
lipids …) in the colour its layer will get. The rows start pre-filled with one checkpoint
per target found (the bundled ISL DAPI, MAP2 and NFH models, or HASTE's nuclei / lipids /
cytoplasm models). Two rows predicting the same target are refused before anything runs.

Run works in a worker thread through :func:`~napari_pathfm.pipelines.translate.translate_stack`
(the code path of ``pathfm translate``); the channels come back as Image layers named from
the cards, coloured by role (nuclei blue, lipids green, cytoplasm red), else by stain name
(MAP2 magenta, NFH green …), else a distinct spare colour, blended additively, plus the
nuclei mask as a Labels layer. Each channel gets contrast limits from its own data (the
1st–99.5th percentiles, computed in the worker, not on the GUI thread), and an opacity that
shrinks as channels are added (:func:`channel_opacity`), so where several additive channels
overlap the sum stays readable instead of saturating to white; the nuclei mask is drawn
translucent (``translucent_no_depth``) over them. The legend under the buttons shows each
channel's colorbar with its range. A re-run updates the same layers in place and removes the
ones the new rows no longer produce: layers never pile up. A LUPI nuclei checkpoint also gives the per-pixel nuclei
confidence (an Image layer) and drives the threshold slider, which re-labels the mask from
the confidence map live, without running the model again: raising it keeps only the nuclei
the model is sure of.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
)

from ..colors import robust_limits
from ..pipelines.translate_channels import channel_colormaps, default_checkpoints, duplicate_targets, is_lupi
from ._colormaps import napari_colormap
from ._compact import compact_combo
from ._dock import TaskDock
from ._legend import Legend
from ._translate_rows import ChannelRow

__all__ = ["ROLES", "TranslateWidget", "layer_colormap", "zstack_layers"]

#: Roles with a colour of their own (HASTE: nuclei blue, lipids green, cytoplasm red); rows for checkpoints
#: predicting them are pre-filled first. Any other target gets a row too (by its stain name).
ROLES = ("nuclei", "lipids", "cytoplasm")
#: Rows pre-filled when the widget opens (one checkpoint per target found, at most this many).
DEFAULT_ROWS = 3
#: Percentiles of each predicted channel that set its contrast limits.
CHANNEL_PERCENTILES = (1.0, 99.5)


def channel_opacity(n_channels: int) -> float:
    """Opacity of each of ``n_channels`` additive channel layers: 1 for one or two, down to 0.4 for many.

    Additive blending sums the layers; with full opacity three bright channels over one pixel clip
    to white. Scaling each by ``2 / n`` keeps the sum of the brightest overlaps near the display's
    range while a lone channel stays clearly visible.

    >>> [channel_opacity(n) for n in (1, 2, 3, 7)]
    [1.0, 1.0, 0.67, 0.4]
    """
    return round(min(1.0, max(0.4, 2.0 / max(1, n_channels))), 2)


def channel_limits(result) -> dict[str, tuple[float, float]]:
    """Robust contrast limits of each predicted channel (worker thread: reads strided samples)."""
    return {name: robust_limits(data, *CHANNEL_PERCENTILES) for name, data in result.channels.items()}


def zstack_layers(viewer) -> list[str]:
    """Names of the Image layers that look like z-stacks: 3-D, one value per pixel (not RGB)."""
    from napari.layers import Image

    return [
        layer.name
        for layer in viewer.layers
        if isinstance(layer, Image) and layer.ndim == 3 and not layer.rgb and not layer.multiscale
    ]


def layer_colormap(name: str, role: str) -> str:
    """napari colormap of one predicted channel on its own: by role, else by stain name, else cyan."""
    return channel_colormaps([(name, role)])[name]


class TranslateWidget(TaskDock):
    """Translate a brightfield z-stack into fluorescence channels and nuclei, one checkpoint per row.

    Attributes
    ----------
    rows : list of ChannelRow
        The channel rows, in display (and run) order.
    result : TranslationResult or None
        The last run's result (its confidence map drives the threshold slider).
    layers : dict
        Layers this widget created, by key (``channel:<name>``, ``confidence``, ``nuclei``).
    """

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.result = None
        self.layers: dict[str, object] = {}
        self.rows: list[ChannelRow] = []
        self._stack_name: str | None = None
        self._runs = 0
        self.legend = Legend("Legend")

        self.layer_combo = compact_combo(QComboBox())
        form = QFormLayout()
        form.addRow("z-stack", self.layer_combo)
        self.rows_box = QVBoxLayout()
        self.rows_box.setContentsMargins(0, 0, 0, 0)
        form.addRow(QLabel("channels (one checkpoint each)"))
        form.addRow(self.rows_box)
        self.add_btn = QPushButton("+ add channel")
        self.add_btn.setToolTip("Add a row for one more translation checkpoint")
        self.add_btn.clicked.connect(lambda: self.add_row())
        form.addRow(self.add_btn)

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
        self.threshold_label = QLabel("0.50")
        self.threshold.valueChanged.connect(self._rethreshold)
        trow = QHBoxLayout()
        trow.addWidget(self.threshold, 1)
        trow.addWidget(self.threshold_label)
        form.addRow("nuclei confidence ≥", trow)

        self.run_btn = QPushButton("Run")
        self.run_btn.clicked.connect(self.run)
        self.run_buttons = [self.run_btn, self.add_btn]
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.task_pieces())
        layout.addWidget(self.legend)
        layout.addStretch(1)

        self._prefill()
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

    def _prefill(self) -> None:
        """One row per target among the checkpoints found (nuclei, lipids, cytoplasm first); one empty row if none."""
        from ..checkpoints import find_checkpoints

        paths = default_checkpoints(find_checkpoints("translate"), ROLES, DEFAULT_ROWS)
        self.set_checkpoints(paths)
        if not self.rows:
            self.add_row()

    def add_row(self, path: str | Path | None = None) -> ChannelRow:
        """Add a channel row with ``path``, else the first listed checkpoint no other row's target has."""
        row = ChannelRow(self)
        self.rows.append(row)
        self.rows_box.addWidget(row)
        row.remove_requested.connect(self.remove_row)
        if path is not None:
            row.picker.set_path(path)
        else:
            self._pick_unused(row)
        row.changed.connect(self._rows_changed)
        self._rows_changed()
        return row

    def _pick_unused(self, row: ChannelRow) -> None:
        """Select the first checkpoint in the row's list predicting nothing the other rows predict."""
        taken = {r.lower() for other in self.rows if other is not row for _n, r in other.targets()}
        for i in range(row.picker.combo.count()):
            row.picker.combo.setCurrentIndex(i)
            if not {r.lower() for _n, r in row.targets()} & taken:
                return
        row.picker.combo.setCurrentIndex(-1)

    def remove_row(self, row: ChannelRow | int) -> None:
        """Remove a channel row (the row or its index)."""
        row = self.rows[row] if isinstance(row, int) else row
        if row not in self.rows:
            return
        self.rows.remove(row)
        self.rows_box.removeWidget(row)
        row.setParent(None)
        row.deleteLater()
        self._rows_changed()

    def set_checkpoints(self, paths) -> None:
        """Replace the rows by one row per checkpoint in ``paths`` (in that order)."""
        for row in list(self.rows):
            self.remove_row(row)
        for path in paths:
            self.add_row(path)

    def set_checkpoint(self, target: str, path: str | Path | None) -> None:
        """Use ``path`` for the row predicting ``target`` (channel name or role, e.g. ``DAPI`` or ``nuclei``).

        A new row is added when no row predicts ``target``; ``None`` removes that row.
        """
        key = target.lower()
        row = next((r for r in self.rows if any(key in (n.lower(), ro.lower()) for n, ro in r.targets())), None)
        if path is None:
            if row is not None:
                self.remove_row(row)
        elif row is None:
            self.add_row(path)
        else:
            row.picker.set_path(path)

    def checkpoints(self) -> list[str]:
        """Chosen checkpoint files, in row order (rows without a checkpoint are left out)."""
        return [row.path() for row in self.rows if row.path()]

    def lupi_checkpoint(self) -> str | None:
        """The checkpoint of the first row whose card is a LUPI nuclei model (it drives the slider), or None."""
        return next((row.path() for row in self.rows if row.card is not None and is_lupi(row.card)), None)

    def problem(self) -> str | None:
        """Why the rows cannot run as they are (no checkpoint, unusable file, one target twice), or None."""
        if not self.rows:
            return "Add a channel (+ add channel) and choose a translation checkpoint for it."
        for i, row in enumerate(self.rows, 1):
            if row.error:
                return f"Row {i}: {row.error}"
            if not row.path():
                return f"Row {i} has no checkpoint: choose one (… browses) or remove the row (✕)."
        dup = duplicate_targets([row.targets() for row in self.rows])
        if dup is not None:
            i, j, target = dup
            a, b = (Path(self.rows[k].path()).name for k in (i, j))
            return (
                f"Rows {i + 1} ({a}) and {j + 1} ({b}) both predict {target}: one checkpoint per target. "
                "Remove one of the rows (✕) or choose a checkpoint for another target."
            )
        return None

    def _rows_changed(self) -> None:
        """Re-colour the row labels, re-check the rows, and tie the slider to the LUPI row."""
        colormaps = channel_colormaps([t for row in self.rows for t in row.targets()])
        for row in self.rows:
            row.show_targets(colormaps)
        lupi = self.lupi_checkpoint()
        has_conf = self.result is not None and self.result.confidence is not None
        self.threshold.setEnabled(lupi is not None or has_conf)
        self.threshold.setToolTip(
            f"Nuclei confidence of {Path(lupi).name} (LUPI): keep only pixels above this value; moves re-label "
            "the nuclei without running the model again"
            if lupi
            else "Needs a LUPI nuclei checkpoint in a row"
        )
        problem = self.problem()
        if problem and (self.status.text().startswith("⚠") or not self.status.text()):
            self.status.setText(f"⚠ {problem}")
        elif not problem and self.status.text().startswith("⚠"):
            self.status.setText("")

    # -- run --------------------------------------------------------------------
    def run(self):
        """Start the translation in a worker; returns the worker (None, with the reason in the status, if refused)."""
        from ..pipelines.translate import translate_stack

        name = self.layer_combo.currentText()
        problem = None if name else "Choose a z-stack layer (open a plane folder or a multipage/OME-TIFF)."
        problem = problem or self.problem()
        if problem:
            self.status.setText(problem)
            return None
        checkpoints = self.checkpoints()
        layer = self.viewer.layers[name]
        path = layer.metadata.get("path") if "plane_names" in layer.metadata else None
        data = layer.data
        tile, threshold = self.tile.value(), self.threshold.value() / 100
        self._stack_name = name

        def job(progress, cancel):
            from ..io.zstack import open_zstack

            stack = open_zstack(path) if path else data  # a file stack: errors then name its planes
            result = translate_stack(
                stack, checkpoints, tile=tile, threshold=threshold, progress=progress, cancel=cancel
            )
            return result, channel_limits(result)

        self.status.setText("Translating…")
        return self.start_task(job, description=f"Translate: {name}", on_done=self._show)

    def _place(self) -> dict:
        """Scale/translate of the (Y, X) axes of the z-stack layer, so the outputs overlay it."""
        if self._stack_name in self.viewer.layers:
            src = self.viewer.layers[self._stack_name]
            return {"scale": tuple(src.scale[-2:]), "translate": tuple(src.translate[-2:])}
        return {}

    def _put(self, key: str, kind: str, data, *, name: str, **kwargs):
        """Create the layer ``key`` or update it in place (a re-run replaces the previous result)."""
        layer = self.layers.get(key)
        if layer is not None and layer in self.viewer.layers and layer.name != name:
            layer.name = name  # another stack's run: the same layer takes the new name
        layer = self.layers[key] = self.show_layer(name, data, kind, **kwargs)
        return layer

    def _show(self, out) -> None:
        result, limits = out
        self.result = result
        self._runs += 1
        stem = self._stack_name or "stack"
        place = self._place()
        colormaps = channel_colormaps([(c, result.roles[c]) for c in result.channels])
        opacity = channel_opacity(len(result.channels))
        run = {"run": self._runs, "checkpoints": result.checkpoints}
        made = []
        for cname, data in result.channels.items():
            role = result.roles[cname]
            self._put(
                f"channel:{cname}",
                "image",
                data,
                name=f"{stem} {cname} (predicted)",
                colormap=colormaps[cname],
                blending="additive",
                contrast_limits=limits[cname],
                opacity=opacity,
                metadata={
                    "pathfm_kind": "translate",
                    "channel": cname,
                    "role": role,
                    "contrast_percentiles": list(CHANNEL_PERCENTILES),
                    **run,
                },
                **place,
            )
            made.append(f"channel:{cname}")
        if result.confidence is not None:
            self._put(
                "confidence",
                "image",
                result.confidence,
                name=f"{stem} nuclei confidence",
                colormap=napari_colormap("probability"),
                blending="translucent",
                contrast_limits=(0.0, 1.0),
                opacity=0.6,
                visible=False,
                metadata={"pathfm_kind": "translate-confidence", **run},
                **place,
            )
            made.append("confidence")
        if result.nuclei_labels is not None:
            self._put(
                "nuclei",
                "labels",
                result.nuclei_labels,
                name=f"{stem} nuclei (predicted)",
                opacity=0.4,
                blending="translucent_no_depth",
                metadata={"pathfm_kind": "translate-nuclei", "threshold": result.threshold, **run},
                **place,
            )
            made.append("nuclei")
        # a re-run replaces, never piles up: drop the previous run's layers this run does not produce
        for key in [k for k in self.layers if k not in made]:
            layer = self.layers.pop(key)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        shown = [self.layers[k] for k in made if k != "nuclei"]
        self.legend.show_layers(shown, title=f"run {self._runs}")
        self.threshold.setEnabled(result.confidence is not None or self.lupi_checkpoint() is not None)
        n = int(result.nuclei_labels.max()) if result.nuclei_labels is not None else 0
        channels = ", ".join(f"{c} ({result.roles[c]})" for c in result.channels)
        notes = list(getattr(result, "notes", []) or [])
        self.show_notes(notes)
        others = [m for m in result.messages if m not in notes]
        self.status.setText(f"{channels}; {n} nuclei" + ("; " + "; ".join(others) if others else ""))

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
