"""The z-stack window that ``pathfm demo`` opens with a display: bundled ISL crop + Translate widget, run."""

import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_bundled_zstack_crop_matches_the_translate_models():
    import tifffile

    from napari_pathfm.demo import demo_translate_checkpoints, demo_zstack_paths
    from napari_pathfm.io.zstack import open_zstack

    stack_path, targets_path = demo_zstack_paths()
    zs = open_zstack(stack_path)
    assert zs.shape == (13, 256, 256) and zs.dtype == np.uint16
    assert tifffile.imread(targets_path).shape == (3, 256, 256)
    cards = [json.loads(p.with_suffix(".json").read_text()) for p in demo_translate_checkpoints()]
    assert [c["channels"] for c in cards] == [["DAPI"], ["MAP2"], ["NFH"]]
    assert all(c["input_planes"] == zs.shape[0] for c in cards)


def test_translate_viewer_runs_dapi_map2_nfh_through_the_widget():
    pytest.importorskip("napari")
    from qtpy.QtWidgets import QApplication

    from napari_pathfm.demo import build_translate_viewer, demo_translate_checkpoints

    viewer, widget = build_translate_viewer(show=False)
    try:
        assert widget is not None and widget.checkpoints() == [str(p) for p in demo_translate_checkpoints()]
        assert [row.targets()[0][0] for row in widget.rows] == ["DAPI", "MAP2", "NFH"]
        deadline = time.monotonic() + 60
        while widget.runner.running and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.02)
        assert widget.runner.last_error is None and widget.result is not None
        assert list(widget.result.channels) == ["DAPI", "MAP2", "NFH"]
        assert widget.result.threshold == pytest.approx(0.3) and widget.result.nuclei_labels.max() > 0
        names = [layer.name for layer in viewer.layers]
        assert "isl-blue-crop z-stack" in names and "DAPI (real confocal)" in names
        for stain, cmap in (("DAPI", "blue"), ("MAP2", "magenta"), ("NFH", "green")):
            layer = viewer.layers[f"isl-blue-crop z-stack {stain} (predicted)"]
            assert layer.metadata["pathfm_kind"] == "translate" and layer.metadata["channel"] == stain  # the widget's
            assert layer.colormap.name == cmap and layer.blending == "additive"
            assert np.asarray(layer.data).shape == (256, 256) and np.asarray(layer.data).std() > 0
    finally:
        viewer.close()
