"""Choose a recipe's object settings on cross-validation folds, and estimate them without the fold scored.

``pathfm segment`` turns a model's class map into glands with :func:`napari_pathfm.instances.split_objects`
(holes filled, regions under ``min_area_um2`` dropped, touching glands split by a watershed whose seeds
are at least ``split_um`` apart). Those settings were chosen once for the first bundled model; a model
trained otherwise (another µm/px, other masks) may want others. This script scores a small grid of them
on the held-out class maps that ``cv.py`` keeps for every fold (``<runs>/<model>/fold_<k>/heldout.npz``,
or ``heldout_flips.npz`` with ``--flips``; nothing is segmented again), and reports:

- every setting's mean over the folds (what ``--objects`` in the recipe would give), and
- a *cross-selected* estimate: fold k is scored with the setting that does best on the other four
  folds (mean of object F1 and object Dice), so no fold's score comes from a choice made on it.
  This is the number to quote; the best row of the grid is the setting to put in the recipe.

    .venv/bin/python benchmarks/segment_glas/objects_select.py --runs runs/segment_cv_full --flips \\
        --out benchmarks/segment_glas/objects_select      # ~12 min per model on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cv import K, folds
from cv_score import GLAS_MPP, METRICS, interval, scores

#: The grid: seeds apart (None: no split) x smallest gland kept; pieces under 190 µm² always dropped.
SPLIT_UM = (25, 35, 45, 60, None)
MIN_AREA_UM2 = (575, 1000, 1500)


def _criterion(row: dict, fold_ids) -> float:
    return float(np.mean([(row["folds"][f]["object_f1"] + row["folds"][f]["object_dice"]) / 2 for f in fold_ids]))


def grid_scores(maps: dict[str, np.ndarray], targets: dict[str, np.ndarray], split: list[list[str]]) -> list[dict]:
    """Per-fold scores of every setting of the grid."""
    from napari_pathfm.instances import ObjectOptions, separate, split_objects

    rows = []
    for split_um, min_area in itertools.product(SPLIT_UM, MIN_AREA_UM2):
        options = {"split_um": split_um, "min_area_um2": min_area, "min_piece_um2": 190, "fill_holes": True}
        o = ObjectOptions(**options)
        per_fold = []
        for names in split:
            preds = [(separate(*split_objects(maps[n], GLAS_MPP, options=o)) > 0).astype(np.uint8) for n in names]
            per_fold.append(scores(preds, [targets[n] for n in names]))
        rows.append({"options": options, "folds": per_fold})
        print(f"[objects] {options}: object F1 {np.mean([s['object_f1'] for s in per_fold]):.3f}", flush=True)
    return rows


def cross_selected(rows: list[dict], k: int) -> dict:
    """Fold f scored with the setting best on the other folds; mean [95% CI] per metric."""
    chosen = []
    for f in range(k):
        best = max(rows, key=lambda r: _criterion(r, [g for g in range(k) if g != f]))
        chosen.append({"fold": f, "options": best["options"], **best["folds"][f]})
    cv = {m: interval([c[m] for c in chosen]) for m in (*METRICS, "objects_per_image")}
    return {"per_fold": chosen, "cv": cv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="cv.py's --runs folder (fold models with held-out maps)")
    ap.add_argument("--models", nargs="*", default=["pathsam2", "unet"])
    ap.add_argument("--flips", action="store_true", help="use the maps scored with test-time flips")
    ap.add_argument("--root", default=None, help="GlaS train folder (default: $PATHFM_SHARED_DATA/glas/train)")
    ap.add_argument("--out", required=True, help="results prefix (.json and .md)")
    args = ap.parse_args()
    shared = os.environ.get("PATHFM_SHARED_DATA")
    root = Path(args.root or (Path(shared) / "glas" / "train" if shared else ""))
    if not (root / "images").is_dir():
        sys.exit(f"GlaS train folder not found: {root} (set PATHFM_SHARED_DATA or pass --root)")
    from napari_pathfm.training.segment_data import find_pairs, mask_to_classes, read_mask

    pairs = {n: m for n, _i, m in find_pairs(root)}
    split = folds(sorted(pairs, key=lambda n: int(n.rsplit("_", 1)[1])))
    targets = {n: (mask_to_classes(read_mask(m), "auto", 2, where=m) > 0).astype(np.uint8) for n, m in pairs.items()}
    kept = "heldout_flips.npz" if args.flips else "heldout.npz"
    report = {"runs": args.runs, "flips": args.flips, "models": {}}
    lines = ["| model | settings | Dice | object F1 | object Dice | object Hausdorff (px) | objects/image |"]
    lines.append("|" + "---|" * 7)
    for model in args.models:
        maps = {}
        for f in range(K):
            path = Path(args.runs) / model / f"fold_{f}" / kept
            if not path.is_file():
                sys.exit(
                    f"{path} is missing: score the folds first (cv.py --score-only{' --flips' if args.flips else ''})"
                )
            with np.load(path) as z:
                maps.update({n: z[n] for n in split[f]})
        rows = grid_scores(maps, targets, split)
        best = max(rows, key=lambda r: _criterion(r, range(K)))
        report["models"][model] = {"grid": rows, "best": best["options"], "cross_selected": cross_selected(rows, K)}
        for label, cv in (
            (
                f"best on all folds: {best['options']}",
                {m: interval([s[m] for s in best["folds"]]) for m in best["folds"][0]},
            ),
            (
                "cross-selected (fold k scored with the setting best on the other folds)",
                report["models"][model]["cross_selected"]["cv"],
            ),
        ):
            cells = [f"{cv[m]['mean']:.3f} [{cv[m]['ci95'][0]:.3f}, {cv[m]['ci95'][1]:.3f}]" for m in METRICS[:3]]
            lo, hi = cv["object_hausdorff"]["ci95"]
            lines.append(
                f"| {model} | {label} | {' | '.join(cells)} | {cv['object_hausdorff']['mean']:.0f} [{lo:.0f}, {hi:.0f}] | "
                f"{cv['objects_per_image']['mean']:.1f} |"
            )
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
