"""Objects from a class map (napari_pathfm.instances) on real GlaS masks: merged glands split, lumen
filled, crumbs dropped, touching objects separated so their connected regions are the objects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_pathfm.instances import ObjectOptions, separate, split_objects

GLAS_MPP = 0.62


def _glas_mask(shared_data, name: str) -> np.ndarray:
    from napari_pathfm.training.segment_data import find_pairs, read_mask

    root = shared_data / "glas" / "train"
    if not root.is_dir():
        pytest.skip(f"GlaS not found at {root}")
    pairs = {n: m for n, _i, m in find_pairs(root)}
    return read_mask(pairs[name])


def test_merged_real_glands_are_split_again(shared_data):
    """Close the gaps between the glands of real GlaS masks (what a segmenter does when it bridges them):
    connected regions then undercount the glands; the split gets most of them back."""
    true_n, merged_n, split_n = 0, 0, 0
    for name in ("train_3", "train_12", "train_40", "train_77"):
        mask = _glas_mask(shared_data, name) > 0
        truth = ndimage.label(mask)[1]
        merged = ndimage.binary_closing(mask, structure=np.ones((9, 9)), iterations=2) | mask
        inst, cls = split_objects(merged.astype(np.uint8), GLAS_MPP)
        true_n, merged_n, split_n = true_n + truth, merged_n + ndimage.label(merged)[1], split_n + int(inst.max())
        assert set(cls[1:].tolist()) <= {1}
        # objects lie in the mask with its holes filled
        assert ((inst > 0) & ~ndimage.binary_fill_holes(merged)).sum() == 0
    assert merged_n < 0.8 * true_n  # the closing really merged glands
    assert abs(split_n - true_n) < abs(merged_n - true_n)


def test_holes_filled_crumbs_dropped_classes_kept():
    m = np.zeros((120, 200), np.uint8)
    m[10:70, 10:70] = 1
    m[30:50, 30:50] = 0  # a lumen: filled
    m[100:103, 100:103] = 1  # a 9 px crumb (3.5 µm²): dropped
    m[10:70, 120:180] = 2  # another class stays its own object
    inst, cls = split_objects(m, GLAS_MPP)
    assert cls.tolist() == [0, 1, 2]
    assert (inst[30:50, 30:50] == 1).all() and inst[100:103, 100:103].max() == 0
    assert split_objects(m, GLAS_MPP, options=ObjectOptions(fill_holes=False))[0][40, 40] == 0
    # an empty map has no objects
    empty, none = split_objects(np.zeros((8, 8), np.uint8), GLAS_MPP)
    assert empty.max() == 0 and none.tolist() == [0]


def test_separate_draws_a_line_between_touching_objects(shared_data):
    mask = _glas_mask(shared_data, "train_12") > 0
    merged = (ndimage.binary_closing(mask, structure=np.ones((9, 9)), iterations=2) | mask).astype(np.uint8)
    inst, cls = split_objects(merged, GLAS_MPP)
    out = separate(inst, cls)
    # 8-connected regions of the separated map are exactly the objects (none touches another)
    _regions, n = ndimage.label(out > 0, structure=np.ones((3, 3)))
    assert n == int(inst.max())
    # each object loses at most its line to a neighbour: the outer edge is untouched
    assert ((out > 0) & (inst == 0)).sum() == 0
    assert (out > 0).sum() > 0.97 * (inst > 0).sum()


def test_a_contour_models_interiors_are_the_objects(shared_data):
    """A contour model's map (classes of training/gland_targets.contour_target on real GlaS masks, with the
    gaps between glands bridged by contour as a model does): one object per true gland, no watershed,
    full size back, and the contour class gone from the separated map."""
    from napari_pathfm.training.gland_targets import contour_target

    for name in ("train_3", "train_12", "train_40"):
        mask = (_glas_mask(shared_data, name) > 0).astype(np.uint8)
        truth, n_true = ndimage.label(mask)
        target = contour_target(mask, 4)
        bridged = ndimage.binary_closing(mask, structure=np.ones((9, 9)), iterations=2) & (mask == 0)
        target[bridged] = 2  # the gaps predicted as contour: one connected region, interiors apart
        options = ObjectOptions(split_um=None, contour_class=2)
        inst, cls = split_objects(target, GLAS_MPP, options=options)
        big = np.bincount(truth.ravel())[1:] * GLAS_MPP**2 >= options.min_area_um2
        assert abs(int(inst.max()) - int(big.sum())) <= 1, name
        assert set(cls[1:].tolist()) == {1}
        # each object sits on one true gland and covers most of it
        for i in range(1, int(inst.max()) + 1):
            under = np.bincount(truth[inst == i], minlength=n_true + 1)[1:]
            assert under.max() >= 0.8 * (truth == under.argmax() + 1).sum()
        assert set(np.unique(separate(inst, cls)).tolist()) <= {0, 1}


def test_a_contour_only_region_is_one_object():
    m = np.zeros((60, 60), np.uint8)
    m[5:55, 5:55] = 2
    inst, cls = split_objects(m, GLAS_MPP, classes=[1, 2], options=ObjectOptions(contour_class=2))
    assert int(inst.max()) == 1 and cls.tolist() == [0, 1]
