"""A prompted object across tiles (pipelines/prompt_tiles.py): which tile decides each pixel, which tiles an
object needs, the prompt a neighbouring tile gets, the joined logits, and whether the object may be cut.

The grid is the real one ``pathfm segment`` and ``pathfm prompt`` lay over a real (generated) image:
256 px tiles overlapping by 64 px on a 600 x 500 px PNG at 0.5 µm/px, read at the same µm/px."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from napari_pathfm.pipelines.prompt import Prompt
from napari_pathfm.pipelines.prompt_tiles import (
    carried_prompt,
    nearest_tiles,
    reaches_uncovered,
    stitch_logits,
    tiles_needed,
)


@pytest.fixture()
def grid(tmp_path):
    from napari_pathfm.pipelines.tile_run import opened_slide
    from napari_pathfm.tiles import tile_grid

    path = tmp_path / "field.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 600, 3), np.uint8)).save(path)
    with opened_slide(path, 0.5) as slide:
        g = tile_grid(slide, 256, mpp=0.5, overlap=64)
    assert g.level0_size == 256 and g.level0_shape == (500, 600)
    return g


def _tile(grid, y, x) -> int:
    return int(np.flatnonzero((grid.tiles[:, 0] == y) & (grid.tiles[:, 1] == x))[0])


def test_each_pixel_goes_to_the_covering_tile_with_the_nearest_centre(grid):
    everything = nearest_tiles(grid, range(len(grid.tiles)), (0, 0, 500, 600))
    assert (everything >= 0).all(), "the grid covers the image"
    a, b = _tile(grid, 0, 0), _tile(grid, 0, 192)
    assert everything[128, 128] == a and everything[128, 320] == b
    # the 64 px overlap of the two is split at its middle (x 192..255: 192..223 nearer a's centre)
    assert everything[100, 223] == a and everything[100, 224] == b
    two = nearest_tiles(grid, [a, b], (0, 0, 500, 600))
    assert (two[256:] == -1).all() and (two[:256, 448:] == -1).all(), "neither covers these"
    assert two[100, 300] == 1 and two[100, 200] == 0


def test_an_object_needs_the_tiles_that_decide_its_pixels(grid):
    a, b, c = _tile(grid, 0, 0), _tile(grid, 0, 192), _tile(grid, 192, 0)
    mask = np.zeros((60, 60), bool)
    mask[10:50, 10:50] = True
    assert tiles_needed(grid, mask, 100, 100) == {a}, "inside a's core"
    wide = np.ones((40, 200), bool)
    assert tiles_needed(grid, wide, 100, 100) == {a, b}, "crosses into b's core"
    assert tiles_needed(grid, np.ones((100, 40), bool), 200, 100) == {a, c}
    assert tiles_needed(grid, np.zeros((5, 5), bool), 0, 0) == set()


def test_stitched_logits_take_each_pixel_from_its_nearest_tile(grid):
    a, b = _tile(grid, 0, 0), _tile(grid, 0, 192)
    logits = {a: np.full((256, 256), -1.0, np.float32), b: np.full((256, 256), 2.0, np.float32)}
    out, covered, y0, x0 = stitch_logits(grid, logits)
    assert (y0, x0) == (0, 0) and out.shape == (256, 448) and covered.all()
    assert (out[:, :224] == -1).all() and (out[:, 224:] == 2).all()
    edge = _tile(grid, 384, 384)  # clipped by the image: 116 x 216 px of it are inside
    out, covered, y0, x0 = stitch_logits(grid, {edge: np.ones((116, 216), np.float32)})
    assert (y0, x0) == (384, 384) and out.shape == (116, 216) and (out == 1).all()


def test_a_neighbour_gets_the_users_prompt_inside_it_or_a_click_deep_in_the_object(grid):
    b = _tile(grid, 0, 192)  # x 192..447
    mask = np.zeros((500, 600), bool)
    mask[40:120, 100:300] = True  # an object from x 100 to 299, found on tile a
    click = Prompt(points=((150, 80), (260, 30)), labels=(1, 0))
    carried = carried_prompt(click, grid, b, mask, 0, 0)
    assert carried.labels == (0, 1), "the negative click inside b is kept, a positive one added"
    (nx, ny), (px, py) = carried.points
    assert (nx, ny) == (260, 30)
    assert 192 <= px < 300 and 40 <= py < 120, "the added click is on the object, inside b"
    assert abs(py - 80) <= 1, "at the object's deepest row"
    boxed = carried_prompt(Prompt(box=(100, 40, 300, 120)), grid, b, mask, 0, 0)
    assert boxed.box == (192, 40, 300, 120), "the box clipped to b"
    inside = carried_prompt(Prompt(points=((250, 60),)), grid, b, mask, 0, 0)
    assert inside.points == ((250.0, 60.0),), "the user's own click in b is enough"
    far = _tile(grid, 192, 384)
    assert carried_prompt(click, grid, far, mask, 0, 0) is None, "nothing of the object in that tile"


def test_an_object_at_the_edge_of_its_tiles_may_be_cut_but_not_at_the_images(grid):
    covered = np.ones((256, 256), bool)
    mask = np.zeros((256, 256), bool)
    mask[100:150, 100:150] = True
    assert not reaches_uncovered(mask, covered, 100, 100, grid.level0_shape)
    mask[100:150, 200:256] = True
    assert reaches_uncovered(mask, covered, 100, 100, grid.level0_shape), "the image goes on to the right"
    assert not reaches_uncovered(mask, covered, 244, 344, grid.level0_shape), "ends at the image's edge"
    holey = covered.copy()
    holey[:, 230:] = False  # a tile not asked
    assert reaches_uncovered(mask & holey, holey, 244, 344, grid.level0_shape)
