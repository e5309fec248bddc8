"""k-fold cross-validation of a ``mil`` recipe on one engine run per fold.

Folds come from the CSV's ``fold`` column when it has one, otherwise they are
dealt by :func:`~napari_pathfm.training.mil_data.assign_folds` (seeded by the
recipe's ``seed``, stratified by label), so every fold run sees the same
partition. Fold ``f`` trains on the other folds and validates (early stopping,
best checkpoint) on ``f``. Rows with ``split == test`` stay out of every fold;
when there are any, each fold's best model is also scored on them.

Output: ``<output>/fold_<f>/`` (a full :func:`~napari_pathfm.training.run_recipe`
folder each, plus ``fold.json``) and ``<output>/cv_summary.json`` with per-fold
metrics and mean ± std (sample std, ddof=1) of accuracy and AUROC. A finished fold
(``fold.json`` present) is reused when the command is run again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..progress import report
from .recipes import load_recipe

__all__ = ["CVResult", "cv_command", "run_cv", "summarize"]


@dataclass
class CVResult:
    """Outcome of :func:`run_cv`.

    Attributes
    ----------
    folds : list of dict
        Per fold: ``fold``, ``output``, ``checkpoint``, ``val_loss``, ``val_acc``,
        ``val_auroc`` (best epoch), ``epoch``, ``stopped_early`` and, with a test
        split, ``test_acc``, ``test_auroc``.
    summary : dict
        What ``cv_summary.json`` holds.
    output : Path
    cancelled : bool
        The user stopped the run; the folds done so far are summarised.
    """

    folds: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    output: Path | None = None
    cancelled: bool = False


def _stats(values: list) -> dict:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    mean = sum(vals) / n if n else float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else (0.0 if n else float("nan"))
    return {"mean": mean, "std": std, "n": n, "values": [None if v is None else float(v) for v in values]}


def summarize(folds: list[dict]) -> dict:
    """Mean ± std (ddof=1, NaN folds left out) of every ``val_*``/``test_*`` accuracy and AUROC."""
    names = ("val_acc", "val_auroc", "val_patch_auroc", "test_acc", "test_auroc", "test_patch_auroc")
    keys = [k for k in names if any(k in f for f in folds)]
    return {k: _stats([f.get(k) for f in folds]) for k in keys}


def _fold_ids(recipe, k: int | None) -> tuple[list[int], str]:
    from .mil_data import read_bag_table

    items, _ = read_bag_table(recipe.get("data.csv"), recipe.get("data.features_dir"), recipe.get("data.classes"))
    pool = [it for it in items if it.split != "test"]
    if pool and all(it.fold is not None for it in pool):
        ids = sorted({it.fold for it in pool})
        if k is not None and k != len(ids):
            raise RecipeError(
                recipe.get("data.csv"),
                f"has {len(ids)} folds in its fold column but {k} were asked for.",
                "Leave k out to use the CSV's folds, or remove the fold column to deal k folds.",
            )
        return ids, "csv fold column"
    k = int(k or recipe.get("data.n_folds") or 5)
    if k < 2:
        raise RecipeError(
            recipe.path or "<recipe>", f"cross-validation needs k >= 2, not {k}.", "Use k=5 (the default)."
        )
    return list(range(k)), f"seeded stratified folds (seed {recipe.get('seed')})"


def _test_metrics(result, recipe) -> dict:
    from ..models.checkpoint import load_checkpoint
    from .tasks.mil import BagDataModule, evaluate_bags

    data = BagDataModule(recipe.get("data"), recipe.get("seed"))
    if not data.test_items:
        return {}
    model, _ = load_checkpoint(result.checkpoint)
    metrics = evaluate_bags(model, data.dataset("test"))["metrics"]
    return {f"test_{k}": v for k, v in metrics.items()}


def _write_json(path: Path, doc: dict) -> None:
    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        from ..io.jsonsafe import dumps as strict_dumps  # undefined metrics -> null, with a warning

        tmp.write_text(strict_dumps(doc, where=str(path), indent=2, default=str) + "\n", encoding="utf-8")


def run_cv(
    recipe,
    k: int | None = None,
    overrides: Iterable[str] = (),
    *,
    output: str | Path | None = None,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    device: str = "auto",
    resume: bool = True,
    on_event: Callable[[dict], Any] | None = None,
) -> CVResult:
    """Cross-validate a ``mil`` recipe: one :func:`~napari_pathfm.training.run_recipe` per fold.

    Parameters
    ----------
    recipe : str, Path, dict or Recipe
        A ``mil`` recipe.
    k : int, optional
        Number of folds to deal; default: the CSV's fold column, else
        ``data.n_folds`` (5). Giving a k that differs from the CSV's folds is an error.
    overrides : iterable of str
        ``key=value`` recipe overrides applied to every fold.
    output : str or Path, optional
        Folder for the fold runs and ``cv_summary.json`` (default: the recipe's
        ``output`` + ``_cv``).
    progress, cancel
        Contract 1; progress counts batches over all folds, cancel stops after the
        current batch and summarises the folds done.
    device, resume, on_event
        Passed to every fold's :func:`~napari_pathfm.training.run_recipe`
        (events get a ``fold`` key).

    Returns
    -------
    CVResult
    """
    from .engine import run_recipe

    overrides = list(overrides)
    rec = load_recipe(recipe, overrides)
    if rec.get("family") != "mil":
        raise RecipeError(
            rec.path or "<recipe>",
            f"is a {rec.get('family')!r} recipe; cross-validation runs mil recipes.",
            "Use a recipe from training/s4mil/.",
        )
    out = Path(output or f"{rec.get('output') or Path('runs') / rec.name}_cv").resolve()
    ids, source = _fold_ids(rec, k)
    folds, cancelled = [], False
    for n, fold in enumerate(ids):
        fold_out = out / f"fold_{fold}"
        done_file = fold_out / "fold.json"
        if resume and done_file.is_file():
            folds.append(json.loads(done_file.read_text(encoding="utf-8")))
            continue

        def fold_progress(done, total, message="", n=n, fold=fold):
            report(progress, n * total + done, len(ids) * total, f"fold {fold} ({n + 1}/{len(ids)}): {message}")

        def fold_event(event, fold=fold):
            if on_event is not None:
                on_event({**event, "fold": fold})

        fold_overrides = [f"data.val_fold={fold}", f"data.n_folds={len(ids)}"]
        result = run_recipe(
            rec,
            fold_overrides,
            output=fold_out,
            progress=fold_progress if progress else None,
            cancel=cancel,
            device=device,
            resume=resume,
            on_event=fold_event if on_event else None,
        )
        best = result.best_metrics
        record = {
            "fold": fold,
            "output": str(fold_out),
            "checkpoint": str(result.checkpoint),
            "val_loss": best.get("val_loss"),
            "val_acc": best.get("val_acc"),
            "val_auroc": best.get("val_auroc"),
            **({"val_patch_auroc": best["val_patch_auroc"]} if "val_patch_auroc" in best else {}),
            "epoch": best.get("epoch"),
            "epochs_run": result.epoch,
            "stopped_early": result.stopped_early,
        }
        if result.cancelled:
            cancelled = True
            folds.append({**record, "cancelled": True})
            break
        record.update(_test_metrics(result, load_recipe(rec, fold_overrides)))
        _write_json(done_file, record)
        folds.append(record)
    summary = {
        "recipe": str(rec.path) if rec.path else None,
        "folds_from": source,
        "k": len(ids),
        "completed": len([f for f in folds if not f.get("cancelled")]),
        "cancelled": cancelled,
        "std": "sample standard deviation over folds (ddof=1); NaN folds left out",
        "metrics": summarize([f for f in folds if not f.get("cancelled")]),
        "folds": folds,
    }
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "cv_summary.json", summary)
    return CVResult(folds=folds, summary=summary, output=out, cancelled=cancelled)


def cv_command(
    recipe: str | Path,
    k: int | None = None,
    set_: Iterable[str] = (),
    out: str | Path | None = None,
    device: str = "auto",
    resume: bool = True,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> dict:
    """What ``pathfm train-cv RECIPE [--k K] [--set ...] [--out DIR]`` runs; returns a JSON-ready summary.

    The result has ``output`` (the CV folder), ``summary_file`` and, per metric,
    ``"mean ± std"`` strings in ``table`` for printing.
    """
    result = run_cv(recipe, k, set_, output=out, progress=progress, cancel=cancel, device=device, resume=resume)
    table = {m: f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})" for m, s in result.summary["metrics"].items()}
    return {
        "output": str(result.output),
        "summary_file": str(result.output / "cv_summary.json"),
        "cancelled": result.cancelled,
        "table": table,
        "folds": result.folds,
    }
