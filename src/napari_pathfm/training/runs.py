"""Training run folders: what each holds and what state its run ended in (no Qt, no torch).

A run folder (``<runs_dir>/<recipe>-<timestamp>/``, or any folder the user chose) holds
``events.jsonl`` (one :class:`~napari_pathfm.training.TrainEvent` per line, appended by every
start and resume), ``last.ckpt`` (the state to resume from), ``recipe.yaml`` (the full recipe
the run used) and, once a run ended, ``model.safetensors``. Its state is read from the last
event that ends a run:

* ``finished``: a ``done`` event of a run that was not stopped;
* ``stopped``: a ``done`` event saying "cancelled" (the panel's Stop, Ctrl-C, SIGTERM);
  it can be resumed from ``last.ckpt``;
* ``crashed``: an ``error`` event, or epochs/batches with no end at all (the process was
  killed); resumable too when ``last.ckpt`` exists;
* ``running``: the folder the panel is training into right now.

Only the last :data:`TAIL_BYTES` of ``events.jsonl`` are read, so listing stays cheap on the
GUI thread however long the runs were.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RECIPE_SECTIONS", "TAIL_BYTES", "RunInfo", "parse_event_line", "read_run", "reusable_run", "scan_runs"]

TAIL_BYTES = 64 * 1024
MARKERS = ("events.jsonl", "last.ckpt", "model.safetensors")


@dataclass
class RunInfo:
    """One run folder: its state, last epoch and metrics, and whether Resume can continue it."""

    path: Path
    state: str
    epoch: int | None = None
    metrics: dict = field(default_factory=dict)
    message: str = ""
    modified: float = 0.0

    @property
    def resumable(self) -> bool:
        return self.state in ("stopped", "crashed") and (self.path / "last.ckpt").is_file()

    def summary(self) -> str:
        """One readable line: state, epochs, last metrics, when."""
        shown = ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items() if isinstance(v, (int, float)))
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.modified)) if self.modified else ""
        epochs = f"{self.epoch + 1} epoch(s)" if self.epoch is not None else "no epoch finished"
        return f"{self.state} · {epochs} · {shown or 'no metrics'} · {when}"


def _tail_events(path: Path) -> tuple[dict | None, dict | None]:
    """``(last event ending or advancing a run, last epoch event)`` from the last :data:`TAIL_BYTES`.

    Lines are scanned from the end and only the two needed are parsed, so a listing of many runs
    costs a few small reads, not a JSON parse of every batch.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - TAIL_BYTES))
            lines = f.read().split(b"\n")
    except OSError:
        return None, None
    if size > TAIL_BYTES:
        lines = lines[1:]  # cut by the seek
    end = epoch = None
    for line in reversed(lines):
        if end is not None and b'"epoch"' not in line[:40]:
            continue  # only the last epoch event is still wanted
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("event") if isinstance(event, dict) else None
        if end is None and kind in ("batch", "epoch", "done", "error"):
            end = event
        if kind == "epoch":
            epoch = event
            break
    return end, epoch


def parse_event_line(line: bytes | str) -> dict | None:
    """One :class:`~napari_pathfm.training.TrainEvent` from a line of ``events.jsonl`` or of
    ``pathfm train --json-progress`` output; None for anything else (a library printing to stdout).

    >>> parse_event_line(b'{"event": "epoch", "epoch": 0}')
    {'event': 'epoch', 'epoch': 0}
    >>> parse_event_line("Seed set to 0") is None
    True
    """
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def read_run(folder: str | Path, running: bool = False) -> RunInfo | None:
    """The :class:`RunInfo` of ``folder``, or None when it is not a run folder (no marker file)."""
    folder = Path(folder)
    present = [folder / m for m in MARKERS if (folder / m).is_file()]
    if not present:
        return None
    modified = max(p.stat().st_mtime for p in present)
    end, last_epoch = _tail_events(folder / "events.jsonl")
    last_epoch = last_epoch or {}
    info = RunInfo(folder, "crashed", last_epoch.get("epoch"), dict(last_epoch.get("metrics") or {}), "", modified)
    if running:
        info.state = "running"
    elif end is None:
        info.state = "finished" if (folder / "model.safetensors").is_file() else "crashed"
    elif end.get("event") == "done":
        info.state = "stopped" if str(end.get("message", "")).startswith("cancelled") else "finished"
    elif end.get("event") == "error":
        info.message = str(end.get("message", ""))
    else:
        info.message = "the run ended without a word (killed?)"
    return info


def scan_runs(parent: str | Path, running: Path | None = None) -> list[RunInfo]:
    """Run folders directly under ``parent``, newest first; ``running`` is the folder being trained now."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    runs = []
    for sub in parent.iterdir():
        if sub.is_dir():
            info = read_run(sub, running=running is not None and sub.resolve() == Path(running).resolve())
            if info is not None:
                runs.append(info)
    return sorted(runs, key=lambda r: r.modified, reverse=True)


#: The parts of a recipe that decide what a run trains (its output folder and description aside). How the
#: model is run afterwards (``objects``, ``flips``) changes no weight, so a new setting there reuses the run.
RECIPE_SECTIONS = ("seed", "model", "data", "loss", "optim", "trainer")
_ABSENT = object()
#: Keys that name a set of images (held-out images listed in another order are the same split).
_NAME_SETS = ("val_names",)


def _same_section(trained: dict | None, now: dict | None, defaults: dict) -> bool:
    """Equal, where a key the earlier run did not record counts as its default (a recipe key added later
    with a default that keeps the old behaviour does not make every earlier run stale)."""
    if not isinstance(trained, dict) or not isinstance(now, dict):
        return json.dumps(trained, sort_keys=True) == json.dumps(now, sort_keys=True)
    for key in set(trained) | set(now):
        a, b = trained.get(key, _ABSENT), now.get(key, _ABSENT)
        a = defaults.get(key, _ABSENT) if a is _ABSENT else a
        b = defaults.get(key, _ABSENT) if b is _ABSENT else b
        if key in _NAME_SETS and isinstance(a, list) and isinstance(b, list):
            a, b = sorted(map(str, a)), sorted(map(str, b))  # which images, not in which order they were named
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            return False
    return True


def reusable_run(out: str | Path, config: dict, label: str = "run") -> bool:
    """Whether ``out`` holds a finished model trained with the recipe ``config`` (as loaded now).

    A benchmark that trains many models (cross-validation folds, same-budget comparisons) reuses a
    finished one only when its card's recipe says it was trained as the recipe says now
    (:data:`RECIPE_SECTIONS`). A finished folder trained otherwise is set aside as ``<name>.stale-<time>``
    (never deleted: it is somebody's CPU time) so a new run can take its place; an unfinished one is
    left for the new run to resume.
    """
    from .recipe_fields import SCHEMA, family_fields

    out = Path(out)
    card_path = out / "model.json"
    if not ((out / "model.safetensors").is_file() and card_path.is_file()):
        return False  # nothing finished there: training into it resumes from its last.ckpt
    trained = (json.loads(card_path.read_text(encoding="utf-8")).get("recipe")) or {}
    fields = {**SCHEMA, **(family_fields(config["family"]) if config.get("family") else {})}
    same = all(
        _same_section(
            trained.get(section),
            config.get(section),
            {k.split(".", 1)[1]: f.default for k, f in fields.items() if k.startswith(section + ".")},
        )
        for section in RECIPE_SECTIONS
    )
    if same:
        return True
    stale = out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"[{label}] {out} was not trained with this recipe: moved to {stale.name}, training again", flush=True)
    out.rename(stale)
    return False
