"""HistoKT cross-transfer grid: which data set's model transfers best to which other data set.

:func:`transfer_matrix` takes several standardised data sets (``pathfm standardize`` output: class folders +
``split.json`` with ``train``/``val``/``test``) and, through the one training engine
(:func:`~napari_pathfm.training.engine.run_recipe`):

1. trains a *source model* on every data set from scratch (``scratch.yaml``), or from local ImageNet weights
   (``twostage_source.yaml``, the two-stage setting) when ``imagenet_weights`` is given;
2. transfers every source model to every other data set (``finetune.yaml``: head only, or ``deeptune.yaml``:
   all layers; ``twostage_target.yaml`` in the two-stage setting), the source head being replaced by a new one;
3. evaluates each run's best weights on the target's test split.

It writes ``OUT/transfer.csv`` (rows = source, columns = target, cells = test accuracy; the diagonal is the
model trained on the target itself), ``OUT/transfer.json`` (accuracy, AUROC, run folders, settings),
``OUT/transfer.png`` (heatmap), the same three as ``transfer_<mode>.*`` (so a fine-tune and a deep-tune grid
can share one folder and its source models) and one run folder per model under ``OUT/runs/``. A finished run (it has
``result.json``) is skipped when the command is run again with the same settings (other settings are refused:
the table would mix them), an interrupted one resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import Cancelled, RecipeError
from ...io.atomic import atomic_path
from ...progress import check_cancel

__all__ = ["TransferResult", "check_standardized", "default_recipe_dir", "plot_matrix", "transfer_matrix"]

MODES = ("finetune", "deeptune")


def default_recipe_dir() -> Path:
    """The bundled ``histokt`` recipes (``training/histokt`` of the repository, shipped in the package)."""
    from ...recipe_files import recipes_dir

    return recipes_dir() / "histokt"


@dataclass
class TransferResult:
    """What :func:`transfer_matrix` wrote."""

    names: list[str]
    accuracy: dict  # accuracy[source][target]
    auroc: dict
    runs: dict  # runs[source][target] -> run folder
    csv: Path
    json: Path
    png: Path | None
    skipped: list[str] = field(default_factory=list)


def check_standardized(root: str | Path) -> dict:
    """Check that ``root`` is a usable standardised data set; return its split.

    Raises
    ------
    RecipeError
        No ``split.json``, no test items, a class folder without images, or a class without training images.
    """
    from ..datasets import find_class_files, read_split_file

    root = Path(root)
    split_file = root / "split.json"
    if not split_file.is_file():
        raise RecipeError(root, "has no split.json.", "Make the data set with `pathfm standardize SRC DST --mpp ...`.")
    classes, items = find_class_files(root)
    counts = {c: 0 for c in classes}
    for _, y in items:
        counts[classes[y]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise RecipeError(
            root / empty[0],
            f"is an empty class folder (classes without images: {empty}).",
            "Delete the empty folder(s) or add images, then rebuild split.json.",
        )
    parts = read_split_file(split_file, items, root)
    in_train = {classes[y] for _, y in parts["train"]}
    missing = [c for c in classes if c not in in_train]
    if missing:
        raise RecipeError(
            split_file,
            f"gives classes {missing} no training images, so a model cannot learn them.",
            "Re-run standardize with more images for those classes, or remove the classes.",
        )
    if not parts["test"]:
        raise RecipeError(split_file, "has no test images to evaluate transfers on.", "Re-run standardize.")
    return parts


def _read_recipe(recipe_dir: Path, name: str) -> dict:
    import yaml

    path = recipe_dir / name
    if not path.is_file():
        raise RecipeError(path, "recipe not found.", "Pass --recipes with the folder of the HistoKT recipes.")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _config(base: dict, data_root: Path, out: Path, weights: Path | None) -> dict:
    import copy

    cfg = copy.deepcopy(base)
    cfg.setdefault("data", {}).update(root=str(data_root), split_file=str(data_root / "split.json"))
    cfg.setdefault("model", {})
    if weights is not None:
        cfg["model"]["weights"] = str(weights)
    else:
        cfg["model"].pop("weights", None)
    cfg["output"] = str(out)
    return cfg


def _run(cfg: dict, overrides: Sequence[str], out: Path, label: str, device: str, cancel, skipped: list) -> dict:
    """Train one cell (or reuse its ``result.json``) and return the result summary."""
    from ..engine import run_recipe
    from ..recipes import load_recipe

    recipe = load_recipe(cfg, overrides)
    done = out / "result.json"
    if done.is_file():
        summary = json.loads(done.read_text(encoding="utf-8"))
        if summary.get("recipe") not in (None, recipe.config):
            raise RecipeError(
                done,
                f"was trained with other settings than this call asks for ({label}).",
                "Use a new --out folder for new settings, or delete this run folder to retrain it.",
            )
        skipped.append(label)
        return summary
    check_cancel(cancel, "transfer-matrix")
    result = run_recipe(recipe, cancel=cancel, device=device, output=out, on_event=lambda e: None)
    if result.cancelled:
        raise Cancelled(f"transfer-matrix cancelled during {label}; run it again to resume")
    summary = {
        "run": label,
        "checkpoint": str(result.checkpoint),
        "test": result.test_metrics,
        "best": result.best_metrics,
        "epochs": result.epoch,
        "recipe": recipe.config,
    }
    with atomic_path(done) as tmp:
        from ...io.jsonsafe import dumps as strict_dumps  # undefined metrics -> null, with a warning

        tmp.write_text(strict_dumps(summary, where=str(done), indent=2, default=str) + "\n", encoding="utf-8")
    return summary


def transfer_matrix(
    datasets: Sequence[str | Path],
    out: str | Path,
    *,
    mode: str = "deeptune",
    epochs: int | None = None,
    overrides: Iterable[str] = (),
    recipe_dir: str | Path | None = None,
    tiny: bool = False,
    imagenet_weights: str | Path | None = None,
    device: str = "auto",
    progress=None,
    cancel=None,
) -> TransferResult:
    """Run the HistoKT cross-transfer grid and write the table (see the module docstring).

    Parameters
    ----------
    datasets : sequence of path
        Two or more standardised data sets; their folder names label the table and must differ.
    out : str or Path
        Output folder (created; re-running continues where it stopped).
    mode : {"deeptune", "finetune"}
        Transfer by training all layers or only the head.
    epochs : int, optional
        Override ``trainer.max_epochs`` of every run.
    overrides : iterable of str
        ``key=value`` recipe overrides applied to every run (e.g. ``trainer.batch_size=16``).
    recipe_dir : path, optional
        Folder of the HistoKT recipes (default: the bundled ``histokt`` recipes, :func:`default_recipe_dir`).
    tiny : bool
        Use the ``*_tiny.yaml`` CPU variants (resnet10t, 64 px, 2 epochs).
    imagenet_weights : path, optional
        Two-stage setting: source models start from this local timm resnet18 weights file.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    progress : callable, optional
        ``progress(done, total, message)`` per run.
    cancel : Event-like or callable, optional
        Checked between and inside runs; raises :class:`~napari_pathfm.errors.Cancelled`.

    Returns
    -------
    TransferResult
    """
    from ...progress import report

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    roots = [Path(d).resolve() for d in datasets]
    names = [r.name for r in roots]
    if len(roots) < 2:
        raise RecipeError(roots[0] if roots else "transfer-matrix", "needs two or more data sets.", "Pass more.")
    if len(set(names)) != len(names):
        raise RecipeError(roots[0], f"data set folder names must differ (got {names}).", "Rename the folders.")
    for r in roots:
        check_standardized(r)
    recipe_dir = Path(recipe_dir) if recipe_dir else default_recipe_dir()
    suffix = "_tiny.yaml" if tiny else ".yaml"
    if imagenet_weights is not None:
        src_recipe = _read_recipe(recipe_dir, "twostage_source" + suffix)
        dst_recipe = _read_recipe(recipe_dir, "twostage_target" + suffix)
    else:
        src_recipe = _read_recipe(recipe_dir, "scratch" + suffix)
        dst_recipe = _read_recipe(recipe_dir, mode + suffix)
    overrides = list(overrides) + ([f"trainer.max_epochs={int(epochs)}"] if epochs else [])
    out = Path(out).resolve()
    runs_dir = out / "runs"
    tag = "twostage" if imagenet_weights is not None else mode
    total, done = len(roots) ** 2, 0
    acc = {s: {} for s in names}
    auroc = {s: {} for s in names}
    runs = {s: {} for s in names}
    skipped: list[str] = []
    sources = {}
    for name, root in zip(names, roots):  # stage 1: a model per data set (the diagonal)
        label = f"{name}__{'twostage_source' if imagenet_weights is not None else 'scratch'}"
        weights = Path(imagenet_weights).resolve() if imagenet_weights is not None else None
        res = _run(
            _config(src_recipe, root, runs_dir / label, weights),
            overrides,
            runs_dir / label,
            label,
            device,
            cancel,
            skipped,
        )
        sources[name] = Path(res["checkpoint"])
        acc[name][name], auroc[name][name] = res["test"].get("test_acc"), res["test"].get("test_auroc")
        runs[name][name] = str(runs_dir / label)
        done += 1
        report(progress, done, total, f"{label}: test acc {acc[name][name]}")
    for s in names:  # stage 2: every source to every other target
        for t, root in zip(names, roots):
            if s == t:
                continue
            label = f"{s}__to__{t}__{tag}"
            res = _run(
                _config(dst_recipe, root, runs_dir / label, sources[s]),
                overrides,
                runs_dir / label,
                label,
                device,
                cancel,
                skipped,
            )
            acc[s][t], auroc[s][t] = res["test"].get("test_acc"), res["test"].get("test_auroc")
            runs[s][t] = str(runs_dir / label)
            done += 1
            report(progress, done, total, f"{label}: test acc {acc[s][t]}")
    csv_path, json_path, png_path = out / "transfer.csv", out / "transfer.json", out / "transfer.png"
    _write_csv(csv_path, names, acc)
    _write_csv(out / f"transfer_{tag}.csv", names, acc)  # kept when the other mode runs in the same folder
    info = {
        "mode": tag,
        "datasets": {n: str(r) for n, r in zip(names, roots)},
        "rows": "source",
        "columns": "target",
        "diagonal": "trained on the target itself (from scratch, or ImageNet -> target in the two-stage setting)",
        "metric": "test accuracy of the best (val_loss) weights on the target's split.json test part",
        "test_acc": acc,
        "test_auroc": auroc,
        "runs": runs,
        "overrides": overrides,
        "recipes": str(recipe_dir),
        "tiny": tiny,
    }
    for path in (json_path, out / f"transfer_{tag}.json"):
        with atomic_path(path) as tmp:
            from ...io.jsonsafe import dumps as strict_dumps  # undefined metrics -> null, with a warning

            tmp.write_text(strict_dumps(info, where=str(path), indent=2, default=str) + "\n", encoding="utf-8")
    for path in (png_path, out / f"transfer_{tag}.png"):
        plot_matrix(names, acc, path, title=f"HistoKT transfer ({tag}): test accuracy")
    return TransferResult(names, acc, auroc, runs, csv_path, json_path, png_path, skipped)


def _write_csv(path: Path, names: list[str], acc: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["source\\target", *names])
        for s in names:
            w.writerow([s, *("" if acc[s].get(t) is None else f"{acc[s][t]:.4f}" for t in names)])


def plot_matrix(names: list[str], acc: dict, path: str | Path, title: str = "") -> Path:
    """Heatmap of ``acc[source][target]`` with the values written in the cells (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if acc[s].get(t) is None else acc[s][t] for t in names] for s in names], float)
    size = 1.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target data set")
    ax.set_ylabel("source data set")
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="test accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)
