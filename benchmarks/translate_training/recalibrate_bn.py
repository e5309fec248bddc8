"""Recompute the BatchNorm statistics of a finished translate run on plain crops of its training rows.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/translate_training/recalibrate_bn.py \\
        runs/translate/isl_dapi_lupi_cpu_long runs/translate/isl_dapi_lupi_cpu_long_bn [--samples 64] [--crop 256]

Reads ``RUN/model.safetensors`` (+ card) and ``RUN/recipe.yaml``, draws ``--samples`` uniform random crops of
``--crop`` px from the recipe's *training* part (no nuclei centring, no flips or warps, torch seed ``--seed``),
runs :func:`napari_pathfm.training.batchnorm.recalibrate_batchnorm` and writes ``OUT/model.safetensors`` with the
card plus a ``batchnorm_recalibration`` entry (and ``OUT/stderr.log`` copied, so ``bundle.py OUT NAME`` keeps the
training time). Why: see the module docstring of ``napari_pathfm.training.batchnorm``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))


def recalibrate_run(
    run: Path, out: Path, *, samples: int = 64, crop: int = 256, batch_size: int = 8, seed: int = 0
) -> Path:
    """Recalibrated copy of ``run``'s exported model in ``out``; returns the new weights file."""
    import torch

    from napari_pathfm.models.checkpoint import load_checkpoint, save_checkpoint
    from napari_pathfm.training.batchnorm import recalibrate_batchnorm
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.tasks.translate import build
    from napari_pathfm.training.translate_crops import TranslateCropDataset

    model, card = load_checkpoint(run / "model.safetensors", device="cpu")
    _, data, _ = build(load_recipe(run / "recipe.yaml"))
    torch.manual_seed(seed)
    ds = TranslateCropDataset(data.train_fovs, crop, samples, augment=False)
    batches = (
        torch.stack([ds[j]["input"] for j in range(i, min(i + batch_size, samples))])
        for i in range(0, samples, batch_size)
    )
    seen = recalibrate_batchnorm(model, batches)
    card = {k: v for k, v in card.items() if k not in ("sha256", "created", "weights_file")}
    card["batchnorm_recalibration"] = {
        "samples": seen,
        "crop": crop,
        "seed": seed,
        "data": "uniform random crops of the training part (no nuclei centring, flips or warps), dropout off",
        "command": f"benchmarks/translate_training/recalibrate_bn.py {run.name} {out.name} --samples {samples} "
        f"--crop {crop} --seed {seed}",
    }
    out.mkdir(parents=True, exist_ok=True)
    weights = save_checkpoint(model, out / "model.safetensors", card)
    for extra in ("stderr.log", "recipe.yaml"):
        if (run / extra).is_file():
            shutil.copyfile(run / extra, out / extra)
    return weights


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(
        recalibrate_run(
            a.run.resolve(), a.out.resolve(), samples=a.samples, crop=a.crop, batch_size=a.batch_size, seed=a.seed
        )
    )
