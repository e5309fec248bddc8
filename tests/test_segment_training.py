"""Segmentation training: metrics of known answer, the image/mask dataset, and Path-SAM2 trained on real GlaS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_pathfm.errors import RecipeError
from napari_pathfm.training import seg_metrics as sm

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "training" / "pathsam2"


# --- metrics -----------------------------------------------------------------------------------


def test_dice_iou_known_answers():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [2, 0, 1, 2]])
    cm = sm.confusion_matrix(pred, gt, 3)
    # rows = truth, cols = prediction; the two ignored pixels are not counted
    assert cm.tolist() == [[3, 1, 0], [1, 3, 0], [1, 0, 1]]
    dice, iou = sm.dice_iou(cm)
    np.testing.assert_allclose(dice, [6 / 9, 6 / 8, 2 / 3])  # 2TP / (2TP + FP + FN)
    np.testing.assert_allclose(iou, [3 / 6, 3 / 5, 1 / 2])  # TP / (TP + FP + FN)
    np.testing.assert_allclose(sm.dice_per_class(pred, gt, 3), dice)
    np.testing.assert_allclose(sm.iou_per_class(pred, gt, 3), iou)
    # a class in neither map is NaN, not 0 or 1
    d = sm.dice_per_class(np.zeros((2, 2), int), np.zeros((2, 2), int), 2)
    assert d[0] == 1.0 and np.isnan(d[1])
    # perfect and empty predictions
    assert sm.dice_per_class(gt, gt, 3).tolist() == [1.0, 1.0, 1.0]
    assert sm.dice_per_class(np.zeros_like(gt), gt, 3)[1] == 0.0
    with pytest.raises(ValueError, match=r"ground truth has values \[7\]"):
        sm.confusion_matrix(pred, np.full_like(gt, 7), 3)


def test_segmentation_metrics_summary_means_foreground_only():
    gt = np.zeros((6, 6), int)
    gt[:3] = 1
    pred = np.zeros((6, 6), int)
    pred[:2] = 1
    m = sm.segmentation_metrics(pred, gt, 2, ["background", "gland"])
    assert m["dice_gland"] == pytest.approx(2 * 12 / (12 + 18))
    assert m["iou_gland"] == pytest.approx(12 / 18)
    assert m["dice_background"] == pytest.approx(2 * 18 / (18 + 24))
    assert m["dice"] == m["dice_gland"] and m["iou"] == m["iou_gland"]
    assert m["object_f1"] == 1.0  # 12 of 18 GT pixels covered: > 50 %


def test_object_f1_glas_rule():
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1  # object A, 16 px
    gt[6:10, 6:10] = 1  # object B, 16 px
    gt[0:2, 7:10] = 1  # object C, 6 px
    pred = np.zeros_like(gt)
    pred[0:3, 0:3] = 1  # 9 of A's 16 px: > 50 % -> TP
    pred[6:8, 6:10] = 1  # 8 of B's 16 px: exactly 50 % is not > 50 % -> FP, B is FN
    pred[4:5, 4:5] = 1  # stray pixel, touches nothing -> FP
    # C not predicted -> FN
    assert sm.object_counts(pred, gt, 1) == (1, 2, 2)
    assert sm.object_f1(pred, gt) == pytest.approx(2 * 1 / (2 * 1 + 2 + 2))
    # one prediction covering several GT objects matches only the one it overlaps most
    assert sm.object_counts(np.ones_like(gt), gt, 1) == (1, 0, 2)
    two = np.zeros((3, 7), int)
    two[:, 0:3] = 1
    two[:, 4:7] = 1
    assert sm.object_counts(np.ones_like(two), two, 1) == (1, 0, 1)
    # 4- vs 8-connectivity: diagonal pixels are one object with 8, two with 4
    diag = np.eye(3, dtype=int)
    assert sm.object_counts(diag, diag, 1, connectivity=8) == (1, 0, 0)
    assert sm.object_counts(diag, diag, 1, connectivity=4) == (3, 0, 0)
    # ignored ground truth removes predicted pixels there
    ign = np.full((3, 3), 255)
    ign[0, 0] = 0
    assert sm.object_counts(np.ones((3, 3), int), ign, 1) == (0, 1, 0)  # only (0, 0) counts: a false positive
    only_ignored = np.ones((3, 3), int)
    only_ignored[0, 0] = 0
    assert sm.object_counts(only_ignored, ign, 1) == (0, 0, 0)
    assert sm.f1_from_counts(0, 0, 0) == 1.0
    # counts pool over a stack before F1: (1, 2, 2) + (1, 0, 1) -> 2 * 2 / (4 + 2 + 3)
    pad = np.zeros((10, 10), int)
    pad[:3, :7] = two
    stack_t = np.stack([gt, pad])
    stack_p = np.stack([pred, np.where(np.arange(10)[None, :] < 7, 1, 0) * (np.arange(10)[:, None] < 3)])
    assert sm.object_f1(stack_p, stack_t, [1]) == pytest.approx(4 / 9)


# --- dataset -----------------------------------------------------------------------------------


def _glas(shared_data: Path) -> Path:
    root = shared_data / "glas" / "train"
    if not (root / "images").is_dir():
        pytest.skip(f"GlaS not found at {root}")
    return root


def _folder(root: Path, masks: dict[str, np.ndarray], size=None, meta: dict | None = None) -> Path:
    """An images/ + masks/ folder: a real-looking RGB gradient per mask (the masks are the test input)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, mask in masks.items():
        h, w = mask.shape if size is None else size
        rgb = np.stack([*np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), np.full((h, w), 128.0)], -1)
        Image.fromarray(rgb.astype(np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")
    if meta is not None:
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _data(root: Path, **cfg):
    from napari_pathfm.training.segment_datamodule import SegmentDataModule

    dm = SegmentDataModule({"root": str(root), **cfg}, batch_size=2, seed=0)
    dm.tile_size = cfg.get("tile_size", 32)
    return dm


def test_glas_split_by_image_name_and_binary_masks(shared_data):
    root = _glas(shared_data)
    val = ["train_3", "train_40", "train_77"]
    dm = _data(root, val_names=val, classes=["background", "gland"], tile_size=64, samples_per_image=2)
    train_names = {it.name for it in dm.train_items}
    assert [it.name for it in dm.val_items] == val and not train_names & set(val) and len(train_names) == 82
    assert dm.num_classes == 2 and dm.classes == ["background", "gland"]
    assert {it.mask_format for it in dm.train_items} == {"binary"}  # GlaS masks are 0/255
    tiles = dm.train_dataset()
    assert len(tiles) == 2 * 82
    sample = tiles[0]
    assert sample["image"].shape == (64, 64, 3) and str(sample["image"].dtype) == "torch.uint8"
    assert set(np.unique(sample["mask"].numpy())) <= {0, 1}
    whole = dm.val_dataset()[0]
    raw = np.asarray(Image.open(root / "masks" / "train_3.png"))
    assert tuple(whole["size"].tolist()) == raw.shape
    np.testing.assert_array_equal(whole["mask"].numpy(), (raw == 255).astype(np.int64))  # 255 -> gland (1)
    # a seeded fraction: 17 of 85 images, the same names every time, never in both parts
    a, b = _data(root, val_fraction=0.2), _data(root, val_fraction=0.2)
    assert [it.name for it in a.val_items] == [it.name for it in b.val_items] and len(a.val_items) == 17
    assert not {it.name for it in a.val_items} & {it.name for it in a.train_items}


def test_glas_resampling_to_input_mpp(shared_data):
    root = _glas(shared_data)
    dm = _data(root, val_names=["train_1"], mpp=0.62, input_mpp=1.24)
    item = dm.val_dataset()[0]
    assert tuple(item["size"].tolist()) == (261, 388)  # 522 x 775 at half resolution
    assert set(np.unique(item["mask"].numpy())) == {0, 1}
    with pytest.raises(RecipeError, match="data.mpp"):
        _data(root, input_mpp=1.24)


def test_small_images_are_padded_with_ignore(tmp_path):
    mask = np.zeros((20, 12), np.uint8)
    mask[5:15, 3:9] = 255
    root = _folder(tmp_path / "d", {"a": mask, "b": mask})
    dm = _data(root, val_names=["b"], tile_size=32, augment=False)
    crop = dm.train_dataset()[0]
    m, img = crop["mask"].numpy(), crop["image"].numpy()
    assert m.shape == (32, 32) and (m == 1).sum() == 60 and (m == 0).sum() == 20 * 12 - 60
    assert (m == 255).sum() == 32 * 32 - 20 * 12  # padding is ignored ...
    assert (img[m == 255] == 255).all()  # ... and white
    whole = dm.val_dataset()[0]
    assert whole["mask"].shape == (32, 32) and tuple(whole["size"].tolist()) == (20, 12)
    assert (whole["mask"][20:] == 255).all() and (whole["mask"][:, 12:] == 255).all()


def test_index_masks_ignore_and_mask_values(tmp_path):
    idx = np.array([[0, 1, 2, 255]] * 4, np.uint8)
    dm = _data(_folder(tmp_path / "idx", {"a": idx, "b": idx}), val_names=["b"], tile_size=4, augment=False)
    assert dm.num_classes == 3 and dm.classes == ["background", "class_1", "class_2"]
    assert {it.mask_format for it in dm.train_items} == {"index"}
    np.testing.assert_array_equal(dm.val_dataset()[0]["mask"].numpy(), idx)  # 255 stays "ignore"
    nines = np.array([[0, 1, 9, 1]] * 4, np.uint8)  # another ignore value in the files
    dm = _data(_folder(tmp_path / "nines", {"a": nines}), val_fraction=0.0, tile_size=4, ignore_index=9)
    assert dm.num_classes == 2
    np.testing.assert_array_equal(dm.store.mask(dm.train_items[0]), [[0, 1, 255, 1]] * 4)
    grey = np.array([[0, 128, 255, 128]] * 4, np.uint8)
    dm = _data(
        _folder(tmp_path / "grey", {"a": grey}), val_fraction=0.0, tile_size=4, mask_values={0: 0, 128: 1, 255: 2}
    )
    assert dm.num_classes == 3
    np.testing.assert_array_equal(dm.store.mask(dm.train_items[0]), [[0, 1, 2, 1]] * 4)


def test_unexpected_mask_values_name_file_and_values(tmp_path):
    good = np.array([[0, 255]] * 4, np.uint8)
    odd = np.array([[0, 255, 128, 7]] * 4, np.uint8)
    root = _folder(tmp_path / "odd", {"a": good, "b": odd})
    with pytest.raises(RecipeError) as err:  # auto: not all 0/255 -> class indices; 128 is no class of 2
        _data(root, classes=["background", "gland"], val_fraction=0.0)
    text = str(err.value)
    assert "b.png" in text and "[7, 128]" in text and "data.mask_values" in text
    with pytest.raises(RecipeError, match=r"b\.png.*value 128.*no mask holds the values \[1, 2, 3, 4, 5"):
        _data(root, val_fraction=0.0)  # classes read from the masks must run 0..K-1
    with pytest.raises(RecipeError, match=r"b\.png.*binary mask.*\[0, 7, 128, 255\]"):
        _data(root, mask_format="binary", val_fraction=0.0)
    with pytest.raises(RecipeError, match=r"b\.png.*\[7\] that data.mask_values does not map"):
        _data(root, mask_values={0: 0, 128: 1, 255: 1}, val_fraction=0.0)
    # mapped explicitly, the same folder reads fine
    dm = _data(root, mask_values={0: 0, 7: 255, 128: 1, 255: 1}, val_fraction=0.0)
    assert dm.num_classes == 2


def test_folder_errors_are_clear(tmp_path):
    root = _folder(tmp_path / "d", {"a": np.zeros((4, 4)), "b": np.zeros((4, 4))})
    (root / "masks" / "b.png").unlink()
    with pytest.raises(RecipeError, match=r"masks.*no mask for 1 image\(s\): b\.png"):
        _data(root)
    (root / "masks" / "b.png").write_bytes((root / "masks" / "a.png").read_bytes())
    with pytest.raises(RecipeError, match=r"no images named \['c'\]"):
        _data(root, val_names=["c"])
    with pytest.raises(RecipeError, match="has no 'images/' folder"):
        _data(tmp_path)


def test_extra_dirs_train_only_with_their_own_mpp(tmp_path):
    base = _folder(tmp_path / "base", {"a": np.zeros((40, 40)), "b": np.full((40, 40), 255)})
    corr = np.zeros((10, 10), np.uint8)
    corr[:5] = 1
    corr[9] = 255  # past the slide edge
    extra = _folder(tmp_path / "slide.pathfm-corrections", {"slide_r0_c0": corr})
    (extra / "corrections.json").write_text(json.dumps({"mpp": 2.0, "classes": ["background", "gland"], "tiles": []}))
    dm = _data(
        base,
        val_names=["b"],
        mpp=0.5,
        input_mpp=1.0,
        classes=["background", "gland"],
        extra_dirs=[{"path": str(extra), "repeat": 3}],
        samples_per_image=2,
        tile_size=16,
    )
    assert [it.name for it in dm.val_items] == ["b"] and [it.name for it in dm.extra_items] == ["slide_r0_c0"]
    assert dm.extra_items[0].mask_format == "index" and dm.extra_items[0].scale == 2.0
    assert dm.store.mask(dm.train_items[0]).shape == (20, 20)  # 0.5 -> 1.0 µm/px
    assert dm.store.mask(dm.extra_items[0]).shape == (20, 20)  # 2.0 -> 1.0 µm/px
    assert len(dm.train_dataset()) == 2 * 1 + 2 * 3  # oversampled corrections
    split = tmp_path / "split.json"
    dm.save_split(split)
    assert json.loads(split.read_text())["val"] == ["b"]
    (extra / "corrections.json").write_text(json.dumps({"mpp": 2.0, "classes": ["bg", "tumour"]}))
    with pytest.raises(RecipeError, match=r"labelled with classes \['bg', 'tumour'\]"):
        _data(base, val_names=["b"], classes=["background", "gland"], extra_dirs=[str(extra)])


# --- recipes and training through the real engine ------------------------------------------------


def test_pathsam2_recipes_validate(shared_data, monkeypatch, tmp_path):
    from napari_pathfm.training.recipes import load_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    for var in ("GLAS_ROOT", "CRAG_ROOT", "EBHI_ROOT", "SAM2_CHECKPOINT", "UNI_CHECKPOINT"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    for name, lr in (("glas", 1e-4), ("crag", 1e-4), ("ebhi", 1e-4)):
        r = load_recipe(RECIPES / f"{name}.yaml")
        assert r.get("family") == "segment" and r.get("model.encoder") == "sam2_hiera_base_plus"
        assert r.get("model.uni") == "uni" and r.get("model.image_size") == 1024
        assert r.get("model.sam2_checkpoint") == str(tmp_path / "sam2_checkpoint")
        assert r.get("optim.name") == "adamw" and r.get("optim.lr") == pytest.approx(lr)
        assert r.get("optim.weight_decay") == pytest.approx(1e-2)
        assert r.get("loss.alpha") == pytest.approx(0.125) and r.get("loss.beta") == pytest.approx(0.01)
    cpu = load_recipe(RECIPES / "glas_cpu.yaml")
    assert cpu.get("model.encoder") == "hiera_micro" and cpu.get("model.uni") is None
    assert cpu.get("model.freeze_encoders") is False and cpu.get("model.image_size") <= 256
    assert Path(cpu.get("data.root")) == shared_data / "glas" / "train"
    # the bundled model trains on all 85 images for a budget; its estimate is cross-validated (cv.py)
    assert cpu.get("data.val_names") == [] and cpu.get("trainer.cpu_budget_minutes") == 36
    unet = load_recipe(RECIPES / "glas_unet_baseline.yaml")
    same = ("root", "classes", "val_names", "mpp", "tile_size", "samples_per_image", "color_jitter")
    for key in (*(f"data.{k}" for k in same), "trainer.cpu_budget_minutes", "loss.alpha", "seed"):
        assert unet.get(key) == cpu.get(key), key  # the baseline gets the same data, crops and budget
    # resolution, batch and object settings are each model's best (levers.md, cv_objects.json)
    chosen = json.loads((REPO / "benchmarks" / "segment_glas" / "cv_objects.json").read_text())
    for recipe, model in ((cpu, "pathsam2"), (unet, "unet")):
        assert recipe.get("objects") == chosen["models"][model]["best"], model
    monkeypatch.delenv("SAM2_CHECKPOINT")
    with pytest.raises(RecipeError, match="SAM2_CHECKPOINT"):
        load_recipe(RECIPES / "glas.yaml")


def _train(args: list[str]):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_border_weights_refused_without_the_pixel_size(shared_data, tmp_path, monkeypatch):
    """loss.border_sigma_um is in µm: with no µm/px known the run is refused, not trained at a guessed size."""
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    _glas(shared_data)
    sets = ["data.mpp=null", "data.input_mpp=null", "loss.border_weight=10"]
    args = [str(RECIPES / "glas_tiny.yaml"), "--out", str(tmp_path / "run"), *(a for s in sets for a in ("--set", s))]
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2 and "µm/px of the images is unknown" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "run" / "model.safetensors").exists()


def test_train_glas_tiny_then_finetune_from_it(shared_data, tmp_path, monkeypatch):
    from napari_pathfm.models.checkpoint import load_checkpoint

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    _glas(shared_data)
    first = tmp_path / "first"
    _train(
        [str(RECIPES / "glas_tiny.yaml"), "--out", str(first), "--set", "objects={split_um: 20}", "--set", "flips=true"]
    )
    card = json.loads((first / "model.json").read_text())
    assert card["objects"]["split_um"] == 20 and card["objects"]["min_area_um2"] == 575  # the recipe's + defaults
    assert card["flips"] is True  # pathfm segment runs it with test-time flips unless told --no-flips
    assert card["family"] == "segment" and card["name"] == "pathsam2"
    assert card["classes"] == ["background", "gland"] and card["num_classes"] == 2
    assert card["input_mpp"] == pytest.approx(2.48) and card["tile_size"] == 64
    assert card["split"]["val"] == ["train_1", "train_2"] and "train_1" not in card["split"]["train"]
    assert "GlaS" in card["description"] and "83 train / 2 val" in card["training_data"]
    best = card["metrics"]["best"]
    for key in (
        "val_loss",
        "val_dice",
        "val_iou",
        "val_object_f1",
        "val_dice_gland",
        "val_iou_background",
        "train_loss",
    ):
        assert np.isfinite(best[key]), key
    assert 0.0 <= best["val_dice"] <= 1.0 and best["val_dice"] == best["val_dice_gland"]
    model, loaded = load_checkpoint(first / "model.safetensors")
    assert model.num_classes == 2 and loaded["sha256"] == card["sha256"]
    image = np.asarray(Image.open(shared_data / "glas" / "train" / "images" / "train_1.png"))[:64, :64]
    assert model.predict(image[None]).shape == (1, 64, 64)

    # fine-tune: a new checkpoint in a new folder, the old files untouched byte for byte
    before = {p.name: p.read_bytes() for p in (first / "model.safetensors", first / "model.json")}
    second = tmp_path / "second"
    init = f"data.init_checkpoint={first / 'model.safetensors'}"
    # a corrections folder as the Segment widget writes it: tiles at the model's µm/px, class-index masks
    corr = tmp_path / "train_1.pathfm-corrections"
    (corr / "images").mkdir(parents=True)
    (corr / "masks").mkdir()
    small = Image.open(shared_data / "glas" / "train" / "images" / "train_3.png").reduce(4).crop((0, 0, 64, 64))
    small.save(corr / "images" / "train_3_r0_c0.png")
    Image.fromarray(np.where(np.arange(64)[:, None] < 32, 1, 0).astype(np.uint8)).save(
        corr / "masks" / "train_3_r0_c0.png"
    )
    (corr / "corrections.json").write_text(
        json.dumps({"mpp": 2.48, "tile_size": 64, "classes": ["background", "gland"]})
    )
    extra = f"data.extra_dirs=[{{path: {corr}, repeat: 4}}]"
    _train(
        [
            str(RECIPES / "glas_tiny.yaml"),
            "--out",
            str(second),
            "--set",
            init,
            "--set",
            extra,
            "--set",
            "trainer.max_epochs=1",
            "--set",
            "loss.border_weight=10",  # the U-Net paper's border weights on the fine-tune's loss
        ]
    )
    assert json.loads((second / "split.json").read_text())["extra"] == [str(corr / "images" / "train_3_r0_c0.png")]
    assert {p.name: p.read_bytes() for p in (first / "model.safetensors", first / "model.json")} == before
    tuned = json.loads((second / "model.json").read_text())
    assert tuned["init_checkpoint"]["sha256"] == card["sha256"] and tuned["sha256"] != card["sha256"]
    assert np.isfinite(tuned["metrics"]["best"]["train_loss"])
    assert tuned["config"] == card["config"]
    assert tuned["objects"] == card["objects"], "a fine-tune keeps its parent's object settings"
    assert tuned["flips"] is True, "and its test-time flips"
    assert f"1 training pairs from {corr}" in tuned["training_data"]
    load_checkpoint(second / "model.safetensors")
    # an export over the initial checkpoint is refused before training
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    result = CliRunner().invoke(
        app, ["train", str(RECIPES / "glas_tiny.yaml"), "--out", str(first), "--no-resume", "--set", init]
    )
    assert result.exit_code == 2 and "is an input of this run" in result.output  # refused before training starts
    assert {p.name: p.read_bytes() for p in (first / "model.safetensors", first / "model.json")} == before


def test_bundled_glas_model_card_tells_the_truth_and_the_model_segments(shared_data):
    """The shipped pathsam2-glas-small checkpoint: its card carries the cross-validated numbers of
    benchmarks/segment_glas/cv_results.json (cv.py: each model at its recipe's object settings) and
    cv_objects.json (objects_select.py on the same fold maps: object settings cross-selected) beside the
    baseline's, and the model segments glands.

    The bundled model is trained on all 85 GlaS images (the held-out estimate is the cross-validation
    on the card), so the Dice here, on four of its training images, is a check that the weights
    shipped are the trained ones, not a quality claim."""
    import json

    import torch
    import yaml

    from napari_pathfm.models.checkpoint import load_checkpoint
    from napari_pathfm.training.segment_data import mask_to_classes, read_mask, read_rgb, resize
    from napari_pathfm.training.segment_predict import predict_image

    root = _glas(shared_data)
    path = REPO / "src" / "napari_pathfm" / "data" / "models" / "pathsam2-glas-small.safetensors"
    model, card = load_checkpoint(path)
    assert card["family"] == "segment" and card["classes"] == ["background", "gland"] and card["input_mpp"] == 0.62
    assert "research use only" in card["licence"] and len(card["split"]["train"]) == 85 and not card["split"]["val"]
    assert path.stat().st_size <= 20 * 2**20
    here = REPO / "benchmarks" / "segment_glas"
    report = json.loads((here / "cv_results.json").read_text(encoding="utf-8"))  # cv.py on the fold models
    chosen = json.loads((here / "cv_objects.json").read_text(encoding="utf-8"))  # objects_select.py on their maps
    ev, crossed = card["evaluation"], [chosen["models"][m]["cross_selected"]["cv"] for m in ("pathsam2", "unet")]
    if "cv_cross_selected_objects" in ev:  # bundle.py --headline shipped: each model at its recipe's objects
        assert ev["cv"] == report["models"]["pathsam2"]["default"]["cv"]
        assert ev["baseline"]["cv"] == report["models"]["unet"]["default"]["cv"]
        assert [ev["cv_cross_selected_objects"], ev["baseline"]["cv_cross_selected_objects"]] == crossed
    else:  # the headline is the cross-selected estimate
        assert [ev["cv"], ev["baseline"]["cv"]] == crossed
        assert ev["cv_shipped_objects"] == report["models"]["pathsam2"]["default"]["cv"]
    recipe = yaml.safe_load((REPO / "training" / "pathsam2" / "glas_cpu.yaml").read_text())
    loss = card["recipe"]["loss"]  # the resolved recipe: the file's keys plus the defaults
    assert {k: loss.get(k) for k in recipe["loss"]} == recipe["loss"], "trained with the recipe's loss"
    best = chosen["models"]["pathsam2"]["best"]  # what `pathfm segment` does by default
    assert {k: card["objects"][k] for k in best} == best
    steps = card["recipe"]["trainer"]["step_budget"]  # the bundled model trained as long as each fold model
    assert [t["steps"] for t in report["models"]["pathsam2"]["training"]] == [steps] * 5
    prompt_recipe = yaml.safe_load((REPO / "training" / "pathsam2" / "glas_cpu_prompts.yaml").read_text())
    budget, words = prompt_recipe["trainer"], card["prompt_training"]["training_time"]  # the prompt path's budget
    held = json.loads((here / "prompt_results.json").read_text(encoding="utf-8"))  # prompt_eval.py, fold 0
    if budget.get("step_budget"):  # the steps the evaluated fold-0 prompt run took, repeated by the bundled one
        assert (
            words.startswith(f"{budget['step_budget']} steps") and held["prompt_model_steps"] == budget["step_budget"]
        )
        assert f"what {budget['cpu_budget_minutes']:g} CPU-minutes bought" in words
    else:
        assert words.startswith(f"{budget['cpu_budget_minutes']:g} CPU-minutes")
    assert card["prompt_evaluation"]["results"] == held["results"] and held["prompt_model_steps"] > 0
    for key in ("dice", "object_f1", "object_dice"):  # the words a user reads say the same
        assert f"{card['evaluation']['cv'][key]['mean']:.3f}" in card["evaluation"]["summary"], key
    assert (
        card["recipe"]["trainer"]["cpu_budget_minutes"]
        == report["models"]["pathsam2"]["training"][0]["cpu_budget_minutes"]
    )
    preds, targets = [], []
    for name in ("train_5", "train_10", "train_15", "train_20"):
        scale = 0.62 / card["input_mpp"]  # GlaS is 0.62 µm/px
        image = resize(read_rgb(root / "images" / f"{name}.png"), scale, labels=False)
        target = resize(mask_to_classes(read_mask(root / "masks" / f"{name}.png")), scale, labels=True)
        logits, _ = predict_image(model, torch.from_numpy(np.array(image)), card["tile_size"])
        preds.append(logits.argmax(0).numpy())
        targets.append(target)
    cm = sum(sm.confusion_matrix(p, t, 2) for p, t in zip(preds, targets))
    dice = sm.dice_iou(cm)[0][1]
    all_gland = sm.dice_iou(sum(sm.confusion_matrix(np.ones_like(t), t, 2) for t in targets))[0][1]
    assert dice > all_gland + 0.1, (dice, all_gland)
