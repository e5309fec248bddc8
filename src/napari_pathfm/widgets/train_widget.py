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

import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from qtpy.QtCore import QProcess, Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)

from ..checkpoints import add_search_folder
from ..families import get_family, list_families
from ..recipe_files import recipes_dir
from ..training.runs import parse_event_line
from ..userdata import runs_dir
from ._checkpoint_picker import refresh_all_pickers
from ._dock import DockLines
from ._train_form import COMMON_KEYS, SKIP_KEYS, Form
from ._train_plot import LossPlot
from ._train_runs import RunsList
from ._train_state import RunState
from ._train_viewer_data import ViewerDataActions, viewer_data_button

__all__ = [
    "COMMON_KEYS",
    "RECIPES_DIR",
    "SKIP_KEYS",
    "RunState",
    "TrainWidget",
    "default_output",
    "flatten",
    "list_recipes",
]

RECIPES_DIR = recipes_dir()  # the bundled recipes (napari_pathfm/recipes)
LOG_LINES = 15


def list_recipes(family: str, folder: Path = RECIPES_DIR) -> list[Path]:
    """Recipe YAML files under ``folder`` whose ``family`` is ``family`` (:func:`napari_pathfm.recipe_files.list_recipes`)."""
    from ..recipe_files import list_recipes as _list

    return _list(family, folder)


def default_output(recipe: str | Path) -> Path:
    """A new run folder for ``recipe``: ``runs_dir() / <recipe stem>-<YYYYmmdd-HHMMSS>`` (never the current folder).

    A run folder of a recipe named ``recipe.yaml`` (a past run's copy) is named after that run.
    """
    recipe = Path(recipe)
    stem = recipe.parent.name.rsplit("-", 2)[0] if recipe.name == "recipe.yaml" else recipe.stem
    base = runs_dir() / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


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


class TrainWidget(ViewerDataActions, QWidget):
    """Train any family from a recipe in a subprocess, with progress, a live plot, Stop and Resume."""

    def __init__(self, napari_viewer=None):
        super().__init__()
        self.viewer = napari_viewer
        self.process: QProcess | None = None
        self.events: list[dict] = []
        self.summary: dict | None = None
        self._buffer = b""
        self._stderr: list[str] = []

        self.family = QComboBox()
        for name in list_families("training"):
            self.family.addItem(name)
            self.family.setItemData(self.family.count() - 1, get_family(name).title, Qt.ItemDataRole.ToolTipRole)
        self.recipe = QComboBox()
        browse = QPushButton("…")
        browse.setToolTip("Choose a recipe YAML file")
        browse.clicked.connect(self._browse_recipe)
        recipe_row = QHBoxLayout()
        recipe_row.addWidget(self.recipe, 1)
        recipe_row.addWidget(browse)
        self.form = Form()
        self.extra = QLineEdit()
        self.extra.setPlaceholderText("more overrides: key=value key2=value2")
        self.extra.setToolTip("Any other recipe keys, as on the command line's --set (space separated).")
        self.out = QLineEdit()
        self.out.setToolTip(
            "Output folder of the run: checkpoints, logs, model.safetensors; Resume continues here.\n"
            f"Default: a new folder per run under {runs_dir()} (per-user data folder; $PATHFM_DATA_DIR)."
        )
        self._auto_out = ""  # the last output folder the panel chose itself (renewed for each new run)
        self.out.textChanged.connect(lambda _: self.state.set(self.state.value))
        out_browse = QPushButton("…")
        out_browse.setToolTip("Choose the output folder")
        out_browse.clicked.connect(self._browse_out)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out, 1)
        out_row.addWidget(out_browse)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.viewer_data = QPushButton()  # text, tooltip and visibility follow the family's spec (viewer_data)
        self.viewer_data.clicked.connect(self.add_viewer_data)

        self.start_btn, self.stop_btn, self.resume_btn = (
            QPushButton("Start"),
            QPushButton("Stop"),
            QPushButton("Resume"),
        )
        self.start_btn.clicked.connect(lambda: self.start(resume=False))
        self.resume_btn.clicked.connect(lambda: self.start(resume=True))
        self.stop_btn.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        for b in (self.start_btn, self.stop_btn, self.resume_btn):
            buttons.addWidget(b)
        self.epoch_bar, self.batch_bar = QProgressBar(), QProgressBar()
        self.epoch_bar.setFormat("epoch %v/%m")
        self.batch_bar.setFormat("batch %v/%m")
        self.lines = DockLines()  # the docks' status and note lines (widgets/_dock.py)
        self.status, self.note = self.lines.status, self.lines.note
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)  # copyable errors

        self.plot = LossPlot()
        self.runs = RunsList(runs_dir)
        self.runs.resume_requested.connect(self.resume_run)

        top = QFormLayout()
        top.addRow("Task", self.family)
        top.addRow("Recipe", recipe_row)
        top.addRow("Output folder", out_row)
        top.addRow("Device", self.device)
        # the panel scrolls instead of forcing the napari window taller than the screen (form + plot + runs list)
        content = QWidget()
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        layout = QVBoxLayout(content)
        layout.addLayout(top)
        layout.addWidget(self.form)
        layout.addWidget(self.viewer_data)
        layout.addWidget(self.extra)
        layout.addLayout(buttons)
        layout.addWidget(self.epoch_bar)
        layout.addWidget(self.batch_bar)
        layout.addWidget(self.note)
        layout.addWidget(self.status)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.runs)

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
        raw = self._read_recipe(path)
        if raw is None:
            return
        if raw.get("family") in list_families("training") and raw["family"] != self.family.currentText():
            self.family.setCurrentText(raw["family"])
        index = self.recipe.findData(path)
        if index < 0:
            self.recipe.addItem(f"{Path(path).parent.name}/{Path(path).name}", path)
            index = self.recipe.count() - 1
        self.recipe.setCurrentIndex(index)
        self._load_recipe()

    def _read_recipe(self, path: str) -> dict | None:
        """The recipe file's mapping (training.recipes reads it), or None with the reason in the status line."""
        from ..error_boundary import describe
        from ..training.recipes import read_recipe_mapping

        try:
            return read_recipe_mapping(path)
        except Exception as exc:  # noqa: BLE001 - unreadable or invalid file: one status line, the form stays
            self.status.setText(f"Cannot use this recipe: {describe(exc).text}")
            return None

    def _load_recipe(self) -> None:
        path = self.recipe.currentData()
        if not path:
            self.form.build(self.family.currentText(), {})
            return
        raw = self._read_recipe(path)
        if raw is None:
            return
        self.form.build(self.family.currentText(), flatten(raw))
        text, tip, _ = viewer_data_button(self.family.currentText())
        self.viewer_data.setText(text)
        self.viewer_data.setToolTip(tip)
        self.viewer_data.setVisible(bool(text))
        self._set_auto_out(path)

    def _browse_recipe(self) -> None:
        """Choose a recipe file, starting in the family's recipe folder (its spec's ``recipe_folders``)."""
        folders = [RECIPES_DIR / name for name in get_family(self.family.currentText()).recipe_folders]
        start = next((f for f in folders if f.is_dir()), RECIPES_DIR)
        path, _ = QFileDialog.getOpenFileName(self, "Training recipe", str(start), "Recipes (*.yaml *.yml)")
        if path:
            self.set_recipe(path)

    def _set_auto_out(self, recipe: str | Path) -> None:
        """Point the output at a new folder under the per-user runs folder (see :func:`default_output`)."""
        self._auto_out = str(default_output(recipe))
        self.out.setText(self._auto_out)

    def resume_run(self, folder: str | Path, start: bool = True) -> None:
        """Continue the run in ``folder`` (stopped or crashed) from its last.ckpt, in the same folder.

        When ``folder`` is the panel's own output folder (the run just stopped here), the form as it
        is now applies (e.g. more epochs); otherwise the form is loaded from the run's own
        ``recipe.yaml`` (the full recipe that run used). With ``start=False`` the panel is only
        prepared, so the values can be edited before pressing Resume.
        """
        folder = Path(folder)
        own = bool(self.recipe.currentData()) and Path(self.out.text()).resolve() == folder.resolve()
        if not own:
            recipe = folder / "recipe.yaml"
            if not recipe.is_file():
                self.status.setText(f"{folder}: no recipe.yaml, cannot resume. Start a new run instead.")
                return
            self.set_recipe(recipe)
            self.out.setText(str(folder))
        if start:
            self.start(resume=True)

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
        if not resume and self.out.text() == self._auto_out and Path(self._auto_out).exists():
            self._set_auto_out(self.recipe.currentData())  # a new run gets a new folder, never overwrites
        self.events, self.summary, self._buffer, self._stderr = [], None, b"", []
        self._run_out, self._killed = Path(self.out.text()), False
        self._max_epochs = int(self.form.value("trainer.max_epochs"))
        self.epoch_bar.setRange(0, self._max_epochs)
        self.epoch_bar.setValue(0)
        self.batch_bar.setValue(0)
        self.plot.clear()
        proc = QProcess(self)
        proc.readyReadStandardOutput.connect(self._read_stdout)
        proc.readyReadStandardError.connect(self._read_stderr)
        proc.finished.connect(self._finished)
        proc.errorOccurred.connect(self._process_error)
        self.process = proc
        self.state.set("training")
        self.status.setText(("resuming" if resume else "starting") + f" {Path(self.recipe.currentData()).name} …")
        proc.start(sys.executable, self.command(resume))
        self.runs.refresh(running=self._run_out)

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
            event = parse_event_line(line)  # None: not one of ours (a library printing to stdout)
            if event is not None:
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
            if "loss" in metrics:  # x in epochs: batch 5 of 10 in the 2nd epoch is 1.5
                self.plot.add("loss", int(event["done"]) / per_epoch, metrics["loss"])
        elif kind == "epoch":
            self.epoch_bar.setValue(min(self._max_epochs, int(event["epoch"]) + 1))
            for name, value in metrics.items():
                if name.startswith("val_"):
                    self.plot.add(name, int(event["epoch"]) + 1, value)
            self.runs.refresh(running=self._run_out)  # the run folder exists now; its last metrics
        if event.get("message"):
            self.status.setText(event["message"])

    @property
    def curves(self) -> dict[str, list[tuple[float, float]]]:
        """The plotted points of this run: curve name → ``[(epoch, value), ...]``."""
        return self.plot.curves

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
        self.plot.flush()
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
        self.runs.refresh()
        self.runs.select(out)
