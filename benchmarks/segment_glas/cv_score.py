"""Scoring half of ``cv.py``: every fold model on its held-out GlaS images, through ``pathfm segment``'s path.

Each held-out image is segmented by :func:`napari_pathfm.pipelines.segment.segment_slide` (the
function behind ``pathfm segment``) at the image's 0.62 µm/px, once with ``objects=False`` (the
model's class map) and then turned into objects with the very functions the pipeline's default
(``objects=True``) calls — :func:`napari_pathfm.instances.split_objects` and ``separate`` — so the
"default" row is what the command writes (tests/test_segment_objects.py checks that the two paths
agree) and the "raw" row shows what the post-processing adds.

Metrics (:mod:`napari_pathfm.training.seg_metrics`): pixel Dice of the gland class pooled over a
fold's images, GlaS object F1 (IoU > 0.5 matches, pooled counts), object Dice and object Hausdorff
(per image, averaged; Hausdorff in pixels at 0.62 µm/px). Across folds: mean, sample SD and a 95%
t-interval (t with k − 1 degrees of freedom); also every metric pooled over all 85 images.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path

import numpy as np

GLAS_MPP = 0.62
METRICS = ("dice", "object_f1", "object_dice", "object_hausdorff")


def scores(preds: list[np.ndarray], targets: list[np.ndarray]) -> dict:
    """Gland Dice, object F1, object Dice and object Hausdorff of binary (0/1) maps."""
    from napari_pathfm.training import seg_metrics as sm

    cm = sum(sm.confusion_matrix(p, t, 2) for p, t in zip(preds, targets))
    dice, _iou = sm.dice_iou(cm)
    counts = np.sum([sm.object_counts(p, t, 1) for p, t in zip(preds, targets)], axis=0)
    pairs = [sm.object_dice_hausdorff(p, t, 1) for p, t in zip(preds, targets)]
    return {
        "dice": float(dice[1]),
        "object_f1": float(sm.f1_from_counts(*counts)),
        "object_dice": float(np.mean([d for d, _h in pairs])),
        "object_hausdorff": float(np.nanmean([h for _d, h in pairs])),
        "objects_per_image": float(np.mean([_count(p) for p in preds])),
    }


def _count(mask: np.ndarray) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask)[1])


def interval(values: list[float]) -> dict:
    """Mean, sample SD and 95% t-interval half-width of per-fold values."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    from scipy.stats import t

    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "n": n, "folds": v}


def _predict(checkpoint: Path, image: Path, flips: bool) -> np.ndarray:
    from napari_pathfm.pipelines.segment import segment_slide

    res = segment_slide(
        image, str(checkpoint), image_mpp=GLAS_MPP, cache=False, objects=False, device="cpu", flips=flips
    )
    return np.asarray(res.labels).astype(np.uint8)  # the class map: a contour model's objects need its classes


def predictions(run: Path, images: dict[str, Path], flips: bool = False) -> dict[str, np.ndarray]:
    """The fold model's class maps of its held-out images, kept in ``<run>/heldout.npz`` (with test-time
    flips: ``heldout_flips.npz``) for the checkpoint they were made with (its sha256), so scoring
    again does not segment again."""
    from napari_pathfm.models.checkpoint import read_card

    sha = read_card(run / "model.json").get("sha256")
    kept = run / ("heldout_flips.npz" if flips else "heldout.npz")
    if kept.is_file():
        with np.load(kept) as z:
            if str(z["sha256"]) == sha and set(images) <= set(z.files):
                return {n: z[n] for n in images}
    out = {n: _predict(run / "model.safetensors", p, flips) for n, p in images.items()}
    np.savez_compressed(kept, sha256=np.array(sha), **out)
    return out


def _fold_training(run: Path) -> dict:
    """Steps, epochs and CPU budget of one fold's training (from its events and recipe)."""
    done = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if '"done"' in line]
    card = json.loads((run / "model.json").read_text())
    recipe = card.get("recipe", {})
    return {
        "steps": int(done[-1].get("step", 0)) if done else None,
        "epochs": card.get("epochs"),
        "cpu_budget_minutes": recipe.get("trainer", {}).get("cpu_budget_minutes"),
        "step_budget": recipe.get("trainer", {}).get("step_budget"),  # wins over the minutes when set
        "batch_size": recipe.get("trainer", {}).get("batch_size"),
        "model": card.get("name"),
        "parameters": card.get("num_parameters"),
    }


def score_runs(
    root: Path,
    runs: Path,
    split: list[list[str]],
    models: list[str],
    fold_ids: list[int],
    flips: bool | None = None,
    recipes: dict[str, dict] | None = None,
) -> dict:
    """Score every trained fold of every model; the report :func:`write_report` writes.

    Each fold model is run as ``pathfm segment`` runs its card, with the ``objects`` and ``flips`` of
    ``recipes[model]`` (the recipe as it is now; a fold trained before they changed keeps its weights)
    taking the card's place. ``flips`` True/False: with or without test-time flips for every model alike.
    """
    from napari_pathfm.instances import object_options, separate, split_objects
    from napari_pathfm.models.checkpoint import read_card
    from napari_pathfm.pipelines.tile_run import uses_flips
    from napari_pathfm.training.segment_data import find_pairs, mask_to_classes, read_mask

    pairs = {n: (i, m) for n, i, m in find_pairs(root)}
    report = {"k": len(split), "folds": {f: split[f] for f in fold_ids}, "models": {}, "machine": platform.node()}
    for model in models:
        per_fold = {"raw": [], "default": []}
        pooled = {"raw": ([], []), "default": ([], [])}
        training = []
        for f in fold_ids:
            run = runs / model / f"fold_{f}"
            ckpt = run / "model.safetensors"
            if not ckpt.is_file():
                print(f"[cv] {model} fold {f}: not trained yet, left out")
                continue
            t0 = time.perf_counter()
            card, recipe = read_card(run / "model.json"), (recipes or {}).get(model, {})
            if isinstance(recipe.get("objects"), dict):  # over the card's: a contour model keeps its contour_class
                card["objects"] = {**(card.get("objects") or {}), **recipe["objects"]}
            if recipe.get("flips") is not None:
                card["flips"] = recipe["flips"]
            objects = object_options(True, card)  # what segment_slide uses with the card this recipe writes today
            used = uses_flips(flips, card)
            fold = {"raw": ([], []), "default": ([], [])}
            maps = predictions(run, {n: pairs[n][0] for n in split[f]}, used)
            for name in split[f]:
                mask = pairs[name][1]
                target = (mask_to_classes(read_mask(mask), "auto", 2, where=mask) > 0).astype(np.uint8)
                raw = (maps[name] > 0).astype(np.uint8)
                default = (separate(*split_objects(maps[name], GLAS_MPP, options=objects)) > 0).astype(np.uint8)
                for key, pred in (("raw", raw), ("default", default)):
                    fold[key][0].append(pred)
                    fold[key][1].append(target)
                    pooled[key][0].append(pred)
                    pooled[key][1].append(target)
            for key, rows in per_fold.items():
                rows.append({"fold": f, **scores(*fold[key])})
            seconds = round(time.perf_counter() - t0, 1)
            training.append({"fold": f, **_fold_training(run), "flips": used, "score_seconds": seconds})
            print(f"[cv] {model} fold {f}: " + json.dumps({k: round(v, 3) for k, v in per_fold["default"][-1].items()}))
        if not training:
            continue
        report["models"][model] = {
            "training": training,
            **{
                key: {
                    "per_fold": per_fold[key],
                    "cv": {m: interval([r[m] for r in per_fold[key]]) for m in (*METRICS, "objects_per_image")},
                    "pooled": scores(*pooled[key]),
                }
                for key in per_fold
            },
        }
    return report


def _cell(stats: dict, digits: int = 3) -> str:
    lo, hi = stats["ci95"]
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _budget(training: dict) -> str:
    """What ended a fold's training: its step budget when the recipe had one, else its CPU-minutes."""
    if training.get("step_budget"):
        return f"{training['step_budget']} steps"
    return f"{training['cpu_budget_minutes']} CPU-min"


def table(report: dict) -> str:
    """Markdown table: one row per model and output, CV mean [95% CI] and the pooled value."""
    head = "| model | output | folds | Dice | object F1 | object Dice | object Hausdorff (px) | objects/image |"
    rows = [head, "|" + "---|" * 8]
    for model, r in report["models"].items():
        for key, label in (("default", "pathfm segment default (objects)"), ("raw", "model's class map")):
            cv = r[key]["cv"]
            rows.append(
                f"| {model} | {label} | {cv['dice']['n']} | {_cell(cv['dice'])} | {_cell(cv['object_f1'])} | "
                f"{_cell(cv['object_dice'])} | {_cell(cv['object_hausdorff'], 0)} | "
                f"{cv['objects_per_image']['mean']:.1f} |"
            )
    rows.append("")
    rows.append("Pooled over all held-out images (each predicted by the fold model that did not see it):")
    rows.append("")
    rows.append("| model | output | Dice | object F1 | object Dice | object Hausdorff (px) |")
    rows.append("|" + "---|" * 6)
    for model, r in report["models"].items():
        for key in ("default", "raw"):
            p = r[key]["pooled"]
            rows.append(
                f"| {model} | {key} | {p['dice']:.3f} | {p['object_f1']:.3f} | {p['object_dice']:.3f} | "
                f"{p['object_hausdorff']:.0f} |"
            )
    rows.append("")
    rows.append("| model | fold | training steps | batch | epochs | budget | parameters | flips |")
    rows.append("|" + "---|" * 8)
    for model, r in report["models"].items():
        for t in r["training"]:
            rows.append(
                f"| {model} | {t['fold']} | {t['steps']} | {t.get('batch_size')} | {t['epochs']} | "
                f"{_budget(t)} | {t['parameters']} | {t.get('flips', False)} |"
            )
    return "\n".join(rows) + "\n"


def write_report(report: dict, prefix: Path) -> None:
    """``<prefix>.json`` (everything) and ``<prefix>.md`` (the tables); prints the tables."""
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md = table(report)
    prefix.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
