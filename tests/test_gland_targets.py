"""Gland contours as a class (training/gland_targets.py) on real GlaS masks, and in the segment data pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from napari_pathfm.training.gland_targets import CONTOUR, GLAND, contour_target, glands_from_contour


@pytest.fixture(scope="module")
def glas_mask(shared_data):
    from napari_pathfm.training.segment_data import mask_to_classes, read_mask

    path = shared_data / "glas" / "train" / "masks" / "train_1.png"
    if not path.is_file():
        pytest.skip(f"GlaS masks not found at {path.parent}")
    return mask_to_classes(read_mask(path), "auto", 2, where=path)


def test_band_keeps_the_glands_and_the_instances_come_back(glas_mask):
    target = contour_target(glas_mask, 3)
    gland = glas_mask == 1
    assert set(np.unique(target)) <= {0, GLAND, CONTOUR} and (target == CONTOUR).any()
    np.testing.assert_array_equal(target > 0, gland)  # gland pixels stay gland (interior or contour)
    assert (target[~gland] == 0).all()
    truth, n_true = ndimage.label(gland)
    found = glands_from_contour(target, min_interior=20)
    assert found.max() >= n_true - 1, "every sizeable gland has an interior of its own"
    np.testing.assert_array_equal(found > 0, gland)
    # a true gland comes back as one instance, not cut in pieces by its own band
    ys, xs = np.nonzero(truth == 1)
    assert len(np.unique(found[ys, xs])) == 1


def test_ignore_and_image_edge():
    m = np.zeros((8, 8), np.uint8)
    m[:, :4] = 1  # a gland cut by the image's left edge
    m[0, 7] = 255
    t = contour_target(m, 1)
    assert t[0, 7] == 255, "unlabelled pixels stay unlabelled"
    assert t[4, 0] == GLAND, "the image edge is not a gland contour"
    assert t[4, 3] == CONTOUR


def test_segment_data_serves_the_three_class_target(shared_data, tmp_path):
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.segment_datamodule import SegmentDataModule

    root = shared_data / "glas" / "train"
    if not root.is_dir():
        pytest.skip(f"GlaS not found at {root}")
    recipe = load_recipe(
        "pathsam2/glas_cpu",
        ["data.contour_width=3", "data.classes=[background, gland, gland_contour]", f"output={tmp_path}"],
    )
    data = SegmentDataModule(recipe.get("data"), 2, 0, 0)
    assert data.classes == ["background", "gland", "gland_contour"]
    mask = data.store.mask(data.train_items[0])
    assert set(np.unique(mask)) == {0, 1, 2}


def test_a_contour_model_segments_one_object_per_interior(shared_data, tmp_path, monkeypatch):
    """Train the tiny GlaS recipe with gland contours through `pathfm train`: its card's objects name the
    contour class, and `segment_slide`'s default objects step turns its map into glands only."""
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.pipelines.segment import segment_slide

    root = shared_data / "glas" / "train"
    if not root.is_dir():
        pytest.skip(f"GlaS not found at {root}")
    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    out = tmp_path / "contour"
    sets = ["data.contour_width=2", "data.classes=[background, gland, gland_contour]", "objects={split_um: 35}"]
    args = ["train", "pathsam2/glas_tiny", "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    card = json.loads((out / "model.json").read_text())
    assert card["objects"]["contour_class"] == CONTOUR and card["num_classes"] == 3
    res = segment_slide(
        root / "images" / "train_1.png", str(out / "model.safetensors"), image_mpp=0.62, cache=False, device="cpu"
    )
    labels = np.asarray(res.labels)
    assert set(np.unique(labels).tolist()) <= {0, GLAND}, "the contour class is folded into the objects"
    assert res.instances is not None and int(res.instances.max()) == len(res.object_classes) - 1
    assert set(res.object_classes[1:].tolist()) <= {GLAND}
