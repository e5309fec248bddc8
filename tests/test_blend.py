"""Overlap blending: exact reproduction of smooth fields, seamless transitions, zarr stores."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from napari_pathfm.tiles.blend import TileBlender, gaussian_weights, pyramidal_weights

WEIGHTS = ["pyramidal", "gaussian"]


def smooth_field(h: int, w: int, c: int | None = None, y0: int = 0, x0: int = 0) -> np.ndarray:
    """A 2-D linear ramp plus a sine pattern, evaluated at canvas rows y0.., cols x0.."""
    yy, xx = np.meshgrid(np.arange(y0, y0 + h), np.arange(x0, x0 + w), indexing="ij")
    f = 0.01 * yy - 0.015 * xx + np.sin(xx / 7.0) * np.cos(yy / 11.0)
    if c is None:
        return f
    return np.stack([f * (k + 1) + k for k in range(c)], axis=-1)


def tile_origins(n: int, tile: int, stride: int, start: int = 0) -> list[int]:
    """Origins from ``start`` (may be negative) until a tile reaches past the canvas end."""
    out, o = [], start
    while True:
        out.append(o)
        if o + tile >= n:
            return out
        o += stride


def cut_and_blend(blender: TileBlender, tile: int, stride: int, start: int = 0) -> int:
    H, W = blender.shape[:2]
    c = blender.shape[2] if len(blender.shape) == 3 else None
    n = 0
    for y in tile_origins(H, tile, stride, start):
        for x in tile_origins(W, tile, stride, start):
            blender.add(y, x, smooth_field(tile, tile, c, y, x))
            n += 1
    return n


@pytest.mark.parametrize("kind", WEIGHTS)
def test_weights_strictly_positive_and_peaked(kind):
    fn = pyramidal_weights if kind == "pyramidal" else gaussian_weights
    for h, w in [(1, 1), (7, 7), (64, 64), (33, 80)]:
        wt = fn(h, w)
        assert wt.shape == (h, w)
        assert wt.min() > 0
        assert wt.max() == pytest.approx(1.0)
        np.testing.assert_allclose(wt, wt[::-1, ::-1])
    wt = fn(64, 64)
    assert wt[32, 32] > wt[32, 16] > wt[32, 0]
    assert wt[0, 0] == wt.min()


def test_pyramidal_is_distance_to_border_plus_one():
    wt = pyramidal_weights(6, 8)
    expected = np.array([[min(y, 5 - y, x, 7 - x) + 1 for x in range(8)] for y in range(6)], float)
    np.testing.assert_allclose(wt, expected / expected.max())


@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("channels", [None, 3])
@pytest.mark.parametrize("start", [0, -20])
def test_blend_reproduces_smooth_field_in_memory(kind, channels, start):
    H, W = 150, 190
    shape = (H, W) if channels is None else (H, W, channels)
    b = TileBlender(shape, weights=kind)
    assert cut_and_blend(b, tile=64, stride=40, start=start) > 12
    out = b.result()
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, smooth_field(H, W, channels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("flatten", [True, False])
def test_blend_reproduces_field_with_and_without_edge_flattening(kind, flatten):
    b = TileBlender((97, 131), weights=kind, flatten_canvas_edges=flatten, dtype=np.float64)
    cut_and_blend(b, tile=48, stride=30, start=-7)
    np.testing.assert_allclose(b.result(), smooth_field(97, 131), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", WEIGHTS)
def test_blend_reproduces_field_with_zarr_store(tmp_path, kind):
    H, W, C = 150, 190, 2
    b = TileBlender((H, W, C), weights=kind, store=tmp_path / "acc.zarr", chunks=(64, 64))
    cut_and_blend(b, tile=64, stride=48, start=-16)
    out = b.result()
    assert out.shape == (H, W, C)
    assert out.chunks == (64, 64, C) and out.nchunks == 3 * 3
    np.testing.assert_allclose(out[:], smooth_field(H, W, C), rtol=0, atol=1e-5)
    # The accumulators and the result persist on disk for outputs larger than RAM.
    import zarr

    g = zarr.open_group(str(tmp_path / "acc.zarr"), mode="r")
    assert set(g.array_keys()) >= {"sum", "weight", "result"}
    np.testing.assert_allclose(g["result"][:], out[:])


def test_zarr_result_is_written_chunk_by_chunk(tmp_path):
    H, W, C = 1000, 1200, 2
    b = TileBlender((H, W, C), weights="pyramidal", store=tmp_path / "big.zarr", chunks=(256, 256))
    cut_and_blend(b, tile=256, stride=192)
    blocks = list(b.blocks())
    assert len(blocks) == 4 * 5
    assert all((s.stop - s.start) <= 256 for by, bx in blocks for s in (by, bx))
    full_bytes = H * W * C * 4
    tracemalloc.start()
    try:
        out = b.result()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_bytes / 3, f"result() used {peak} bytes for a {full_bytes}-byte output"
    assert out.nchunks == 20
    for by, bx in [blocks[0], blocks[7], blocks[-1]]:
        expected = smooth_field(by.stop - by.start, bx.stop - bx.start, C, by.start, bx.start)
        np.testing.assert_allclose(out[by, bx], expected, rtol=0, atol=1e-5)


def test_uncovered_pixels_take_the_fill_value():
    b = TileBlender((40, 40), fill_value=np.nan)
    b.add(0, 0, np.full((16, 16), 2.0))
    out = b.result()
    assert np.all(out[:16, :16] == 2.0)
    assert np.isnan(out[16:, :]).all() and np.isnan(out[:, 16:]).all()
    assert np.all(TileBlender((8, 8)).result() == 0)


def test_tiles_outside_the_canvas_are_ignored_and_clipped():
    b = TileBlender((20, 20))
    b.add(-50, -50, np.ones((16, 16)))
    b.add(25, 0, np.ones((16, 16)))
    assert not np.asarray(b.weight_sum).any()
    b.add(10, 12, np.full((16, 16), 3.0))
    out = b.result()
    assert np.all(out[10:, 12:] == 3.0) and np.all(out[:10] == 0)


def max_step(img: np.ndarray) -> float:
    return max(np.abs(np.diff(img, axis=0)).max(), np.abs(np.diff(img, axis=1)).max())


@pytest.mark.parametrize("kind", WEIGHTS)
def test_disagreeing_tiles_blend_without_seams(kind):
    """Tiles with different constant values: naive pasting/averaging jumps at every tile
    edge, blending turns the jump into a ramp over the overlap."""
    rng = np.random.default_rng(0)
    H, W, tile, stride = 224, 288, 96, 64
    blended = TileBlender((H, W), weights=kind, dtype=np.float64)
    pasted = np.zeros((H, W))
    mean_sum, mean_n = np.zeros((H, W)), np.zeros((H, W))
    for y in tile_origins(H, tile, stride):
        for x in tile_origins(W, tile, stride):
            v = rng.uniform(0, 1)
            blended.add(y, x, np.full((tile, tile), v))
            pasted[y : y + tile, x : x + tile] = v
            mean_sum[y : y + tile, x : x + tile] += v
            mean_n[y : y + tile, x : x + tile] += 1
    out = blended.result()
    naive_paste, naive_mean = max_step(pasted), max_step(mean_sum / mean_n)
    assert naive_paste > 0.5 and naive_mean > 0.2
    assert max_step(out) < 0.1
    assert max_step(out) < naive_mean / 4


def test_canvas_edge_flattening_removes_edge_seams():
    """Two disagreeing tiles overlapping along the top canvas edge: with tapered top sides,
    both weights are equal there and the value jumps; flattened sides blend smoothly."""
    for flatten, ok in [(True, True), (False, False)]:
        b = TileBlender((64, 192), weights="pyramidal", dtype=np.float64, flatten_canvas_edges=flatten)
        b.add(0, 0, np.zeros((64, 128)))
        b.add(0, 64, np.ones((64, 128)))
        row0 = b.result()[0]
        assert bool(np.abs(np.diff(row0)).max() < 0.1) is ok


def test_argmax_result_labels(tmp_path):
    H, W, C = 100, 120, 3
    logits = np.zeros((H, W, C), np.float32)
    logits[:, :40, 0] = 5
    logits[:, 40:80, 1] = 5
    logits[:, 80:, 2] = 5
    for store in (None, tmp_path / "lab.zarr"):
        b = TileBlender((H, W, C), store=store, chunks=(64, 64))
        for y in tile_origins(H, 48, 32):
            for x in tile_origins(W, 48, 32):
                b.add(y, x, logits[y : y + 48, x : x + 48])
        labels = np.asarray(b.argmax_result()[:])
        assert labels.dtype == np.uint8
        expected = np.zeros((H, W), np.uint8)
        expected[:, 40:80], expected[:, 80:] = 1, 2
        np.testing.assert_array_equal(labels, expected)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError):
        TileBlender((10,))
    with pytest.raises(ValueError):
        TileBlender((10, 10), weights="cosine")
    with pytest.raises(ValueError):
        TileBlender((10, 10), weights=np.zeros((4, 4)))
    b = TileBlender((10, 10, 2))
    with pytest.raises(ValueError):
        b.add(0, 0, np.ones((4, 4)))
    b = TileBlender((10, 10), weights=np.ones((4, 4)))
    with pytest.raises(ValueError):
        b.add(0, 0, np.ones((5, 5)))
    with pytest.raises(ValueError):
        TileBlender((10, 10)).argmax_result()
