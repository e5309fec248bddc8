"""`pathfm segment` gives one object per gland by default: the pipeline's objects are exactly
napari_pathfm.instances applied to the model's class map, the OME-TIFF, GeoJSON and Labels hold them,
and class maps too large for memory say that they were not split. Real GlaS image, the bundled model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from napari_pathfm.cli import app

torch = pytest.importorskip("torch")
GLAS_MPP = 0.62


@pytest.fixture(scope="module")
def glas_image(shared_data):
    path = shared_data / "glas" / "train" / "images" / "train_12.png"
    if not path.is_file():
        pytest.skip(f"GlaS image not found at {path}")
    return path


@pytest.fixture(scope="module")
def bundled():
    from napari_pathfm.models.checkpoint import load_checkpoint
    from napari_pathfm.pipelines.segment_model import default_segment_checkpoint

    path = default_segment_checkpoint()
    model, card = load_checkpoint(path)
    return path, model, card


def test_bundled_card_names_its_object_settings(bundled):
    from napari_pathfm.instances import ObjectOptions, object_options

    _path, _model, card = bundled
    assert isinstance(object_options(None, card), ObjectOptions), "the bundled model splits glands by default"


def test_default_objects_are_the_instances_of_the_raw_map(bundled, glas_image):
    from napari_pathfm.instances import ObjectOptions, separate, split_objects
    from napari_pathfm.pipelines.segment import segment_slide

    _path, model, card = bundled
    card = {**card, "objects": {"split_um": 35.0, "min_area_um2": 575.0}}
    kw = {"image_mpp": GLAS_MPP, "cache": False, "device": "cpu"}
    raw = segment_slide(glas_image, (model, card), objects=False, **kw)
    res = segment_slide(glas_image, (model, card), **kw)  # objects=None: the card's settings
    assert raw.instances is None and raw.summary()["objects"] is None
    inst, cls = split_objects(raw.labels, GLAS_MPP, options=ObjectOptions(split_um=35.0, min_area_um2=575.0))
    np.testing.assert_array_equal(res.instances, inst)
    np.testing.assert_array_equal(res.labels, separate(inst, cls))
    n = int(inst.max())
    assert res.summary()["objects"] == n >= 3
    # no two objects touch: the 8-connected regions of the class map are the objects
    assert ndimage.label(res.labels > 0, structure=np.ones((3, 3)))[1] == n
    # the split added objects the raw map had merged (train_12 has glands that touch in the prediction):
    # more objects than the raw map has regions of at least the minimum area (crumbs are dropped)
    regions, k = ndimage.label(raw.labels > 0)
    min_px = 575.0 / GLAS_MPP**2
    large = int(np.count_nonzero(np.bincount(regions.ravel())[1:] >= min_px)) if k else 0
    assert n > large, (n, large)


def test_cli_writes_the_objects_to_ome_tiff_and_geojson(bundled, glas_image, tmp_path):
    from napari_pathfm.io.geojson import geojson_to_labels
    from napari_pathfm.io.ome_tiff import read_ome_tiff

    path, _model, _card = bundled
    out, geo = tmp_path / "mask.ome.tif", tmp_path / "mask.geojson"
    args = ["segment", str(glas_image), "-c", str(path), "--image-mpp", "0.62", "--no-cache", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "-o", str(out), "--geojson", str(geo), "--objects"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    n = summary["objects"]
    assert n >= 3
    mask = np.asarray(read_ome_tiff(out)[0][0])
    features = json.loads(geo.read_text())["features"]
    # every feature is one region of the written map; regions are the objects but where the line
    # between two objects cuts a thin one in two
    assert len(features) == ndimage.label(mask > 0)[1]
    assert n <= len(features) <= n + max(2, n // 10)
    np.testing.assert_array_equal(geojson_to_labels(geo, mask.shape, {1: "gland"}), mask)
    raw = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "raw.ome.tif"), "--no-objects"])
    assert raw.exit_code == 0, raw.output
    assert json.loads(raw.output[raw.output.index("{") :])["objects"] is None


def test_a_map_too_large_for_memory_says_it_was_not_split(bundled, glas_image, monkeypatch):
    import napari_pathfm.pipelines.segment as seg

    _path, model, card = bundled
    monkeypatch.setattr(seg, "IN_MEMORY_PIXELS", 10_000)  # this image's map goes to a temporary zarr store
    res = seg.segment_slide(glas_image, (model, card), image_mpp=GLAS_MPP, cache=False, device="cpu", objects=True)
    try:
        assert res.instances is None
        assert any("not split into objects" in m for m in res.messages), res.messages
    finally:
        res.close()
