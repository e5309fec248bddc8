"""The U-Net paper's border weights (training/border_weights.py) on real GlaS masks, and in the Path-SAM2 loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_pathfm.training.border_weights import border_weights


@pytest.fixture(scope="module")
def glas_mask(shared_data):
    from napari_pathfm.training.segment_data import mask_to_classes, read_mask

    path = shared_data / "glas" / "train" / "masks" / "train_3.png"  # 19 glands, some a few µm apart
    if not path.is_file():
        pytest.skip(f"GlaS masks not found at {path.parent}")
    return mask_to_classes(read_mask(path), "auto", 2, where=path)


def test_weights_sit_in_the_gaps_between_glands(glas_mask):
    w = border_weights(glas_mask, 10.0, 8.0)  # σ 5 µm at 0.62 µm/px
    gland = glas_mask == 1
    assert (w[gland] == 1).all(), "gland pixels keep weight 1"
    heavy = w > 3
    assert heavy.any() and (heavy & ~gland).sum() == heavy.sum()
    # a heavy pixel has two different glands close by: within 3σ of at least two components
    labels, _ = ndimage.label(gland)
    ys, xs = np.nonzero(heavy)
    for y, x in list(zip(ys, xs, strict=True))[:: max(1, len(ys) // 20)]:
        window = labels[max(y - 24, 0) : y + 25, max(x - 24, 0) : x + 25]
        assert len(set(np.unique(window)) - {0}) >= 2
    # background far from any two glands keeps weight 1
    far = ndimage.distance_transform_edt(~gland) > 60
    assert np.allclose(w[far], 1.0)


def test_one_gland_ignore_and_off():
    t = np.zeros((32, 32), np.uint8)
    t[8:20, 8:20] = 1
    np.testing.assert_array_equal(border_weights(t, 10.0, 3.0), np.ones((32, 32), np.float32))
    t[0, :] = 255
    t[22:30, 8:20] = 1  # a second gland, 2 px below the first
    w = border_weights(t, 10.0, 3.0)
    assert (w[0] == 0).all(), "ignored pixels weigh nothing"
    assert w[20:22, 8:20].min() > 5 and w[25, 2] < 1.5
    np.testing.assert_array_equal(border_weights(t, 0.0, 3.0), (t != 255).astype(np.float32))


def test_loss_with_weights_punishes_a_bridged_gap_more():
    from napari_pathfm.models.pathsam2.loss import pathsam2_loss

    t = np.zeros((32, 32), np.uint8)
    t[4:28, 4:14] = 1
    t[4:28, 17:28] = 1  # two glands, a 3 px gap
    target = torch.from_numpy(t.astype(np.int64))[None]
    right = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 8 - 4
    bridged = right.clone()
    bridged[0, 1, 4:28, 14:17], bridged[0, 0, 4:28, 14:17] = 4, -4  # the gap painted as gland
    weight = torch.from_numpy(border_weights(t, 10.0, 3.0))[None]
    ones = torch.ones_like(weight)
    out = {"logits": bridged, "iou": None}
    plain = float(pathsam2_loss(out, target)[0])
    assert float(pathsam2_loss(out, target, weight=ones)[0]) == pytest.approx(plain, rel=1e-6)
    weighted = float(pathsam2_loss(out, target, weight=weight)[0])
    assert weighted > 1.5 * plain
    # the right masks stay near zero loss either way
    assert float(pathsam2_loss({"logits": right * 5, "iou": None}, target, weight=weight)[0]) < 0.01
