"""Order-dependent MIL benchmark: 5-fold cross-validation of S4 MIL and four baselines on GlaS bag pairs.

The bags of ``build_order_bags.py`` come in pairs of identical tiles: gland tiles
in one contiguous region (positive) or scattered (negative). Each model trains
with the one recipe ``training/s4mil/glas_bags.yaml`` through the package's engine
(Adam + Lookahead, lr 2e-4, weight decay 1e-4, one bag per batch), with the same
fixed budget for every model: ``--epochs`` epochs, no early stopping, no
validation split, the last weights scored. Only the ``model`` section changes.

Cross-validation: the folds are the bag builder's image groups (both bags of a
pair and every image's tiles in one fold). Fold ``f`` is held out as the test
split and the model trains on the other folds; per fold we score

- **slide AUROC** and **slide accuracy** (threshold 0.5) on the held-out bags;
- **pair accuracy**: the share of held-out pairs whose contiguous bag scores
  above its scattered twin (ties count 1/2), the direct question "does the model
  see the arrangement".

Per model the table gives the mean over the folds and a 95 % confidence interval
from the t distribution with k - 1 degrees of freedom (mean ± t·sd/√k, sd with
ddof 1). Results go to ``<out>/results.json`` and ``<out>/table.md``; each finished
(model, fold) run is kept under ``<out>/runs/`` and reused when the command is run
again.

    .venv/bin/python benchmarks/mil_order/run.py                 # builds the bags if missing, then 5 models x 5 folds
    .venv/bin/python benchmarks/mil_order/run.py --models s4mil,meanpool --report
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_order_bags

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "training" / "s4mil" / "glas_bags.yaml"
CLASSES = ["scattered", "contiguous"]
MODELS = build_order_bags.load_benchmark("run.py").MODELS  # mil_glas's model settings: s4mil and four baselines
METRICS = ("slide_auroc", "slide_acc", "pair_acc")


def fold_csv(bags: Path, fold: int, out: Path) -> Path:
    """``bags.csv`` with a ``split`` column: fold ``fold`` is ``test``, the others ``train``."""
    with open(bags / "bags.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    path = out / "csv" / f"test_fold_{fold}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")  # runs of other models may write it at the same time
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("slide", "label", "split"))
        w.writerows((r["slide"], r["label"], "test" if int(r["fold"]) == fold else "train") for r in rows)
    os.replace(tmp, path)
    return path


def recipe_for(bags: Path, csv_path: Path, model: str, epochs: int, seed: int, overrides=()):
    """The GlaS bag recipe with this benchmark's data, budget (fixed epochs, no early stopping) and model."""
    from napari_pathfm.training.recipes import Recipe, load_recipe

    base = load_recipe(RECIPE)
    config = copy.deepcopy(base.config)
    config["seed"] = seed
    config["model"] = {"name": model, **MODELS[model]}
    config["data"].update(features_dir=str(bags / "bags"), csv=str(csv_path), classes=CLASSES)
    config["trainer"]["max_epochs"] = epochs
    config["trainer"]["early_stopping"] = {**config["trainer"].get("early_stopping", {}), "enabled": False}
    return load_recipe(Recipe(config, base.path), list(overrides))


def pair_accuracy(slides: list[str], probs: np.ndarray) -> float:
    """Share of pairs whose contiguous bag has the higher positive probability (ties 1/2)."""
    score = dict(zip(slides, probs[:, 1]))
    pairs = sorted({s.rsplit("_", 1)[0] for s in slides})
    wins = [np.sign(score[f"{p}_contiguous"] - score[f"{p}_scattered"]) for p in pairs]
    return float(np.mean([(w + 1) / 2 for w in wins]))


def run_one(bags: Path, model: str, fold: int, out: Path, epochs: int, seed: int, overrides=()) -> dict:
    """Train ``model`` on every fold but ``fold`` (or reuse a finished run) and score it on ``fold``."""
    from napari_pathfm.models.checkpoint import load_checkpoint
    from napari_pathfm.training.engine import run_recipe
    from napari_pathfm.training.tasks.mil import BagDataModule, evaluate_bags

    run_dir = out / "runs" / model / f"fold_{fold}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = recipe_for(bags, fold_csv(bags, fold, out), model, epochs, seed, overrides)
    t0 = time.perf_counter()
    result = run_recipe(recipe, output=run_dir, device="cpu", resume=False, progress=lambda *a: None)
    train_s = time.perf_counter() - t0
    net, card = load_checkpoint(result.checkpoint)
    ev = evaluate_bags(net, BagDataModule(recipe.get("data"), seed).dataset("test"))
    record = {
        "model": model,
        "fold": fold,
        "slide_auroc": ev["metrics"]["auroc"],
        "slide_acc": ev["metrics"]["acc"],
        "pair_acc": pair_accuracy(ev["slides"], ev["probs"]),
        "test_bags": len(ev["slides"]),
        "epochs": result.epoch,
        "train_loss": result.last_metrics.get("train_loss"),
        "train_s": train_s,
        "num_parameters": card.get("num_parameters"),
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def t_interval(values) -> dict:
    """Mean and 95 % t-interval half-width (k - 1 degrees of freedom, sd with ddof 1) of the fold values."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if len(v) < 2:
        return {"mean": float(v.mean()) if len(v) else float("nan"), "ci95": float("nan"), "n": len(v)}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": float(v.mean()), "ci95": half, "n": len(v)}


def summarize(records: list[dict]) -> dict:
    """Per model: :func:`t_interval` of every metric, mean epochs and training seconds per fold."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in records):
        rs = [r for r in records if r["model"] == model]
        out[model] = {k: t_interval([r[k] for r in rs]) for k in METRICS}
        out[model].update(train_s=float(np.mean([r["train_s"] for r in rs])), params=rs[0]["num_parameters"])
    return out


def table(summary: dict) -> str:
    """Markdown table: mean [95 % CI] per metric over the folds."""
    lines = [
        "| model | slide AUROC | slide accuracy | pair accuracy | folds | train s / fold | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, s in summary.items():
        cells = [
            f"{s[k]['mean']:.3f} [{s[k]['mean'] - s[k]['ci95']:.3f}, {s[k]['mean'] + s[k]['ci95']:.3f}]"
            for k in METRICS
        ]
        lines.append(
            f"| {model} | " + " | ".join(cells) + f" | {s['pair_acc']['n']} | {s['train_s']:.0f} | {s['params']:,} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Order-dependent MIL benchmark (see the module docstring).")
    p.add_argument("--bags", help=f"bags of build_order_bags.py (default {build_order_bags.OUT}; built if missing)")
    p.add_argument("--out", help="results folder (default <bags>/results)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: all five)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs for every model (default 20)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--folds", help="comma-separated held-out folds to run (default all; runs in parallel processes)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--report", action="store_true", help="only tabulate the runs already finished")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    bags = Path(args.bags or build_order_bags.OUT)
    if not (bags / "bags.csv").is_file():
        print(f"building bags in {bags}", flush=True)
        build_order_bags.build(build_order_bags.parser().parse_args(["--out", str(bags)]))
    out = Path(args.out or bags / "results")
    build = json.loads((bags / "build.json").read_text())
    models = args.models.split(",")
    t0 = time.perf_counter()
    records = []
    for model in models:
        for fold in [int(f) for f in args.folds.split(",")] if args.folds else range(build["folds"]):
            if args.report:
                done = out / "runs" / model / f"fold_{fold}" / "result.json"
                records += [json.loads(done.read_text())] if done.is_file() else []
                continue
            records.append(run_one(bags, model, fold, out, args.epochs, args.seed))
            r = records[-1]
            print(
                f"{model} fold {fold}: slide AUROC {r['slide_auroc']:.3f}, acc {r['slide_acc']:.3f}, "
                f"pair acc {r['pair_acc']:.3f} ({r['train_s']:.0f} s)",
                flush=True,
            )
    sides = [b["side"] for b in build["bags"]]
    note = (
        f"{len(build['bags'])} bags ({build['pairs_per_fold']} pairs per fold, {build['folds']} folds by image group), "
        f"{min(sides) ** 2}-{max(sides) ** 2} patches; epochs {sorted({r['epochs'] for r in records})}, "
        f"seed {args.seed}; 95 % CI: t-interval over folds; this call {time.perf_counter() - t0:.0f} s"
    )
    summary = save(out, records, note)
    print(f"\n{table(summary)}\n\n{note}")
    return summary


def save(out: Path, records: list[dict], note: str) -> dict:
    """Write ``results.json`` (note, per-model summary, per-fold records) and ``table.md``; return the summary."""
    summary = summarize(records)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"note": note, "summary": summary, "records": records}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    (out / "table.md").write_text(f"{table(summary)}\n\n{note}\n")
    return summary


if __name__ == "__main__":
    main()
