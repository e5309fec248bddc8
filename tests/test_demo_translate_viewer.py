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


def test_translate_viewer_docks_the_widget_and_loads_predictions(tmp_path):
    pytest.importorskip("napari")
    from qtpy.QtWidgets import QApplication

    from napari_pathfm.demo import (
        build_translate_viewer,
        demo_translate_checkpoints,
        demo_zstack_paths,
    )
    from napari_pathfm.io.zstack import open_zstack
    from napari_pathfm.pipelines.translate import translate_stack, write_translation

    res = translate_stack(open_zstack(demo_zstack_paths()[0]), demo_translate_checkpoints()[1:], tile=256,
                          device="cpu", nuclei_mask=False)  # fmt: skip
    write_translation(res, tmp_path)
    viewer, widget = build_translate_viewer(show=False, predictions=tmp_path)
    try:
        assert widget is not None and widget.checkpoints()[0].endswith("haste-isl-dapi.safetensors")
        deadline = time.monotonic() + 60
        while widget.runner.running and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.02)
        assert widget.runner.last_error is None and widget.result is not None
        assert widget.result.threshold == pytest.approx(0.3) and widget.result.nuclei_labels.max() > 0
        names = [layer.name for layer in viewer.layers]
        assert "isl-blue-crop z-stack" in names and "DAPI (real confocal)" in names
        for stain in ("DAPI", "MAP2", "NFH"):
            layer = viewer.layers[f"isl-blue-crop z-stack {stain} (predicted)"]
            assert np.asarray(layer.data).shape == (256, 256) and np.asarray(layer.data).std() > 0
    finally:
        viewer.close()
