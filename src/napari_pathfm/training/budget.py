"""Train for a fixed amount of CPU time or of optimizer steps, not epochs (``trainer.cpu_budget_minutes``,
``trainer.step_budget``).

Comparing two models "with the same budget" on a shared machine needs a clock that other jobs do
not move: the training process's own CPU time (:func:`time.process_time`, all its threads), which
is what a model costs on a given CPU whatever else runs beside it. :class:`CPUBudget` stops the
run once that much CPU time is used and, with ``optim.scheduler: cosine``, sets the learning rate
before every step to the cosine of the fraction of the budget spent (after an optional linear
warm-up, ``optim.warmup_fraction``), so each model gets a whole schedule however fast its steps are. The time used survives a resume (it is in ``last.ckpt``).

A CPU budget buys a different number of steps on a different (or busier) CPU: the same recipe made
996 steps in 12 CPU-minutes on one day and 329 on another. To reproduce a model exactly, give its
recorded step count instead (:class:`StepBudget`, ``trainer.step_budget``; every card records the
steps its training made): the same stop and the same schedule, step for step, on any machine.
"""

from __future__ import annotations

import math
import time

import lightning as L

__all__ = ["Budget", "CPUBudget", "StepBudget", "budget_lr_factor"]


def budget_lr_factor(spent: float, warmup: float = 0.0) -> float:
    """Factor of the base learning rate when ``spent`` (0–1) of the budget is used.

    A linear warm-up over the first ``warmup`` share of the budget (a randomly initialised
    transformer diverges or collapses when it starts at a high rate), then a cosine to 0 over the rest.

    >>> budget_lr_factor(0.0), budget_lr_factor(0.5), budget_lr_factor(1.0)
    (1.0, 0.5, 0.0)
    >>> budget_lr_factor(0.05, warmup=0.1), budget_lr_factor(0.1, warmup=0.1)
    (0.5, 1.0)
    """
    spent = min(max(float(spent), 0.0), 1.0)
    warmup = min(max(float(warmup), 0.0), 0.99)
    if spent < warmup:
        return round(max(spent / warmup, 1e-3), 12)
    rest = (spent - warmup) / (1.0 - warmup)
    return round(0.5 * (1.0 + math.cos(math.pi * rest)), 12)


class Budget(L.Callback):
    """Stop when :attr:`spent` reaches 1; with ``cosine``, set the LR from :attr:`spent` before each step.

    Subclasses say what is spent (CPU time, steps) and how to describe the budget.
    """

    def __init__(self, cosine: bool = False, warmup: float = 0.0):
        self.cosine, self.warmup = bool(cosine), float(warmup or 0.0)
        self._base: list[float] = []

    @property
    def spent(self) -> float:
        """Share of the budget used so far (can pass 1 by the last step)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The budget in words for progress messages, e.g. ``"12 CPU-minutes"``."""
        raise NotImplementedError

    def on_train_start(self, trainer, pl_module) -> None:
        self._base = [float(g.get("initial_lr", g["lr"])) for opt in trainer.optimizers for g in opt.param_groups]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.cosine:
            return
        factor = budget_lr_factor(self.spent, self.warmup)
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        for group, base in zip(groups, self._base):
            group["lr"] = base * factor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.spent >= 1.0:
            trainer.should_stop = True


class CPUBudget(Budget):
    """Stop training after ``minutes`` of process CPU time; optionally anneal the LR over it.

    Parameters
    ----------
    minutes : float
        CPU minutes (all threads of this process) the training steps may use.
    cosine : bool
        Set every parameter group's LR to ``base_lr * budget_lr_factor(spent, warmup)`` before each step.
    warmup : float
        Share of the budget over which the LR rises linearly from 0 (with ``cosine``).
    """

    def __init__(self, minutes: float, cosine: bool = False, warmup: float = 0.0):
        if not minutes or minutes <= 0:
            raise ValueError(f"the CPU budget must be positive, got {minutes} minutes")
        super().__init__(cosine, warmup)
        self.seconds = float(minutes) * 60.0
        self.used = 0.0  # CPU seconds of earlier (resumed) runs
        self._t0: float | None = None

    @property
    def spent(self) -> float:
        now = self.used + (time.process_time() - self._t0 if self._t0 is not None else 0.0)
        return now / self.seconds

    def describe(self) -> str:
        return f"{self.seconds / 60:g} CPU-minutes"

    def state_dict(self) -> dict:
        return {"used": self.spent * self.seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.used = float(state_dict.get("used", 0.0))

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.process_time()
        super().on_train_start(trainer, pl_module)


class StepBudget(Budget):
    """Stop training after ``steps`` optimizer steps; optionally anneal the LR over them.

    The step count is the trainer's ``global_step``, which a resume restores, so a resumed run
    continues the same schedule.

    Parameters
    ----------
    steps : int
        Optimizer steps in total.
    cosine, warmup
        As for :class:`CPUBudget`, over steps instead of CPU time.
    """

    def __init__(self, steps: int, cosine: bool = False, warmup: float = 0.0):
        if not steps or int(steps) != steps or steps <= 0:
            raise ValueError(f"the step budget must be a positive whole number, got {steps}")
        super().__init__(cosine, warmup)
        self.steps = int(steps)
        self._trainer = None

    @property
    def spent(self) -> float:
        return (self._trainer.global_step if self._trainer is not None else 0) / self.steps

    def describe(self) -> str:
        return f"{self.steps} steps"

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
