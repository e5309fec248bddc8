"""GlaS gland-bag MIL benchmark: S4 MIL against meanpool, maxpool, ABMIL and TransMIL over seeds.

Every model trains with the same recipe (``training/s4mil/glas_bags.yaml``: Adam +
Lookahead, lr 2e-4, weight decay 1e-4, one bag per batch, early stopping on
val_loss; only the ``model`` section changes) through the package's engine, on the
bags of ``build_bags.py`` (built first when missing). The best checkpoint of each
run is scored on the test split:

- slide AUROC and accuracy (positive = the bag contains gland tiles);
- patch AUROC, pooled: ``heatmap_scores(out, positive)`` of every patch of every
  test bag against its gland label; this is what one threshold on a heatmap
  over many slides achieves;
- patch AUROC within bags: the same, per positive test bag, averaged (how well the
  heatmap ranks the gland patches of one slide).

Prints a markdown table (mean ± std over seeds) and writes ``results.json`` and
``table.md``; each finished (model, seed) run is kept in ``runs/`` and reused
when the command is repeated.

    .venv/bin/python benchmarks/mil_glas/run.py --quick      # a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/mil_glas/run.py              # full bags (hours on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_bags

REPO = build_bags.REPO
RECIPE = REPO / "training" / "s4mil" / "glas_bags.yaml"
MODELS = {
    "s4mil": {"d_model": 512, "d_state": 32},
    "meanpool": {"d_model": 512},
    "maxpool": {"d_model": 512},
    "abmil": {"d_model": 512},
    "transmil": {},
}
QUICK_OVERRIDES = ["trainer.max_epochs=10"]


def _recipe(bags: Path, model: str, seed: int, overrides: list[str], multitask: bool):
    from napari_pathfm.training.recipes import Recipe, load_recipe

    paths = [f"data.features_dir={bags / 'bags'}", f"data.csv={bags / 'bags.csv'}"]
    base = load_recipe(RECIPE, [*paths, f"seed={seed}", *overrides])
    config = copy.deepcopy(base.config)
    config["model"] = {"name": model, **MODELS[model], **({"multitask": True} if multitask else {})}
    return load_recipe(Recipe(config, base.path))


def within_bag_auroc(scores: list, labels: list) -> float:
    """Mean over bags that have both gland and non-gland patches of the per-bag patch AUROC."""
    from napari_pathfm.training.tasks.mil import patch_auroc

    vals = [patch_auroc(s, y) for s, y in zip(scores, labels) if len(np.unique(y[y >= 0])) == 2]
    return float(np.mean(vals)) if vals else float("nan")


def run_one(bags: Path, model: str, seed: int, out: Path, overrides: list[str], multitask: bool) -> dict:
    """Train ``model`` with ``seed`` (or reuse a finished run) and score its best checkpoint on the test bags."""
    import torch

    from napari_pathfm.models.checkpoint import load_checkpoint
    from napari_pathfm.training.engine import run_recipe
    from napari_pathfm.training.tasks.mil import BagDataModule, evaluate_bags

    run_dir = out / "runs" / f"{model}{'_mt' if multitask else ''}" / f"seed_{seed}"
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    recipe = _recipe(bags, model, seed, overrides, multitask)
    t0 = time.perf_counter()

    def progress(d, t, msg):
        if "done:" in msg:
            print(f"  {model} seed {seed}: {msg[:110]}", flush=True)

    result = run_recipe(recipe, output=run_dir, progress=progress, device="cpu")
    train_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    net, card = load_checkpoint(result.checkpoint)
    test = BagDataModule(recipe.get("data"), seed).dataset("test")
    t1 = time.perf_counter()
    ev = evaluate_bags(net, test)
    record = {
        "model": model,
        "seed": seed,
        "multitask": multitask,
        "slide_auroc": ev["metrics"]["auroc"],
        "slide_acc": ev["metrics"]["acc"],
        "patch_auroc": ev["metrics"]["patch_auroc"],
        "patch_auroc_within": within_bag_auroc(ev["patch_scores"], ev["patch_labels"]),
        "best_epoch": result.best_metrics.get("epoch"),
        "epochs": result.epoch,
        "val_auroc": result.best_metrics.get("val_auroc"),
        "train_s": train_s,
        "test_s": time.perf_counter() - t1,
        "num_parameters": card.get("num_parameters"),
    }
    done.write_text(json.dumps(record, indent=1))
    return record


def _ms(values) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "n/a"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.3f}"


def table(records: list[dict]) -> str:
    """Markdown table, one row per model: mean ± std (ddof=1) over seeds."""
    head = (
        "| model | slide AUROC | slide acc | patch AUROC (pooled) | patch AUROC (within bag) "
        "| epochs (best) | train s | params |"
    )
    lines = [head, "|" + "---|" * 8]
    for name in dict.fromkeys(f"{r['model']}{' (multitask)' if r['multitask'] else ''}" for r in records):
        rs = [r for r in records if f"{r['model']}{' (multitask)' if r['multitask'] else ''}" == name]
        cols = [_ms([r[k] for r in rs]) for k in ("slide_auroc", "slide_acc", "patch_auroc", "patch_auroc_within")]
        epochs = f"{np.mean([r['epochs'] for r in rs]):.1f} ({np.mean([r['best_epoch'] or 0 for r in rs]) + 1:.1f})"
        train_s = np.mean([r["train_s"] for r in rs])
        lines.append(f"| {name} | " + " | ".join(cols) + f" | {epochs} | {train_s:.0f} | {rs[0]['num_parameters']:,} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description="GlaS gland-bag MIL benchmark (see the module docstring).")
    p.add_argument("--quick", action="store_true", help="small bags and 10 epochs (minutes on 2 CPU cores)")
    p.add_argument("--bags", help="bags from build_bags.py (default <cache>/bags-quick or bags-full; built if missing)")
    p.add_argument("--out", help="results folder (default <bags>/results)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: all five)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--multitask", action="store_true", help="also train multitask s4mil (patch labels, lambda 5)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override key=value")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--report", action="store_true", help="only tabulate the runs already finished in --out")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    bags = Path(args.bags or build_bags.CACHE / ("bags-quick" if args.quick else "bags-full"))
    if not (bags / "bags.csv").is_file():
        print(f"building bags in {bags}", flush=True)
        build_bags.build(build_bags.parser().parse_args((["--quick"] if args.quick else []) + ["--out", str(bags)]))
    out = Path(args.out or bags / "results")
    overrides = (QUICK_OVERRIDES if args.quick else []) + args.overrides
    jobs = [(m, False) for m in args.models.split(",")] + ([("s4mil", True)] if args.multitask else [])
    records = []
    t0 = time.perf_counter()
    if args.report:
        records = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*/seed_*/result.json"))]
        order = list(MODELS)
        records.sort(key=lambda r: (r["multitask"], order.index(r["model"]), r["seed"]))
        jobs = []
    for model, mt in jobs:
        for seed in (int(s) for s in args.seeds.split(",")):
            records.append(run_one(bags, model, seed, out, overrides, mt))
            r = records[-1]
            print(
                f"{model}{' (mt)' if mt else ''} seed {seed}: slide AUROC {r['slide_auroc']:.3f}, patch AUROC "
                f"{r['patch_auroc']:.3f} / within {r['patch_auroc_within']:.3f} ({r['train_s']:.0f} s)",
                flush=True,
            )
    build = json.loads((bags / "build.json").read_text())
    md = table(records)
    lengths = [b["length"] for b in build["bags"] if b["split"] == "test"]
    note = (
        f"GlaS gland bags ({'quick' if args.quick else 'full'}): {bags}; test bags {len(lengths)} "
        f"({min(lengths)}-{max(lengths)} patches); tile linear-probe AUROC {build['tile_probe_auroc']:.3f}; "
        f"seeds {sorted({r['seed'] for r in records})}; recipe overrides {overrides or 'none'}; "
        f"this call {time.perf_counter() - t0:.0f} s"
    )
    print("\n" + md + "\n\n" + note)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md + "\n\n" + note + "\n")
    (out / "results.json").write_text(json.dumps({"note": note, "records": records}, indent=1))
    return records


if __name__ == "__main__":
    main()
