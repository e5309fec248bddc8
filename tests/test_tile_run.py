"""The tile-run frame shared by segment, classify and features (:mod:`napari_pathfm.pipelines.tile_run`).

A toy task on the bundled sample slide: every tile reaches ``collect`` once, in grid order, with
the pixels the loader reads; ``finish`` runs after the last batch and ``close`` always, also after a
cancel; a slide opened from a path gets its µm/px back and is closed.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_pathfm.errors import Cancelled, SlideError
from napari_pathfm.pipelines.tile_run import TileTask, opened_slide, plan_tiles, run_mpp, run_tiles

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def sample():
    from napari_pathfm._sample_data import sample_slide_path

    return sample_slide_path()


def _toy(calls: list) -> TileTask:
    """Mean colour of each tile; records the calls it gets."""
    return TileTask(
        "toy run",
        "toying",
        infer=lambda batch: batch.images.reshape(len(batch.indices), -1).mean(1),
        collect=lambda batch, means: calls.append(("collect", batch.indices.tolist(), means)),
        finish=lambda: calls.append(("finish",)),
        close=lambda: calls.append(("close",)),
    )


def test_every_tile_once_in_grid_order_then_finish_and_close(sample):
    from napari_pathfm.tiles import read_tile

    calls, seen = [], []
    with opened_slide(sample) as slide:
        reader, grid, tissue = plan_tiles(slide, 2.0, 64, what="toy run", min_tissue=0.25)
        assert tissue is not None and len(grid) > 3
        run_tiles(reader, grid, _toy(calls), batch_size=3, progress=lambda d, t, m="": seen.append((d, t, m)))
        expected = np.array([read_tile(slide, grid, i).mean() for i in range(len(grid))])
    batches = [c for c in calls if c[0] == "collect"]
    assert [i for c in batches for i in c[1]] == list(range(len(grid)))
    np.testing.assert_allclose(np.concatenate([c[2] for c in batches]), expected)
    assert calls[-2:] == [("finish",), ("close",)]
    assert seen[0][:2] == (0, len(grid)) and seen[-1][:2] == (len(grid), len(grid))
    assert seen[-1][2].endswith(": toying")


def test_cancel_skips_finish_but_closes(sample):
    cancel, calls = threading.Event(), []
    with opened_slide(sample) as slide:
        reader, grid, _ = plan_tiles(slide, 2.0, 64, what="toy run", tissue_only=False)
        with pytest.raises(Cancelled):
            run_tiles(
                reader,
                grid,
                _toy(calls),
                batch_size=2,
                cancel=cancel,
                progress=lambda d, t, m="": cancel.set() if d >= 2 else None,
            )
    assert ("finish",) not in calls and calls[-1] == ("close",)
    assert len([c for c in calls if c[0] == "collect"]) == 1


def test_opened_slide_restores_mpp_and_closes_what_it_opened(sample, monkeypatch):
    from napari_pathfm.io.slide import Slide

    closed = []
    monkeypatch.setattr(Slide, "close", lambda self: closed.append(self))
    with opened_slide(sample, image_mpp=0.25) as slide:
        assert slide.mpp == 0.25
    assert closed == [slide] and slide.mpp == 0.499, "opened here: mpp restored, closed"
    with opened_slide(slide, image_mpp=1.5) as same:
        assert same is slide and slide.mpp == 1.5
    assert closed == [slide] and slide.mpp == 0.499, "given open: mpp restored, left open"
    with pytest.raises(ValueError, match="image_mpp must be positive"), opened_slide(sample, image_mpp=0):
        pass


def test_run_mpp_falls_back_to_level_0_only_when_the_card_asked(sample):
    with opened_slide(sample) as slide:
        assert run_mpp(slide, None, {"input_mpp": 1.24}, "segmented", "segment") == 1.24
        assert run_mpp(slide, 2.0, {"input_mpp": 1.24}, "segmented", "segment") == 2.0
        slide.mpp = None
        try:
            assert run_mpp(slide, None, {"input_mpp": 1.24}, "segmented", "segment") is None
            with pytest.raises(SlideError, match="cannot be classified at 0.5"):
                run_mpp(slide, 0.5, {}, "classified", "classify")
        finally:
            slide.mpp = 0.499
