"""The ``pathfm`` command line on real slides: info, open, tiles, demo, and its error messages."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from napari_pathfm.cli import app

runner = CliRunner()


def test_console_script_is_installed():
    exe = shutil.which("pathfm") or str(Path(sys.executable).parent / "pathfm")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("info", "models", "open", "tiles", "train", "demo"):
        assert command in out.stdout


def test_info_lists_versions_devices_and_models():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["versions"]["napari-pathfm"] == "0.1.0"
    assert info["versions"]["libopenslide"].startswith("4.")
    assert info["devices"]["auto"] in {"cpu", "cuda", "mps"}
    assert "timm_classifier" in info["models"]


def test_open_prints_metadata_json(cmu_small):
    result = runner.invoke(app, ["open", str(cmu_small)])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.output)
    assert meta["mpp"] == pytest.approx(0.499)
    assert meta["level_shapes"] == [[2967, 2220]]
    assert meta["properties"]["openslide.vendor"] == "aperio"


def test_open_unreadable_file_fails_with_a_clear_message(wsi_dir):
    result = runner.invoke(app, ["open", str(wsi_dir / "unopenable.tiff")])
    assert result.exit_code == 2
    assert "unopenable.tiff" in result.output and "supported format" in result.output


def test_tiles_writes_mask_grid_and_overview(cmu_small, tmp_path):
    from napari_pathfm.io.geojson import geojson_to_labels
    from napari_pathfm.io.ome_tiff import read_ome_tiff

    result = runner.invoke(app, ["tiles", str(cmu_small), "--out", str(tmp_path), "--mpp", "1.0", "--size", "224"])
    assert result.exit_code == 0, result.output
    stem = "CMU-1-Small-Region"
    levels, mpp, _meta = read_ome_tiff(tmp_path / f"{stem}.tissue.ome.tif")
    mask = np.asarray(levels[0])
    assert mpp == pytest.approx(0.499 * 16, rel=0.01)
    assert 0.2 < mask.mean() < 0.9
    back = geojson_to_labels(tmp_path / f"{stem}.tissue.geojson", mask.shape, {1: "Tissue"}, downsample=16.0)
    np.testing.assert_array_equal(back, mask)
    rows = (tmp_path / f"{stem}.tiles.csv").read_text().strip().splitlines()
    assert rows[0].startswith("index,row,col,y0,x0")
    grid = json.loads((tmp_path / f"{stem}.tiles.json").read_text())
    assert grid["tile_size"] == 224 and len(rows) - 1 == len(grid["tiles"]) > 5
    assert (tmp_path / f"{stem}.overview.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*")), "no temporary files are left behind"


def test_demo_writes_everything_it_promises(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--no-show"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "demo-summary.json").read_text())
    assert summary["tissue_tiles"] > 10
    canvas = tmp_path / "napari-canvas-slide.png"
    assert canvas.exists(), summary.get("napari_canvas_png")
    from PIL import Image

    img = np.asarray(Image.open(canvas).convert("RGB"))
    assert img.mean() > 100, "the canvas shows the slide, not a black frame"
    for key in ("tissue_mask", "tissue_geojson", "tiles_csv", "overview_png", "mil_heatmap", "mil_json"):
        assert Path(summary["files"][key]).exists()
    mil = summary["mil"]
    assert mil["predicted"] in ("no gland", "gland") and sum(mil["probabilities"].values()) == pytest.approx(
        1, abs=1e-3
    )
    assert mil["patches"] > 100 and mil["model_test_metrics"]["auroc"] > 0.8
    prediction = json.loads((tmp_path / "mil-prediction.json").read_text())
    assert prediction["predicted"] == mil["predicted"] and len(prediction["top_patches"]) == 10
    heat = _canvas_like(tmp_path / "napari-canvas-mil.png", img)
    assert np.abs(heat - img).mean() > 5, "the MIL canvas shows the heatmap over the slide"
    from napari_pathfm.checkpoints import find_checkpoints

    if not find_checkpoints("segment"):
        assert "no segmentation model" in summary["segment"]
        return
    seg = summary["segment"]
    assert seg["classes"][0] == "background" and abs(sum(seg["fraction"].values()) - 1) < 1e-3 and seg["tiles"] > 0
    import tifffile

    mask = tifffile.imread(summary["files"]["segmentation_mask"])
    assert mask.shape == tuple(summary["slide_shape"][:2]) and mask.max() < len(seg["classes"])
    assert Path(summary["files"]["segmentation_geojson"]).exists()
    canvas = _canvas_like(tmp_path / "napari-canvas-segment.png", img)
    assert np.abs(canvas - img).mean() > 1, "the segment canvas shows the class map over the slide"
    _check_demo_classify_translate(tmp_path, summary, img)


def _canvas_like(png, like: np.ndarray) -> np.ndarray:
    """A canvas PNG as float RGB at the size of ``like``: canvases fit their visible layers, and the tissue mask
    and tile boxes reach half a mask pixel / half a pixel past the slide's edge, so sizes differ by a few %."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    h, w = like.shape[:2]
    assert abs(im.height / h - 1) < 0.05 and abs(im.width / w - 1) < 0.05, (im.size, like.shape)
    return np.asarray(im.resize((w, h), Image.BILINEAR)).astype(float)


def _check_demo_classify_translate(out: Path, summary: dict, slide_canvas: np.ndarray) -> None:
    """The demo's tile classes (bundled SLCA model) and z-stack translation (bundled ISL models + crop)."""
    import tifffile
    from PIL import Image

    cls = summary["classify"]
    assert cls["classes"] == ["gland", "non_gland"] and cls["tiles"] > 10
    assert (
        sum(cls["class_fractions"].values()) == pytest.approx(1, abs=1e-3)
        and cls["model_test_metrics"]["test_auroc"] > 0.8
    )
    class_map = tifffile.imread(summary["files"]["classify_class_map"])
    assert (class_map > 0).sum() == cls["tiles"] and class_map.max() <= 2
    tiles = json.loads((out / "classify" / "summary.json").read_text())
    assert tiles["tiles"] == cls["tiles"] and (out / "classify" / "tiles.csv").exists()
    canvas = _canvas_like(summary["files"]["napari_canvas_classify_png"], slide_canvas)
    assert np.abs(canvas - slide_canvas).mean() > 5, "class map over the slide"
    tr = summary["translate"]
    assert set(tr["channels"]) == {"DAPI", "MAP2", "NFH"} and tr["shape"] == [256, 256]
    for name in ("DAPI", "MAP2", "NFH"):
        pred = tifffile.imread(summary["files"][f"translate_{name}"])
        assert pred.shape == (256, 256) and pred.dtype == np.uint16 and pred.std() > 0
        assert tr["pearson_r_vs_real"][name] > 0.2, "held-out crop: predictions follow the real stain"
    assert Path(summary["files"]["translate_nuclei_confidence"]).exists() and tr["nuclei"] > 0
    canvas = np.asarray(Image.open(summary["files"]["napari_canvas_translate_png"]).convert("RGB")).astype(float)
    assert canvas.shape[0] >= 256 and canvas.std() > 10, "the translate canvas shows the z-stack and predictions"


REPO = Path(__file__).resolve().parents[1]


def test_train_streams_json_events_and_exports_a_checkpoint(shared_data, tmp_path):
    recipe = REPO / "training" / "classify" / "crc_tiny.yaml"
    args = ["train", str(recipe), "--out", str(tmp_path), "--set", "trainer.max_epochs=1", "--json-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.strip().splitlines()]
    kinds = {e["event"] for e in events}
    assert {"batch", "epoch", "summary"} <= kinds
    summary = events[-1]
    assert summary["event"] == "summary" and summary["epochs_run"] == 1
    assert Path(summary["checkpoint"]).exists() and Path(summary["checkpoint"]).with_suffix(".json").exists()


def test_train_with_a_bad_override_names_the_recipe(tmp_path):
    recipe = REPO / "training" / "classify" / "crc_tiny.yaml"
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path), "--set", "optim.nonsense=1"])
    assert result.exit_code == 2
    assert "crc_tiny.yaml" in result.output and "nonsense" in result.output


def test_features_over_a_folder_reports_each_slide_and_resumes(wsi_dir, tmp_path):
    from napari_pathfm.pipelines.features import read_features

    args = ["features", str(wsi_dir), "--out", str(tmp_path), "--backbone", "resnet10t", "--mpp", "2.0", "--tile", "64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, "two shared slides are unreadable, so the run reports failure"
    assert "failed   " in result.output and "unreadable.svs" in result.output
    bag = read_features(tmp_path / "CMU-1-Small-Region.features.zarr")
    assert bag.features.shape[0] == bag.coords.shape[0] > 10
    again = runner.invoke(app, args)
    assert "skipped" in again.output and "written 0" in again.output


@pytest.mark.parametrize("recipe", sorted((REPO / "training").glob("*/*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_passes_the_train_preflight(recipe, shared_data, tmp_path, monkeypatch):
    """``pathfm train`` checks the folders a recipe names before it starts; a long description (one
    "word" over the file system's 255-character name limit) once crashed that check."""
    from napari_pathfm.cli import _preflight_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    given = tmp_path / "given.pt"  # what the user sets for recipes that name their own weights or data
    given.write_bytes(b"")
    for var in set(re.findall(r"\$\{(\w+)\}", recipe.read_text(encoding="utf-8"))) - {"PATHFM_SHARED_DATA"}:
        monkeypatch.setenv(var, str(given))
    _preflight_recipe(recipe, [], tmp_path / "run")
