"""Painted corrections on a real slide: which tiles a stroke touches, atomic saving, resuming, bad labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_pathfm.errors import CorrectionError
from napari_pathfm.io import open_slide
from napari_pathfm.pipelines.corrections import CorrectionRecorder, corrections_dir, paint_boxes

MPP, T = 2.0, 128


@pytest.fixture
def slide(cmu_small):
    with open_slide(cmu_small) as s:
        yield s


def _labels(slide):
    from napari_pathfm.tiles import tile_grid

    g = tile_grid(slide, T, mpp=MPP)
    return np.zeros(g.output_shape, np.uint8), g


def test_corrections_folder_is_in_the_user_data_folder_not_beside_the_slide(cmu_small, tmp_path, monkeypatch):
    monkeypatch.setenv("PATHFM_DATA_DIR", str(tmp_path / "data"))
    folder = corrections_dir(cmu_small)
    assert folder.parent == tmp_path / "data" / "corrections" and folder.name.startswith("CMU-1-Small-Region-")
    assert cmu_small.parent not in folder.parents
    assert corrections_dir(cmu_small) == folder, "the same slide file finds the same folder again"


def test_a_brush_stroke_in_a_real_viewer_saves_exactly_the_touched_tiles(make_napari_viewer, qtbot, slide, tmp_path):
    labels, grid = _labels(slide)
    viewer = make_napari_viewer()
    layer = viewer.add_labels(labels, name="mask")
    from qtpy.QtCore import QTimer

    # napari emits a single paint()'s event before writing it: the GUI defers saving to the event loop
    rec = CorrectionRecorder(
        slide,
        layer.data,
        mpp=MPP,
        classes=["background", "gland"],
        tile_size=T,
        folder=tmp_path,
        schedule=lambda fn: QTimer.singleShot(0, fn),
    )
    rec.attach(layer)
    layer.brush_size = 10
    layer.paint((T + 20, 2 * T - 3), 1)  # straddles the border between tile columns 1 and 2 of row 1
    qtbot.waitUntil(lambda: not rec.pending, timeout=5000)
    names = sorted(p.stem for p in (tmp_path / "masks").glob("*.png"))
    assert names == ["CMU-1-Small-Region_r0001_c0001", "CMU-1-Small-Region_r0001_c0002"]
    for name in names:
        img = np.asarray(Image.open(tmp_path / "images" / f"{name}.png"))
        assert img.shape == (T, T, 3) and img.dtype == np.uint8
    mask = np.asarray(Image.open(tmp_path / "masks" / f"{names[0]}.png"))
    assert mask.shape == (T, T) and set(np.unique(mask)) == {0, 1}
    assert mask[20, T - 3] == 1 and mask[20, 10] == 0
    i = rec.tiles_in_box(T + 20, T + 21, T + 5, T + 6)[0]
    from napari_pathfm.tiles.loader import read_tile

    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "images" / f"{names[0]}.png")), read_tile(slide, grid, i)
    )
    doc = json.loads((tmp_path / "corrections.json").read_text())
    assert doc["classes"] == ["background", "gland"] and doc["tile_size"] == T and set(doc["tiles"]) == set(names)
    assert not list(tmp_path.rglob("*.tmp*")), "no temporary files are left"

    layer.fill((5, 5), 1)  # a fill is one more stroke: it reaches every connected background pixel
    qtbot.waitUntil(lambda: not rec.pending, timeout=5000)
    all_tiles = grid.grid_shape[0] * grid.grid_shape[1]
    assert len(list((tmp_path / "masks").glob("*.png"))) == all_tiles
    assert np.asarray(Image.open(tmp_path / "masks" / f"{names[0]}.png"))[20, 10] == 1
    rec.detach()
    layer.paint((3 * T, 10), 0)
    qtbot.wait(50)
    assert len(json.loads((tmp_path / "corrections.json").read_text())["tiles"]) == all_tiles
    assert np.asarray(Image.open(tmp_path / "masks" / "CMU-1-Small-Region_r0003_c0000.png"))[0, 10] == 1


def test_edge_tiles_mark_the_outside_as_ignore_and_recorder_resumes(slide, tmp_path):
    labels, grid = _labels(slide)
    rows, cols = grid.grid_shape
    rec = CorrectionRecorder(slide, labels, mpp=MPP, classes=["bg", "gland"], tile_size=T, folder=tmp_path)
    last = rows * cols - 1
    name = rec.save_tiles([last])[0]
    mask = np.asarray(Image.open(tmp_path / "masks" / f"{name}.png"))
    h, w = labels.shape
    assert (mask[h - (rows - 1) * T :, :] == 255).all() and (mask[:, w - (cols - 1) * T :] == 255).all()
    assert (mask[: h - (rows - 1) * T, : w - (cols - 1) * T] == 0).all()
    again = CorrectionRecorder(slide, labels, mpp=MPP, classes=["bg", "gland"], tile_size=T, folder=tmp_path)
    assert set(again.saved) == {name}
    with pytest.raises(CorrectionError, match="classes") as err:
        CorrectionRecorder(slide, labels, mpp=MPP, classes=["bg", "gland", "tumour"], tile_size=T, folder=tmp_path)
    assert "corrections.json" in str(err.value)


def test_labels_outside_the_model_classes_are_refused_and_nothing_is_written(slide, tmp_path):
    labels, _ = _labels(slide)
    labels[:10, :10] = 7
    rec = CorrectionRecorder(slide, labels, mpp=MPP, classes=["bg", "gland"], tile_size=T, folder=tmp_path)
    with pytest.raises(CorrectionError, match=r"\[7\]"):
        rec.save_tiles(rec.tiles_in_box(0, 5, 0, 5))
    assert not (tmp_path / "masks").exists() or not list((tmp_path / "masks").iterdir())


def test_paint_boxes_reads_both_kinds_of_history_atoms():
    from napari.layers.labels.labels import _MaskedPaintAtom

    masked = _MaskedPaintAtom((slice(3, 9), slice(10, 20)), None, np.zeros(1), 1)
    legacy = ((np.array([5, 7]), np.array([1, 40])), np.zeros(2), 1)
    assert paint_boxes([masked, legacy]) == [(3, 9, 10, 20), (5, 8, 1, 41)]


def test_level0_labels_are_saved_on_the_model_grid(slide, tmp_path):
    """A level-0 class map (what `pathfm segment` writes) is sampled at the model's µm/px."""
    from napari_pathfm.tiles import tile_grid

    h, w = slide.pyramid[0].shape[:2]
    labels = np.zeros((h, w), np.uint8)
    labels[:, w // 2 :] = 1
    rec = CorrectionRecorder(
        slide, labels, mpp=MPP, classes=["bg", "gland"], tile_size=T, folder=tmp_path, labels_downsample=1.0
    )
    g = tile_grid(slide, T, mpp=MPP)
    col = int((w // 2) // g.level0_size)
    tiles = rec.tiles_in_box(10, 12, w // 2 - 1, w // 2 + 1)
    assert [int(v) for v in g.tile_index[tiles[0]]] == [0, col] and len(tiles) == 1
    mask = rec.mask_tile(tiles[0])
    edge = (w // 2 - col * g.level0_size) / g.scale  # model-pixel column where the label flips
    assert (mask[:, : int(edge) - 1] == 0).all() and (mask[:, int(edge) + 1 :] == 1).all()


def test_undo_drops_a_tile_back_at_the_baseline_and_restore_writes_saved_tiles_back(slide, tmp_path):
    """Undo through the wrapped ``layer.undo``; a new class map gets the saved corrections back."""
    from napari.layers import Labels

    labels, _grid = _labels(slide)
    layer = Labels(labels)
    rec = CorrectionRecorder(
        slide, layer.data, mpp=MPP, classes=["bg", "gland"], tile_size=T, folder=tmp_path, baseline=labels.copy()
    )
    rec.attach(layer)
    with layer.block_history():
        layer.paint((T + 20, T + 20), 1, refresh=False)
    name = rec.tile_name(rec.tiles_in_box(T + 20, T + 21, T + 20, T + 21)[0])
    assert list(rec.saved) == [name]
    layer.undo()
    assert rec.saved == {} and not (tmp_path / "masks" / f"{name}.png").exists() and rec.removed == [name]
    layer.redo()
    assert list(rec.saved) == [name]
    rec.detach()
    assert "undo" not in vars(layer), "detach gives the layer its own undo back"

    fresh = np.zeros_like(labels)
    again = CorrectionRecorder(slide, fresh, mpp=MPP, classes=["bg", "gland"], tile_size=T, folder=tmp_path)
    assert again.restore() == [name]
    np.testing.assert_array_equal(fresh, np.asarray(layer.data))
