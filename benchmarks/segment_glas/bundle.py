"""Make the final ``pathsam2/glas_cpu`` run the bundled default segmentation model, with a card that tells the truth.

Copies ``<run>/model.safetensors`` + ``model.json`` to
``src/napari_pathfm/data/models/pathsam2-glas-small.*`` and writes into the card what a user needs to
judge it (``pathfm models --checkpoints`` shows it): the training data, budget and command, the
cross-validated metrics with 95% intervals from ``cv_results.json`` (written by ``cv.py``) beside
the plain U-Net's from the same run, the licence and the intended use.

    .venv/bin/python benchmarks/segment_glas/bundle.py [--run runs/pathsam2_glas_cpu_final]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARGET = REPO / "src" / "napari_pathfm" / "data" / "models" / "pathsam2-glas-small"
NAMES = {"dice": "Dice", "object_f1": "object F1", "object_dice": "object Dice", "object_hausdorff": "object Hausdorff"}


def _line(cv: dict) -> str:
    parts = []
    for key, label in NAMES.items():
        s = cv[key]
        digits = 0 if key == "object_hausdorff" else 3
        parts.append(f"{label} {s['mean']:.{digits}f} [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]")
    return ", ".join(parts)


def evaluation(report: dict) -> dict:
    """The card's ``evaluation`` section from a ``cv.py`` report."""
    ours, unet = report["models"]["pathsam2"], report["models"]["unet"]
    k = ours["default"]["cv"]["dice"]["n"]
    summary = (
        f"{k}-fold cross-validation on the 85 GlaS training images, scored as `pathfm segment` writes it "
        f"(objects on, 0.62 µm/px; mean [95% t-interval] over folds; Hausdorff in px): {_line(ours['default']['cv'])}. "
        f"Plain ResNet18 U-Net, same data and CPU budget, same run: {_line(unet['default']['cv'])}."
    )
    return {
        "summary": summary,
        "method": (
            f"{k} folds by image number (train_<i> in fold i mod {k}; GlaS names carry no patient ids); each fold "
            "trained with this model's recipe on the other folds, last weights, nothing held out for selection; "
            "held-out images segmented by segment_slide, then its default objects (napari_pathfm.instances). "
            "The object settings were chosen on fold 0's images with an earlier model."
        ),
        "command": ".venv/bin/python benchmarks/segment_glas/cv.py",
        "cv": ours["default"]["cv"],
        "cv_class_map_without_objects": ours["raw"]["cv"],
        "pooled": ours["default"]["pooled"],
        "baseline": {
            "model": "resnet_unet (ResNet18 encoder, random init), recipe pathsam2/glas_unet_baseline",
            "cv": unet["default"]["cv"],
            "pooled": unet["default"]["pooled"],
        },
        "training_steps": {m: [t["steps"] for t in r["training"]] for m, r in report["models"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "pathsam2_glas_cpu_final"))
    ap.add_argument("--cv", default=str(HERE / "cv_results.json"))
    args = ap.parse_args()
    run = Path(args.run)
    card = json.loads((run / "model.json").read_text(encoding="utf-8"))
    report = json.loads(Path(args.cv).read_text(encoding="utf-8"))
    done = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"done"' in x][-1]
    budget = card["recipe"]["trainer"]["cpu_budget_minutes"]
    card.pop("held_out_evaluation", None)  # an earlier model's 17-image hold-out
    card.update(
        {
            "weights_file": TARGET.name + ".safetensors",
            "recipe_file": "training/pathsam2/glas_cpu.yaml",  # not this machine's absolute path
            "description": (
                "Small Path-SAM2 for gland vs background in H&E (colon): random-init SAM2-style Hiera micro trunk "
                "(no SAM2 weights), no UNI branch, KAN class prompts and heads, SAM-style decoder of width 128, "
                f"256 px tiles at 1.24 µm/px. Trained from scratch on the 85 GlaS training images for {budget} "
                "CPU-minutes. The default model of `pathfm segment` and the Segment widget; one object per gland."
            ),
            "command": "pathfm train pathsam2/glas_cpu",
            "training_data": (
                "GlaS (MICCAI 2015 gland segmentation; Sirinukunwattana et al., Medical Image Analysis 2017) "
                "training part, all 85 images; 0.62 µm/px resampled to 1.24 µm/px; binary gland masks."
            ),
            "training_time": (
                f"{budget} CPU-minutes of the training process (trainer.cpu_budget_minutes): {done['step']} steps "
                f"of 8 random 256 px crops, {card.get('epochs')} epochs, one thread"
            ),
            "intended_use": (
                "Research and demonstration: gland / background in H&E of colon at about 0.5–1.3 µm/px, and a "
                "starting point to fine-tune on your own slides with painted corrections. Not for diagnosis; "
                "on other tissue it marks gland-like epithelium."
            ),
            "licence": "GlaS: research use only, no commercial use. These weights inherit that restriction.",
            "evaluation": evaluation(report),
        }
    )
    for suffix in (".safetensors", ".json"):
        tmp = TARGET.with_name(TARGET.name + suffix + ".tmp")
        if suffix == ".json":
            tmp.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(run / "model.safetensors", tmp)
        tmp.replace(TARGET.with_name(TARGET.name + suffix))
    print(card["evaluation"]["summary"])


if __name__ == "__main__":
    main()
