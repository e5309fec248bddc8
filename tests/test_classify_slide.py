"""Slide classification, Grad-CAM and ``pathfm classify`` on the real CMU-1 slide, with a checkpoint
trained by the classify engine on the real Kather 2016 CRC tiles."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")

from napari_pathfm.errors import Cancelled, CheckpointError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "classify" / "crc_tiny.yaml"


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """resnet10t trained 1 epoch on the 8-class Kather tiles by the classify engine (seconds on a CPU)."""
    from napari_pathfm.training import run_recipe

    out = tmp_path_factory.mktemp("crc_tiny_classify")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATHFM_SHARED_DATA", str(shared_data))
        result = run_recipe(TINY, ["trainer.max_epochs=1"], output=out, progress=lambda *a: None, device="cpu")
    return result.checkpoint


@pytest.fixture(scope="module")
def slide(cmu_small):
    from napari_pathfm.io.slide import open_slide

    with open_slide(cmu_small) as s:
        yield s


@pytest.fixture(scope="module")
def result(slide, trained):
    from napari_pathfm.pipelines.classify import classify_slide

    return classify_slide(slide, trained, batch_size=16, device="cpu")


def test_result_matches_card_geometry_and_bare_model(slide, trained, result):
    from napari_pathfm.models import load_checkpoint
    from napari_pathfm.pipelines.classify import preprocess_tiles
    from napari_pathfm.tiles import read_tile

    model, card = load_checkpoint(trained)
    assert result.classes == card["classes"] and len(result.classes) == 8
    assert result.grid.tile_size == card["tile_size"] == 96
    assert result.model_mpp == pytest.approx(card["input_mpp"], rel=0.01)
    assert 0 < result.n_tiles < result.grid.grid_shape[0] * result.grid.grid_shape[1], "tissue tiles only"
    p = result.probabilities
    assert p.shape == (result.n_tiles, 8) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    # the same numbers as the bare model on the same tiles, normalised as the card says
    some = [0, result.n_tiles // 2, result.n_tiles - 1]
    tiles = np.stack([read_tile(slide, result.grid, i) for i in some])
    mean, std = card["normalization"]["mean"], card["normalization"]["std"]
    with torch.no_grad():
        bare = model(preprocess_tiles(tiles, "cpu", mean, std)).softmax(-1).numpy()
    np.testing.assert_allclose(p[some], bare, atol=1e-5)


def test_class_map_and_probability_maps_follow_the_tiles(result):
    cmap, pmaps = result.class_map, result.prob_maps
    assert cmap.shape == result.grid.grid_shape and pmaps.shape == (8, *result.grid.grid_shape)
    r, c = result.grid.tile_index.T
    np.testing.assert_array_equal(cmap[r, c], np.argmax(result.probabilities, axis=1) + 1)
    np.testing.assert_array_equal(cmap[r, c], np.argmax(pmaps[:, r, c], axis=0) + 1)
    background = np.ones(cmap.shape, bool)
    background[r, c] = False
    assert (cmap[background] == 0).all() and (pmaps[:, background] == 0).all()
    np.testing.assert_allclose(pmaps[:, r, c].sum(axis=0), 1.0, atol=1e-5)
    assert result.label_names()[0] == "background" and result.label_names()[1] == result.classes[0]
    assert sum(result.class_fractions().values()) == pytest.approx(1.0)


def test_layers_overlay_the_slide(slide, result):
    """A grid cell's centre in world units is the centre of its tile on the slide layer (scale mpp)."""
    scale, translate = result.transform()
    mpp, cell = slide.mpp, result.cell
    assert scale == pytest.approx((cell * mpp, cell * mpp))
    for i in (0, result.n_tiles - 1):
        (y, x), (r, c) = result.grid.tiles[i], result.grid.tile_index[i]
        cell_centre = np.array([r, c]) * scale + translate
        tile_centre = (np.array([y, x]) + cell / 2 - 0.5) * mpp  # level-0 pixel j is centred at j * mpp
        np.testing.assert_allclose(cell_centre, tile_centre, atol=mpp)
        assert result.tile_at(y + cell / 2, x + cell / 2) == i
    assert result.tile_at(-1, 0) is None
    everything = result.tiles_in_box(0, 0, *slide.shape)
    assert everything.tolist() == list(range(result.n_tiles))


def test_all_tiles_and_explicit_mpp(slide, trained):
    from napari_pathfm.pipelines.classify import classify_slide

    res = classify_slide(slide, trained, tissue_only=False, mpp=2.0, batch_size=64, device="cpu")
    assert res.n_tiles == res.grid.grid_shape[0] * res.grid.grid_shape[1]
    assert res.model_mpp == pytest.approx(2.0, rel=0.01) and (res.class_map > 0).all()


def test_cancel_raises_and_writes_nothing(slide, trained, result, tmp_path):
    from napari_pathfm.pipelines.classify import classify_slide, write_classify_outputs
    from napari_pathfm.pipelines.gradcam import write_top_gradcam

    cancel = threading.Event()
    seen = []

    def progress(done, total, msg=""):
        seen.append(done)
        if "classifying" in msg and done > 0:
            cancel.set()

    with pytest.raises(Cancelled):
        classify_slide(slide, trained, batch_size=8, device="cpu", progress=progress, cancel=cancel)
    assert max(seen) < result.n_tiles, "stopped between batches"
    out = tmp_path / "out"
    (out / "summary.json").parent.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's file stays as it was
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        write_classify_outputs(result, out, cancel=stop)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"] and (out / "summary.json").read_text() == "{}"
    with pytest.raises(Cancelled):
        write_top_gradcam(slide, result, trained, out / "gradcam", 1, device="cpu", cancel=stop)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"], "no Grad-CAM folder, no temporary left"


def test_wrong_family_checkpoints_are_refused(slide, tmp_path):
    from napari_pathfm.models import create_model, save_checkpoint
    from napari_pathfm.pipelines.classify import classify_slide

    mil = save_checkpoint(create_model("s4mil", in_dim=16, n_classes=2, d_model=8, d_state=4), tmp_path / "mil-s4")
    seg = save_checkpoint(
        create_model(
            "pathsam2",
            num_classes=2,
            encoder="hiera_micro",
            uni=None,
            image_size=64,
            decoder_dim=32,
            decoder_depth=1,
            decoder_heads=2,
            decoder_mlp_dim=64,
        ),
        tmp_path / "seg-pathsam2",
        {"classes": ["background", "gland"]},
    )
    for ckpt, family in ((mil, "mil"), (seg, "segment")):
        with pytest.raises(CheckpointError) as err:
            classify_slide(slide, ckpt, device="cpu")
        text = str(err.value)
        assert str(ckpt) in text and f"'{family}' checkpoint" in text and "'classify'" in text


def test_cli_writes_all_outputs(cmu_small, trained, result, tmp_path):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.io.ome_tiff import read_ome_tiff

    out = tmp_path / "classified"
    run = CliRunner().invoke(
        app,
        [
            "classify",
            str(cmu_small),
            "--checkpoint",
            str(trained),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--batch-size",
            "16",
            "--gradcam",
            "1",
        ],
    )
    assert run.exit_code == 0, run.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles"] == result.n_tiles and summary["classes"] == result.classes
    assert sum(summary["class_fractions"].values()) == pytest.approx(1.0)
    levels, mpp, meta = read_ome_tiff(out / "class-map.ome.tif")
    np.testing.assert_array_equal(levels[0], result.class_map)
    assert mpp == pytest.approx(result.mpp * result.cell, rel=1e-4)
    assert meta["is_labels"] and meta["class_names"][1] == result.classes[0] and meta["class_names"][0] == "background"
    probs, _, pmeta = read_ome_tiff(out / "probabilities.ome.tif")
    np.testing.assert_allclose(probs[0], result.prob_maps, atol=1e-6)
    assert pmeta["channel_names"] == result.classes
    rows = (out / "tiles.csv").read_text().splitlines()
    assert len(rows) == result.n_tiles + 1 and rows[0].split(",")[:8] == [
        "index",
        "row",
        "col",
        "y0",
        "x0",
        "size0",
        "class",
        "label",
    ]
    geo = json.loads((out / "tiles.geojson").read_text())
    assert {f["properties"]["classification"]["name"] for f in geo["features"]} <= set(result.classes)
    pngs = sorted((out / "gradcam").glob("*.png"))
    assert len(pngs) == 8, "one top tile per class"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary folder left"


def test_cli_refuses_a_mil_checkpoint(cmu_small, tmp_path):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.models import create_model, save_checkpoint

    mil = save_checkpoint(create_model("meanpool", in_dim=16, n_classes=2, d_model=8), tmp_path / "mil")
    run = CliRunner().invoke(app, ["classify", str(cmu_small), "-c", str(mil), "-o", str(tmp_path / "o")])
    assert run.exit_code == 2 and "not a tile classifier" in run.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_gradcam_maps_are_placed_and_differ_between_classes(slide, trained, result):
    from napari_pathfm.models import load_checkpoint
    from napari_pathfm.pipelines.gradcam import gradcam_images, gradcam_tiles

    model = load_checkpoint(trained)  # (model, card), loaded once
    some = [0, 5, result.n_tiles - 1]
    a = gradcam_tiles(slide, result, model, some, target=0, device="cpu")
    t = result.grid.tile_size
    assert a.heat.shape == (3, t, t) and a.heat.dtype == np.float32 and a.images.shape == (3, t, t, 3)
    # every class for the same tiles in one batch
    tiles = np.concatenate([a.images] * 8)
    targets = np.repeat(np.arange(8), 3)
    heats = gradcam_images(
        model[0],
        tiles,
        targets,
        mean=model[1]["normalization"]["mean"],
        std=model[1]["normalization"]["std"],
        batch_size=24,
    ).reshape(8, 3, t, t)
    np.testing.assert_allclose(heats[0], a.heat, atol=1e-5)
    assert heats.min() >= 0 and heats.max() <= 1
    # a map is scaled to [0, 1] per tile, or all 0 where the class has no positive evidence (ReLU)
    peaks = heats.max(axis=(2, 3))
    assert np.all((peaks > 0.99) | (peaks == 0))
    live = [k for k in range(8) if (peaks[k] > 0.99).all()]
    assert len(live) >= 2, f"a 1-epoch model still has evidence for a few classes, got {live}"
    assert np.abs(heats[live[0]] - heats[live[1]]).mean() > 0.01, "maps for different classes differ"
    assert a.empty_tiles() == [i for i, p in zip(some, peaks[0]) if p == 0]
    default = gradcam_tiles(slide, result, model, some, device="cpu")
    np.testing.assert_array_equal(default.targets, result.predicted[some])
    image, scale, translate = a.mosaic()
    rows, cols = result.grid.tile_index[some].T
    assert image.shape == ((rows.max() - rows.min() + 1) * t, (cols.max() - cols.min() + 1) * t)
    # the mosaic's first pixel sits on the first pixel of the top-left tile of the bounding box
    px = slide.mpp * result.grid.scale
    assert scale == pytest.approx((px, px))
    corner = np.array([rows.min(), cols.min()]) * result.cell
    np.testing.assert_allclose(translate, (corner + (result.grid.scale - 1) / 2) * slide.mpp, atol=1e-6)
    capped = gradcam_tiles(slide, result, model, range(result.n_tiles), max_tiles=4, device="cpu")
    assert len(capped.indices) == 4 and capped.capped == result.n_tiles - 4


def test_gradcam_target_layers_for_vit_and_slca():
    """Token activations (ViT) are folded to a map; the slca model names its own target layer."""
    import timm

    from napari_pathfm.models import create_model, list_models
    from napari_pathfm.pipelines.gradcam import default_target_layers, gradcam_images

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3, pretrained=False)
    layers, _ = default_target_layers(vit)
    assert layers[0] is vit.blocks[-1].norm1
    heat = gradcam_images(vit, images, [0, 2], mean=(0.5,) * 3, std=(0.25,) * 3)
    assert heat.shape == (2, 64, 64) and 0 <= heat.min() and heat.max() <= 1 and heat.max() > 0.99
    res = create_model("timm_classifier", backbone="resnet10t", num_classes=3)
    assert default_target_layers(res)[0][0] is res.layer4
    if "slca" in list_models():
        torch.manual_seed(0)
        slca = create_model(
            "slca",
            backbone="resnet10t",
            num_classes=3,
            sam_img_size=64,
            sam_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
        )
        target = default_target_layers(slca)[0]
        assert target == list(slca.gradcam_target_layers())
        heat = gradcam_images(slca, images[:1], [1], mean=(0.5,) * 3, std=(0.25,) * 3)
        assert heat.shape == (1, 64, 64) and np.isfinite(heat).all()


def test_importing_classify_modules_does_not_import_torch():
    code = (
        "import sys, napari_pathfm.pipelines.classify, napari_pathfm.pipelines.gradcam, "
        "napari_pathfm.widgets.classify_widget, napari_pathfm.cli; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_card_classes_must_match_the_model_outputs(slide):
    from napari_pathfm.models import create_model
    from napari_pathfm.pipelines.classify import classify_slide

    model = create_model("timm_classifier", backbone="resnet10t", num_classes=3)
    card = {"classes": ["a", "b"], "tile_size": 64, "input_mpp": 4.0}
    with pytest.raises(CheckpointError, match="lists 2 classes .* but the model predicts 3"):
        classify_slide(slide, (model, card), device="cpu")


def test_slca_model_classifies_a_slide(slide):
    """The slca model runs through the same pipeline (tiny SAM, coarse tiles so it stays fast)."""
    from napari_pathfm.models import create_model, list_models
    from napari_pathfm.pipelines.classify import classify_slide

    if "slca" not in list_models():
        pytest.skip("slca model not registered")
    torch.manual_seed(0)
    model = create_model(
        "slca",
        backbone="resnet10t",
        num_classes=2,
        sam_img_size=64,
        sam_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
    )
    res = classify_slide(
        slide, (model, {"classes": ["gland", "stroma"], "tile_size": 64, "input_mpp": 8.0}), device="cpu"
    )
    assert res.n_tiles > 0 and res.probabilities.shape == (res.n_tiles, 2)
    np.testing.assert_allclose(res.probabilities.sum(1), 1.0, atol=1e-5)
    assert set(np.unique(res.class_map)) <= {0, 1, 2}


def test_image_without_pixel_size_is_tiled_at_its_own_resolution(shared_data):
    from napari_pathfm.errors import SlideError
    from napari_pathfm.models import create_model
    from napari_pathfm.pipelines.classify import classify_slide

    png = shared_data / "glas" / "train" / "images" / "train_1.png"
    model = create_model("timm_classifier", backbone="resnet10t", num_classes=2)
    card = {"classes": ["gland", "other"], "tile_size": 64, "input_mpp": 1.0}
    res = classify_slide(png, (model, card), tissue_only=False, device="cpu")
    assert res.mpp is None and res.model_mpp is None and res.cell == 64
    assert "no pixel size" in res.messages[0]
    assert res.scale == (64.0, 64.0), "without µm/px the layers are in level-0 pixels"
    with pytest.raises(SlideError, match="no pixel size"):
        classify_slide(png, (model, card), mpp=1.0, device="cpu")
