"""MIL prediction on a real slide: CLI, bad input, and the napari widget with its heatmap layer."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from napari_pathfm.cli import app

runner = CliRunner()
SETTINGS = dict(mpp=2.0, tile_size=64)


@pytest.fixture(scope="module")
def features_and_checkpoint(cmu_small, tmp_path_factory):
    """Real features of CMU-1 (resnet10t, random init) and a random-init s4mil checkpoint for them."""
    import torch
    from safetensors.torch import save_file

    from napari_pathfm.io.features import extractor_card
    from napari_pathfm.models import create_model, save_checkpoint
    from napari_pathfm.pipelines.features import extract_features, read_features

    root = tmp_path_factory.mktemp("mil")
    torch.manual_seed(0)
    weights = root / "resnet10t-random.safetensors"
    save_file(create_model("timm_features", backbone="resnet10t").trunk.state_dict(), str(weights))
    extractor = create_model("timm_features", backbone="resnet10t", weights=str(weights))
    feats = extract_features(cmu_small, extractor, root / "cmu.features.zarr", **SETTINGS)
    bag = read_features(feats)
    torch.manual_seed(0)
    model = create_model("s4mil", in_dim=bag.dim, n_classes=2, d_model=64, d_state=8)
    ckpt = save_checkpoint(
        model, root / "s4mil", {"classes": ["normal", "tumour"], "feature_extractor": extractor_card(bag.attrs)}
    )
    return feats, ckpt, bag


def test_cli_predict_from_features_writes_heatmap_and_json(features_and_checkpoint, tmp_path):
    from napari_pathfm.io.ome_tiff import read_ome_tiff

    feats, ckpt, bag = features_and_checkpoint
    heat, js = tmp_path / "heat.ome.tif", tmp_path / "pred.json"
    result = runner.invoke(
        app, ["mil", "predict", "-c", str(ckpt), "--features", str(feats), "--out", str(heat), "--json", str(js)]
    )
    assert result.exit_code == 0, result.output
    pred = json.loads(js.read_text())
    assert set(pred["probabilities"]) == {"normal", "tumour"}
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert pred["n_patches"] == len(bag) and len(pred["top_patches"]) == 10
    levels, mpp, _meta = read_ome_tiff(heat)
    grid = np.asarray(levels[0])
    assert grid.shape == tuple(bag.attrs["grid_shape"]) or grid.shape[0] <= bag.attrs["grid_shape"][0]
    assert mpp == pytest.approx(0.499 * bag.level0_tile_size, rel=1e-3), "heatmap pixels are tile-sized, in µm"
    top = pred["top_patches"][0]
    r, c = round(top["y"] / bag.level0_tile_size), round(top["x"] / bag.level0_tile_size)
    assert grid[r, c] == pytest.approx(top["score"], rel=1e-5)


def test_cli_predict_from_slide_matches_features(features_and_checkpoint, cmu_small, tmp_path):
    feats, ckpt, _ = features_and_checkpoint
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert (
        runner.invoke(app, ["mil", "predict", "-c", str(ckpt), "--features", str(feats), "--json", str(a)]).exit_code
        == 0
    )
    result = runner.invoke(app, ["mil", "predict", "-c", str(ckpt), "--slide", str(cmu_small), "--json", str(b)])
    assert result.exit_code == 0, result.output
    pa, pb = json.loads(a.read_text())["probabilities"], json.loads(b.read_text())["probabilities"]
    assert pa == pytest.approx(pb, abs=1e-4), "re-extracting with the card's extractor reproduces the features"


def test_feature_dimension_mismatch_is_a_clear_error_and_writes_nothing(features_and_checkpoint, tmp_path):
    from napari_pathfm.models import create_model, save_checkpoint

    feats, _, bag = features_and_checkpoint
    wrong = save_checkpoint(
        create_model("s4mil", in_dim=bag.dim + 1, n_classes=2, d_model=32, d_state=4), tmp_path / "wrong"
    )
    heat = tmp_path / "heat.ome.tif"
    result = runner.invoke(app, ["mil", "predict", "-c", str(wrong), "--features", str(feats), "--out", str(heat)])
    assert result.exit_code == 2
    assert str(bag.dim) in result.output and str(bag.dim + 1) in result.output
    assert "wrong.safetensors" in result.output and "cmu.features.zarr" in result.output
    assert not list(tmp_path.glob("heat*")), "nothing is written half-way"


@pytest.mark.parametrize("problem", ["nan", "empty", "lengths"])
def test_bad_feature_files_are_refused(features_and_checkpoint, tmp_path, problem):
    import zarr

    feats, ckpt, bag = features_and_checkpoint
    broken = tmp_path / "broken.features.zarr"
    import shutil

    shutil.copytree(feats, broken)
    group = zarr.open_group(broken, mode="r+")
    if problem == "nan":
        values = group["features"][:]
        values[3, 5] = np.nan
        group["features"][:] = values
    elif problem == "empty":
        group.create_array("features", shape=(0, bag.dim), dtype="float32", overwrite=True)
        group.create_array("coords", shape=(0, 2), dtype="int64", overwrite=True)
    else:
        group.create_array("coords", shape=(len(bag) - 1, 2), dtype="int64", overwrite=True)
    result = runner.invoke(
        app, ["mil", "predict", "-c", str(ckpt), "--features", str(broken), "--json", str(tmp_path / "p.json")]
    )
    assert result.exit_code == 2
    assert "broken.features.zarr" in result.output
    assert not (tmp_path / "p.json").exists()


@pytest.mark.gui
def test_mil_widget_shows_probabilities_heatmap_and_goes_to_top_patch(
    make_napari_viewer, qtbot, cmu_small, features_and_checkpoint
):
    from napari_pathfm.coords import layer_transform
    from napari_pathfm.widgets.mil_widget import MILWidget, viewer_camera
    from napari_pathfm.widgets.slide_widget import SlideWidget

    feats, ckpt, bag = features_and_checkpoint
    viewer = make_napari_viewer()
    slide_layer = SlideWidget(viewer).open_path(cmu_small)
    _, widget = viewer.window.add_plugin_dock_widget("napari-pathfm", "MIL slide prediction")
    assert isinstance(widget, MILWidget)
    widget.set_checkpoint(ckpt)
    widget.set_features(feats)
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: widget.prediction is not None, timeout=10_000)
    assert "prediction:" in widget.result_label.text()
    heat = viewer.layers[f"{slide_layer.name} MIL heatmap"]
    # one patch = k x k heatmap pixels of `sub` level-0 px, so that the heatmap stops at the slide's edge
    sub = heat.metadata["downsample"]
    k = round(bag.level0_tile_size / sub)
    assert k > 1 and bag.level0_tile_size / k == pytest.approx(sub)
    scale, translate = layer_transform(0.499, sub)
    assert tuple(heat.scale) == pytest.approx(scale) and tuple(heat.translate) == pytest.approx(translate)
    h0, w0 = slide_layer.data[0].shape[:2]
    assert heat.data.shape[0] * sub - h0 < sub and heat.data.shape[1] * sub - w0 < sub, "ends at the slide's edge"
    # the slide prediction names its probability
    best = int(np.argmax(widget.prediction.probabilities))
    assert f"probability {widget.prediction.probabilities[best]:.3f}" in widget.result_label.text()
    # contrast from the data (1st-99th percentiles of the shown class's scores), a colormap of its own, a colorbar
    cls = widget.class_combo.currentIndex()
    scores = widget.prediction.patch_scores[:, cls]
    lo, hi = np.percentile(scores, [1, 99])
    assert tuple(heat.contrast_limits) == pytest.approx((lo, hi), rel=1e-5) and tuple(heat.contrast_limits) != (
        0.0,
        1.0,
    )
    assert heat.colormap.name == "pathfm-attention"
    [bar] = widget.legend.entries
    assert (
        widget.legend.isVisibleTo(widget)
        and bar["kind"] == "colorbar"
        and bar["range"] == pytest.approx((lo, hi), rel=1e-5)
    )
    assert float(np.asarray(heat.data).min()) < lo  # cells without a patch sit under the transparent end

    # clicking a top patch draws its box over the patch's level-0 pixels (in µm) and centres the view on it
    assert widget.top_list.count() == 10
    camera = viewer_camera(viewer)
    before = tuple(camera.center[-2:])
    widget.top_list.itemClicked.emit(widget.top_list.item(0))
    top = widget.prediction.top_patches(1, cls)[0]
    cell, mpp = bag.level0_tile_size, 0.499
    box = viewer.layers[f"{slide_layer.name} MIL top patch"]
    assert type(box).__name__ == "Shapes" and box.nshapes == 1 and box.shape_type == ["rectangle"]
    world = box.data[0] * np.asarray(box.scale)
    y1, x1 = min(top["y"] + cell, h0), min(top["x"] + cell, w0)  # a patch over the slide's edge stops there
    expected_box = np.array([[top["y"] - 0.5, top["x"] - 0.5], [y1 - 0.5, x1 - 0.5]]) * mpp
    np.testing.assert_allclose(world.min(axis=0), expected_box[0])
    np.testing.assert_allclose(world.max(axis=0), expected_box[1])
    # the box's edges are those of the patch's heatmap cell
    r, c = k * round(top["y"] / cell), k * round(top["x"] / cell)
    cell_lo = np.asarray(heat.translate) + np.array([r, c]) * np.asarray(heat.scale) - np.asarray(heat.scale) / 2
    np.testing.assert_allclose(world.min(axis=0), cell_lo, atol=1e-6)
    centre = tuple(camera.center[-2:])
    assert centre == pytest.approx(tuple(expected_box.mean(axis=0))) and centre != pytest.approx(before)
    widget.top_list.itemClicked.emit(widget.top_list.item(1))
    assert box.nshapes == 1, "a second click moves the box, it does not add one"

    widget.class_combo.setCurrentIndex(1 - widget.class_combo.currentIndex())
    assert heat.metadata["class"] == widget.class_combo.currentText()

    # a second run replaces its layers: same layers, the stale patch box cleared
    n_layers = len(viewer.layers)
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: widget._runs == 2, timeout=10_000)
    assert len(viewer.layers) == n_layers and viewer.layers[heat.name] is heat and box.nshapes == 0


# --- the bundled demo model --------------------------------------------------------------


def test_bundled_demo_model_finds_its_extractor_beside_the_card_and_keeps_tile_size(tmp_path):
    """The demo card names its extractor file without a folder; prediction finds it next to the checkpoint,
    checks its sha256, and feeds 64 px tiles at their own size (the card's input_size None), as in training."""
    from napari_pathfm._sample_data import sample_slide_path
    from napari_pathfm.demo import demo_mil_checkpoint
    from napari_pathfm.io import open_slide
    from napari_pathfm.models.checkpoint import read_card
    from napari_pathfm.pipelines.mil import features_for_slide, mil_predict

    ckpt = demo_mil_checkpoint()
    card = read_card(ckpt.with_suffix(".json"))
    fx = card["feature_extractor"]
    assert "/" not in fx["weights"] and (ckpt.parent / fx["weights"]).is_file()
    assert fx["input_size"] is None and fx["tile_size"] == 64
    with open_slide(sample_slide_path()) as slide:
        bag = features_for_slide(slide, card, checkpoint_dir=ckpt.parent, device="cpu")
        assert bag.attrs["input_size"] is None and bag.attrs["weights_sha256"] == fx["weights_sha256"]
        assert bag.path is None, "features extracted for one prediction are not left on disk"
        pred = mil_predict(ckpt, slide=slide, device="cpu")
    assert pred.classes == ["no gland", "gland"] and len(pred.coords) == len(bag.features) > 100
    assert pred.level0_tile_size == pytest.approx(64 * 0.62 / 0.499, abs=1)
    np.testing.assert_allclose(pred.probabilities.sum(), 1.0, rtol=1e-5)

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in (ckpt.name, ckpt.with_suffix(".json").name):
        (moved / name).write_bytes((ckpt.parent / name).read_bytes())
    with open_slide(sample_slide_path()) as slide, pytest.raises(Exception, match="missing") as err:
        mil_predict(moved / ckpt.name, slide=slide, device="cpu")
    assert fx["weights"] in str(err.value) and "next to the checkpoint" in str(err.value)


def test_widget_task_imports_torch_safely_after_the_canvas_exists():
    """Loading Triton (PyPI torch's dependency) after a Mesa OpenGL context exists segfaults; the widget runner
    keeps it out. A fresh process: napari viewer first, then the guard, then torchvision + a model forward."""
    import subprocess
    import sys

    code = (
        "import napari; v = napari.Viewer(show=False)\n"
        "from napari_pathfm.widgets._gl_safety import keep_triton_out; assert keep_triton_out()\n"
        "import torch, torchvision, lightning\n"
        "from napari_pathfm.models.registry import create_model\n"
        "m = create_model('s4mil', in_dim=8, n_classes=2, d_model=16, d_state=4)\n"
        "print('ok', tuple(m(torch.randn(1, 20, 8))['logits'].shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok (1, 2)" in proc.stdout, proc.stderr[-2000:]
