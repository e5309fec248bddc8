"""Rebuild the small S4 MIL model bundled for ``pathfm demo`` and the MIL widget.

Steps, all on real GlaS data (``../shared/data/glas``):

1. ``build_bags.py`` with a small extractor: ResNet10t truncated after layer3
   (``resnet50_trunc --backbone resnet10t``, 256-d, 5 MB), seeded random init with
   BatchNorm statistics estimated on train tiles (no pretrained weights exist offline);
   64 / 16 / 40 bags of 32-2048 patches of 64 px tiles at 0.62 µm/px, labelled
   ``no gland`` / ``gland``.
2. ``training/s4mil/glas_demo.yaml``: multitask S4 MIL, d_model 128, d_state 32, paper
   optimiser (Adam + Lookahead, lr 2e-4), early stopping on val_loss.
3. Test bags: slide AUROC/accuracy and patch AUROC, written into the model card.
4. Copy the checkpoint (``s4mil-glas-glands-demo.safetensors`` + ``.json``) and the
   extractor weights beside it into ``src/napari_pathfm/data/models/``. The card
   names the extractor file without a folder; prediction finds it next to the card.

    .venv/bin/python benchmarks/mil_glas/make_demo_model.py [--dest DIR]   # ~2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_bags

REPO = build_bags.REPO
RECIPE = REPO / "training" / "s4mil" / "glas_demo.yaml"
DEST = REPO / "src" / "napari_pathfm" / "data" / "models"
NAME = "s4mil-glas-glands-demo"
EXTRACTOR_FILE = "resnet10t-trunc-glas-bncal.safetensors"
BAG_ARGS = [
    "--extractor",
    "resnet50_trunc",
    "--backbone",
    "resnet10t",
    "--bags",
    "64,16,40",
    "--min-len",
    "32",
    "--max-len",
    "2048",
    "--labels",
    "no gland,gland",
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Rebuild the bundled demo S4 MIL model (see the module docstring).")
    p.add_argument("--bags", default=str(build_bags.CACHE / "bags-demo"), help="bag folder (built when missing)")
    p.add_argument("--dest", default=str(DEST), help="where the checkpoint and extractor weights go")
    p.add_argument("--run", default=None, help="training output folder (default <bags>/run)")
    args = p.parse_args(argv)

    import torch

    from napari_pathfm.io.atomic import atomic_path
    from napari_pathfm.models.checkpoint import load_checkpoint
    from napari_pathfm.training.engine import run_recipe
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.tasks.mil import BagDataModule, evaluate_bags

    bags = Path(args.bags)
    if not (bags / "bags.csv").is_file():
        build_bags.build(build_bags.parser().parse_args([*BAG_ARGS, "--out", str(bags)]))
    recipe = load_recipe(RECIPE, [f"data.features_dir={bags / 'bags'}", f"data.csv={bags / 'bags.csv'}"])
    result = run_recipe(recipe, output=Path(args.run or bags / "run"), device="cpu")
    model, card = load_checkpoint(result.checkpoint)
    torch.manual_seed(0)
    ev = evaluate_bags(model, BagDataModule(recipe.get("data"), recipe.get("seed")).dataset("test"), positive=1)
    test = {k: round(float(v), 4) for k, v in ev["metrics"].items()}

    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    fx = dict(card["feature_extractor"])
    with atomic_path(dest / EXTRACTOR_FILE) as tmp:
        shutil.copyfile(fx["weights"], tmp)
    fx["weights"] = EXTRACTOR_FILE
    build = json.loads((bags / "build.json").read_text())
    card.update(
        feature_extractor=fx,
        test_metrics=test,
        training_data=card["training_data"] + f"; tile linear-probe AUROC {build['tile_probe_auroc']:.3f}",
        rebuild="benchmarks/mil_glas/make_demo_model.py",
    )
    with atomic_path(dest / f"{NAME}.safetensors") as tmp:
        shutil.copyfile(result.checkpoint, tmp)
    card["weights_file"] = f"{NAME}.safetensors"
    with atomic_path(dest / f"{NAME}.json") as tmp:
        tmp.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    print(f"test bags: {test}; best epoch {result.best_metrics.get('epoch')}; wrote {dest / NAME}.*")
    return test


if __name__ == "__main__":
    main()
