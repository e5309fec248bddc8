"""Shift-scale-rotate training crops (training/affine_crop.py) and their use in segment training.

The map is checked against what it must be (the crop's centre lands on the chosen point, a quarter
turn is ``np.rot90``), and the segment crops on real GlaS images keep image and mask aligned:
labels stay labels, what falls outside the image is white and ignored.
"""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from napari_pathfm.training.affine_crop import ssr_matrix, warp_crop


class _Fixed:
    """Stands in for a numpy Generator: ``uniform(lo, hi)`` returns the next of the given shares of the range."""

    def __init__(self, *shares):
        self.shares = list(shares)

    def uniform(self, lo, hi):
        return lo + (hi - lo) * self.shares.pop(0)


def test_the_crop_centre_lands_on_the_chosen_point_at_any_angle_and_scale():
    rng = np.random.default_rng(0)
    half = (64 - 1) / 2
    for _ in range(20):
        mat = ssr_matrix((100.0, 150.0), 64, rng, scale=0.1, rotate_deg=180)
        np.testing.assert_allclose(mat @ [half, half, 1.0], [150.0, 100.0], atol=1e-9)  # (x, y)
        assert 0.9 - 1e-9 <= 1 / np.hypot(*mat[0, :2]) <= 1.1 + 1e-9


def test_a_quarter_turn_is_rot90_and_no_turn_is_the_window():
    a = np.arange(40 * 40, dtype=np.float32).reshape(40, 40)
    centre = (19.5, 19.5)
    still = ssr_matrix(centre, 40, _Fixed(0.5, 0.5, 0.5, 0.5), scale=0.1, rotate_deg=90)
    np.testing.assert_array_equal(warp_crop(a, still, 40, nearest=True), a)
    quarter = ssr_matrix(centre, 40, _Fixed(0.5, 0.5, 0.5, 1.0), scale=0.1, rotate_deg=90)
    turned = warp_crop(a, quarter, 40, nearest=True)
    assert any(np.array_equal(turned, np.rot90(a, k)) for k in (1, 3))
    outside = ssr_matrix((0.0, 0.0), 40, _Fixed(0.5, 0.5, 0.5, 0.5))
    crop = warp_crop(a.astype(np.uint8), outside, 40, nearest=True, fill=255)
    assert (crop[:19, :19] == 255).all() and (crop[:19, 25:] == 255).all()  # above the image: the fill


def test_segment_crops_turn_image_and_mask_together_on_glas(shared_data):
    import torch
    from scipy import ndimage

    from napari_pathfm.training.segment_data import IGNORE
    from napari_pathfm.training.segment_datamodule import SegmentDataModule

    root = shared_data / "glas" / "train"
    if not (root / "images").is_dir():
        pytest.skip(f"GlaS train not found under {root}")
    data = dict(root=str(root), classes=["background", "gland"], mpp=0.62, input_mpp=0.62, color_jitter=0.0)
    data.update(val_names=[], extensions=[".png"], shift_scale_rotate=True)
    dm = SegmentDataModule(data, num_classes=2)
    dm.tile_size = 128
    dm.setup("fit")
    ds = dm.train_dataset()
    assert ds.ssr == (0.1, 180.0)
    torch.manual_seed(0)
    items = [ds[i] for i in range(0, len(ds), 9)]
    for it in items:
        img, msk = it["image"].numpy(), it["mask"].numpy()
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8 and msk.shape == (128, 128)
        assert set(np.unique(msk)) <= {0, 1, IGNORE}
        # outside the image: white and ignored (bilinear pixels on the image's very edge mix in some colour)
        outside = ndimage.binary_erosion(msk == IGNORE, np.ones((3, 3), bool))
        assert (img[outside] == 255).all()
    # glands are darker than the stroma around them in H&E: a turned mask still sits on the glands
    gland = np.concatenate([it["image"].numpy()[it["mask"].numpy() == 1].mean(1) for it in items])
    stroma = np.concatenate([it["image"].numpy()[it["mask"].numpy() == 0].mean(1) for it in items])
    assert gland.mean() < stroma.mean() - 5
