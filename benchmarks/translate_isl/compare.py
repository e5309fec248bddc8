"""The bundled ISL translation recipes next to a plain L1 U-Net with the same CPU budget, in one run.

For each target (DAPI, MAP2, NFH) every model below is trained on the ISL well's top 768 rows with
the same ``trainer.cpu_budget_minutes`` (CPU time of the training process, so other jobs on the
machine do not change what a model gets; cosine learning rate over the budget), nothing held out for
model selection (``limit_val_batches 0``: the last weights are the model), and then scored on the
validation rows 768–1024, which no model saw, by
:func:`napari_pathfm.pipelines.translate_eval.evaluate_translation` — what
``pathfm evaluate-translation --rows 768:1024`` prints: MAE/median, PSNR, SSIM and the nuclei
measurements (count, area, intensity, texture).

Models:

- DAPI: ``lupi`` — the bundled ``haste-isl-dapi`` recipe (HASTE's LUPI nuclei net, dropout 0),
  ``lupi_dropout`` — the same with HASTE's dropout 0.2 (the BatchNorm statistics problem in docs/translate.md),
  ``lupi_grad`` — the same plus the GAN's image-gradient term (``loss.lupi_grad_weight=5``),
  ``unet`` — ``isl_dapi_l1_unet_cpu`` (plain U-Net, L1, same crops and augmentation);
- MAP2 and NFH: ``gan`` — the bundled GAN recipe, ``unet`` — ``isl_<target>_l1_unet_cpu``.

Trained runs are kept under ``--runs`` and reused when the command runs again if they were trained
with what the recipe and budget say now (otherwise set aside as ``*.stale-<time>`` and trained again).

    .venv/bin/python benchmarks/translate_isl/compare.py                  # all targets, 15 CPU-minutes each
    .venv/bin/python benchmarks/translate_isl/compare.py --targets DAPI --minutes 15
    .venv/bin/python benchmarks/translate_isl/compare.py --targets DAPI --models lupi,unet --minutes 30
    .venv/bin/python benchmarks/translate_isl/compare.py --score-only
    .venv/bin/python benchmarks/translate_isl/compare.py --targets DAPI --models lupi,unet \
        --steps-from benchmarks/translate_isl/results.json --flips --runs runs/translate_steps

``--steps-from`` gives each model the steps it made in an earlier results file
(``trainer.step_budget``, the cosine over the steps): that run's training lengths repeated on a
machine of another speed. ``--flips`` scores every model with flip averaging (``pathfm
evaluate-translation --flips``), and without it, side by side.

Results: ``benchmarks/translate_isl/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from napari_pathfm.pipelines.translate_eval import COLUMNS as EVALUATION_COLUMNS

HERE = Path(__file__).resolve().parent
ROWS = (768, 1024)
MODELS = {
    "DAPI": {
        "lupi": ("training/translate/isl_dapi_lupi_cpu.yaml", []),
        "lupi_dropout": ("training/translate/isl_dapi_lupi_cpu.yaml", ["model.dropout=0.2"]),
        "lupi_grad": ("training/translate/isl_dapi_lupi_cpu.yaml", ["loss.lupi_grad_weight=5"]),
        "unet": ("training/translate/isl_dapi_l1_unet_cpu.yaml", []),
    },
    "MAP2": {
        "gan": ("training/translate/isl_map2_gan_cpu.yaml", []),
        "unet": ("training/translate/isl_map2_l1_unet_cpu.yaml", []),
    },
    "NFH": {
        "gan": ("training/translate/isl_nfh_gan_cpu.yaml", []),
        "unet": ("training/translate/isl_nfh_l1_unet_cpu.yaml", []),
    },
}


def budget_sets(minutes: float) -> list[str]:
    """What every model of the comparison shares: the CPU budget, its cosine schedule, no selection."""
    return [
        f"trainer.cpu_budget_minutes={minutes}",
        "trainer.max_epochs=100000",  # the budget ends the run
        "trainer.limit_val_batches=0",  # the validation rows are the test rows: never used to pick weights
        "optim.scheduler=cosine",
        "optim.low_lr_epoch=null",
    ]


def train(target: str, model: str, minutes: float, runs: Path, threads: int = 1, steps: int | None = None) -> Path:
    """Train one model of ``target`` (or reuse a finished run of the same recipe); its checkpoint.

    ``steps``: a step budget instead of the CPU budget (``trainer.step_budget`` wins over it).
    """
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.runs import reusable_run

    recipe, extra = MODELS[target][model]
    sets = budget_sets(minutes) + extra + ([f"trainer.step_budget={steps}"] if steps else [])
    out = runs / target / model
    ckpt = out / "model.safetensors"
    if reusable_run(out, load_recipe(recipe, sets).config, label="translate"):
        return ckpt
    cmd = [sys.executable, "-m", "napari_pathfm.cli", "train", recipe, "--out", str(out), "--device", "cpu"]
    cmd += [a for s in sets for a in ("--set", s)]
    print(f"[translate] training {target} {model} → {out}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # no OpenMP spin-waits on a busy machine
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    print(f"[translate] {target} {model} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return ckpt


def _training(run: Path) -> dict:
    card = json.loads((run / "model.json").read_text(encoding="utf-8"))
    done = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"done"' in x]
    return {
        "parameters": card.get("num_parameters"),
        "epochs": card.get("epochs"),
        "steps": int(done[-1].get("step", 0)) if done else None,
        "cpu_budget_minutes": card.get("recipe", {}).get("trainer", {}).get("cpu_budget_minutes"),
        "step_budget": card.get("recipe", {}).get("trainer", {}).get("step_budget"),
    }


def score(stack: Path, runs: Path, targets: list[str], wanted: set[str] | None = None, flips: bool = False) -> dict:
    """Every trained model of each target on the validation rows, as ``pathfm evaluate-translation``.

    With ``flips``, each model is scored twice: as it is (``<model>``) and with flip averaging
    (``<model>+flips``).
    """
    from napari_pathfm.pipelines.translate_eval import evaluate_translation

    report = {"rows": list(ROWS), "targets": {}}
    for target in targets:
        models = [
            m
            for m in MODELS[target]
            if (wanted is None or m in wanted) and (runs / target / m / "model.safetensors").is_file()
        ]
        report["targets"][target] = {}
        for f in (False, True) if flips else (False,):
            rows = evaluate_translation(
                [runs / target / m / "model.safetensors" for m in models],
                stack=stack,
                target=target,
                rows=ROWS,
                tile=256,
                device="cpu",
                flips=f,  # explicit: both ways whatever a card says
            )
            report["targets"][target] |= {
                m + ("+flips" if f else ""): {
                    **{k: v for k, v in r.items() if k != "source"},
                    "training": _training(runs / target / m),
                }
                for m, r in zip(models, rows)
            }
    return report


#: ``pathfm evaluate-translation``'s metric columns (its ``source`` and ``channel`` are the table's rows here).
COLUMNS = tuple(c for c in EVALUATION_COLUMNS if c not in ("source", "channel"))


def table(report: dict) -> str:
    """One markdown table: target, model, the metrics, and what training each got."""
    head = ["target", "model", *COLUMNS, "parameters", "steps", "CPU min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target, models in report["targets"].items():
        for model, r in models.items():
            cells = [target, model]
            for k in COLUMNS:
                v = r.get(k)
                cells.append("–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
            t = r["training"]
            cells += [str(t["parameters"]), str(t["steps"]), str(t["cpu_budget_minutes"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--models", help="comma-separated models to train and score (default: all of each target)")
    ap.add_argument("--minutes", type=float, default=15.0, help="CPU minutes of training per model")
    ap.add_argument("--runs", default="runs/translate_compare")
    ap.add_argument("--parallel", type=int, default=2, help="training processes at a time (one per core)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--flips", action="store_true", help="also score every model with flip averaging")
    ap.add_argument("--steps-from", help="results .json: train each model for the steps it made there")
    ap.add_argument("--out", default=str(HERE / "results"), help="results prefix (.json and .md)")
    args = ap.parse_args()
    shared = os.environ.get("PATHFM_SHARED_DATA")
    stack = Path(shared or "") / "isl-blue-sample"
    if not shared or not stack.is_dir():
        sys.exit(f"ISL stack not found: {stack} (set PATHFM_SHARED_DATA to the shared data folder)")
    runs = Path(args.runs)
    wanted = set(args.models.split(",")) if args.models else {m for t in MODELS.values() for m in t}
    unknown = wanted - {m for t in args.targets for m in MODELS[t]}
    if unknown:
        sys.exit(f"unknown model(s) for {', '.join(args.targets)}: {', '.join(sorted(unknown))}")
    if not args.score_only:
        jobs = [(t, m) for t in args.targets for m in MODELS[t] if m in wanted]
        steps = {}
        if args.steps_from:
            earlier = json.loads(Path(args.steps_from).read_text(encoding="utf-8"))["targets"]
            steps = {(t, m): earlier[t][m]["training"]["steps"] for t, m in jobs}
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = [pool.submit(train, t, m, args.minutes, runs, args.threads, steps.get((t, m))) for t, m in jobs]
            for f in futures:
                f.result()
    report = score(stack, runs, args.targets, wanted, args.flips)
    report["machine"] = {"cpus": os.cpu_count()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table(report), encoding="utf-8")
    print(table(report))


if __name__ == "__main__":
    main()
