"""The banded blending canvas of whole-slide segmentation (:mod:`napari_pathfm.tiles.canvas`).

Random, disagreeing tile logits blended band by band must give exactly the whole-canvas blend of
the shared :class:`~napari_pathfm.tiles.TileBlender`, resampled to level 0 as torch's bilinear
interpolation does it, on the numpy (CPU) and torch (accelerator) paths.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    "image, mpp, backend",
    [
        ("glas", None, "numpy"),
        ("glas", None, "torch"),
        ("cmu", 1.0, "numpy"),
        ("cmu", 1.0, "torch"),
        ("cmu", 0.5, "numpy"),
    ],
)
def test_banded_canvas_is_the_whole_slide_blend_resampled(cmu_small, shared_data, monkeypatch, image, mpp, backend):
    """Tiles that disagree (random logits, per-tile offsets): blending them in narrow bands gives
    exactly the shared TileBlender's blend of the whole canvas, resampled to level 0 the way
    ``torch.nn.functional.interpolate`` (bilinear) does it; torch is the GPU code path."""
    import torch.nn.functional as F

    import napari_pathfm.tiles.canvas as canvas_module
    from napari_pathfm.io import open_slide
    from napari_pathfm.tiles import TileBlender, tile_grid, tissue_mask

    path = cmu_small if image == "cmu" else shared_data / "glas" / "train" / "images" / "train_1.png"
    if not path.is_file():
        pytest.skip(f"GlaS image not found at {path}")
    with open_slide(path) as slide:
        tissue = tissue_mask(slide, downsample=None if slide.mpp else 4)
        grid = tile_grid(slide, 128, mpp=mpp, overlap=32, tissue=tissue, min_tissue=1e-9)
    k, t = 3, grid.tile_size
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(grid), k, t, t)).astype(np.float32) + rng.normal(size=(len(grid), k, 1, 1)) * 3
    logits = logits.astype(np.float32)
    monkeypatch.setattr(canvas_module, "BAND_BYTES", 120 * grid.output_shape[1] * (k + 1) * 4)  # bands of ~100 rows
    store = np.zeros(grid.level0_shape, np.uint8)
    canvas = canvas_module.BandedCanvas(grid, k, store, None if backend == "numpy" else torch.device("cpu"))
    assert canvas.core < grid.output_shape[0] // 3
    whole = TileBlender(grid.output_shape + (k,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what is checked is the logic of the GPU path; this keeps it quick
    try:
        for (y, x), tile in zip(grid.output_coords, logits):
            canvas.add(int(y), int(x), tile if backend == "numpy" else torch.from_numpy(tile))
            whole.add(y, x, np.moveaxis(tile, 0, -1))
        canvas.finish()
    finally:
        torch.set_num_threads(threads)
    blended, covered = torch.from_numpy(whole.result()).permute(2, 0, 1), whole.weight_sum > 0
    h0, w0 = grid.level0_shape
    s = grid.scale
    if s == 1.0:
        expected = np.where(covered, blended.argmax(0).numpy(), 0)[:h0, :w0]
    else:
        rel = (blended[1:] - blended[:1])[None]
        up = F.interpolate(
            rel, scale_factor=(s, s), mode="bilinear", align_corners=False, recompute_scale_factor=False
        )[0, :, :h0, :w0]
        near_y = np.minimum(((np.arange(h0) + 0.5) / s).astype(int), covered.shape[0] - 1)
        near_x = np.minimum(((np.arange(w0) + 0.5) / s).astype(int), covered.shape[1] - 1)
        full = torch.cat([torch.zeros_like(up[:1]), up]).numpy()  # class 0 is 0
        top2 = np.sort(full, axis=0)[-2:]
        margin = top2[1] - top2[0]
        expected = np.where(covered[near_y][:, near_x], full.argmax(0), 0)
        mismatch = store != expected
        # Float rounding differs between the two implementations only at near-ties.
        assert np.all(margin[mismatch] < 1e-4), margin[mismatch].max()
        expected[mismatch] = store[mismatch]
    np.testing.assert_array_equal(store, expected)
    assert len(np.unique(store)) == k
