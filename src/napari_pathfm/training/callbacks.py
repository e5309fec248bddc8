"""Engine callback: progress reports, :class:`TrainEvent` dicts, cancel checks, metric history.

Every family's run goes through this one callback, so progress, cancel and the
event stream behave the same whatever is being trained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import lightning as L

from ..io.jsonsafe import finite_or_none
from ..progress import is_cancelled, report

__all__ = ["EngineCallback", "TrainEvent", "floats"]


class TrainEvent(TypedDict, total=False):
    """One progress event: ``{"event": "batch"|"epoch"|"done"|"error", ...}``.

    ``epoch`` is 0-based, ``step`` is the optimizer step, ``done``/``total`` count
    training batches over the whole run, ``metrics`` maps names to floats and
    ``message`` is a line for humans.
    """

    event: str
    epoch: int
    step: int
    done: int
    total: int
    metrics: dict
    message: str


def floats(metrics: dict) -> dict:
    """Metrics as plain floats (tensors converted, non-numbers dropped)."""
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


class EngineCallback(L.Callback):
    """Reports progress, emits :class:`TrainEvent` s, checks cancel and keeps per-epoch metrics.

    The metric history is part of the Lightning checkpoint, so a resumed run
    still knows the metrics of earlier epochs.
    """

    def __init__(
        self, progress=None, cancel=None, on_event: Callable[[dict], Any] | None = None, events_file: Path | None = None
    ):
        self.progress, self.cancel, self.on_event, self.events_file = progress, cancel, on_event, events_file
        self.history: list[dict] = []
        self.cancelled = False
        self.start_epoch = 0
        self.epochs_run = 0
        self._last = (0, 0)

    def emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)
        if self.events_file is not None:
            with open(self.events_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(finite_or_none(event)[0], allow_nan=False) + "\n")  # NaN loss -> null

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_epoch = trainer.current_epoch

    def _totals(self, trainer, batch_idx: int) -> tuple[int, int]:
        """Batches done and expected. Under a CPU budget the run ends when the budget is spent, not at
        ``max_epochs``, so the total is what the pace so far gives for the whole budget."""
        n = trainer.num_training_batches
        n = n if math.isfinite(n) else batch_idx + 1
        done, total = trainer.current_epoch * n + batch_idx + 1, n * (trainer.max_epochs or 1)
        budget = _budget(trainer)
        if budget is not None and budget.spent > 0:
            total = min(total, max(done, round(done / min(budget.spent, 1.0))))
        return done, total

    def _epoch_text(self, trainer) -> str:
        budget = _budget(trainer)
        if budget is None:
            return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        used = min(budget.spent, 1.0) * 100
        return f"epoch {trainer.current_epoch + 1} ({used:.0f}% of {budget.describe()})"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done, total = self._last = self._totals(trainer, batch_idx)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        metrics = {"loss": float(loss)} if loss is not None else {}
        msg = f"{self._epoch_text(trainer)}, batch {batch_idx + 1}/{trainer.num_training_batches}"
        msg += f": loss {metrics['loss']:.4f}" if metrics else ""
        if trainer.is_global_zero:
            report(self.progress, done, total, msg)
            self.emit(
                {
                    "event": "batch",
                    "epoch": trainer.current_epoch,
                    "step": trainer.global_step,
                    "done": done,
                    "total": total,
                    "metrics": metrics,
                    "message": msg,
                }
            )
        stop = trainer.strategy.reduce_boolean_decision(is_cancelled(self.cancel), all=False)
        if stop:
            self.cancelled = True
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = floats(trainer.callback_metrics)
        self.history.append({"epoch": trainer.current_epoch, **metrics})
        self.epochs_run += 1
        if trainer.is_global_zero:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            msg = f"{self._epoch_text(trainer)} done: {shown}"
            done, total = self._last
            report(self.progress, done, total, msg)
            self.emit(
                {
                    "event": "epoch",
                    "epoch": trainer.current_epoch,
                    "step": trainer.global_step,
                    "done": done,
                    "total": total,
                    "metrics": metrics,
                    "message": msg,
                }
            )


def _budget(trainer):
    """The run's :class:`~.budget.Budget` (CPU time or steps), or None when it trains for ``max_epochs``."""
    from .budget import Budget

    return next((c for c in trainer.callbacks if isinstance(c, Budget)), None)
