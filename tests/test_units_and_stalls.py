"""Honest units (issue 15, part 4) and a GUI that does not freeze (part 7), on real files in a real viewer.

Timing is not asserted (2 shared cores, Xvfb): the stall table lives in benchmarks/gui_stall.py.
Here we assert the structure that keeps the GUI thread free: no torch import when the reader opens
a slide, multiscale slide layers, the probed slide is not opened twice, the tissue run happens in
a worker and re-runs update layers in place.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ZSTACK = Path(__file__).resolve().parents[2] / "shared" / "data" / "isl-blue-sample"


def _units(layer) -> set[str]:
    return {str(u) for u in layer.units}


@pytest.fixture
def boxes_tiff(wsi_dir: Path) -> Path:
    path = wsi_dir / "boxes.tiff"
    from napari_pathfm.io import open_slide

    with open_slide(path) as slide:
        assert slide.mpp is None, "this test needs a slide without µm/px"
    return path


def _slide_dock(viewer):
    _, widget = viewer.window.add_plugin_dock_widget("napari-pathfm", "Slide")
    return widget


def _run_tissue(widget, qtbot):
    worker = widget.compute_tissue()
    assert worker is not None  # the work runs in a worker thread, not on the GUI thread
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=120_000)


def test_slide_without_mpp_is_in_pixels_everywhere_then_in_entered_micrometres(make_napari_viewer, qtbot, boxes_tiff):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    seen = []
    notification_manager.notification_ready.connect(lambda n: seen.append(str(n.message)))
    (slide_layer,) = viewer.open(str(boxes_tiff), plugin="napari-pathfm")
    widget = _slide_dock(viewer)
    assert not widget.mpp_box.isHidden()
    assert "pixel size unknown" in widget.mpp_note.text() and not widget.mpp_note.isHidden()
    assert not widget.tile_mpp.isEnabled()  # no µm/px target can be honoured without µm/px
    _run_tissue(widget, qtbot)
    ours = [
        layer for layer in viewer.layers if layer is slide_layer or layer.metadata.get("pathfm_of") == str(boxes_tiff)
    ]
    assert len(ours) == 3  # image, tissue, tiles
    for layer in ours:
        assert _units(layer) == {"pixel"}, layer.name
    assert "µm/px unknown" in widget.status.text() and "0.5" not in widget.status.text()
    tissue = viewer.layers[f"{slide_layer.name} tissue"]
    ds = tissue.metadata["downsample"]
    scale_px, translate_px = np.array(tissue.scale), np.array(tissue.translate)

    widget.slide_mpp.setValue(0.25)
    widget.slide_mpp_btn.click()
    qtbot.wait(200)  # napari checks units at the next draw
    for layer in ours:
        assert _units(layer) == {"micrometer"}, layer.name
    assert tuple(slide_layer.scale) == (0.25, 0.25)
    np.testing.assert_allclose(tissue.scale, scale_px * 0.25)
    np.testing.assert_allclose(tissue.translate, translate_px * 0.25)
    from napari_pathfm.coords import layer_transform

    np.testing.assert_allclose(tissue.translate, layer_transform(0.25, ds)[1])  # contract 4 still holds
    assert slide_layer.metadata["pathfm_slide"]["mpp"] == 0.25
    assert slide_layer.metadata["pathfm_mpp_source"] == "entered"
    assert "(entered)" in widget.table.item(2, 1).text()

    _run_tissue(widget, qtbot)  # a re-run uses the entered value and updates the same layers
    assert [layer.name for layer in viewer.layers].count(f"{slide_layer.name} tissue") == 1
    assert viewer.layers[f"{slide_layer.name} tissue"] is tissue
    assert _units(tissue) == {"micrometer"}
    qtbot.wait(200)
    assert not [m for m in seen if "Inconsistent units" in m], seen


def test_mpp_shown_is_the_level_actually_read_and_boxes_stay_inside(make_napari_viewer, qtbot, cmu_small):
    viewer = make_napari_viewer()
    (slide_layer,) = viewer.open(str(cmu_small), plugin="napari-pathfm")
    widget = _slide_dock(viewer)
    assert widget.mpp_box.isHidden()  # the file says 0.499 µm/px
    widget.tile_mpp.setValue(0.5)
    _run_tissue(widget, qtbot)
    # the only level is level 0 at 0.499 µm/px: that is what was read, not the 0.5 asked for
    assert "level 0 (0.499 µm/px)" in widget.status.text(), widget.status.text()
    tiles = viewer.layers[f"{slide_layer.name} tiles"]
    h, w = slide_layer.metadata["pathfm_slide"]["level_shapes"][0]
    corners = np.concatenate([np.asarray(b) for b in tiles.data])
    assert corners[:, 0].max() <= h - 0.5 and corners[:, 1].max() <= w - 0.5
    assert corners.min() >= -0.5


def test_tile_boxes_are_clipped_to_the_slide(cmu_small):
    from napari_pathfm.io import open_slide
    from napari_pathfm.tiles import tile_grid
    from napari_pathfm.widgets.slide_widget import tile_boxes

    with open_slide(cmu_small) as slide:
        grid = tile_grid(slide, 512, level=0)  # 2220 x 2967 is no multiple of 512: the last row/column overhang
    h, w = grid.level0_shape
    assert grid.tiles[:, 0].max() + grid.level0_size > h or grid.tiles[:, 1].max() + grid.level0_size > w
    corners = np.concatenate(tile_boxes(grid))
    assert corners[:, 0].max() == h - 0.5 and corners[:, 1].max() == w - 0.5


@pytest.mark.skipif(not ZSTACK.exists(), reason="ISL z-stack not in shared data")
def test_zstack_z_axis_is_named_z(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open(str(ZSTACK), plugin="napari-pathfm")
    stack = layers[0]
    assert stack.ndim == 3 and stack.axis_labels == ("z", "y", "x")
    assert viewer.dims.axis_labels[0] == "z"
    assert _units(stack) == {"pixel"}  # no plane spacing in PNG files: z is a plain plane index
    for target in layers[1:]:
        assert target.axis_labels == ("y", "x") and isinstance(target.data, np.ndarray)  # shown in memory


def test_zstack_shown_plane_is_decoded_once(tmp_path):
    """The middle plane decoded for the contrast limits is what napari's first slice gets (plane cache)."""
    pytest.importorskip("PIL")
    if not ZSTACK.exists():
        pytest.skip("ISL z-stack not in shared data")
    from napari_pathfm.io import zstack
    from napari_pathfm.io.zstack_layers import zstack_layer_data

    layers = zstack_layer_data(ZSTACK)
    data = layers[0][0]
    calls = []
    original = zstack._decode
    zstack._decode = lambda p, key: calls.append(p) or original(p, key)
    try:
        np.asarray(data[data.shape[0] // 2])
    finally:
        zstack._decode = original
    assert calls == []


def test_reader_does_not_import_torch_or_other_heavy_libraries(cmu_small):
    code = textwrap.dedent(f"""
        import json, sys
        from napari_pathfm._reader import napari_get_reader
        layers = napari_get_reader({str(cmu_small)!r})({str(cmu_small)!r})
        heavy = [m for m in ("torch", "timm", "lightning", "matplotlib", "dask.distributed") if m in sys.modules]
        print(json.dumps({{"heavy": heavy, "multiscale": layers[0][1]["multiscale"], "levels": len(layers[0][0])}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["multiscale"] is True and result["levels"] >= 2  # napari reads only the tiles it shows


def test_reader_hands_the_probed_slide_on(cmu_small):
    from napari_pathfm import _reader

    reader = _reader.napari_get_reader(str(cmu_small))
    probed = _reader._probed[str(cmu_small)]
    data, _kwargs, kind = reader(str(cmu_small))[0]
    assert kind == "image" and data is probed.pyramid and str(cmu_small) not in _reader._probed
    probed.close()
