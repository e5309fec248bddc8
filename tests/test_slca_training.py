"""SLCA training: the GlaS tile data set builder, the SLCA recipes and one epoch of the smoke recipe.

Real data from ``../shared/data`` (GlaS images + masks, Kather 2016 CRC tiles); skipped with a
reason when it is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SLCA_RECIPES = REPO / "training" / "slca"
THREE = ["train_1", "train_2", "train_3"]


@pytest.fixture(scope="module")
def glas_train(shared_data) -> Path:
    return shared_data / "glas" / "train"


@pytest.fixture(scope="module")
def tiles3(glas_train, tmp_path_factory):
    from napari_pathfm.training.glas_tiles import build_glas_tiles

    out = tmp_path_factory.mktemp("glas") / "tiles"
    return out, build_glas_tiles(glas_train, out, images=THREE, val_fraction=1 / 3, test_fraction=1 / 3, seed=0)


def test_glas_tiles_labels_follow_the_mask(tiles3, glas_train):
    from PIL import Image

    out, info = tiles3
    assert info["classes"] == ["gland", "non_gland"] and info["tile"] == 224
    masks = {n: np.asarray(Image.open(glas_train / "masks" / f"{n}.png")) > 0 for n in THREE}
    images = {n: np.asarray(Image.open(glas_train / "images" / f"{n}.png").convert("RGB")) for n in THREE}
    n_grid = sum((m.shape[0] // 224) * (m.shape[1] // 224) for m in masks.values())
    assert len(info["tiles"]) + info["dropped"] == n_grid  # every whole tile is kept or dropped, none twice
    for t in info["tiles"]:
        window = np.s_[t["y"] : t["y"] + 224, t["x"] : t["x"] + 224]
        frac = float(masks[t["image"]][window].mean())
        assert t["gland_fraction"] == pytest.approx(frac, abs=1e-6)
        assert (t["label"] == "gland" and frac >= 0.5) or (t["label"] == "non_gland" and frac <= 0.1)
        assert t["file"].startswith(t["label"] + "/")
        np.testing.assert_array_equal(np.asarray(Image.open(out / t["file"])), images[t["image"]][window])
    assert {t["label"] for t in info["tiles"]} == {"gland", "non_gland"}


def test_glas_tiles_split_by_image_and_read_by_the_classify_engine(tiles3):
    from napari_pathfm.errors import RecipeError
    from napari_pathfm.training.glas_tiles import build_glas_tiles
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.tasks.classify import ClassifyDataModule

    out, info = tiles3
    assert sorted(n for names in info["split"].values() for n in names) == sorted(THREE)
    assert all(len(names) == 1 for names in info["split"].values())
    split = json.loads((out / "split.json").read_text())
    for part, files in split.items():
        assert {t["image"] for t in info["tiles"] if t["file"] in files} == set(info["split"][part])
    assert sum(len(v) for v in split.values()) == len(info["tiles"])
    # the same call again reuses the data set; other parameters are refused
    assert build_glas_tiles(info["source"], out, images=THREE, val_fraction=1 / 3, test_fraction=1 / 3) == info
    with pytest.raises(RecipeError, match="other parameters"):
        build_glas_tiles(info["source"], out, images=THREE, seed=5)
    recipe = load_recipe(SLCA_RECIPES / "glas_cpu.yaml", [f"data.root={out}", f"data.split_file={out / 'split.json'}"])
    data = ClassifyDataModule(recipe.get("data"), seed=0)
    assert data.classes == ["gland", "non_gland"] and data.has_test
    assert len(data.test_items) == len(split["test"]) and len(data.train_items) == len(split["train"])


def test_slca_recipes_validate(shared_data, monkeypatch, tmp_path):
    from napari_pathfm.training.recipes import load_recipe

    monkeypatch.setenv("PATHFM_GLAS_TILES", str(tmp_path))
    monkeypatch.delenv("PATHFM_RESNET152_WEIGHTS", raising=False)
    recipes = {p.stem: load_recipe(p) for p in sorted(SLCA_RECIPES.glob("*.yaml"))}
    assert {"breakhis", "crc", "crc_tiny", "glas_cpu", "glas_cpu_noslca"} <= set(recipes)
    for name in ("breakhis", "crc"):  # paper-like: SAM ViT-H at 1024, ResNet-152, AdamW 1e-4 / 0.005, 224 px
        r = recipes[name]
        assert (r.get("model.sam"), r.get("model.sam_img_size"), r.get("model.backbone")) == (
            "samvit_huge_patch16",
            1024,
            "resnet152",
        )
        assert (r.get("optim.name"), r.get("optim.lr"), r.get("optim.weight_decay")) == ("adamw", 1e-4, 0.005)
        assert r.get("data.image_size") == 224 and r.get("model.backbone_weights") is None
    slca, bare = recipes["glas_cpu"].config, recipes["glas_cpu_noslca"].config
    assert slca["data"]["root"] == str(tmp_path)
    assert {k: v for k, v in slca.items() if k not in ("model", "output", "description")} == {
        k: v for k, v in bare.items() if k not in ("model", "output", "description")
    }  # only the model differs
    assert slca["model"]["backbone"] == bare["model"]["backbone"] == "resnet18"


def test_slca_head_only_trains_only_its_classifier():
    from napari_pathfm.models import create_model
    from napari_pathfm.training.tasks.classify import ClassifyTask

    model = create_model(
        "slca",
        backbone="resnet10t",
        sam_img_size=64,
        num_classes=3,
        projector_dim=16,
        sam_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2, "neck_chans": 16},
    )
    ClassifyTask(model, 3, {}, 1, trainable="head")
    head = {id(p) for p in model.get_classifier().parameters()}
    assert head and {id(p) for p in model.parameters() if p.requires_grad} == head


def test_slca_crc_tiny_trains_one_epoch_and_exports(shared_data, tmp_path):
    import torch

    from napari_pathfm.models import load_checkpoint
    from napari_pathfm.training.datasets import ClassFolderDataset, classify_transforms
    from napari_pathfm.training.engine import run_recipe

    recipe = SLCA_RECIPES / "crc_tiny.yaml"
    res = run_recipe(recipe, ["trainer.max_epochs=1"], output=tmp_path, progress=lambda *a: None, device="cpu")
    assert res.epoch == 1 and {"val_acc", "val_auroc", "val_loss"} <= set(res.best_metrics)
    card = res.card
    assert card["name"] == "slca" and card["config"]["sam_kwargs"]["depth"] == 2 and len(card["classes"]) == 8
    model, _ = load_checkpoint(res.checkpoint)
    ds = ClassFolderDataset(shared_data / "crc-tiles" / "kather2016", transform=classify_transforms(64, train=False))
    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (4, 8) and torch.isfinite(logits).all()
