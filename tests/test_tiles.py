"""Tissue masks, tile grids and the streaming tile loader, on the real CMU-1-Small-Region slide.

CMU-1-Small-Region.svs is one level, 2967 x 2220 px (height x width) at 0.499 µm/px:
a strip of skin running from the top to the bottom, white glass on the left.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_pathfm.errors import Cancelled, SlideError
from napari_pathfm.io import open_slide
from napari_pathfm.tiles import (
    TileGrid,
    TissueMask,
    choose_level,
    iter_tile_batches,
    iter_tiles,
    read_tile,
    resize_tile,
    tile_grid,
    tissue_mask,
)

H0, W0 = 2967, 2220
WHITE_BOX = (1340, 0, 800, 535)  # level-0 (y, x, h, w): glass left of the tissue
TISSUE_BOX = (1990, 920, 300, 300)  # level-0 (y, x, h, w): dense dermis


@pytest.fixture(scope="module")
def slide(cmu_small: Path):
    s = open_slide(cmu_small)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tissue(slide) -> TissueMask:
    return tissue_mask(slide)


def _box_mean(thumb: np.ndarray, box, scale: float) -> float:
    y, x, h, w = (int(round(v / scale)) for v in box)
    return float(thumb[y : y + h, x : x + w].mean())


# -- tissue -------------------------------------------------------------------------


def test_tissue_mask_finds_tissue_and_excludes_glass(slide, tissue):
    assert slide.level_shapes[0] == (H0, W0)
    assert tissue.downsample == 16.0  # 8 µm/px / 0.499 µm/px rounded to whole pixels
    assert tissue.mpp == pytest.approx(16 * 0.499)
    assert tissue.mask.shape == (math.ceil(H0 / 16), math.ceil(W0 / 16))
    assert tissue.mask.dtype == bool
    assert 0.2 < tissue.tissue_fraction < 0.95

    thumb = slide.thumbnail(512)
    scale = H0 / thumb.shape[0]
    assert _box_mean(thumb, WHITE_BOX, scale) > 230, "reference region should be white glass"
    assert _box_mean(thumb, TISSUE_BOX, scale) < 200, "reference region should be stained tissue"
    assert tissue.fraction(*WHITE_BOX) < 0.02
    assert tissue.fraction(*TISSUE_BOX) > 0.95


def test_tissue_methods_agree_roughly(slide, tissue):
    sat = tissue_mask(slide, method="saturation")
    assert 0.2 < sat.tissue_fraction < 0.95
    agree = (sat.mask == tissue.mask).mean()
    assert agree > 0.9
    with pytest.raises(ValueError):
        tissue_mask(slide, method="magic")


@pytest.fixture(scope="module")
def lowres(slide) -> np.ndarray:
    """The slide at 16x downsample (7.98 µm/px), what ``tissue_mask(slide)`` works on."""
    full = slide.read(0, 0, 0, 16 * 186, 16 * 139).astype(np.float32)
    return full.reshape(186, 16, 139, 16, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def _count(lowres, **kw) -> int:
    return int(tissue_mask(lowres, mpp=16 * 0.499, image_mpp=16 * 0.499, **kw).mask.sum())


def test_tissue_mask_of_an_array_equals_that_of_the_slide(slide, tissue, lowres):
    tm = tissue_mask(lowres, mpp=16 * 0.499, image_mpp=16 * 0.499)
    assert tm.downsample == 1 and tm.mask.shape == tissue.mask.shape
    assert (tm.mask == tissue.mask).mean() > 0.995


def test_tissue_parameters_act_monotonically(lowres):
    sat = [_count(lowres, method="saturation", saturation_threshold=t) for t in (0.05, 0.2, 0.3, 0.5)]
    assert sat == sorted(sat, reverse=True) and sat[0] > sat[-1]

    bare = dict(opening_radius=0, fill_holes=False, min_object_area_px=0)
    close = [_count(lowres, closing_radius=r, **bare) for r in (0, 1, 2, 4, 8)]
    assert close == sorted(close) and close[0] < close[-1]

    area = [_count(lowres, min_object_area_um2=a) for a in (0, 1e4, 1e5, 1e6)]
    assert area == sorted(area, reverse=True) and area[-1] == 0  # all tissue is < 1 mm²

    white = [
        _count(lowres, method="saturation", saturation_threshold=0.02, exclude_white=w) for w in (250, 200, 150, 100)
    ]
    assert white == sorted(white, reverse=True) and white[0] > white[-1]

    dark = [_count(lowres, exclude_dark=d) for d in (None, 40, 120, 200)]
    assert dark == sorted(dark, reverse=True) and dark[0] > dark[-1]

    holes = [_count(lowres, fill_holes=f) for f in (False, True)]
    assert holes[0] <= holes[1]


def test_tissue_mask_of_an_rgb_thumbnail_matches_the_slide(slide, tissue):
    thumb = slide.thumbnail(512)
    ds = H0 / thumb.shape[0]
    tm = tissue_mask(thumb, image_mpp=slide.mpp * ds)
    assert tm.level0_shape == thumb.shape[:2]
    assert tm.downsample == round(8.0 / (slide.mpp * ds))
    assert abs(tm.tissue_fraction - tissue.tissue_fraction) < 0.05


def test_tissue_mask_without_mpp_falls_back_to_a_downsample(slide):
    no_mpp = _Proxy(slide, mpp=None)
    tm = tissue_mask(no_mpp)
    assert tm.downsample == 32.0 and tm.mpp is None
    assert tm.mask.shape == (math.ceil(H0 / 32), math.ceil(W0 / 32))
    assert 0.2 < tm.tissue_fraction < 0.95
    assert tissue_mask(no_mpp, downsample=64).downsample == 64.0
    with pytest.raises(SlideError, match="pixel size"):
        tile_grid(no_mpp, 256, mpp=0.5)


def test_tissue_mask_progress_and_cancel(slide):
    calls = []
    tissue_mask(slide, progress=lambda d, t, m="": calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1]
    with pytest.raises(Cancelled):
        tissue_mask(slide, cancel=lambda: True)


def test_fraction_is_exact_area_weighting():
    rng = np.random.default_rng(1)
    mask = rng.random((10, 12)) > 0.5
    tm = TissueMask(mask, downsample=4, level0_shape=(40, 48))
    up = np.zeros((80, 100))
    up[:40, :48] = np.kron(mask, np.ones((4, 4)))
    for _ in range(50):
        y, x = rng.integers(-5, 45, size=2)
        h, w = rng.integers(1, 30, size=2)
        yy, xx = max(y, 0), max(x, 0)
        expected = up[yy : y + h, xx : x + w].sum() / (h * w)
        assert tm.fraction(y, x, h, w) == pytest.approx(expected, abs=1e-9)
    assert tm.to_level0_slices(2, 3) == (slice(8, 12), slice(12, 16))
    assert tm.to_mask_slices(5, 0, 10, 4) == (slice(1, 4), slice(0, 1))


# -- grid ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mpp, read_size, grid_shape",
    [(0.5, 257, (12, 9)), (1.0, 513, (6, 5)), (2.0, 1026, (3, 3))],
)
def test_grid_at_target_mpp(slide, mpp, read_size, grid_shape):
    g = tile_grid(slide, 256, mpp=mpp)
    assert g.level == 0 and g.read_size == read_size == round(256 * mpp / 0.499)
    assert g.grid_shape == grid_shape == (math.ceil(H0 / read_size), math.ceil(W0 / read_size))
    assert len(g) == grid_shape[0] * grid_shape[1]
    assert g.tiles.shape == (len(g), 2) and g.tiles.dtype == np.int64
    assert g.scale == pytest.approx(read_size / 256)
    assert g.mpp == pytest.approx(mpp, rel=0.01) and g.target_mpp == mpp
    assert g.level0_size == pytest.approx(read_size)
    rows, cols = grid_shape
    expected = np.array([(r * read_size, c * read_size) for r in range(rows) for c in range(cols)])
    np.testing.assert_array_equal(g.tiles, expected)  # row-major, top-left first
    np.testing.assert_array_equal(g.tile_index, expected // read_size)
    assert g.tiles[:, 0].max() < H0 <= g.tiles[:, 0].max() + read_size
    assert g.tiles[:, 1].max() < W0 <= g.tiles[:, 1].max() + read_size
    assert g.output_shape == (math.ceil(H0 * 256 / read_size), math.ceil(W0 * 256 / read_size))


def test_grid_with_level_and_overlap(slide):
    g = tile_grid(slide, 256, level=0, overlap=64)
    assert g.read_size == 256 and g.stride == 192 and g.scale == 1.0
    assert g.grid_shape == (math.ceil((H0 - 256) / 192) + 1, math.ceil((W0 - 256) / 192) + 1)
    np.testing.assert_array_equal(g.tiles, g.tile_index * 192)
    np.testing.assert_array_equal(g.output_coords, g.tiles)
    assert tile_grid(slide, 256).grid_shape == (12, 9)
    with pytest.raises(ValueError):
        tile_grid(slide, 256, mpp=0.5, level=0)
    with pytest.raises(ValueError):
        tile_grid(slide, 256, overlap=256)
    with pytest.raises(ValueError):
        tile_grid(slide, 256, level=3)


def test_choose_level_never_upsamples_more_than_needed():
    fake = SimpleNamespace(mpp=0.25, level_downsamples=[1.0, 4.0, 16.0])
    assert [choose_level(fake, m) for m in (0.1, 0.9, 1.0, 1.005, 2.0, 4.0, 10.0, 100.0)] == [0, 0, 1, 1, 1, 2, 2, 2]


def test_grid_on_a_pyramid_reads_from_the_right_level(slide):
    pyr = _Proxy(
        slide,
        mpp=0.25,
        level_count=3,
        level_downsamples=[1.0, 4.0, 16.0],
        level_shapes=[(4000, 3000), (1000, 750), (250, 188)],
    )
    g = tile_grid(pyr, 256, mpp=2.0)
    assert (g.level, g.read_size, g.scale) == (1, 512, 8.0)
    np.testing.assert_array_equal(g.level_coords, g.tile_index * 512)
    np.testing.assert_array_equal(g.tiles, g.tile_index * 2048)
    assert g.grid_shape == (math.ceil(4000 / 2048), math.ceil(3000 / 2048))


def test_min_tissue_filters_tiles_in_order(slide, tissue):
    full = tile_grid(slide, 256, mpp=0.5)
    counts = []
    for m in (0.0, 0.1, 0.25, 0.5, 0.9):
        g = tile_grid(slide, 256, mpp=0.5, tissue=tissue, min_tissue=m)
        counts.append(len(g))
        assert g.tissue_fraction is not None and np.all(g.tissue_fraction >= m)
        assert g.grid_shape == full.grid_shape
        flat = g.tile_index[:, 0] * g.grid_shape[1] + g.tile_index[:, 1]
        assert np.all(np.diff(flat) > 0)  # order kept
        np.testing.assert_array_equal(full.tiles[flat], g.tiles)
    assert counts[0] == len(full)
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[2] < counts[0]
    g = tile_grid(slide, 256, mpp=0.5, tissue=tissue)
    by, bx, bh, bw = WHITE_BOX
    s = g.level0_size

    def on_glass(yx):
        return (yx[:, 0] >= by) & (yx[:, 0] + s <= by + bh) & (yx[:, 1] >= bx) & (yx[:, 1] + s <= bx + bw)

    assert on_glass(full.tiles).sum() == 4 and not on_glass(g.tiles).any()


def test_grid_json_and_csv_round_trip(slide, tissue, tmp_path):
    g = tile_grid(slide, 224, mpp=1.0, overlap=16, tissue=tissue)
    back = TileGrid.from_json(g.to_json(tmp_path / "grid.json"))
    assert TileGrid.from_json(tmp_path / "grid.json").to_dict() == g.to_dict()
    np.testing.assert_array_equal(back.tiles, g.tiles)
    np.testing.assert_allclose(back.tissue_fraction, g.tissue_fraction)
    assert (back.level, back.read_size, back.scale, back.mpp, back.grid_shape, back.output_shape) == (
        g.level,
        g.read_size,
        g.scale,
        g.mpp,
        g.grid_shape,
        g.output_shape,
    )
    g.to_csv(tmp_path / "grid.csv")
    lines = (tmp_path / "grid.csv").read_text().splitlines()
    assert lines[0].startswith("index,row,col,y0,x0") and len(lines) == len(g) + 1
    sub = g.subset(np.arange(len(g)) % 2 == 0)
    assert len(sub) == (len(g) + 1) // 2


# -- loader -------------------------------------------------------------------------


def test_iter_tiles_match_slide_read_in_order(slide, tissue):
    g = tile_grid(slide, 256, level=0, tissue=tissue)
    tiles = list(iter_tiles(slide, g, prefetch=4, workers=2))
    assert [t.index for t in tiles] == list(range(len(g)))
    for t in tiles:
        assert t.image.shape == (256, 256, 3) and t.image.dtype == np.uint8
        y, x = t.yx
        assert (y, x) == tuple(g.tiles[t.index])
        np.testing.assert_array_equal(t.image, slide.read(0, y, x, 256, 256))


def test_iter_tiles_resize_from_read_size(slide, tissue):
    g = tile_grid(slide, 256, mpp=1.0, tissue=tissue)
    assert g.read_size == 513
    for index, (y, x), image in iter_tiles(slide, g):
        region = slide.read(0, y, x, 513, 513)
        np.testing.assert_array_equal(image, resize_tile(region, 256))
    exact = tile_grid(slide, 256, mpp=0.998, tissue=tissue)
    assert exact.read_size == 512
    for index, (y, x), image in iter_tiles(slide, exact, indices=[0, len(exact) // 2]):
        region = slide.read(0, y, x, 512, 512).astype(np.float64)
        block_mean = region.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
        assert np.abs(image - block_mean).max() <= 1.0  # area interpolation, not subsampling
    border = tile_grid(slide, 256, mpp=1.0)
    last = read_tile(slide, border, len(border) - 1)  # hangs over the bottom-right corner
    assert last.shape == (256, 256, 3)
    assert np.all(last[-20:, -20:] == 255)  # padded with the white background


def test_iter_tiles_workers_batches_and_indices_agree(slide, tissue):
    g = tile_grid(slide, 128, mpp=2.0)
    ref = list(iter_tiles(slide, g, workers=0))
    threaded = list(iter_tiles(slide, g, workers=3, prefetch=2))
    assert [t.index for t in threaded] == [t.index for t in ref]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(ref, threaded))
    batches = list(iter_tile_batches(slide, g, batch_size=4))
    assert len(g) == 30 and [len(b.indices) for b in batches] == [4] * 7 + [2]
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), np.stack([t.image for t in ref]))
    np.testing.assert_array_equal(np.concatenate([b.yx for b in batches]), g.tiles)
    picked = list(iter_tiles(slide, g, indices=[5, 1]))
    assert [t.index for t in picked] == [5, 1]
    assert np.array_equal(picked[0].image, ref[5].image)
    progress = []
    list(iter_tiles(slide, g, progress=lambda d, t, m="": progress.append((d, t))))
    assert progress == [(i + 1, len(g)) for i in range(len(g))]


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pathfm-tiles")]


def _new_threads(baseline: set) -> set:
    """Threads started since ``baseline`` (a set of threads) that are still alive; threads of earlier
    tests that end meanwhile do not count, so the check is about this test's threads only."""
    return set(threading.enumerate()) - baseline


def _wait_for_threads(baseline: set, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while _new_threads(baseline) and time.monotonic() < end:
        time.sleep(0.01)


def test_cancel_stops_early_without_leaking_threads(slide):
    g = tile_grid(slide, 256, level=0)
    baseline = set(threading.enumerate())
    stop = threading.Event()
    seen = []
    with pytest.raises(Cancelled):
        for t in iter_tiles(slide, g, prefetch=8, workers=3, cancel=stop):
            seen.append(t.index)
            if len(seen) == 3:
                stop.set()
    assert seen == [0, 1, 2]
    assert not _new_threads(baseline) and not _loader_threads()

    gen = iter_tiles(slide, g, workers=3)
    next(gen)
    assert _loader_threads()
    gen.close()  # abandoning the iterator also stops its threads
    _wait_for_threads(baseline)
    assert not _new_threads(baseline) and not _loader_threads()

    with pytest.raises(Cancelled):
        next(iter_tiles(slide, g, cancel=lambda: True))
    assert not _new_threads(baseline)


def test_read_errors_reach_the_consumer(wsi_dir):
    path = wsi_dir / "unreadable.svs"
    with pytest.raises(SlideError, match="unreadable.svs"):
        open_slide(path)  # the lead's reader probes pixels on open
    from napari_pathfm.io._openslide_backend import OpenSlideBackend
    from napari_pathfm.io.slide import Slide

    bad = Slide(path, OpenSlideBackend(path, None))  # opens, but every read_region fails
    baseline = set(threading.enumerate())
    g = tile_grid(bad, 8, level=0)
    assert len(g) == 4
    with pytest.raises(SlideError, match="Bogus marker"):
        list(iter_tiles(bad, g, workers=2))
    with pytest.raises(SlideError):
        list(iter_tiles(bad, g, workers=0))
    assert not _new_threads(baseline)


def test_a_failing_tile_mid_stream_is_raised_not_zero_filled(slide):
    g = tile_grid(slide, 128, mpp=2.0)
    flaky = _Proxy(slide, read=_FailAt(slide, fail_at=(0, int(g.level_coords[5][0]), int(g.level_coords[5][1]))))
    baseline = set(threading.enumerate())
    got = []
    with pytest.raises(SlideError, match="tile 5") as err:
        for t in iter_tiles(flaky, g, workers=2, prefetch=4):
            got.append(t.index)
    assert got == [0, 1, 2, 3, 4]
    assert isinstance(err.value.__cause__, OSError)
    assert not _new_threads(baseline)


class _FailAt:
    def __init__(self, slide, fail_at):
        self.slide, self.fail_at = slide, fail_at

    def __call__(self, level, y, x, h, w):
        if (level, y, x) == self.fail_at:
            raise OSError("simulated decode failure")
        return self.slide.read(level, y, x, h, w)


class _Proxy:
    """The real slide with some attributes overridden (unknown mpp, a pretend pyramid)."""

    def __init__(self, slide, **overrides):
        self._slide = slide
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def best_level_for_downsample(self, ds):
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= ds * 1.01:
                best = i
        return best
