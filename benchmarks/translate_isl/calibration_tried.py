"""Tried for DAPI nuclei intensity and texture: mapping a model's output onto the real stain's histogram.

The bundled DAPI model (``haste-isl-dapi``) beats the same-budget U-Net on every metric of
``pathfm evaluate-translation`` but nuclei intensity and texture: its image is smoother and a little
darker inside nuclei (docs/translate.md). A monotone quantile map, fitted on the training rows 0–768
only (the model's predicted grey levels at 1001 quantiles → the real stain's at the same quantiles),
stretches the prediction's histogram onto the stain's; ``linear`` is the least-squares gain and
offset on the same rows. Each model is run once on the whole field (its card's flip averaging) and
scored on the held-out rows 768–1024 with :func:`~napari_pathfm.pipelines.translate_eval.compare_images`,
as-is and with each map, so the rows compare like with like.

    .venv/bin/python benchmarks/translate_isl/calibration_tried.py --flips \\
        src/napari_pathfm/data/models/haste-isl-dapi.safetensors runs/translate_compare30/DAPI/unet/model.safetensors

Writes ``calibration_tried.json`` and ``.md`` beside this file (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from napari_pathfm.pipelines.translate_eval import COLUMNS

HERE = Path(__file__).resolve().parent
TRAIN, HELD = slice(0, 768), slice(768, 1024)
KEYS = COLUMNS[2:]  # evaluate-translation's metric columns (after source and channel)


def quantile_map(pred: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(from, to)``: the prediction's and the stain's grey levels at 1001 quantiles (``np.interp`` applies it)."""
    q = np.linspace(0, 100, 1001)
    return np.percentile(pred, q), np.percentile(real, q)


def scores(pred: np.ndarray, real: np.ndarray) -> dict:
    from napari_pathfm.pipelines.translate_eval import compare_images

    m = compare_images(pred[HELD], real[HELD])
    return {k: m[k] for k in KEYS}


def main(argv=None) -> dict:
    from napari_pathfm.io.zstack import open_zstack
    from napari_pathfm.pipelines.translate import translate_stack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "calibration_tried")
    ap.add_argument("--flips", action="store_true", help="flip averaging for every model (default: as each card says)")
    args = ap.parse_args(argv)
    shared = os.environ.get("PATHFM_SHARED_DATA")
    if not shared or not (Path(shared) / "isl-blue-sample").is_dir():
        sys.exit("ISL stack not found: set PATHFM_SHARED_DATA to the shared data folder")
    zs = open_zstack(Path(shared) / "isl-blue-sample")
    real = np.asarray(zs.targets["DAPI"]).astype(np.float64)
    rows = []
    for ckpt in args.checkpoints:
        res = translate_stack(zs, ckpt, tile=256, device="cpu", nuclei_mask=False, flips=True if args.flips else None)
        pred = np.asarray(res.channels["DAPI"]).astype(np.float64)
        src, dst = quantile_map(pred[TRAIN], real[TRAIN])
        design = np.stack([pred[TRAIN].ravel(), np.ones(pred[TRAIN].size)], 1)
        gain, offset = np.linalg.lstsq(design, real[TRAIN].ravel(), rcond=None)[0]
        flips = bool(args.flips or res.cards[0].get("flips", False))
        for how, image in (
            ("as trained", pred),
            ("quantile map (training rows)", np.interp(pred, src, dst)),
            (f"linear {gain:.3f} x + {offset:.0f} (training rows)", pred * gain + offset),
        ):
            rows.append(
                {
                    "checkpoint": ckpt.name,
                    "parent": ckpt.parent.name,
                    "flips": flips,
                    "output": how,
                    **scores(image, real),
                }
            )
            print(json.dumps(rows[-1]))
    report = {
        "rows_fitted": [0, 768],
        "rows_scored": [768, 1024],
        "tile": 256,
        "command": "benchmarks/translate_isl/calibration_tried.py "
        + ("--flips " if args.flips else "")
        + " ".join(str(c) for c in args.checkpoints),
        "results": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    head = "| model | flips | output | MAE/median | PSNR dB | SSIM | nuclei real / pred | count | area | intensity | texture |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['parent']}/{r['checkpoint']} | {'yes' if r['flips'] else 'no'} | {r['output']} | {r['mae_over_median']:.3f} | {r['psnr']:.2f} | "
            f"{r['ssim']:.3f} | {r['nuclei_real']} / {r['nuclei_pred']} | {r['count_rel']:+.3f} | {r['area_rel']:+.3f} | "
            f"{r['intensity_rel']:+.3f} | {r['texture_rel']:+.3f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
