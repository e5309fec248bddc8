"""The GlaS challenge's object Dice and object Hausdorff (training/seg_metrics.py), by hand and on real masks."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pathfm.training.seg_metrics import object_dice_hausdorff, segmentation_metrics


def test_merged_glands_score_lower_than_separate_ones():
    gt = np.zeros((10, 20), int)
    gt[2:8, 2:8] = 1
    gt[2:8, 10:16] = 1
    separate = gt.copy()
    merged = gt.copy()
    merged[2:8, 8:10] = 1  # a bridge: one predicted object over two glands
    assert object_dice_hausdorff(separate, gt) == (1.0, 0.0)
    d, h = object_dice_hausdorff(merged, gt)
    # each gland (36 px) pairs with the merged object (84 px): Dice 72/120; the merged object pairs with
    # the gland it overlaps most (the first): Dice 72/120 too
    assert d == pytest.approx(0.6)
    # Hausdorff gland -> merged object: the far end of the other gland is 8 px from the gland's edge
    assert h == pytest.approx(8.0)


def test_no_objects_on_one_side_or_both():
    empty = np.zeros((5, 5), int)
    one = empty.copy()
    one[1:3, 1:3] = 1
    assert object_dice_hausdorff(empty, empty) == (1.0, 0.0)
    d, h = object_dice_hausdorff(empty, one)
    assert d == 0.0 and np.isnan(h)


def test_real_glas_mask_against_itself_and_a_dilation(shared_data):
    from PIL import Image
    from scipy import ndimage

    masks = shared_data / "glas" / "train" / "masks"
    if not masks.is_dir():
        pytest.skip(f"GlaS masks not found at {masks}")
    gt = (np.asarray(Image.open(masks / "train_1.png")) > 0).astype(int)
    if gt.ndim == 3:
        gt = gt[..., 0]
    assert object_dice_hausdorff(gt, gt) == (1.0, 0.0)
    grown = ndimage.binary_dilation(gt, iterations=3).astype(int)
    d, h = object_dice_hausdorff(grown, gt)
    assert 0.5 < d < 1.0 and h >= 3.0
    m = segmentation_metrics(grown, gt, 2, ["background", "gland"])
    assert m["object_dice"] == pytest.approx(d) and m["object_hausdorff"] == pytest.approx(h)
