"""Recipes and the Lightning engine, trained for real on the Kather 2016 CRC tiles (CPU)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from napari_pathfm.errors import RecipeError
from napari_pathfm.training.recipes import load_recipe, parse_override, schema

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "classify" / "crc_tiny.yaml"
PAPER = REPO / "training" / "classify" / "crc_paper_like.yaml"


# --- recipes (no training) ---------------------------------------------------------------


def test_repo_recipes_validate(shared_data, monkeypatch):
    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    tiny = load_recipe(TINY)
    assert tiny.get("family") == "classify" and tiny.get("model.backbone") == "resnet10t"
    assert Path(tiny.get("data.root")) == shared_data / "crc-tiles" / "kather2016"
    assert tiny.get("trainer.early_stopping.enabled") is True
    paper = load_recipe(PAPER)
    assert paper.get("optim.lr") == pytest.approx(1e-4) and paper.get("trainer.max_epochs") == 50
    assert paper.get("trainer.early_stopping.patience") == 10 and paper.get("data.image_size") == 224
    assert "placeholder" in paper.get("description")


def test_overrides_parse_as_yaml_scalars():
    assert parse_override("optim.lr=0.01") == ("optim.lr", 0.01)
    assert parse_override("trainer.devices=[0, 1]") == ("trainer.devices", [0, 1])
    assert parse_override("trainer.early_stopping=null") == ("trainer.early_stopping", None)
    r = load_recipe(
        TINY, ["optim.lr=0.01", "trainer.max_epochs=7", "optim.weight_decay=1e-4", "trainer.early_stopping=false"]
    )
    assert r.get("optim.lr") == 0.01 and r.get("trainer.max_epochs") == 7
    assert r.get("optim.weight_decay") == pytest.approx(1e-4)
    assert r.get("trainer.early_stopping.enabled") is False


def test_bad_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("max_epochs:", "max_epoch:"))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    text = str(err.value)
    assert (
        str(bad) in text and "unknown key 'trainer.max_epoch'" in text and "Did you mean 'trainer.max_epochs'" in text
    )
    with pytest.raises(RecipeError, match=r"crc_tiny\.yaml.*'optim\.name'.*choose one of"):
        load_recipe(TINY, ["optim.name=lamb"])
    with pytest.raises(RecipeError, match=r"'trainer\.batch_size' must be int"):
        load_recipe(TINY, ["trainer.batch_size=eight"])
    with pytest.raises(RecipeError, match=r"'model\.name'.*not a known model"):
        load_recipe(TINY, ["model.name=resnet"])
    with pytest.raises(RecipeError, match=r"unknown key 'model\.depth'"):
        load_recipe(TINY, ["model.depth=3"])


def test_relative_paths_and_env_vars(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    r = tmp_path / "recipes" / "r.yaml"
    r.write_text(
        "family: classify\nmodel: {name: timm_classifier}\ndata: {root: ../tiles, split_file: '${SPLITS:-splits}/a.json'}\n"
    )
    monkeypatch.chdir(tmp_path)
    rec = load_recipe(r)
    assert rec.get("data.root") == str(tmp_path / "tiles")
    assert rec.get("data.split_file") == str(tmp_path / "recipes" / "splits" / "a.json")
    monkeypatch.setenv("SPLITS", "/data/splits")
    assert load_recipe(r).get("data.split_file") == "/data/splits/a.json"
    assert load_recipe(r, ["data.root=elsewhere"]).get("data.root") == str(tmp_path / "elsewhere")
    r.write_text("family: classify\nmodel: {name: timm_classifier}\ndata: {root: ${NOT_SET_ANYWHERE}/x}\n")
    with pytest.raises(RecipeError, match="NOT_SET_ANYWHERE"):
        load_recipe(r)


def test_schema_for_forms():
    s = schema("classify")
    assert s["optim.name"]["choices"] == ["adamw", "adam", "sgd"]
    assert s["trainer.max_epochs"]["default"] == 10 and s["trainer.max_epochs"]["type"] == ["int"]
    assert s["data.root"]["required"] and s["family"]["required"]
    assert all(v["help"] for v in s.values())


# --- training on real tiles ----------------------------------------------------------------


def _quiet(*args):
    return None


@pytest.fixture(scope="module")
def first_run(shared_data, tmp_path_factory):
    from napari_pathfm.training import run_recipe

    out = tmp_path_factory.mktemp("crc_tiny")
    events = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHFM_SHARED_DATA", str(shared_data))
        result = run_recipe(
            TINY, ["trainer.max_epochs=2"], output=out, progress=_quiet, device="cpu", on_event=events.append
        )
    return result, events


@pytest.mark.slow
def test_train_exports_checkpoint_that_predicts(first_run):
    import torch

    from napari_pathfm.models import load_checkpoint
    from napari_pathfm.training.datasets import ClassFolderDataset, classify_transforms

    result, events = first_run
    assert result.checkpoint.is_file() and result.checkpoint.with_suffix(".json").is_file()
    assert not result.cancelled and result.epochs_run == 2 and result.epoch == 2 and result.start_epoch == 0
    card = result.card
    assert card["family"] == "classify" and card["tile_size"] == 96 and len(card["classes"]) == 8
    assert {"val_loss", "val_acc", "val_auroc", "train_loss"} <= set(card["metrics"]["best"])
    assert card["metrics"]["monitor"] == "val_loss" and card["input_mpp"] == pytest.approx(0.773)
    assert "too small for accuracy claims" in card["description"].lower()
    assert [e["event"] for e in events].count("epoch") == 2 and events[-1]["event"] == "done"
    assert all(e["total"] == 4 for e in events if e["event"] == "batch")
    lines = (result.output / "events.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "done"
    assert (result.log_dir / "metrics.csv").is_file() and any((result.output / "tensorboard").rglob("events.out.*"))
    assert (result.output / "last.ckpt").is_file() and (result.output / "split.json").is_file()

    model, loaded_card = load_checkpoint(result.checkpoint)
    assert loaded_card["sha256"] == card["sha256"]
    ds = ClassFolderDataset(card["recipe"]["data"]["root"], transform=classify_transforms(96, train=False))
    x = torch.stack([ds[i][0] for i in range(0, len(ds), 3)])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    assert probs.shape == (8, 8) and torch.isfinite(probs).all()


@pytest.mark.slow
def test_second_run_resumes(tmp_path, shared_data, monkeypatch):
    from napari_pathfm.training import run_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    small = ["data.image_size=64"]
    first = run_recipe(TINY, [*small, "trainer.max_epochs=2"], output=tmp_path, progress=_quiet, device="cpu")
    assert first.start_epoch == 0 and first.epochs_run == 2
    result = run_recipe(TINY, [*small, "trainer.max_epochs=3"], output=tmp_path, progress=_quiet, device="cpu")
    assert result.start_epoch == 2 and result.epochs_run == 1 and result.epoch == 3
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert result.best_metrics["val_loss"] == min(h["val_loss"] for h in result.history)
    assert result.log_dir.name == "version_1"
    with pytest.raises(RecipeError, match=r"last\.ckpt.*different model"):
        run_recipe(
            TINY,
            [*small, "trainer.max_epochs=4", "model.backbone=resnet18"],
            output=tmp_path,
            progress=_quiet,
            device="cpu",
        )


@pytest.mark.slow
def test_cancel_saves_checkpoint(shared_data, tmp_path, monkeypatch):
    from napari_pathfm.training import run_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    stop = threading.Event()
    batches = []

    def progress(done, total, message):
        if "batch" in message:
            batches.append(done)
            if len(batches) == 3:
                stop.set()

    result = run_recipe(
        TINY,
        ["trainer.max_epochs=5", "data.image_size=64"],
        output=tmp_path,
        progress=progress,
        cancel=stop,
        device="cpu",
    )
    assert result.cancelled and not result.stopped_early
    assert len(batches) == 3 and result.epoch < 5
    assert (tmp_path / "last.ckpt").is_file() and result.checkpoint.is_file()
    assert result.card["metrics"]["best"]


@pytest.mark.slow
def test_early_stopping_and_overrides(shared_data, tmp_path, monkeypatch):
    from napari_pathfm.training import run_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    overrides = [
        "trainer.max_epochs=6",
        "data.image_size=64",
        "optim.lr=0.01",
        "trainer.early_stopping.patience=0",
        "trainer.early_stopping.min_delta=100",  # nothing counts as an improvement after epoch 1
    ]
    result = run_recipe(TINY, overrides, output=tmp_path, progress=_quiet, device="cpu")
    assert result.stopped_early and result.epoch == 2 and not result.cancelled
    assert result.card["recipe"]["optim"]["lr"] == 0.01
    assert result.card["recipe"]["trainer"]["early_stopping"]["patience"] == 0


# --- datasets and optimizers ------------------------------------------------------------


def test_split_is_seeded_stratified_and_reusable(shared_data, tmp_path):
    from napari_pathfm.training.datasets import ClassFolderDataset, find_class_files, split_files

    root = shared_data / "crc-tiles" / "kather2016"
    classes, items = find_class_files(root)
    assert len(classes) == 8 and len(items) == 24
    train, val = split_files(items, val_fraction=0.34, seed=0)
    assert split_files(items, val_fraction=0.34, seed=0) == (train, val)
    assert split_files(items, val_fraction=0.34, seed=1) != (train, val)
    assert sorted(y for _, y in val) == list(range(8)) and len(train) == 16
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [str(f.relative_to(root)) for f, _ in val], "val": []}))
    assert split_files(items, split_file=split, root=root) == (val, [])
    ds = ClassFolderDataset(root, items=val)
    image, label = ds[0]
    assert image.size == (150, 150) and image.mode == "RGB" and label == val[0][1]
    assert ds.class_counts() == {c: 1 for c in classes}


def test_optimizers_and_cosine_schedule():
    import torch

    from napari_pathfm.training.tasks.classify import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(params, {"name": "sgd", "lr": 0.1}, 5), torch.optim.SGD)
    out = build_optimizer(params, {"name": "adamw", "lr": 1e-4, "weight_decay": 0.005, "scheduler": "cosine"}, 50)
    assert isinstance(out["optimizer"], torch.optim.AdamW) and out["optimizer"].defaults["weight_decay"] == 0.005
    assert out["lr_scheduler"]["scheduler"].T_max == 50
