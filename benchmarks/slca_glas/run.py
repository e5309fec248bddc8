"""SLCA vs the same backbone without SLCA on real GlaS tiles, over label fractions and seeds.

1. Builds the gland / non-gland tile data set from ``../shared/data/glas/train``
   (:func:`napari_pathfm.training.glas_tiles.build_glas_tiles`: 224 px tiles, split by
   image 51 / 17 / 17, cached in ``<per-user data folder>/glas_tiles``, where the recipes look
   unless ``PATHFM_GLAS_TILES`` is set).
2. For every seed, label fraction and model, trains with the CPU recipes
   ``training/slca/glas_cpu.yaml`` (SLCA) and ``glas_cpu_noslca.yaml`` (bare ResNet-18),
   which differ only in their ``model`` section; ``seed`` sets the weights init, the
   augmentation and which training tiles a fraction keeps (the same tiles for both
   models).
3. The engine evaluates each run's best weights (lowest val_loss) on the held-out test
   images; ``results.csv`` gets one row per run and the table (mean ± std over seeds)
   goes into ``README.md`` between the ``results`` markers and into ``table.md``.

Finished runs (``runs/slca_glas/<model>_f<fraction>_s<seed>/model.json`` with test
metrics) are reused and an interrupted run resumes from its ``last.ckpt``, so a
stopped benchmark continues where it stopped. The table is always rebuilt from
every finished run folder, so seeds can run in separate processes at once
(``--seeds 0`` and ``--seeds 1``; give each ``--threads 1`` on 2 cores).

    nice -n 10 .venv/bin/python benchmarks/slca_glas/run.py                   # 0.1/0.5/1.0 x seeds 0,1
    nice -n 10 .venv/bin/python benchmarks/slca_glas/run.py --seeds 0 --fractions 1.0
    nice -n 10 .venv/bin/python benchmarks/slca_glas/run.py --seeds 1 --threads 1 &   # a second seed alongside
    .venv/bin/python benchmarks/slca_glas/run.py --report                     # table from the finished runs only

The SAM encoder of the SLCA recipe is random-init (no SAM weights offline), so this
measures the plumbing and what the SLCA path adds on top of random frozen SAM
features, not the paper's claim with pretrained SAM ViT-H.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# the data beside the checkout unless PATHFM_SHARED_DATA is set (the package's own default is a per-user folder)
os.environ.setdefault("PATHFM_SHARED_DATA", str(REPO.parent / "shared" / "data"))
RECIPES = {"slca": REPO / "training/slca/glas_cpu.yaml", "noslca": REPO / "training/slca/glas_cpu_noslca.yaml"}
LABELS = {"slca": "SLCA (ResNet-18 + random-init SAM)", "noslca": "ResNet-18 without SLCA"}
FIELDS = [
    "model",
    "label_fraction",
    "seed",
    "n_train",
    "epochs",
    "best_epoch",
    "val_auroc",
    "test_acc",
    "test_auroc",
    "test_loss",
    "seconds",
]
MARK = ("<!-- results:start -->", "<!-- results:end -->")


def _run_dir(runs: Path, model: str, fraction: float, seed: int) -> Path:
    return runs / f"{model}_f{fraction:g}_s{seed}"


def _row(model: str, fraction: float, seed: int, card: dict, seconds: float) -> dict:
    """One results row from a finished run's model card."""
    metrics = card["metrics"]
    best, test = metrics.get("best", {}), metrics.get("test", {})
    n_train = card["training_data"].split(" train /")[0].rsplit("(", 1)[-1]
    return {
        "model": model,
        "label_fraction": fraction,
        "seed": seed,
        "n_train": int(n_train),
        "epochs": card.get("epochs"),
        "best_epoch": best.get("epoch"),
        "val_auroc": best.get("val_auroc"),
        "test_acc": test.get("test_acc"),
        "test_auroc": test.get("test_auroc"),
        "test_loss": test.get("test_loss"),
        "seconds": round(seconds, 1),
    }


def _finished(out: Path) -> dict | None:
    """The card of a finished run folder (one with test metrics), else None."""
    card = out / "model.json"
    if not card.is_file():
        return None
    card = json.loads(card.read_text(encoding="utf-8"))
    return card if "test" in card.get("metrics", {}) else None


def collect(runs: Path) -> list[dict]:
    """Results rows of every finished run folder ``<model>_f<fraction>_s<seed>`` under ``runs``."""
    rows = []
    for out in sorted(runs.glob("*_f*_s*")):
        card = _finished(out)
        if card is None:
            continue
        model, _, rest = out.name.rpartition("_f")
        fraction, _, seed = rest.partition("_s")
        timing = out / "seconds.txt"
        secs = float(timing.read_text()) if timing.is_file() else float("nan")
        rows.append(_row(model, float(fraction), int(seed), card, secs))
    return sorted(rows, key=lambda r: (r["model"], r["label_fraction"], r["seed"]))


def train_one(model: str, fraction: float, seed: int, tiles: Path, runs: Path, extra: list[str]) -> None:
    """Train one run unless its folder already holds a finished one (resumes a cut-short run)."""
    from napari_pathfm.training.engine import run_recipe

    out = _run_dir(runs, model, fraction, seed)
    timing = out / "seconds.txt"
    if _finished(out) is not None:
        return
    overrides = [
        f"data.root={tiles}",
        f"data.split_file={tiles / 'split.json'}",
        f"seed={seed}",
        f"data.label_fraction={fraction}",
        *extra,
    ]

    def on_event(ev: dict) -> None:
        if ev.get("event") in ("epoch", "done"):
            print(f"  [{model} f={fraction:g} s={seed}] {ev.get('message', '')}", flush=True)

    t0 = time.perf_counter()
    try:
        run_recipe(RECIPES[model], overrides, output=out, device="cpu", on_event=on_event)
    finally:  # wall time adds up over a cut-short call and the call that resumes it
        earlier = float(timing.read_text()) if timing.is_file() else 0.0
        timing.write_text(f"{earlier + time.perf_counter() - t0:.1f}")


def _stat(values: list) -> str:
    vals = [float(v) for v in values if v not in (None, "") and not math.isnan(float(v))]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def table(rows: list[dict]) -> str:
    """Markdown table: test accuracy / AUROC (mean ± std over seeds, ddof 1) per model and label fraction."""
    lines = [
        "| model | label fraction | training tiles | seeds | test accuracy | test AUROC | minutes per run |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["model"], float(r["label_fraction"])) for r in rows}, key=lambda k: (k[0] != "slca", k[1]))
    for model, frac in keys:
        rs = [r for r in rows if r["model"] == model and float(r["label_fraction"]) == frac]
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: int(r["seed"])))
        n_train = "/".join(sorted({str(r["n_train"]) for r in rs}))
        minutes = [float(r["seconds"]) / 60 for r in rs if r["seconds"] not in (None, "")]
        lines.append(
            f"| {LABELS.get(model, model)} | {frac:g} | {n_train} | {seeds} | {_stat([r['test_acc'] for r in rs])} "
            f"| {_stat([r['test_auroc'] for r in rs])} | {np.nanmean(minutes):.1f} |"
        )
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    from napari_pathfm.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_results(rows: list[dict]) -> str:
    """``results.csv``, ``table.md`` and the README section; returns the table."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    _write(HERE / "results.csv", buf.getvalue())
    md = table(rows)
    _write(HERE / "table.md", md)
    readme = HERE / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if MARK[0] in text and MARK[1] in text:
            head, rest = text.split(MARK[0], 1)
            tail = rest.split(MARK[1], 1)[1]
            _write(readme, f"{head}{MARK[0]}\n{md}{MARK[1]}{tail}")
    return md


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="0.1,0.5,1.0")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--models", default="slca,noslca")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "slca_glas")
    ap.add_argument("--tiles", type=Path, default=None, help="tile cache (default: where the recipes look)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override (both models)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--report", action="store_true", help="only rewrite the table from the finished runs")
    a = ap.parse_args(argv)
    if a.report:
        print(write_results(collect(a.runs)))
        return
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)

    from napari_pathfm.training.glas_tiles import build_glas_tiles
    from napari_pathfm.training.recipes import default_shared_data
    from napari_pathfm.userdata import data_dir

    a.tiles = a.tiles or Path(os.environ.get("PATHFM_GLAS_TILES") or data_dir() / "glas_tiles")
    info = build_glas_tiles(default_shared_data() / "glas" / "train", a.tiles)
    print(f"GlaS tiles in {a.tiles}: {json.dumps(info['counts'])}, {info['dropped']} mixed tiles dropped", flush=True)
    fractions = [float(f) for f in a.fractions.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    models = a.models.split(",")
    for seed in seeds:  # whole seeds first, so a cut-short benchmark still compares both models
        for fraction in sorted(fractions, reverse=True):
            for model in models:
                train_one(model, fraction, seed, a.tiles, a.runs, a.overrides)
                print(write_results(collect(a.runs)), flush=True)


if __name__ == "__main__":
    main()
