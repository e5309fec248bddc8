"""HistoKT toolkit: standardisation, weight distillation, transfer grid and t-SNE on real H&E data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from napari_pathfm.errors import CheckpointError, RecipeError
from napari_pathfm.training.histokt.standardize import (
    image_mpp,
    is_low_contrast,
    reflect_pad,
    split_by_source,
    standardize,
)
from napari_pathfm.training.segment_data import tile_starts


def _png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _stem_of_crop(rel: str) -> str:
    return Path(rel).name.split("__y")[0]


# --- standardize: the rules ---------------------------------------------------------------------------------


def test_crop_grid_aligns_the_last_crop_to_the_edge():
    assert tile_starts(600, 272, 272) == [0, 272, 328]
    assert tile_starts(600, 272, 136) == [0, 136, 272, 328]
    assert tile_starts(272, 272, 136) == [0]
    assert tile_starts(100, 272, 272) == [0]


def test_reflect_pad_mirrors_small_images_up_to_the_crop():
    img = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    out = reflect_pad(img, 8)
    assert out.shape == (8, 8, 3)
    # centred: 1 row above, 2 below; the image sits unchanged in the middle, mirrored (edge repeated) around it
    np.testing.assert_array_equal(out[1:6, 2:5], img)
    np.testing.assert_array_equal(out[0, 2:5], img[0])  # symmetric mode repeats the edge row, then mirrors
    np.testing.assert_array_equal(out[6, 2:5], img[4])
    np.testing.assert_array_equal(out[7, 2:5], img[3])
    np.testing.assert_array_equal(out[1:6, 1], img[:, 0])
    tiny = reflect_pad(np.full((2, 2, 3), 7, np.uint8), 272)  # much smaller than the crop: reflects repeatedly
    assert tiny.shape == (272, 272, 3) and (tiny == 7).all()


def test_low_contrast_rule_is_5_percent_of_the_grey_range_between_5th_and_99th_percentile():
    ramp = lambda lo, hi: np.repeat(np.linspace(lo, hi, 100 * 100).reshape(100, 100, 1), 3, axis=2).astype(np.uint8)
    assert is_low_contrast(np.full((64, 64, 3), 240, np.uint8))  # blank glass
    assert is_low_contrast(ramp(100, 112))  # span ~11 grey levels < 12.75
    assert not is_low_contrast(ramp(100, 120))  # span ~19 > 12.75
    noisy = np.full((100, 100, 3), 200, np.uint8)
    noisy[:2] = 0  # 2 % dark outliers sit below the 5th percentile and do not count
    assert is_low_contrast(noisy)


def test_split_by_source_is_seeded_stratified_and_keeps_one_for_training():
    labels = ["a"] * 3 + ["b"] * 10 + ["c"] * 2 + ["d"]
    parts = split_by_source(labels, (0.7, 0.15, 0.15), seed=3)
    assert parts == split_by_source(labels, (0.7, 0.15, 0.15), seed=3)
    by = lambda lab: sorted(p for p, y in zip(parts, labels) if y == lab)
    assert by("a") == ["test", "train", "val"]
    assert by("b").count("val") == 2 and by("b").count("test") == 2 and by("b").count("train") == 6
    assert by("c") == ["test", "train"]
    assert by("d") == ["train"]


def test_image_mpp_reads_tiff_and_ome_resolution_and_ignores_screen_dpi(tmp_path):
    import tifffile

    img = np.zeros((16, 16, 3), np.uint8)
    tifffile.imwrite(tmp_path / "res.tif", img, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "ome.ome.tif", img, ome=True, metadata={"PhysicalSizeX": 0.5, "axes": "YXS"})
    tifffile.imwrite(tmp_path / "dpi.tif", img, resolution=(72, 72), resolutionunit="INCH")
    _png(tmp_path / "plain.png", img)
    assert image_mpp(tmp_path / "res.tif") == pytest.approx(0.25)
    assert image_mpp(tmp_path / "ome.ome.tif") == pytest.approx(0.5)
    assert image_mpp(tmp_path / "dpi.tif") is None
    assert image_mpp(tmp_path / "plain.png") is None


# --- standardize: real data ----------------------------------------------------------------------------------


def test_standardize_kather_reflection_wraps_drops_blank_tiles_and_splits_by_image(shared_data, tmp_path):
    dst = tmp_path / "k16"
    seen = []
    info = standardize(shared_data / "crc-tiles/kather2016", dst, mpp=0.495, progress=lambda d, t, m: seen.append(d))
    assert seen[-1] == 24
    # 150 px at 0.495 um/px -> 74 px at 1.0 um/px, smaller than 272: every image is reflection-wrapped, 1 crop
    assert info["totals"]["padded_images"] == 24
    assert info["classes_without_crops"] == ["08_EMPTY"]  # blank glass: every crop low-contrast
    assert not (dst / "08_EMPTY").exists()
    split = json.loads((dst / "split.json").read_text())
    files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png"))
    assert sorted(split["train"] + split["val"] + split["test"]) == files
    assert len(files) == 21 and all(len(split[p]) == 7 for p in ("train", "val", "test"))  # 1/1/1 per class
    from PIL import Image

    with Image.open(dst / files[0]) as im:
        assert im.size == (272, 272)
    card = json.loads((dst / "standardize.json").read_text())
    assert card["target_mpp"] == 1.0 and card["crop"] == 272 and card["source_mpp"] == 0.495
    with pytest.raises(RecipeError, match="not empty"):
        standardize(shared_data / "crc-tiles/kather2016", dst, mpp=0.495)


def test_standardize_without_known_mpp_names_the_file_and_asks_for_mpp(shared_data, tmp_path):
    with pytest.raises(RecipeError, match=r"01_TUMOR.*no known µm/px.*--mpp"):
        standardize(shared_data / "crc-tiles/kather2016", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_standardize_refuses_empty_class_folders(tmp_path):
    _png(tmp_path / "src/a/1.png", np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (tmp_path / "src/b").mkdir()
    with pytest.raises(RecipeError, match=r"src/b: class 'b' contains no images"):
        standardize(tmp_path / "src", tmp_path / "dst", mpp=1.0)


def test_standardize_cancel_leaves_nothing(shared_data, tmp_path):
    from napari_pathfm.errors import Cancelled

    with pytest.raises(Cancelled):
        standardize(shared_data / "crc-tiles/kather2016", tmp_path / "out", mpp=0.495, cancel=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_transfer_recipes_say_what_trains(monkeypatch):
    from napari_pathfm.training.histokt.transfer import default_recipe_dir
    from napari_pathfm.training.recipes import load_recipe

    monkeypatch.setenv("HISTOKT_SOURCE_CHECKPOINT", "/src/model.safetensors")
    monkeypatch.setenv("PATHFM_RESNET18_WEIGHTS", "/w/resnet18.safetensors")
    expect = {
        "scratch": ("all", None),
        "finetune": ("head", "/src/model.safetensors"),
        "deeptune": ("all", "/src/model.safetensors"),
        "twostage_source": ("all", "/w/resnet18.safetensors"),
        "twostage_target": ("all", "/src/model.safetensors"),
    }
    for name, (trainable, weights) in expect.items():
        for suffix in ("", "_tiny"):
            r = load_recipe(default_recipe_dir() / f"{name}{suffix}.yaml")
            assert r.get("family") == "classify" and r.get("optim.trainable") == trainable, name
            assert r.get("model.weights") == weights, name
            assert r.get("model.backbone") == ("resnet10t" if suffix else "resnet18")


def test_standardize_csv_with_overlap_on_nct_tiles(shared_data, tmp_path):
    rows = [(p, p.name.split("-")[0]) for p in sorted((shared_data / "crc-tiles/nct-crc-he").glob("*.tif"))]
    with open(tmp_path / "nct.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    info = standardize(tmp_path / "nct.csv", tmp_path / "nct", mpp=0.5, crop=64, overlap=True)
    # 224 px at 0.5 -> 112 px at 1.0; stride 32: offsets 0, 32 and the edge-aligned 48 -> 9 crops per image
    assert info["stride"] == 32 and info["totals"]["padded_images"] == 0
    tum = sorted(p.name for p in (tmp_path / "nct/TUM").glob("*.png"))
    assert tum == sorted(f"TUM-AACHEHDV__y{y}_x{x}.png" for y in (0, 32, 48) for x in (0, 32, 48))
    assert info["totals"]["crops"] + info["totals"]["dropped_low_contrast"] == 81
    assert info["split_by"] == "image"  # one image per class: every image trains
    assert json.loads((tmp_path / "nct/split.json").read_text())["test"] == []


def _glas_source(shared_data: Path, tmp_path: Path, images: list[str]) -> Path:
    """A gland / non-gland CSV from GlaS masks (helper module glas_tiles), grouped by GlaS image."""
    glas_tiles = pytest.importorskip("napari_pathfm.training.glas_tiles")
    info = glas_tiles.build_glas_tiles(shared_data / "glas/train", tmp_path / "glas_tiles", images=images)
    path = tmp_path / "glas.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for r in info["tiles"]:
            w.writerow([tmp_path / "glas_tiles" / r["file"], r["label"], r["image"]])
    return path


def test_standardize_glas_groups_keep_every_glas_image_in_one_split(shared_data, tmp_path):
    names = [f"train_{i}" for i in range(1, 9)]
    info = standardize(_glas_source(shared_data, tmp_path, names), tmp_path / "glas", mpp=0.62)
    split = json.loads((tmp_path / "glas/split.json").read_text())
    part_of_image: dict[str, set] = {}
    for part, files in split.items():
        for rel in files:
            part_of_image.setdefault(_stem_of_crop(rel).split("_y")[0], set()).add(part)
    assert len(part_of_image) == 8 and all(len(p) == 1 for p in part_of_image.values())
    assert info["totals"]["padded_images"] == info["totals"]["images"]  # 224 px at 0.62 -> 139 px < 272


# --- distill ------------------------------------------------------------------------------------------------


def _save(tmp_path: Path, name: str, backbone: str = "test_resnet", num_classes: int = 3, seed: int = 0) -> Path:
    import torch

    from napari_pathfm.models import create_model, save_checkpoint

    torch.manual_seed(seed)
    model = create_model("timm_classifier", backbone=backbone, num_classes=num_classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return save_checkpoint(model, tmp_path / name, {"classes": [f"c{i}" for i in range(num_classes)]})


def test_distilling_a_model_with_itself_gives_it_back(tmp_path):
    import torch

    from napari_pathfm.models import load_checkpoint
    from napari_pathfm.training.histokt.distill import distill_checkpoints

    a = _save(tmp_path, "a")
    out = distill_checkpoints([a, a, a], tmp_path / "self")
    ref, _ = load_checkpoint(a)
    got, card = load_checkpoint(out)
    for (k, v), w in zip(ref.state_dict().items(), got.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-5, rtol=1e-5), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(got(x), ref(x), atol=1e-4, rtol=1e-4)
    assert len(card["distilled_from"]) == 3 and card["classes"] == ["c0", "c1", "c2"]


def test_distill_matrix_matches_the_svd_formula():
    import torch

    from napari_pathfm.training.histokt.distill import distill_matrix

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(6, 20, generator=g, dtype=torch.float64) for _ in range(2))
    m = torch.cat([a, b])
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    v = vh[:6].T
    expected = (m @ v @ v.T).reshape(2, 6, 20).mean(0)
    torch.testing.assert_close(distill_matrix([a, b]), expected)
    torch.testing.assert_close(distill_matrix([a, a]), a)
    c, d = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    torch.testing.assert_close(distill_matrix([c, d]), (c + d) / 2)  # k < n_out: nothing to drop


def test_distill_refuses_other_architectures_and_class_counts_without_drop_head(tmp_path):
    from napari_pathfm.training.histokt.distill import distill_checkpoints

    a, b = _save(tmp_path, "a"), _save(tmp_path, "b18", backbone="resnet10t")
    with pytest.raises(CheckpointError, match=r"b18\.safetensors: has a different architecture.*backbone"):
        distill_checkpoints([a, b], tmp_path / "x")
    c = _save(tmp_path, "c5", num_classes=5, seed=1)
    with pytest.raises(CheckpointError, match=r"c5\.safetensors: .*other shapes.*--drop-head"):
        distill_checkpoints([a, c], tmp_path / "x")
    out = distill_checkpoints([a, c], tmp_path / "x", drop_head=True)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["distillation"]["head_from_first"] == ["fc.bias", "fc.weight"]


# --- transfer grid, distillation of transferred models, t-SNE ------------------------------------------------


@pytest.fixture(scope="module")
def grid(shared_data, tmp_path_factory):
    """Two standardised real data sets and a finished 2x2 transfer grid.

    Tiny recipes with timm's test_resnet at 32 px, 1 epoch.
    """
    from napari_pathfm.training.histokt.transfer import transfer_matrix

    tmp = tmp_path_factory.mktemp("histokt")
    standardize(shared_data / "crc-tiles/kather2016", tmp / "kather2016", mpp=0.495)
    standardize(_glas_source(shared_data, tmp, [f"train_{i}" for i in range(1, 5)]), tmp / "glas", mpp=0.62)
    datasets = [tmp / "kather2016", tmp / "glas"]
    overrides = ["data.image_size=32", "model.backbone=test_resnet"]
    opts = {"mode": "deeptune", "tiny": True, "epochs": 1, "overrides": overrides, "device": "cpu"}
    result = transfer_matrix(datasets, tmp / "tm", **opts)
    return tmp, datasets, result, opts


def test_transfer_matrix_writes_the_table_and_resumes(grid):
    from napari_pathfm.training.histokt.transfer import transfer_matrix

    tmp, datasets, result, opts = grid
    with open(result.csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["source\\target", "kather2016", "glas"]
    assert [r[0] for r in rows[1:]] == ["kather2016", "glas"]
    assert all(0.0 <= float(v) <= 1.0 for r in rows[1:] for v in r[1:])
    assert result.png.stat().st_size > 1000
    info = json.loads(result.json.read_text())
    assert set(info["runs"]["kather2016"]) == {"kather2016", "glas"}
    card = json.loads((Path(info["runs"]["kather2016"]["glas"]) / "model.json").read_text())
    assert card["classes"] == ["gland", "non_gland"] and "test" in card["metrics"]
    again = transfer_matrix(datasets, tmp / "tm", **opts)  # every run finished: nothing retrains
    assert len(again.skipped) == 4 and again.accuracy == result.accuracy
    with pytest.raises(RecipeError, match=r"kather2016__scratch/result.json: was trained with other settings"):
        transfer_matrix(datasets, tmp / "tm", **{**opts, "epochs": 2})


def test_distilling_two_trained_models_gives_a_working_model(shared_data, tmp_path):
    """Two models of one ancestry (B = A trained on), as HistoKT distils transferred models; real kather tiles."""
    import torch
    import torch.nn.functional as F

    from napari_pathfm.models import create_model, load_checkpoint, save_checkpoint
    from napari_pathfm.training.datasets import ClassFolderDataset, classify_transforms
    from napari_pathfm.training.histokt.distill import distill_checkpoints

    root = tmp_path / "k16"
    standardize(shared_data / "crc-tiles/kather2016", root, mpp=0.495)
    data = ClassFolderDataset(root, transform=classify_transforms(32, False))
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    card = {"classes": data.classes, "tile_size": 32}

    def train(model, steps, seed):
        torch.manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            flip = torch.rand(len(x)) < 0.5
            xb = torch.where(flip[:, None, None, None], x.flip(-1), x)
            opt.zero_grad()
            F.cross_entropy(model(xb), y).backward()
            opt.step()
        return model.eval()

    def accuracy(model):
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()

    torch.manual_seed(0)
    a = train(create_model("timm_classifier", backbone="test_resnet", num_classes=len(data.classes)), 40, 0)
    pa = save_checkpoint(a, tmp_path / "a", card)
    b = train(load_checkpoint(pa)[0], 15, 1)
    pb = save_checkpoint(b, tmp_path / "b", card)
    out = distill_checkpoints([pa, pb], tmp_path / "ab")
    merged, merged_card = load_checkpoint(out)
    chance = 1 / len(data.classes)
    acc_a, acc_b, acc = accuracy(a), accuracy(b), accuracy(merged)
    assert min(acc_a, acc_b) > 2 * chance  # both parents learned something
    assert acc > chance, (acc_a, acc_b, acc)
    assert not torch.allclose(merged.state_dict()["conv1.0.weight"], a.state_dict()["conv1.0.weight"])
    assert [d["path"] for d in merged_card["distilled_from"]] == [str(pa.resolve()), str(pb.resolve())]


def test_tsne_plot_of_encoder_features(grid):
    from napari_pathfm.training.histokt.tsne import tsne_plot

    tmp, datasets, result, _ = grid
    ckpt = Path(result.runs["glas"]["glas"]) / "model.safetensors"
    png = tsne_plot(ckpt, datasets, tmp / "tsne.png", split="all", device="cpu")
    assert png.stat().st_size > 1000
    with open(png.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["dataset"] for r in rows} == {"kather2016", "glas"}
    assert sum(r["dataset"] == "kather2016" for r in rows) == 21


def test_transfer_matrix_refuses_a_class_without_training_images(grid):
    from napari_pathfm.training.histokt.transfer import check_standardized

    tmp, datasets, _, _ = grid
    bad = tmp / "bad"
    import shutil

    shutil.copytree(datasets[0], bad)
    split = json.loads((bad / "split.json").read_text())
    split["val"] += [p for p in split["train"] if p.startswith("01_TUMOR/")]
    split["train"] = [p for p in split["train"] if not p.startswith("01_TUMOR/")]
    (bad / "split.json").write_text(json.dumps(split))
    with pytest.raises(RecipeError, match=r"classes \['01_TUMOR'\] no training images"):
        check_standardized(bad)
    (bad / "09_NEW").mkdir()
    with pytest.raises(RecipeError, match="09_NEW: is an empty class folder"):
        check_standardized(bad)


def test_cli_reports_missing_mpp_and_wrong_architecture(shared_data, tmp_path):
    from napari_pathfm.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["standardize", str(shared_data / "crc-tiles/kather2016"), str(tmp_path / "o")])
    assert res.exit_code == 2 and "--mpp" in res.output
    a, b = _save(tmp_path, "a"), _save(tmp_path, "b", backbone="resnet10t")
    res = runner.invoke(app, ["distill", str(a), str(b), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "different architecture" in res.output
