"""5-fold cross-validation of the bundled segmentation recipe next to a plain U-Net with the same CPU budget.

What it does, in one run:

1. deals the 85 GlaS training images into 5 folds by number (``train_<i>`` → fold ``i % 5``; fold 0
   is the old 17-image hold-out; GlaS file names carry no patient or slide ids, so the folds cannot
   be grouped by patient — neighbouring numbers may come from the same slide);
2. for each fold and each model (``pathsam2/glas_cpu``, the bundled model's recipe, and
   ``pathsam2/glas_unet_baseline``), trains on the other four folds with the recipe's budget and
   nothing held out for model selection: the last weights are the fold's model. Both recipes record
   their budget as steps (``trainer.step_budget``: three times what 12 CPU-minutes bought in the CV run
   of 2026-12-05), so a faster or slower machine repeats the same schedule; ``--set trainer.step_budget=null``
   trains on ``trainer.cpu_budget_minutes`` instead (CPU time of the training process, so other jobs
   on the machine do not change what a model gets);
3. predicts every held-out image with the segment command's defaults
   (:func:`napari_pathfm.pipelines.segment.segment_slide`, with test-time flips where the recipe says
   ``flips: true``, then the recipe's object settings through :mod:`napari_pathfm.instances`: holes
   filled, small objects dropped, touching glands split), at the images' own 0.62 µm/px
   (``cv_score.py``); ``objects`` and ``flips`` are read from the recipe when scoring, so changing
   them reuses the trained folds;
4. scores each fold (pixel Dice of the gland class, GlaS object F1, object Dice, object Hausdorff)
   and reports the mean over folds with a 95% t-interval, plus the metrics pooled over all 85
   images, for both models side by side.

Every trained fold is kept under ``--runs`` and reused when the command is run again, if it was trained
with the recipe as it is now (otherwise it is set aside and trained again), so an interrupted run continues.

    .venv/bin/python benchmarks/segment_glas/cv.py                 # train what is missing, then score
    .venv/bin/python benchmarks/segment_glas/cv.py --score-only    # score the folds trained so far
    .venv/bin/python benchmarks/segment_glas/cv.py --folds 0 1     # only these folds
    .venv/bin/python benchmarks/segment_glas/cv.py --score-only --flips --out runs/cv_flips  # test-time flips
    .venv/bin/python benchmarks/segment_glas/cv.py --runs runs/cv_x --set data.input_mpp=0.62 --out runs/cv_x/results

(``--set``: a candidate change to the Path-SAM2 recipe, cross-validated beside the U-Net before it goes in;
``--baseline-set``: the U-Net's side of a change both should get, such as a longer budget.)

Results: ``benchmarks/segment_glas/cv_results.json`` and ``cv_results.md``; then
``objects_select.py --runs runs/segment_cv --out benchmarks/segment_glas/cv_objects`` chooses the
object settings on the kept held-out maps and gives the cross-selected rows (the table in the docs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"pathsam2": "pathsam2/glas_cpu", "unet": "pathsam2/glas_unet_baseline"}
K = 5


def fold_of(name: str, k: int = K) -> int:
    """Fold of ``train_<i>``: ``i % k`` (fold 0 holds train_5, train_10, …)."""
    return int(name.rsplit("_", 1)[1]) % k


def folds(names: list[str], k: int = K) -> list[list[str]]:
    """The held-out names of each fold, in the order of ``names``."""
    return [[n for n in names if fold_of(n, k) == f] for f in range(k)]


def train_fold(
    model: str, fold: int, held_out: list[str], runs: Path, threads: int = 1, extra: tuple[str, ...] = ()
) -> Path:
    """Train ``model``'s recipe without ``held_out``; the fold's checkpoint. ``extra``: more recipe
    ``--set`` overrides (a candidate change to test before it goes into the recipe). A finished fold is
    reused only when it was trained with the recipe as it is now (overrides included); otherwise its
    folder is set aside (renamed ``*.stale-<time>``) and the fold is trained again."""
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.runs import reusable_run

    out = runs / model / f"fold_{fold}"
    ckpt = out / "model.safetensors"
    names = "[" + ", ".join(held_out) + "]"
    sets = [f"data.val_names={names}", "trainer.limit_val_batches=0", *extra]
    if reusable_run(out, load_recipe(MODELS[model], sets).config, label="cv"):
        return ckpt
    cmd = [sys.executable, "-m", "napari_pathfm.cli", "train", MODELS[model], "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    print(f"[cv] training {model} fold {fold} → {out}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # no OpenMP spin-waits on a busy machine
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    print(f"[cv] {model} fold {fold} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return ckpt


def train_final(out: Path, threads: int = 1) -> Path:
    """The bundled model's run: ``pathsam2/glas_cpu`` on all 85 images (what ``bundle.py`` ships)."""
    if (out / "model.safetensors").is_file():
        return out / "model.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"[cv] training the final model on every image → {out}", flush=True)
    cmd = [sys.executable, "-m", "napari_pathfm.cli", "train", MODELS["pathsam2"], "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return out / "model.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="GlaS train folder (default: $PATHFM_SHARED_DATA/glas/train)")
    ap.add_argument("--runs", default="runs/segment_cv", help="where the fold models are kept")
    ap.add_argument("--folds", type=int, nargs="*", default=list(range(K)))
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--score-only", action="store_true", help="score the folds already trained")
    ap.add_argument("--train-only", action="store_true", help="train what is missing, do not score")
    ap.add_argument("--threads", type=int, default=1, help="threads per training process (1: no OpenMP spin-waits)")
    ap.add_argument("--parallel", type=int, default=2, help="training processes at a time (one per core)")
    ap.add_argument("--final", action="store_true", help="also train the bundled model on every image first")
    ap.add_argument("--out", default=str(HERE / "cv_results"), help="results prefix (.json and .md)")
    ap.add_argument(
        "--flips",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score every model with (or without) test-time flips, as segment --flips/--no-flips (default: each card's)",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for the Path-SAM2 trainings only (repeat; e.g. data.input_mpp=0.62): a candidate change",
    )
    ap.add_argument(
        "--baseline-set",
        dest="baseline_sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for the U-Net trainings (repeat): the baseline's side of a change such as a longer budget",
    )
    args = ap.parse_args()
    if args.final and args.sets:
        sys.exit("--final trains the recipe as it is: put a --set change into the recipe first")
    if (args.sets or args.baseline_sets or args.flips is not None) and Path(args.out) == HERE / "cv_results":
        sys.exit(
            "--set/--baseline-set/--flips score a candidate, not the recipe: give --out so the recipe's cv_results stay as they are"
        )
    shared = os.environ.get("PATHFM_SHARED_DATA")
    root = Path(args.root or (Path(shared) / "glas" / "train" if shared else ""))
    if not (root / "images").is_dir():
        sys.exit(f"GlaS train folder not found: {root} (set PATHFM_SHARED_DATA or pass --root)")
    from napari_pathfm.training.segment_data import find_pairs

    names = sorted((n for n, _i, _m in find_pairs(root)), key=lambda n: int(n.rsplit("_", 1)[1]))
    split = folds(names)
    runs = Path(args.runs)
    sets = {"pathsam2": args.sets, "unet": args.baseline_sets}  # each model's overrides
    if not args.score_only:  # one queue of (model, fold) runs, --parallel at a time, each on its own core(s)
        jobs = [(m, f) for f in args.folds for m in args.models]
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = (
                [pool.submit(train_final, runs.parent / "pathsam2_glas_cpu_final", args.threads)] if args.final else []
            )
            futures += [pool.submit(train_fold, m, f, split[f], runs, args.threads, tuple(sets[m])) for m, f in jobs]
            for done in futures:
                done.result()
    if args.train_only:
        return
    sys.path.insert(0, str(HERE))
    from cv_score import score_runs, write_report

    from napari_pathfm.training.recipes import load_recipe

    recipes = {m: load_recipe(MODELS[m], sets[m]).config for m in args.models}
    report = score_runs(root, runs, split, args.models, args.folds, flips=args.flips, recipes=recipes)
    report["inference"] = {m: {k: recipes[m].get(k) for k in ("objects", "flips")} for m in args.models}
    report["pathsam2_overrides"] = args.sets  # the candidate change, if any (--set)
    report["baseline_overrides"] = args.baseline_sets
    report["flips"] = args.flips  # None: each card's (the training rows say what was used)
    write_report(report, Path(args.out))


if __name__ == "__main__":
    main()
