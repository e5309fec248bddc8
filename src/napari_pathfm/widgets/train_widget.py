"""The "Train a model" dock widget: pick a recipe, edit it in a form, train in a subprocess.

Training runs ``pathfm train RECIPE --set k=v ... --out DIR --json-progress`` in a
:class:`~qtpy.QtCore.QProcess`, so napari stays responsive and every byte of (GPU) memory
the run used is freed when it ends. The run streams :class:`~napari_pathfm.training.TrainEvent`
dicts as JSON lines; the panel turns them into an epoch bar, a batch bar and a live
loss/metric plot. *Stop* sends SIGINT, which the CLI turns into a graceful cancel (finish
the batch, save ``last.ckpt``, export ``model.safetensors``); a second *Stop* kills the run.
*Resume* re-runs the same output folder, which the engine continues from ``last.ckpt``.
When a run ends its folder is added to the checkpoint search folders and every open
:class:`~napari_pathfm.widgets._checkpoint_picker.CheckpointPicker` is refreshed, so the
new model is listed in every inference widget at once. A crash (non-zero exit) shows the
last lines of the run's log and the panel is ready for the next run.

Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import yaml
from qtpy.QtCore import QProcess, Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)  # fmt: skip

from ..checkpoints import add_search_folder
from ..training.recipes import FAMILIES, schema
from ._checkpoint_picker import refresh_all_pickers

__all__ = ["RECIPES_DIR", "VIEWER_DATA", "RunState", "TrainWidget", "flatten", "list_recipes"]

RECIPES_DIR = Path(__file__).resolve().parents[3] / "training"
# shown for every recipe, whether or not it sets them
COMMON_KEYS = ("optim.lr", "optim.weight_decay", "trainer.max_epochs", "trainer.batch_size")
# identity of a recipe, not hyperparameters: not editable in the form
SKIP_KEYS = {"family", "description", "output", "model.name"}
LOG_LINES = 15
# family -> (button text, tooltip) of the "data from what is open" button
VIEWER_DATA = {
    "segment": (
        "Add corrections from the viewer",
        (
            "Train also on painted corrections of what is open (Segment widget recordings, "
            "<file>.pathfm-corrections folders beside open files): appended to data.extra_dirs."
        ),
    ),
    "translate": (
        "Use the open z-stacks",
        "Train on the z-stacks open in the viewer (with their target layers): they replace data.stacks.",
    ),
}


def list_recipes(family: str, folder: Path = RECIPES_DIR) -> list[Path]:
    """Recipe YAML files under ``folder`` whose ``family`` is ``family`` (unreadable files are skipped)."""
    found = []
    for path in sorted(folder.glob("*/*.yaml")) if folder.is_dir() else []:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(raw, dict) and raw.get("family") == family:
            found.append(path)
    return found


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Leaf values of a nested mapping under dotted keys: ``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


class RunState:
    """The panel's run state; :meth:`set` updates which buttons are enabled.

    ``idle`` → ``training`` → (``stopping`` →) ``done`` or ``crashed``; from ``done`` and
    ``crashed`` a new run (Start) or a continued one (Resume) may begin.
    """

    STATES = ("idle", "training", "stopping", "done", "crashed")

    def __init__(self, start: QPushButton, stop: QPushButton, resume: QPushButton, can_resume):
        self.value = "idle"
        self._start, self._stop, self._resume, self._can_resume = start, stop, resume, can_resume
        self.set("idle")

    def set(self, value: str) -> None:
        if value not in self.STATES:
            raise ValueError(f"unknown run state {value!r}; expected one of {self.STATES}")
        self.value = value
        running = value in ("training", "stopping")
        self._start.setEnabled(not running)
        self._stop.setEnabled(running)
        self._stop.setText("Kill" if value == "stopping" else "Stop")
        self._resume.setEnabled(not running and self._can_resume())


class _Form(QWidget):
    """Rows of editors for recipe keys; :meth:`overrides` gives ``key=value`` for the edited ones."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.layout_ = QFormLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self.editors: dict[str, tuple[QWidget, Any]] = {}
        self._fields: dict[str, dict] = {}

    def build(self, family: str, values: dict[str, Any]) -> None:
        while self.layout_.rowCount():
            self.layout_.removeRow(0)
        self.editors.clear()
        fields = schema(family)
        keys = [k for k in values if k not in SKIP_KEYS] + [k for k in COMMON_KEYS if k not in values]
        self._fields = fields
        for key in keys:
            self.add_row(key, values.get(key, fields.get(key, {}).get("default")))

    def add_row(self, key: str, value: Any) -> None:
        """One editor row for ``key`` showing ``value``; it is only overridden once edited."""
        field = self._fields.get(key, {})
        editor = self._editor(value, field)
        editor.setToolTip(field.get("help") or "Recipe value (YAML syntax).")
        self.editors[key] = (editor, self.value(key, editor))
        self.layout_.addRow(key, self._with_browse(key, editor) if field.get("path") else editor)

    def _with_browse(self, key: str, editor: QLineEdit) -> QWidget:
        """``editor`` plus a ``…`` button choosing a folder (``*root``/``*dir`` keys) or a file."""
        folder = key.endswith(("root", "dir"))

        def browse() -> None:
            start = os.path.expandvars(editor.text())
            if folder:
                path = QFileDialog.getExistingDirectory(self, key, start)
            else:
                path, _ = QFileDialog.getOpenFileName(self, key, start)
            if path:
                editor.setText(path)

        row = QWidget()
        layout = QHBoxLayout(row)
        layout.setContentsMargins(0, 0, 0, 0)
        button = QPushButton("…")
        button.setToolTip(f"Choose the {'folder' if folder else 'file'} for {key}")
        button.clicked.connect(browse)
        layout.addWidget(editor, 1)
        layout.addWidget(button)
        return row

    @staticmethod
    def _editor(value: Any, field: dict) -> QWidget:
        types = field.get("type") or [type(value).__name__]
        if field.get("choices") and isinstance(value, str):
            editor = QComboBox()
            editor.addItems([str(c) for c in field["choices"]])
            editor.setCurrentText(value)
        elif isinstance(value, bool) or types == ["bool"]:
            editor = QCheckBox()
            editor.setChecked(bool(value))
        elif isinstance(value, int) and types == ["int"]:
            editor = QSpinBox()
            editor.setRange(-(2**31) + 1, 2**31 - 1)
            editor.setValue(value)
        else:  # floats, strings, lists, None: YAML text keeps 1e-3, [a, b] and null readable
            editor = QLineEdit(value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True))
            editor.setText(editor.text().strip().removesuffix("...").strip())
        return editor

    def value(self, key: str, editor: QWidget | None = None) -> Any:
        editor = editor or self.editors[key][0]
        if isinstance(editor, QComboBox):
            return editor.currentText()
        if isinstance(editor, QCheckBox):
            return editor.isChecked()
        if isinstance(editor, QSpinBox):
            return editor.value()
        return editor.text()

    def set_value(self, key: str, value: Any) -> None:
        editor = self.editors[key][0]
        if isinstance(editor, QCheckBox):
            editor.setChecked(bool(value))
        elif isinstance(editor, QSpinBox):
            editor.setValue(int(value))
        elif isinstance(editor, QComboBox):
            editor.setCurrentText(str(value))
        else:
            editor.setText(str(value))

    def overrides(self) -> list[str]:
        """``key=value`` for every row whose value differs from the recipe's."""
        out = []
        for key, (editor, initial) in self.editors.items():
            value = self.value(key, editor)
            if value != initial:
                out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return out


class TrainWidget(QWidget):
    """Train any family from a recipe in a subprocess, with progress, a live plot, Stop and Resume."""

    def __init__(self, napari_viewer=None):
        super().__init__()
        self.viewer = napari_viewer
        self.process: QProcess | None = None
        self.events: list[dict] = []
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.summary: dict | None = None
        self._buffer = b""
        self._stderr: list[str] = []

        self.family = QComboBox()
        self.family.addItems(list(FAMILIES))
        self.recipe = QComboBox()
        browse = QPushButton("…")
        browse.setToolTip("Choose a recipe YAML file")
        browse.clicked.connect(self._browse_recipe)
        recipe_row = QHBoxLayout()
        recipe_row.addWidget(self.recipe, 1)
        recipe_row.addWidget(browse)
        self.form = _Form()
        self.extra = QLineEdit()
        self.extra.setPlaceholderText("more overrides: key=value key2=value2")
        self.extra.setToolTip("Any other recipe keys, as on the command line's --set (space separated).")
        self.out = QLineEdit()
        self.out.setToolTip("Output folder: checkpoints, logs, model.safetensors; Resume continues here.")
        self.out.textChanged.connect(lambda _: self.state.set(self.state.value))
        out_browse = QPushButton("…")
        out_browse.clicked.connect(self._browse_out)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out, 1)
        out_row.addWidget(out_browse)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.viewer_data = QPushButton()  # text, tooltip and visibility follow the family (VIEWER_DATA)
        self.viewer_data.clicked.connect(self.add_viewer_data)

        self.start_btn, self.stop_btn, self.resume_btn = QPushButton("Start"), QPushButton("Stop"), QPushButton("Resume")
        self.start_btn.clicked.connect(lambda: self.start(resume=False))
        self.resume_btn.clicked.connect(lambda: self.start(resume=True))
        self.stop_btn.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        for b in (self.start_btn, self.stop_btn, self.resume_btn):
            buttons.addWidget(b)
        self.epoch_bar, self.batch_bar = QProgressBar(), QProgressBar()
        self.epoch_bar.setFormat("epoch %v/%m")
        self.batch_bar.setFormat("batch %v/%m")
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)  # copyable errors

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.5, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.axes = self.figure.add_subplot(111)

        top = QFormLayout()
        top.addRow("family", self.family)
        top.addRow("recipe", recipe_row)
        top.addRow("output", out_row)
        top.addRow("device", self.device)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.form)
        layout.addWidget(self.viewer_data)
        layout.addWidget(self.extra)
        layout.addLayout(buttons)
        layout.addWidget(self.epoch_bar)
        layout.addWidget(self.batch_bar)
        layout.addWidget(self.canvas)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.state = RunState(self.start_btn, self.stop_btn, self.resume_btn, self._can_resume)
        self.family.currentTextChanged.connect(self._fill_recipes)
        self.recipe.currentIndexChanged.connect(lambda _: self._load_recipe())
        self._fill_recipes()

    # ----------------------------------------------------------------- recipe and form
    def _fill_recipes(self) -> None:
        self.recipe.blockSignals(True)
        self.recipe.clear()
        for path in list_recipes(self.family.currentText()):
            self.recipe.addItem(f"{path.parent.name}/{path.name}", str(path))
        self.recipe.blockSignals(False)
        self._load_recipe()

    def set_recipe(self, path: str | Path) -> None:
        """Select the recipe file ``path`` (adding it to the list), switching family to the recipe's."""
        path = str(Path(path).resolve())
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if raw.get("family") in FAMILIES and raw["family"] != self.family.currentText():
            self.family.setCurrentText(raw["family"])
        index = self.recipe.findData(path)
        if index < 0:
            self.recipe.addItem(Path(path).name, path)
            index = self.recipe.count() - 1
        self.recipe.setCurrentIndex(index)
        self._load_recipe()

    def _load_recipe(self) -> None:
        path = self.recipe.currentData()
        if not path:
            self.form.build(self.family.currentText(), {})
            return
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            self.status.setText(f"{path}: cannot read the recipe ({exc}). Fix the file or pick another.")
            return
        self.form.build(self.family.currentText(), flatten(raw))
        text, tip = VIEWER_DATA.get(self.family.currentText(), ("", ""))
        self.viewer_data.setText(text)
        self.viewer_data.setToolTip(tip)
        self.viewer_data.setVisible(bool(text))
        self.out.setText(str(Path.cwd() / (raw.get("output") or f"runs/{Path(path).stem}")))

    def viewer_corrections(self) -> list[Path]:
        """Corrections folders of what is open in the viewer (images/ + masks/ training sets).

        Found from Segment widgets that record corrections and from
        ``<file>.pathfm-corrections`` folders beside the files of open layers.
        """
        from ..pipelines.corrections import corrections_dir

        found: list[Path] = []
        if self.viewer is None:
            return found
        for widget in list(self.viewer.window.dock_widgets.values()):
            folder = getattr(widget, "corrections_folder", None)
            folder = folder() if callable(folder) else None
            if folder is not None:
                found.append(Path(folder))
        for layer in self.viewer.layers:
            path = getattr(layer.source, "path", None)
            if path and (corrections_dir(path) / "images").is_dir():
                found.append(corrections_dir(path))
        return list(dict.fromkeys(p.resolve() for p in found))

    def add_viewer_corrections(self) -> list[Path]:
        """Append the viewer's corrections folders to ``data.extra_dirs``; returns the folders added."""
        return self._put_paths(
            "data.extra_dirs", self.viewer_corrections(), append=True,
            missing="No corrections found: record some with the Segment widget (Record corrections).",
            done="training also on corrections folder(s): ",
        )  # fmt: skip

    def viewer_zstacks(self) -> list[Path]:
        """Files/folders of the z-stacks open in the viewer (layers the z-stack reader made)."""
        if self.viewer is None:
            return []
        paths = [layer.metadata.get("path") for layer in self.viewer.layers if "plane_names" in layer.metadata]
        return list(dict.fromkeys(Path(p) for p in paths if p))

    def use_viewer_zstacks(self) -> list[Path]:
        """Set ``data.stacks`` to the open z-stacks; returns them."""
        return self._put_paths(
            "data.stacks", self.viewer_zstacks(), append=False,
            missing="No z-stack is open: open one (File > Open) with its target images first.",
            done="training on the open z-stack(s): ",
        )  # fmt: skip

    def _put_paths(self, key: str, paths: list[Path], append: bool, missing: str, done: str) -> list[Path]:
        """Write ``paths`` into the form's ``key`` as a YAML list (after its current items with ``append``)."""
        if not paths:
            self.status.setText(missing)
            return []
        if key not in self.form.editors:
            self.form.add_row(key, [])
        current = (yaml.safe_load(str(self.form.value(key)) or "[]") or []) if append else []
        current = current if isinstance(current, list) else [current]
        listed = {str(d.get("path") if isinstance(d, dict) else d) for d in current}
        added = [p for p in paths if str(p) not in listed]
        self.form.set_value(key, yaml.safe_dump(current + [str(p) for p in added], default_flow_style=True).strip())
        self.status.setText(done + ", ".join(map(str, added)))
        return added

    def add_viewer_data(self) -> list[Path]:
        """The family's "data from what is open" action (see :data:`VIEWER_DATA`)."""
        if self.family.currentText() == "translate":
            return self.use_viewer_zstacks()
        return self.add_viewer_corrections()

    def _browse_recipe(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Training recipe", str(RECIPES_DIR), "Recipes (*.yaml *.yml)")
        if path:
            self.set_recipe(path)

    def _browse_out(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Output folder", self.out.text())
        if path:
            self.out.setText(path)

    def _can_resume(self) -> bool:
        return bool(self.out.text()) and (Path(self.out.text()) / "last.ckpt").is_file()

    def command(self, resume: bool) -> list[str]:
        """Arguments of the ``pathfm train`` run (after the Python executable)."""
        args = ["-m", "napari_pathfm.cli", "train", str(self.recipe.currentData())]
        for item in self.form.overrides() + shlex.split(self.extra.text()):
            args += ["--set", item]
        args += ["--out", self.out.text(), "--device", self.device.currentText(), "--json-progress"]
        return args + ([] if resume else ["--no-resume"])

    # ----------------------------------------------------------------- run control
    def start(self, resume: bool = False) -> None:
        """Start (or, with ``resume``, continue) a run in a subprocess."""
        if self.state.value in ("training", "stopping") or not self.recipe.currentData():
            return
        self.events, self.curves, self.summary, self._buffer, self._stderr = [], {}, None, b"", []
        self._run_out, self._killed = Path(self.out.text()), False
        self._max_epochs = int(self.form.value("trainer.max_epochs"))
        self.epoch_bar.setRange(0, self._max_epochs)
        self.epoch_bar.setValue(0)
        self.batch_bar.setValue(0)
        self._draw()
        proc = QProcess(self)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._process_error)
        self.process = proc
        self.state.set("training")
        self.status.setText(("resuming" if resume else "starting") + f" {Path(self.recipe.currentData()).name} …")
        proc.start(sys.executable, self.command(resume))

    def stop(self) -> None:
        """First press: graceful stop (SIGINT → save last.ckpt and export); second press: kill the run."""
        if self.process is None or self.state.value not in ("training", "stopping"):
            return
        if self.state.value == "stopping":
            self._killed = True
            self.process.kill()
            return
        self.state.set("stopping")
        self.status.setText("stopping after this batch (saving last.ckpt) …")
        pid = int(self.process.processId())
        if os.name == "posix" and pid:
            os.kill(pid, signal.SIGINT)
        else:
            self.process.terminate()

    def _read_stdout(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput())
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not one of ours (a library printing to stdout)
            if isinstance(event, dict):
                self._on_event(event)

    def _read_stderr(self) -> None:
        text = bytes(self.process.readAllStandardError()).decode("utf-8", "replace")
        self._stderr = (self._stderr + text.splitlines())[-200:]

    def _on_event(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "summary":
            self.summary = event
            return
        self.events.append(event)
        metrics = event.get("metrics") or {}
        if kind == "batch":
            total = max(1, int(event.get("total", 1)))
            per_epoch = max(1, total // max(1, self._max_epochs))
            self.batch_bar.setRange(0, per_epoch)
            self.batch_bar.setValue(int(event["done"]) - int(event["epoch"]) * per_epoch)
            if "loss" in metrics:
                self.curves.setdefault("loss", []).append((int(event["done"]), metrics["loss"]))
        elif kind == "epoch":
            self.epoch_bar.setValue(min(self._max_epochs, int(event["epoch"]) + 1))
            for name, value in metrics.items():
                if name.startswith("val_"):
                    self.curves.setdefault(name, []).append((int(event.get("done", 0)), value))
        if event.get("message"):
            self.status.setText(event["message"])
        if kind in ("batch", "epoch"):
            self._draw(lazy=kind == "batch")

    def _draw(self, lazy: bool = False) -> None:
        ax = self.axes
        ax.clear()
        for name, points in self.curves.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="" if name == "loss" else "o", lw=1, label=name)
        ax.set_xlabel("batch")
        if self.curves:
            ax.legend(fontsize=7)
        self.canvas.draw_idle() if lazy else self.canvas.draw()

    def _process_error(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._stderr.append(f"could not start {sys.executable}: {self.process.errorString()}")
            self._end("crashed")

    def _finished(self, exit_code: int, exit_status) -> None:
        self._read_stdout()
        self._read_stderr()
        done = any(e.get("event") == "done" for e in self.events)
        self._end("done" if exit_code == 0 and done else "crashed", exit_code)

    def _end(self, state: str, exit_code: int | None = None) -> None:
        out = self._run_out
        if (out / "model.safetensors").is_file():
            add_search_folder(out)
            refresh_all_pickers()
        if state == "done":
            s = self.summary or {}
            best = ", ".join(f"{k} {v:.4g}" for k, v in (s.get("best_metrics") or {}).items() if k != "epoch")
            test = ", ".join(f"{k} {v:.4g}" for k, v in (s.get("test_metrics") or {}).items())
            word = "stopped" if s.get("cancelled") else ("stopped early" if s.get("stopped_early") else "finished")
            self.status.setText(
                f"{word}: {s.get('epochs_run', '?')} epoch(s) this run; best {best or '-'}"
                + (f"\ntest: {test}" if test else "")
                + f"\nweights: {s.get('checkpoint', out / 'model.safetensors')}"
            )
            if not s.get("cancelled"):
                self.batch_bar.setValue(self.batch_bar.maximum())
        else:
            tail = "\n".join(self._stderr[-LOG_LINES:]) or "(no output)"
            how = "killed" if self._killed else f"failed (exit code {exit_code})"
            self.status.setText(f"training {how}; last lines of its log:\n{tail}")
        self.process = None
        self.state.set(state)
