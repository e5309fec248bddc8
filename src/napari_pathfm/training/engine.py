"""One training engine for every family, on Lightning.

:func:`run_recipe` turns a recipe into a Lightning ``Trainer`` run: seeded,
best + last checkpoints, early stopping, CSV and TensorBoard logs, resume from
``<output>/last.ckpt``, progress/cancel (contract 1) and structured
:class:`TrainEvent` dicts that a GUI can stream as JSON lines (they are also
appended to ``<output>/events.jsonl``). At the end the best weights are exported
as ``<output>/model.safetensors`` + ``model.json`` through
:func:`~napari_pathfm.models.save_checkpoint`. When the data module holds out
test items (``has_test``), the best weights are evaluated on them with
``trainer.test`` and the ``test_*`` metrics go into the card (``metrics.test``).

Lightning's multi-device settings (``devices``, ``num_nodes``, ``strategy``) pass
through from the recipe unchanged.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..device import resolve_device
from ..errors import RecipeError
from ..families import get_family
from ..models.checkpoint import save_checkpoint
from ..models.weights import load_into, load_state_dict_file
from .budget import CPUBudget, StepBudget
from .callbacks import EngineCallback, TrainEvent, floats
from .recipes import Recipe, load_recipe

__all__ = ["EngineCallback", "TrainEvent", "TrainResult", "run_recipe"]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    checkpoint : Path
        ``<output>/model.safetensors`` (best weights; card in ``model.json``).
    card : dict
        The model card as written.
    best_metrics, last_metrics : dict
        Metrics of the best epoch (by the monitored metric) and of the last one.
    log_dir : Path
        CSV log folder of this call (``<output>/logs/version_N``); TensorBoard
        logs are in ``<output>/tensorboard/version_N``.
    output : Path
        The output folder.
    start_epoch, epochs_run, epoch : int
        Epoch this call started at (0, or where a resumed run continued),
        epochs trained in this call, and epochs done in total. An epoch cut
        short by cancel counts as done, as Lightning counts it; resuming goes on
        with the next one.
    stopped_early, cancelled : bool
        Early stopping ended the run / the user stopped it.
    history : list of dict
        Metrics of every epoch, including those of earlier (resumed) calls.
    test_metrics : dict
        ``test_*`` metrics of the best weights on the held-out test items
        (empty when there are none, or the run was cancelled).
    """

    checkpoint: Path | None
    card: dict
    best_metrics: dict
    last_metrics: dict
    log_dir: Path
    output: Path
    start_epoch: int = 0
    epochs_run: int = 0
    epoch: int = 0
    stopped_early: bool = False
    cancelled: bool = False
    history: list = field(default_factory=list)
    test_metrics: dict = field(default_factory=dict)


def _build(recipe: Recipe):
    return get_family(recipe.get("family")).part("training").build(recipe)


def _accelerator(recipe: Recipe, device: str) -> tuple[str, Any]:
    """Lightning accelerator and devices: an explicit ``device`` argument wins over the recipe."""
    acc, devices = recipe.get("trainer.accelerator"), recipe.get("trainer.devices")
    if acc == "auto" or (device or "auto") != "auto":
        device = resolve_device(device)
        acc = {"cpu": "cpu", "mps": "mps"}.get(device.split(":")[0], "gpu")
        if acc == "gpu" and ":" in device and devices == "auto":
            devices = [int(device.split(":")[1])]
    if acc == "cpu" and devices == "auto":
        devices = 1
    return acc, devices


def _precision(recipe: Recipe, accelerator: str):
    precision = recipe.get("trainer.precision")
    if precision is not None:
        return precision
    if accelerator == "gpu":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _limit(value):
    return None if value == 1.0 and isinstance(value, float) else value


def _check_resumable(task, last: Path) -> None:
    """Fail early, in words, when ``last.ckpt`` was written by a different model."""
    rep = load_into(task, load_state_dict_file(last, unwrap=False).get("state_dict", {}), dry_run=True)
    if rep.missing or rep.mismatched:
        raise RecipeError(
            last,
            f"was written for a different model and cannot be resumed: {rep}.",
            "Use a new output folder, delete last.ckpt, or run with resume=False (--no-resume).",
        )


def run_recipe(
    recipe: str | Path | dict | Recipe,
    overrides: Iterable[str] = (),
    *,
    progress=None,
    cancel=None,
    resume: bool = True,
    device: str = "auto",
    output: str | Path | None = None,
    on_event: Callable[[dict], Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train what ``recipe`` describes and export the best weights.

    Parameters
    ----------
    recipe : str, Path, dict or Recipe
        Recipe file or mapping (see :mod:`napari_pathfm.training.recipes`).
    overrides : iterable of str
        ``"key.sub=value"`` items applied on top of the recipe.
    progress : callable, optional
        ``progress(done, total, message)`` per batch and per epoch. When given,
        Lightning's own progress bar is turned off.
    cancel : Event-like or callable, optional
        Checked after every batch. When set, training stops after that batch
        (one validation pass still runs so the checkpoint has metrics), the state
        is saved to ``last.ckpt``, the best weights are exported, and the result
        has ``cancelled=True``.
    resume : bool
        Continue from ``<output>/last.ckpt`` if it exists (up to ``max_epochs``).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``.
    output : str or Path, optional
        Output folder; overrides the recipe's ``output`` (default ``runs/<recipe>``).
    on_event : callable, optional
        Receives every :class:`TrainEvent`.
    callbacks : sequence of lightning Callback, optional
        Added to the trainer's (e.g. :class:`~napari_pathfm.training.signals.GracefulStop`,
        which makes SIGTERM a graceful stop like ``cancel``).

    Returns
    -------
    TrainResult
    """
    recipe = load_recipe(recipe, overrides)
    out = Path(output or recipe.get("output") or Path("runs") / recipe.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    events = EngineCallback(progress, cancel, on_event, out / "events.jsonl")
    try:
        return _run(recipe, out, events, resume, device, progress is not None or on_event is not None, callbacks)
    except BaseException as exc:
        events.emit({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
        raise


def _budget(recipe: Recipe) -> list:
    """The run's budget callback (``trainer.step_budget`` or ``trainer.cpu_budget_minutes``), if any.

    A step budget wins over a CPU budget: it is how a recorded run is reproduced (``--set
    trainer.step_budget=N`` on a recipe that names CPU-minutes), and one run has one schedule.
    """
    cosine, warmup = recipe.get("optim.scheduler") == "cosine", recipe.get("optim.warmup_fraction") or 0.0
    if recipe.get("trainer.step_budget"):
        return [StepBudget(recipe.get("trainer.step_budget"), cosine=cosine, warmup=warmup)]
    if recipe.get("trainer.cpu_budget_minutes"):
        return [CPUBudget(recipe.get("trainer.cpu_budget_minutes"), cosine=cosine, warmup=warmup)]
    return []


def _callbacks(recipe: Recipe, data, events: EngineCallback):
    """Engine callback, checkpoints and early stopping; returns ``(callbacks, exported checkpoint, stopper)``.

    With validation data: the best epoch by the monitored validation metric (exported) plus
    ``last.ckpt`` for resuming, and early stopping. Without (e.g. a fine-tune on one corrected
    tile, or ``limit_val_batches=0``) there is nothing to rank epochs by, so only ``last.ckpt`` is
    kept and exported: two unmonitored ModelCheckpoints would share one state key, which
    Lightning refuses ("more than one stateful callback of type ModelCheckpoint").
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    es = recipe.get("trainer.early_stopping")
    has_val = bool(getattr(data, "val_items", True)) and recipe.get("trainer.limit_val_batches") != 0
    # ``last.ckpt`` after every epoch: Lightning's save_last=True only writes it when the best one changes
    last = ModelCheckpoint(
        dirpath=events.events_file.parent, filename="last", save_top_k=1, enable_version_counter=False
    )
    first = [events, *_budget(recipe)]
    if not has_val:
        return [*first, last], last, None
    monitor, mode = es["monitor"], es["mode"]
    ckpt = ModelCheckpoint(
        dirpath=events.events_file.parent,
        filename="best-{epoch}",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
    )
    stopper = None
    if es["enabled"]:
        stopper = EarlyStopping(monitor=monitor, mode=mode, patience=es["patience"], min_delta=es["min_delta"])
    return [c for c in (*first, ckpt, last, stopper) if c is not None], ckpt, stopper


def _trainer(recipe: Recipe, out: Path, callbacks: list, device: str, n_batches: int, quiet: bool):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    version = f"version_{len(list((out / 'logs').glob('version_*')))}"
    loggers = [
        CSVLogger(out, name="logs", version=version),
        TensorBoardLogger(out, name="tensorboard", version=version),
    ]
    accelerator, devices = _accelerator(recipe, device)
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=recipe.get("trainer.num_nodes"),
        strategy=recipe.get("trainer.strategy"),
        precision=_precision(recipe, accelerator),
        max_epochs=recipe.get("trainer.max_epochs"),
        limit_train_batches=_limit(recipe.get("trainer.limit_train_batches")),
        limit_val_batches=_limit(recipe.get("trainer.limit_val_batches")),
        log_every_n_steps=max(1, min(recipe.get("trainer.log_every_n_steps"), n_batches)),
        gradient_clip_val=recipe.get("trainer.gradient_clip_val"),
        accumulate_grad_batches=recipe.get("trainer.accumulate_grad_batches"),
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=out,
        enable_progress_bar=not quiet,
        enable_model_summary=not quiet,
    )


def _run(
    recipe: Recipe,
    out: Path,
    events: EngineCallback,
    resume: bool,
    device: str,
    quiet: bool,
    extra_callbacks: Sequence[Any] = (),
) -> TrainResult:
    L.seed_everything(recipe.get("seed"), workers=True, verbose=False)
    task, data, card = _build(recipe)
    (out / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    if hasattr(data, "save_split"):
        data.save_split(out / "split.json")
    callbacks, ckpt, stopper = _callbacks(recipe, data, events)
    callbacks += list(extra_callbacks)
    last = out / "last.ckpt"
    ckpt_path = last if resume and last.is_file() else None
    if ckpt_path is not None:
        _check_resumable(task, last)

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    if quiet:  # the caller shows progress; keep Lightning's banners out of the way
        lightning_log.setLevel(logging.WARNING)
    try:
        trainer = _trainer(recipe, out, callbacks, device, max(1, len(data.train_dataloader())), quiet)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*exists and is not empty.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")
            # frozen encoders (SLCA's SAM) and frozen BatchNorm (optim.trainable: head) are in eval on purpose
            warnings.filterwarnings("ignore", r".*module\(s\) in eval mode at the start of training.*")
            safe = {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}
            trainer.fit(task, datamodule=data, ckpt_path=ckpt_path, **safe)
        if events.cancelled:
            trainer.save_checkpoint(last, weights_only=False)
    finally:
        lightning_log.setLevel(level)

    best_path = Path(ckpt.best_model_path) if ckpt.best_model_path else None
    if best_path is not None and best_path.is_file():
        load_into(task.model, _model_state(best_path), strict=True, source=best_path)
    history, monitor = events.history, ckpt.monitor
    best = history[-1] if history else {}
    if monitor and any(monitor in h for h in history):
        pick = min if ckpt.mode == "min" else max
        best = pick((h for h in history if monitor in h), key=lambda h: h[monitor])
    last_metrics = floats(trainer.callback_metrics)
    test_metrics = _test(trainer, task, data, quiet) if not events.cancelled else {}
    card = {
        **card,
        "family": recipe.get("family"),
        "description": recipe.get("description"),
        "metrics": {"best": best, "last": last_metrics, "monitor": monitor},
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,  # optimizer steps: `--set trainer.step_budget=<steps>` repeats the run anywhere
        "recipe_file": str(recipe.path) if recipe.path else None,
        "recipe": recipe.config,
    }
    if test_metrics:
        card["metrics"]["test"] = test_metrics
    weights = out / "model.safetensors"
    if trainer.is_global_zero:
        save_checkpoint(task.model, weights, card)
        _warn_if_diverged(task.model, weights, events)
        card = json.loads((out / "model.json").read_text(encoding="utf-8"))
        word = "cancelled" if events.cancelled else "finished"
        events.emit(
            {
                "event": "done",
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "metrics": {**best, **test_metrics},
                "message": f"{word} after epoch {trainer.current_epoch}; weights in {weights}",
            }
        )
    return TrainResult(
        checkpoint=weights,
        card=card,
        best_metrics=best,
        last_metrics=last_metrics,
        log_dir=Path(trainer.loggers[0].log_dir),
        output=out,
        start_epoch=events.start_epoch,
        epochs_run=events.epochs_run,
        epoch=trainer.current_epoch,
        stopped_early=bool(stopper is not None and stopper.stopped_epoch > 0 and not events.cancelled),
        cancelled=events.cancelled,
        history=list(history),
        test_metrics=test_metrics,
    )


def _warn_if_diverged(model, weights: Path, events) -> None:
    """Say at once when the exported weights hold NaN/Inf (a diverged run): loading them is refused later.

    They are still written, so the run can be inspected; the warning goes to the log, to
    ``events.jsonl`` and to the ``on_event`` listener (CLI, training panel).
    """
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if not bad:
        return
    message = (
        f"{weights}: the exported weights hold NaN/Inf in {len(bad)} tensors ({', '.join(bad[:3])}"
        f"{' ...' if len(bad) > 3 else ''}): training diverged and this checkpoint will be refused at load. "
        "Lower optim.lr or set trainer.gradient_clip_val, then train again."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    events.emit({"event": "warning", "message": message})


def _model_state(path: Path) -> dict:
    """The exported model's tensors in a Lightning checkpoint: the ``model.`` entries, prefix removed.

    Tasks may hold more modules than the exported model (the GAN's discriminator);
    those stay in the checkpoint for resuming but are not part of ``model.safetensors``.
    """
    sd = load_state_dict_file(path, unwrap=False).get("state_dict") or {}
    own = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
    return own or load_state_dict_file(path)


def _test(trainer, task, data, quiet: bool) -> dict:
    """``test_*`` metrics of ``task`` (best weights loaded) on the data module's test items, if it has any."""
    if not getattr(data, "has_test", False):
        return {}
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    if quiet:
        lightning_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            out = trainer.test(task, datamodule=data, verbose=False)
    finally:
        lightning_log.setLevel(level)
    return floats(out[0]) if out else {}
