"""Evaluate a segment checkpoint on the GlaS images it held out, next to trivial baselines.

Reads the checkpoint's card (held-out image names in ``split.val``, ``input_mpp``,
``tile_size``), predicts every held-out image whole (sliding tiles at the model's
µm/px, logits averaged where tiles overlap), and prints pooled Dice / IoU of the
gland class and GlaS object-level F1 (:mod:`napari_pathfm.training.seg_metrics`)

- at the model's resolution (what training validates on), and
- at the images' own 0.62 µm/px (logits upsampled bilinearly to the original size),

together with the all-background and all-gland predictions as baselines. For a model trained on all
85 images (the bundled one) there is nothing held out: ``cv.py`` cross-validates its recipe instead.

    .venv/bin/python benchmarks/segment_glas/evaluate.py runs/pathsam2_glas_cpu/model.safetensors [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_pathfm.models.checkpoint import load_checkpoint
from napari_pathfm.training import seg_metrics as sm
from napari_pathfm.training.segment_data import find_pairs, mask_to_classes, read_mask, read_rgb, resize
from napari_pathfm.training.segment_predict import predict_image

GLAS_MPP = 0.62


def _glands(class_map: np.ndarray, min_size: int = 1500) -> np.ndarray:
    """Gland (1) / background (0) of a three-class contour model: one object per predicted interior
    (training/gland_targets.glands_from_contour), objects under ``min_size`` px dropped, one-pixel gaps
    between touching objects so that their connected components are the instances."""
    from scipy import ndimage

    from napari_pathfm.training.gland_targets import glands_from_contour

    inst = glands_from_contour(class_map, min_interior=200)
    sizes = np.bincount(inst.ravel())
    small = sizes < min_size
    small[0] = False
    inst[small[inst]] = 0
    edge = (ndimage.grey_dilation(inst, size=3) != ndimage.grey_erosion(inst, size=3)) & (inst > 0)
    return ((inst > 0) & ~edge).astype(np.uint8)


def _scores(preds: list[np.ndarray], targets: list[np.ndarray], k: int, names: list[str]) -> dict:
    cm = sum(sm.confusion_matrix(p, t, k) for p, t in zip(preds, targets))
    dice, iou = sm.dice_iou(cm)
    counts = np.sum([sm.object_counts(p, t, c) for p, t in zip(preds, targets) for c in range(1, k)], axis=0)
    out = {
        "dice": float(np.nanmean(dice[1:])),
        "iou": float(np.nanmean(iou[1:])),
        "object_f1": sm.f1_from_counts(*counts),
    }
    # the challenge's other two object metrics, per image and averaged (Hausdorff in pixels at GlaS's 0.62 µm/px)
    pairs = [sm.object_dice_hausdorff(p, t, c) for p, t in zip(preds, targets) for c in range(1, k)]
    out["object_dice"] = float(np.mean([d for d, _h in pairs]))
    out["object_hausdorff"] = float(np.nanmean([h for _d, h in pairs]))
    out.update({f"dice_{n}": float(d) for n, d in zip(names, dice)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument(
        "--root", default=None, help="GlaS folder with images/ and masks/ (default: the card's recipe data.root)"
    )
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    model, card = load_checkpoint(args.checkpoint)
    root = Path(args.root or card["recipe"]["data"]["root"])
    val = card["split"]["val"]
    if not val:
        raise SystemExit(
            f"{args.checkpoint} was trained on every image (nothing held out); its estimate comes from "
            "cross-validation of its recipe: .venv/bin/python benchmarks/segment_glas/cv.py"
        )
    k, names, tile = card["num_classes"], card["classes"], int(card["tile_size"])
    contour = k == 3 and "contour" in str(names[2]).lower()
    if contour:
        k, names = 2, names[:2]
    scale = GLAS_MPP / float(card["input_mpp"] or GLAS_MPP)
    pairs = {n: (i, m) for n, i, m in find_pairs(root)}
    res: dict[str, dict[str, list]] = {"model": {"p": [], "t": []}, "native": {"p": [], "t": []}}
    t0 = time.perf_counter()
    for name in val:
        img_path, mask_path = pairs[name]
        image, target = read_rgb(img_path), mask_to_classes(read_mask(mask_path), "auto", k, where=mask_path)
        small, small_t = resize(image, scale, labels=False), resize(target, scale, labels=True)
        h, w = small_t.shape
        padded = np.full((max(h, tile), max(w, tile), 3), 255, np.uint8)
        padded[:h, :w] = small
        logits, _ = predict_image(model, torch.from_numpy(padded), tile, None, 8)
        logits = logits[:, :h, :w]
        big = F.interpolate(logits[None], size=target.shape, mode="bilinear", align_corners=False)[0]
        small_p, big_p = logits.argmax(0).numpy(), big.argmax(0).numpy()
        if contour:  # gland contour model (data.contour_width): instances from interiors, scored as gland/background
            small_p, big_p = _glands(small_p), _glands(big_p)
        res["model"]["p"].append(small_p)
        res["model"]["t"].append(small_t)
        res["native"]["p"].append(big_p)
        res["native"]["t"].append(target)
    seconds = time.perf_counter() - t0
    report = {"checkpoint": str(args.checkpoint), "held_out": val, "seconds": round(seconds, 1)}
    for where, r in res.items():
        report[where] = {
            "model": _scores(r["p"], r["t"], k, names),
            "all_background": _scores([np.zeros_like(t) for t in r["t"]], r["t"], k, names),
            "all_gland": _scores([np.ones_like(t) for t in r["t"]], r["t"], k, names),
        }
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
