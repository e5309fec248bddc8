"""Garbage images, z-stacks and evaluation sources are refused by name; undefined metrics become null (issue 14, part 4).

Real files made in the test: an all-NaN float32 TIFF, a flat one-colour PNG, the shared ISL z-stack
copied to tmp_path with one plane truncated or resized, wrong evaluate-translation sources, and a
metrics dict with NaN written through :mod:`napari_pathfm.io.jsonsafe`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from _cli_helpers import cli_refuses
from PIL import Image

from napari_pathfm.errors import CheckpointError, InputError, SlideError, ZStackError
from napari_pathfm.io import open_slide
from napari_pathfm.io.jsonsafe import UndefinedMetricWarning, dumps, write_json
from napari_pathfm.io.zstack import open_zstack
from napari_pathfm.tiles import tissue_mask

DATA = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "data"
DAPI = DATA / "models" / "haste-isl-dapi.safetensors"
CROP = DATA / "isl-blue-crop.ome.tif"  # 13-plane 256 x 256 ISL crop; targets in isl-blue-crop-targets.ome.tif


def strict_json(text: str):
    """Parse as strict JSON: NaN / Infinity fail the test."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


# --- images with nothing in them ------------------------------------------------------------


@pytest.fixture
def nan_tiff(tmp_path) -> Path:
    path = tmp_path / "all-nan.tif"
    tifffile.imwrite(path, np.full((700, 900), np.nan, np.float32))
    return path


@pytest.fixture
def flat_png(tmp_path) -> Path:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((400, 500, 3), 243, np.uint8)).save(path)
    return path


def test_all_nan_float_image_is_refused_not_no_tissue(nan_tiff):
    with open_slide(nan_tiff) as slide, pytest.raises(SlideError, match=r"all-nan\.tif: holds only NaN/Inf values"):
        tissue_mask(slide)


def test_flat_image_is_refused_but_a_partly_nan_image_is_not(flat_png, tmp_path):
    with open_slide(flat_png) as slide, pytest.raises(SlideError, match=r"flat\.png: is one flat colour .*243"):
        tissue_mask(slide)
    img = np.random.default_rng(0).uniform(0.6, 1.0, (300, 300)).astype(np.float32)
    img[:100] = np.nan  # a float image with a NaN border is still an image
    tifffile.imwrite(tmp_path / "some-nan.tif", img)
    with open_slide(tmp_path / "some-nan.tif") as slide:
        assert tissue_mask(slide).mask.shape[0] > 0
        assert 0.3 < slide.nonfinite_fraction() < 0.4


def test_cli_tiles_and_segment_refuse_nan_and_flat_images(nan_tiff, flat_png, tmp_path):
    cli_refuses(["tiles", nan_tiff, "--out", tmp_path / "tiles"], "all-nan.tif", "NaN")
    cli_refuses(["tiles", flat_png, "--out", tmp_path / "tiles2"], "flat.png", "one flat colour")
    cli_refuses(["segment", flat_png, "--out", tmp_path / "mask.ome.tif", "--device", "cpu"], "flat.png", "flat colour")
    assert not (tmp_path / "mask.ome.tif").exists()


# --- z-stacks with a damaged or mismatched plane ----------------------------------------------


@pytest.fixture
def isl_copy(shared_data, tmp_path) -> Path:
    """The shared ISL phase-contrast planes and DAPI target, copied (never modified in place)."""
    folder = tmp_path / "isl"
    folder.mkdir()
    for f in (shared_data / "isl-blue-sample").iterdir():
        if "PHASE_CONTRAST" in f.name or "DAPI" in f.name:
            shutil.copyfile(f, folder / f.name)
    return folder


def _plane(folder: Path, z: int) -> Path:
    return next(folder.glob(f"*z_depth-{z},*"))


def test_truncated_plane_is_named_at_the_lazy_read(isl_copy):
    plane = _plane(isl_copy, 4)
    data = plane.read_bytes()
    plane.write_bytes(data[: len(data) // 2])
    stack = open_zstack(isl_copy)  # the header is intact: opening works
    np.asarray(stack.data[0, :8, :8])  # other planes read fine
    with pytest.raises(ZStackError) as err:
        stack.data[:, :64, :64].compute()
    assert str(plane) in str(err.value) and "truncated" in str(err.value)


def test_cli_translate_names_the_truncated_plane(isl_copy, tmp_path):
    plane = _plane(isl_copy, 2)
    plane.write_bytes(plane.read_bytes()[:5000])
    cli_refuses(
        ["translate", isl_copy, "-c", DAPI, "--out", tmp_path / "out", "--device", "cpu"], plane.name, "truncated"
    )


def test_planes_of_another_shape_or_dtype_name_both_files(isl_copy):
    plane, first = _plane(isl_copy, 7), _plane(isl_copy, 0)
    pixels = np.asarray(Image.open(plane))
    Image.fromarray(pixels[:512]).save(plane)
    with pytest.raises(ZStackError) as err:
        open_zstack(isl_copy)
    text = str(err.value)
    assert str(plane) in text and first.name in text and "(512, 1024)" in text
    Image.fromarray((pixels >> 8).astype(np.uint8)).save(plane)
    with pytest.raises(ZStackError, match=r"uint8 but plane z_depth-0 .* uint16"):
        open_zstack(isl_copy)


# --- evaluate-translation with wrong sources -------------------------------------------------


@pytest.fixture(scope="module")
def real_dapi(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("real") / "dapi.tif"
    tifffile.imwrite(path, tifffile.imread(DATA / "isl-blue-crop-targets.ome.tif")[0])
    return path


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda d: (d / "notes.txt").write_text("not an image") and d / "notes.txt", SlideError, "readable image"),
        (lambda d: DATA / "CMU-1-Small-Region.svs", SlideError, "a colour image"),
        (lambda d: DATA / "models" / "slca-glas-glands-demo.safetensors", CheckpointError, "not a translation one"),
        (
            lambda d: tifffile.imwrite(d / "small.tif", np.ones((10, 10), np.uint16)) or d / "small.tif",
            InputError,
            "prediction is (10, 10)",
        ),
        (
            lambda d: tifffile.imwrite(d / "nan.tif", np.full((256, 256), np.nan, np.float32)) or d / "nan.tif",
            SlideError,
            "NaN/Inf",
        ),
        (lambda d: d, InputError, "is a folder"),
    ],
    ids=["text", "slide", "classify-checkpoint", "wrong-size", "nan-image", "folder"],
)
def test_evaluate_translation_refuses_wrong_sources(make, error, words, real_dapi, tmp_path):
    from napari_pathfm.pipelines.translate_eval import evaluate_translation

    source = make(tmp_path)
    with pytest.raises(error) as err:
        evaluate_translation([source], stack=CROP, target=real_dapi, device="cpu")
    assert str(source) in str(err.value) and words in str(err.value)


def test_evaluate_translation_refuses_a_flat_real_stain(real_dapi, tmp_path):
    from napari_pathfm.pipelines.translate_eval import evaluate_translation

    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((256, 256), np.uint16))
    with pytest.raises(SlideError, match=r"flat\.tif: the real channel is one flat value"):
        evaluate_translation([real_dapi], target=tmp_path / "flat.tif")


def test_cli_evaluate_translation_wrong_sources(real_dapi, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    cli_refuses(["evaluate-translation", tmp_path / "notes.txt", "--target", real_dapi], "notes.txt", "readable image")
    cli_refuses(
        ["evaluate-translation", DATA / "CMU-1-Small-Region.svs", "--target", real_dapi],
        "CMU-1-Small-Region.svs",
        "colour image",
    )


# --- undefined metrics -----------------------------------------------------------------------


def test_nan_metrics_are_written_as_null_with_a_warning(tmp_path):
    metrics = {"acc": 0.5, "auroc": float("nan"), "folds": [{"loss": float("inf")}, {"loss": np.float32(0.25)}]}
    with pytest.warns(UndefinedMetricWarning, match=r"metrics\.json: 2 undefined .*auroc, folds\[0\]\.loss"):
        write_json(tmp_path / "metrics.json", metrics)
    doc = strict_json((tmp_path / "metrics.json").read_text())
    assert doc == {"acc": 0.5, "auroc": None, "folds": [{"loss": None}, {"loss": 0.25}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing undefined: no warning
        assert dumps({"acc": 1.0, "n": 3}) == '{"acc": 1.0, "n": 3}'


def test_model_card_with_nan_metric_is_valid_json(tmp_path):
    from napari_pathfm.models import create_model, read_card, save_checkpoint

    net = create_model("s4mil", in_dim=8, n_classes=2, d_model=8, d_state=4)
    with pytest.warns(UndefinedMetricWarning, match="metrics.best.val_auroc"):
        path = save_checkpoint(net, tmp_path / "m", {"metrics": {"best": {"val_auroc": float("nan"), "val_acc": 1.0}}})
    strict_json(path.with_suffix(".json").read_text())
    assert read_card(path)["metrics"]["best"] == {"val_auroc": None, "val_acc": 1.0}


def test_evaluation_table_leaves_undefined_cells_empty(real_dapi, tmp_path):
    from napari_pathfm.pipelines.translate_eval import write_table

    rows = [{"source": "a", "channel": "DAPI", "mae_over_median": 0.1, "area_rel": float("nan")}]
    with pytest.warns(UndefinedMetricWarning, match="area_rel"):
        write_table(rows, tmp_path / "table.csv")
    lines = (tmp_path / "table.csv").read_text().splitlines()
    assert "nan" not in lines[1] and lines[1].startswith("a,DAPI,0.1,")
