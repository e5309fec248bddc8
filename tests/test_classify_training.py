"""Classify engine options: label fraction, head-only fine-tuning, test split, transfer from a checkpoint.

All runs use the real Kather 2016 CRC tiles from ``../shared/data`` (8 classes x 3 tiles)
at a small image size so the whole file stays well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "classify" / "crc_tiny.yaml"
FAST = ["data.image_size=48", "trainer.batch_size=8", "trainer.max_epochs=1"]


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def kather(shared_data) -> Path:
    return shared_data / "crc-tiles" / "kather2016"


def _split(root: Path, path: Path, n_classes: int | None = None) -> dict:
    """Per class: tile 0 -> test, tile 1 -> val, tile 2 -> train (a fixed, leak-free split)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())[:n_classes]
    spec = {"train": [], "val": [], "test": []}
    for c in classes:
        files = sorted(f.name for f in (root / c).iterdir())
        for part, name in zip(("test", "val", "train"), files):
            spec[part].append(f"{c}/{name}")
    path.write_text(json.dumps(spec))
    return spec


# --- data options ------------------------------------------------------------------------


def test_subsample_per_class_is_seeded_nested_and_keeps_every_class():
    from napari_pathfm.training.datasets import subsample_per_class

    items = [(f"a{i}", 0) for i in range(20)] + [(f"b{i}", 1) for i in range(5)] + [("c0", 2)]
    ten = subsample_per_class(items, 0.1, seed=3)
    half = subsample_per_class(items, 0.5, seed=3)
    counts = lambda kept: [sum(y == c for _, y in kept) for c in range(3)]
    assert counts(ten) == [2, 1, 1]  # round(2.0), max(1, round(0.5)), at least one of a single item
    assert counts(half) == [10, 2, 1]  # round(2.5) rounds half to even
    assert set(ten) <= set(half)  # same seed: smaller fractions are subsets of larger ones
    assert subsample_per_class(items, 0.5, seed=3) == half and subsample_per_class(items, 0.5, seed=4) != half
    assert half == [it for it in items if it in half]  # input order kept
    assert subsample_per_class(items, 1.0) == items
    with pytest.raises(ValueError, match="label fraction"):
        subsample_per_class(items, 0.0)


def test_label_fraction_trims_training_only_and_says_so(kather, tmp_path):
    from napari_pathfm.errors import RecipeError
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.tasks.classify import ClassifyDataModule

    big = tmp_path / "tiles"  # 8 classes x 3 tiles, each tile linked 4 times: 12 per class
    for c in sorted(p.name for p in kather.iterdir() if p.is_dir()):
        (big / c).mkdir(parents=True)
        for f in sorted((kather / c).iterdir()):
            for k in range(4):
                (big / c / f"{f.stem}_{k}{f.suffix}").symlink_to(f)
    base = load_recipe(TINY, [f"data.root={big}", "data.val_fraction=0.25"]).get("data")
    full = ClassifyDataModule(base, seed=0)
    tenth = ClassifyDataModule({**base, "label_fraction": 0.1}, seed=0)
    per_class = lambda items: sorted(sum(y == c for _, y in items) for c in range(8))
    assert per_class(full.train_items) == [9] * 8 and per_class(tenth.train_items) == [1] * 8
    assert tenth.val_items == full.val_items and set(tenth.train_items) <= set(full.train_items)
    assert "label_fraction 0.1: 8 of 72 training images kept" in tenth.describe()
    with pytest.raises(RecipeError, match="label_fraction"):
        ClassifyDataModule({**base, "label_fraction": 1.5}, seed=0)


def test_split_file_with_test_part_and_bad_split_files(kather, tmp_path):
    from napari_pathfm.errors import RecipeError
    from napari_pathfm.training.datasets import (
        find_class_files,
        read_split_file,
        split_files,
    )

    _, items = find_class_files(kather)
    spec = _split(kather, tmp_path / "split.json")
    parts = read_split_file(tmp_path / "split.json", items, kather)
    assert {k: len(v) for k, v in parts.items()} == {"train": 8, "val": 8, "test": 8}
    assert split_files(items, split_file=tmp_path / "split.json", root=kather) == (parts["train"], parts["val"])
    bad = tmp_path / "twice.json"
    bad.write_text(json.dumps({"train": spec["train"], "test": spec["train"][:1]}))
    with pytest.raises(RecipeError, match="in both 'train' and 'test'"):
        read_split_file(bad, items, kather)
    bad.write_text("[1, 2]")
    with pytest.raises(RecipeError, match="not a JSON object"):
        read_split_file(bad, items, kather)


# --- head-only training -----------------------------------------------------------------


def test_head_only_needs_a_classifier():
    import torch

    from napari_pathfm.errors import RecipeError
    from napari_pathfm.training.tasks.classify import ClassifyTask

    with pytest.raises(RecipeError, match="get_classifier"):
        ClassifyTask(torch.nn.Sequential(torch.nn.Linear(4, 2)), 2, {}, 1, trainable="head")


def test_head_only_freezes_everything_but_the_head_and_keeps_batchnorm_in_eval():
    import torch

    from napari_pathfm.models import create_model
    from napari_pathfm.training.tasks.classify import ClassifyTask

    model = create_model("timm_classifier", backbone="resnet10t", num_classes=3)
    task = ClassifyTask(model, 3, {"name": "adamw", "lr": 1e-3}, 1, trainable="head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    opt = task.configure_optimizers()
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 3 * 512 + 3
    task.train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and model.fc.training


# --- end to end: test split metrics, transfer from a pathfm checkpoint, head-only ---------


@pytest.fixture(scope="module")
def source_run(kather, tmp_path_factory):
    """One epoch of crc_tiny (8 classes) with a split file that holds out a test part."""
    from napari_pathfm.training.engine import run_recipe

    out = tmp_path_factory.mktemp("source")
    _split(kather, out / "split_in.json")
    overrides = FAST + [f"data.split_file={out / 'split_in.json'}"]
    return run_recipe(TINY, overrides, output=out / "run", progress=_quiet, device="cpu")


def test_test_split_is_evaluated_with_the_best_weights(source_run):
    from napari_pathfm.models import load_checkpoint, read_card

    res = source_run
    assert set(res.test_metrics) == {"test_loss", "test_acc", "test_auroc"}
    card = read_card(res.checkpoint)
    assert card["metrics"]["test"] == pytest.approx(res.test_metrics)
    assert "8 train / 8 val / 8 test" in card["training_data"]
    saved = json.loads((res.output / "split.json").read_text())
    assert len(saved["test"]) == 8 and not set(saved["test"]) & set(saved["train"] + saved["val"])
    # the reported test accuracy is that of the exported (best) weights
    import torch

    from napari_pathfm.training.datasets import ClassFolderDataset, classify_transforms

    model, _ = load_checkpoint(res.checkpoint)
    root = Path(card["recipe"]["data"]["root"])
    ds = ClassFolderDataset(root, transform=classify_transforms(48, train=False))
    test = [i for i, (f, _) in enumerate(ds.items) if str(f.relative_to(root)) in set(saved["test"])]
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in test])
        pred = model.eval()(x).argmax(1)
    acc = float((pred == torch.tensor([ds[i][1] for i in test])).float().mean())
    assert res.test_metrics["test_acc"] == pytest.approx(acc)
    events = [json.loads(line) for line in (res.output / "events.jsonl").read_text().splitlines()]
    assert "test_acc" in events[-1]["metrics"]


def test_pathfm_checkpoint_transfers_into_a_new_head_and_head_only_trains_the_head(source_run, kather, tmp_path):
    import torch
    from safetensors.torch import load_file

    from napari_pathfm.models import create_model, read_card
    from napari_pathfm.training.engine import run_recipe

    src = load_file(str(source_run.checkpoint))
    assert "fc.weight" in src and not any(k.startswith("model.") for k in src)  # timm keys, no task prefix
    model = create_model("timm_classifier", backbone="resnet10t", num_classes=2, weights=str(source_run.checkpoint))
    report = model.pathfm_load_report
    assert [k for k, _, _ in report.mismatched] == ["fc.weight", "fc.bias"]
    assert not report.missing and not report.unexpected and len(report.loaded) == report.total - 2

    two = tmp_path / "two"  # a 2-class target task: the first two Kather classes (linked, not copied)
    two.mkdir()
    for c in sorted(p.name for p in kather.iterdir() if p.is_dir())[:2]:
        (two / c).symlink_to(kather / c, target_is_directory=True)
    _split(two, tmp_path / "split2.json")
    overrides = FAST + [
        f"data.root={two}",
        f"data.split_file={tmp_path / 'split2.json'}",
        f"model.weights={source_run.checkpoint}",
        "optim.trainable=head",
        "optim.lr=0.05",
        "trainer.max_epochs=2",
        "trainer.early_stopping.enabled=false",
    ]
    res = run_recipe(TINY, overrides, output=tmp_path / "ft", progress=_quiet, device="cpu")
    out = load_file(str(res.checkpoint))
    assert out["fc.weight"].shape == (2, 512)
    body = [k for k in src if not k.startswith("fc.")]
    assert body and all(torch.equal(out[k], src[k]) for k in body)  # incl. BatchNorm running statistics
    assert "head only" in read_card(res.checkpoint)["training_data"]
    assert set(res.test_metrics) == {"test_loss", "test_acc", "test_auroc"}


def test_last_checkpoint_is_written_after_every_epoch(kather, tmp_path):
    """Resuming continues from the last epoch, also when later epochs did not improve on the best one."""
    import torch

    from napari_pathfm.training.engine import run_recipe

    # "best" = highest val_loss, usually epoch 0: Lightning's own save_last wrote last.ckpt only then
    keep = FAST[:-1] + ["trainer.early_stopping.enabled=false", "trainer.early_stopping.mode=max"]
    res = run_recipe(TINY, [*keep, "trainer.max_epochs=3"], output=tmp_path, progress=_quiet, device="cpu")
    names = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert res.epoch == 3 and len(names) == 2 and names[0].startswith("best-epoch=") and names[1] == "last.ckpt"
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2
    again = run_recipe(TINY, [*keep, "trainer.max_epochs=4"], output=tmp_path, progress=_quiet, device="cpu")
    assert again.start_epoch == 3 and again.epochs_run == 1
