"""The Translate z-stack (HASTE) dock widget in a real viewer on a crop of the ISL well."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _translate_helpers import TINY, isl_card, one_thread, train_tiny_lupi

one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def isl_inputs(shared_data, tmp_path_factory):
    """A 13-plane 160 x 224 crop of the ISL well as an OME-TIFF z-stack, a trained LUPI (DAPI) checkpoint and
    a random-init dense_unet 'lipids' checkpoint."""
    import tifffile

    from napari_pathfm.io.zstack import open_zstack
    from napari_pathfm.models import create_model, save_checkpoint

    d = shared_data / "isl-blue-sample"
    if not d.is_dir():
        pytest.skip(f"ISL sample not found in {shared_data}")
    zs = open_zstack(d)
    planes, dapi = np.asarray(zs.data), np.asarray(zs.targets["DAPI"])
    root = tmp_path_factory.mktemp("translate-widget")
    stack = root / "isl-crop.ome.tif"
    tifffile.imwrite(stack, planes[:, 640:800, 300:524], ome=True, metadata={"axes": "ZYX"})
    card = isl_card(planes, dapi)
    lupi = train_tiny_lupi(planes, dapi, card, root / "models" / "tiny-lupi-dapi")
    torch.manual_seed(1)
    cfg = {k: v for k, v in TINY.items()}
    lipids = create_model("dense_unet", **cfg)
    lip_card = {**card, "channels": ["lipids"], "channel_roles": ["lipids"], "has_mask": False}
    lip = save_checkpoint(lipids, root / "models" / "tiny-dense-lipids", lip_card)
    return stack, lupi, lip


def _wait(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=timeout)
    assert widget.runner.last_error is None, widget.runner.last_error


def test_translate_widget_layers_colours_and_live_threshold(make_napari_viewer, qtbot, isl_inputs, monkeypatch):
    import napari_pathfm.pipelines.translate as tr
    from napari_pathfm.widgets.translate_widget import TranslateWidget

    stack, lupi, lipids = isl_inputs
    viewer = make_napari_viewer()
    viewer.open(str(stack), plugin="napari-pathfm")
    _, widget = viewer.window.add_plugin_dock_widget("napari-pathfm", "Translate z-stack (HASTE)")
    assert isinstance(widget, TranslateWidget)
    stack_layer = viewer.layers[0]
    assert widget.layer_combo.currentText() == stack_layer.name and stack_layer.data.shape == (13, 160, 224)
    widget.set_checkpoint("nuclei", lupi)
    widget.set_checkpoint("lipids", lipids)
    widget.set_checkpoint("cytoplasm", None)
    widget.tile.setValue(64)
    assert widget.checkpoints() == [str(lupi), str(lipids)]

    _wait(qtbot, widget) if widget.run() is not None else pytest.fail(widget.status.text())
    names = [layer.name for layer in viewer.layers]
    dapi = viewer.layers[f"{stack_layer.name} DAPI (predicted)"]
    lip = viewer.layers[f"{stack_layer.name} lipids (predicted)"]
    conf = viewer.layers[f"{stack_layer.name} nuclei confidence"]
    nuclei = viewer.layers[f"{stack_layer.name} nuclei (predicted)"]
    assert len(names) == 5
    assert dapi.colormap.name == "blue" and lip.colormap.name == "green"
    assert dapi.blending == lip.blending == "additive"
    assert dapi.data.shape == lip.data.shape == nuclei.data.shape == (160, 224) and dapi.data.dtype == np.uint16
    assert type(nuclei).__name__ == "Labels" and float(conf.data.max()) <= 1.0
    assert widget.threshold.isEnabled()
    assert "nuclei" in widget.status.text()

    # the slider re-labels from the confidence map without running the model again
    calls = []
    monkeypatch.setattr(tr, "translate_stack", lambda *a, **k: calls.append(1))
    widget.threshold.setValue(20)
    loose = (np.asarray(nuclei.data) > 0).sum()
    widget.threshold.setValue(80)
    strict = (np.asarray(nuclei.data) > 0).sum()
    assert strict < loose and calls == [] and widget.runner.worker is None
    assert np.array_equal(np.asarray(nuclei.data) > 0, np.asarray(widget.result.nuclei_mask(0.8)) > 0)
    assert nuclei.metadata["threshold"] == pytest.approx(0.8)
