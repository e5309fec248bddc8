"""Patch features for MIL: extractors, the zarr feature file, resumable slide runs, bad files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from napari_pathfm.errors import Cancelled, CheckpointError, FeatureError
from napari_pathfm.io.features import create_feature_store
from napari_pathfm.pipelines.features import (
    PATCH_ORDER,
    check_feature_dim,
    extract_features,
    feature_path,
    read_features,
    write_features,
)
from napari_pathfm.pipelines.features_many import extract_features_many, features_command

COARSE = {"mpp": 2.0, "tile_size": 64, "device": "cpu", "batch_size": 16}


def test_import_does_not_import_torch():
    code = textwrap.dedent("""
        import sys
        import napari_pathfm.pipelines.features, napari_pathfm.io.features
        from napari_pathfm.models import list_models, model_info
        assert list_models(family="features") == ["resnet50_trunc", "timm_features"], list_models()
        assert model_info("resnet50_trunc")["default_cfg"]["backbone"] == "resnet50"
        heavy = [m for m in ("torch", "timm", "torchvision", "zarr") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.fixture(scope="module")
def small_extractor():
    from napari_pathfm.models import create_model

    return create_model("timm_features", backbone="resnet10t", input_size=0)


@pytest.fixture(scope="module")
def cmu_bag(cmu_small, small_extractor, tmp_path_factory):
    out = tmp_path_factory.mktemp("feat") / "cmu.features.zarr"
    return extract_features(cmu_small, small_extractor, out, **COARSE)


def test_feature_file_layout_and_attrs(cmu_bag, cmu_small):
    import zarr

    from napari_pathfm.io import open_slide
    from napari_pathfm.pipelines.tissue_tiles import compute_tissue_tiles

    group = zarr.open_group(str(cmu_bag), mode="r")
    feats, coords = group["features"], group["coords"]
    assert group.metadata.zarr_format == 3
    assert feats.dtype == np.float32 and coords.dtype == np.int64
    assert feats.shape[1] == 512 and coords.shape == (feats.shape[0], 2) and feats.shape[0] > 10
    assert feats.chunks[1] == 512
    a = dict(group.attrs)
    with open_slide(cmu_small) as slide:
        grid = compute_tissue_tiles(slide, tile_size=64, mpp=2.0, min_tissue=0.25).grid
        assert a["slide_signature"] == slide.signature().key()
    np.testing.assert_array_equal(coords[:], grid.tiles)
    assert a["complete"] is True and a["patch_order"] == PATCH_ORDER
    assert a["slide"] == str(cmu_small) and a["tile_size"] == 64 and a["target_mpp"] == 2.0
    assert a["mpp"] == pytest.approx(grid.mpp) and a["level"] == grid.level and a["read_size"] == grid.read_size
    assert a["level0_tile_size"] == pytest.approx(grid.level0_size)
    assert (a["extractor"], a["backbone"], a["feature_dim"]) == ("timm_features", "resnet10t", 512)
    assert a["weights"] is None and a["weights_sha256"] is None and a["pathfm_version"]
    bag = read_features(cmu_bag)
    order = np.lexsort((bag.coords[:, 1], bag.coords[:, 0]))
    np.testing.assert_array_equal(order, np.arange(len(bag)))  # row-major


def test_features_equal_direct_extractor_on_read_tile(cmu_bag, cmu_small, small_extractor):
    import torch

    from napari_pathfm.io import open_slide
    from napari_pathfm.pipelines.tissue_tiles import compute_tissue_tiles
    from napari_pathfm.tiles import read_tile

    bag = read_features(cmu_bag)
    with open_slide(cmu_small) as slide:
        grid = compute_tissue_tiles(slide, tile_size=64, mpp=2.0).grid
        for i in (0, len(grid) // 2, len(grid) - 1):
            with torch.inference_mode():
                direct = small_extractor(read_tile(slide, grid, i)).numpy()[0]
            np.testing.assert_allclose(bag.features[i], direct, rtol=1e-4, atol=1e-4)


def test_resume_skips_finished_slides_and_recomputes_on_new_mpp(cmu_small, small_extractor, tmp_path):
    calls = []
    hook = small_extractor.trunk.register_forward_hook(lambda *a: calls.append(1))
    opts = {**COARSE, "cache": False}  # the feature files' own resume logic, without the embedding cache
    try:
        out = feature_path(tmp_path, cmu_small)
        create_feature_store(out, 3, 512, {})  # an interrupted earlier run: redone
        first = extract_features_many([cmu_small], tmp_path, extractor=small_extractor, **opts)
        assert first == {str(cmu_small): out} and calls
        stamp = os.stat(out / "zarr.json").st_mtime_ns
        calls.clear()
        again = extract_features_many(cmu_small, tmp_path, extractor=small_extractor, **opts)
        assert again == first and not calls and os.stat(out / "zarr.json").st_mtime_ns == stamp
        n_before = len(read_features(out))
        extract_features_many(cmu_small, tmp_path, extractor=small_extractor, **{**opts, "mpp": 4.0})
        assert calls
        bag = read_features(out)
        assert bag.attrs["target_mpp"] == 4.0 and len(bag) < n_before
    finally:
        hook.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_cancel_midway_leaves_no_output(cmu_small, small_extractor, tmp_path):
    stop = threading.Event()
    seen = []

    def progress(done, total, message=""):
        seen.append((done, total, message))
        if "features" in message and done >= 16:
            stop.set()

    with pytest.raises(Cancelled):
        extract_features_many(
            [cmu_small], tmp_path / "out", extractor=small_extractor, progress=progress, cancel=stop, **COARSE
        )
    assert any(m.startswith("[1/1]") for _, _, m in seen)
    assert list((tmp_path / "out").iterdir()) == []


def test_folder_run_reports_failing_slide_and_finishes_others(wsi_dir, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("CMU-1-Small-Region.svs", "unreadable.svs"):
        (folder / name).symlink_to(wsi_dir / name)
    (folder / "notes.txt").write_text("not a slide")
    summary = features_command(folder, tmp_path / "out", backbone="resnet10t", mpp=2.0, tile=64, device="cpu")
    slides = summary["slides"]
    assert len(slides) == 2 and summary["counts"]["failed"] == 1
    bad, good = slides[str(folder / "unreadable.svs")], slides[str(folder / "CMU-1-Small-Region.svs")]
    assert bad["status"] == "failed" and "unreadable.svs" in bad["error"] and bad["path"] is None
    assert good["status"] == "written" and good["n_tiles"] > 10
    bag = read_features(good["path"])
    assert bag.attrs["input_size"] == 176 and bag.dim == 512  # resnet10t's own input size
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["CMU-1-Small-Region.features.zarr"]


def test_plain_png_without_pixel_size(shared_data, small_extractor, tmp_path):
    png = shared_data / "glas" / "train" / "images" / "train_1.png"
    out = extract_features(png, small_extractor, tmp_path / "g.features.zarr", tile_size=128, device="cpu")
    bag = read_features(out)
    assert bag.attrs["mpp"] is None and bag.attrs["level"] == 0 and bag.attrs["level0_tile_size"] == 128.0
    assert len(bag) > 0 and (bag.coords % 128 == 0).all() and bag.dim == 512


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A resnet50 state dict in timm/torchvision key format with random values, fc included."""
    import timm
    import torch

    g = torch.Generator().manual_seed(0)
    sd = timm.create_model("resnet50", pretrained=False, num_classes=1000).state_dict()
    sd = {
        k: (torch.randn(v.shape, generator=g) * 0.05 + (1.0 if "running_var" in k else 0.0)).abs()
        if v.is_floating_point()
        else v
        for k, v in sd.items()
    }
    path = tmp_path_factory.mktemp("w") / "resnet50_imagenet.pth"
    torch.save(sd, path)
    return path, sd


def test_resnet50_trunc_loads_weights_and_extracts_1024d(resnet50_file, cmu_small, tmp_path):
    from napari_pathfm.models import create_model

    path, sd = resnet50_file
    ex = create_model("resnet50_trunc", weights=str(path))
    assert (ex.out_dim, ex.input_size, ex.mean) == (1024, 224, (0.485, 0.456, 0.406))
    assert ex.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "weights" not in ex.pathfm_config
    report = ex.load_report
    assert not report.missing and not report.mismatched and len(report.loaded) == report.total
    assert {k.split(".")[0] for k in report.unexpected} == {"layer4", "fc"}
    assert "layer3.5.bn3.running_var" in report.loaded
    np.testing.assert_array_equal(ex.trunk.layer3[5].bn3.running_var.numpy(), sd["layer3.5.bn3.running_var"].numpy())
    out = extract_features(cmu_small, ex, tmp_path / "r.features.zarr", mpp=8.0, tile_size=112, device="cpu")
    bag = read_features(out)
    assert bag.dim == 1024 and 0 < len(bag) <= 4
    assert bag.attrs["weights_sha256"] == ex.weights_sha256 and bag.attrs["weights"] == str(path)
    assert (bag.attrs["extractor"], bag.attrs["backbone"], bag.attrs["input_size"]) == (
        "resnet50_trunc",
        "resnet50",
        224,
    )


def test_torchvision_safetensors_weights_and_wrong_file(tmp_path):
    import torch
    import torchvision
    from safetensors.torch import save_file

    from napari_pathfm.models.feature_extractor import resnet50_trunc

    tv = torchvision.models.resnet50(weights=None).state_dict()
    tv_path = tmp_path / "tv.safetensors"
    save_file({k: v.contiguous() for k, v in tv.items()}, str(tv_path))
    ex = resnet50_trunc(weights=tv_path)
    assert ex.load_report.loaded and not ex.load_report.missing
    torch.testing.assert_close(ex.trunk.conv1.weight, tv["conv1.weight"])
    r18 = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    with pytest.raises(CheckpointError, match=r"(?s)r18\.pth.*does not fit.*wrong shape"):  # a multi-line table
        resnet50_trunc(weights=r18)


def test_extractor_preprocess_and_other_backbones():
    import torch

    from napari_pathfm.models.feature_extractor import resnet50_trunc, timm_features

    vit = timm_features("vit_tiny_patch16_224")
    assert (vit.out_dim, vit.input_size, vit.mean) == (192, 224, (0.5, 0.5, 0.5))
    tiles = np.full((2, 100, 100, 3), 255, np.uint8)
    x = vit.preprocess(tiles)
    assert x.shape == (2, 3, 224, 224) and torch.allclose(x, torch.ones_like(x))
    with torch.inference_mode():
        assert vit(tiles).shape == (2, 192)
    with pytest.raises(ValueError, match="uint8"):
        vit.preprocess(tiles.astype(np.float32))
    with pytest.raises(ValueError, match="timm_features"):
        resnet50_trunc("vit_tiny_patch16_224")


def _raw(path, feats, coords, attrs):
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("features", data=np.asarray(feats, np.float32))
    g.create_array("coords", data=np.asarray(coords, np.int64))
    g.attrs.update(attrs)
    return path


def test_read_features_errors_name_the_file(tmp_path):
    import zarr

    coords = [[0, 0], [0, 8], [8, 0]]
    good = write_features(tmp_path / "good.features.zarr", np.ones((3, 4)), coords, {"backbone": "resnet10t"})
    bag = read_features(good)
    assert bag.features.shape == (3, 4) and bag.attrs["complete"] and bag.attrs["patch_order"] == PATCH_ORDER
    cases = {
        "missing.features.zarr": ("does not exist", None),
        "plain": ("not a patch-feature file", lambda p: p.mkdir()),
        "group_only.zarr": ("no 'features' and 'coords'", lambda p: zarr.open_group(str(p), mode="w")),
        "partial.zarr": ("(?i)interrupted.*run pathfm features again", lambda p: create_feature_store(p, 3, 4, {})),
        "mismatch.zarr": (
            "3 feature rows but 2 coordinates",
            lambda p: _raw(p, np.ones((3, 4)), coords[:2], {"complete": True}),
        ),
        "nan.zarr": (
            "NaN or infinite features in 1 of 3 patches .*row 1",
            lambda p: _raw(p, [[0.0] * 4, [np.nan, 0, np.inf, 0], [1.0] * 4], coords, {"complete": True}),
        ),
        "empty.zarr": (
            "no tissue tiles.*lower --min-tissue",
            lambda p: write_features(p, np.zeros((0, 4)), np.zeros((0, 2)), {"min_tissue": 0.25}),
        ),
    }
    for name, (message, make) in cases.items():
        path = tmp_path / name
        if make:
            make(path)
        with pytest.raises(FeatureError, match=message) as err:
            read_features(path)
        assert str(path) in str(err.value)
    with pytest.raises(FeatureError, match="NaN"):
        write_features(tmp_path / "w.zarr", [[np.nan, 1.0]], [[0, 0]])
    with pytest.raises(FeatureError, match="do not match"):
        write_features(tmp_path / "w.zarr", np.ones((2, 3)), [[0, 0]])
    assert not (tmp_path / "w.zarr").exists()
    check_feature_dim(bag, 4, "model.safetensors")
    with pytest.raises(FeatureError, match=r"4-d features \(from resnet10t\).*model\.safetensors expects 1024-d"):
        check_feature_dim(bag, 1024, "model.safetensors")
