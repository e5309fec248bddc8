"""The "Classify tiles (SLCA)" widget in a real viewer: classify CMU-1 → class map + probability layers
over the slide → Grad-CAM of a clicked tile and of the current view."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")

CLASSES = ["tumour", "stroma", "fat"]


@pytest.fixture
def checkpoint(tmp_path):
    """A random-init resnet10t tile classifier (3 classes, 64 px tiles at 2 µm/px) with its card."""
    from napari_pathfm.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("timm_classifier", backbone="resnet10t", num_classes=3)
    card = {
        "classes": CLASSES,
        "input_mpp": 2.0,
        "tile_size": 64,
        "normalization": {"mean": [0.7, 0.5, 0.7], "std": [0.15, 0.2, 0.15]},
    }
    return save_checkpoint(model, tmp_path / "toy-classifier", card)


def _wait(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=timeout)
    assert widget.runner.last_error is None, widget.runner.last_error


def test_classify_widget_layers_and_gradcam(make_napari_viewer, qtbot, cmu_small, checkpoint, tmp_path):
    from napari_pathfm.pipelines.gradcam import MAX_TILES
    from napari_pathfm.widgets.classify_widget import ClassifyWidget

    viewer = make_napari_viewer()
    viewer.open(str(cmu_small), plugin="napari-pathfm")
    slide_layer = viewer.layers[0]
    widget = ClassifyWidget(viewer)
    assert not widget.view_btn.isEnabled(), "no Grad-CAM before a result"
    widget.checkpoint.set_path(checkpoint)
    _wait(qtbot, widget) if widget.run() is not None else pytest.fail(widget.status.text())

    result = widget.result
    labels = widget.labels_layer
    # one tile = k x k layer pixels of `sub` level-0 px, so that the map can stop at the slide's edge
    sub = labels.metadata["downsample"]
    k = round(result.cell / sub)
    assert k > 1 and result.cell / k == pytest.approx(sub)
    np.testing.assert_array_equal(
        labels.data[::k, ::k], result.class_map[: -(-labels.data.shape[0] // k), : -(-labels.data.shape[1] // k)]
    )
    from napari_pathfm.coords import layer_transform

    np.testing.assert_allclose(labels.scale, layer_transform(result.mpp, sub)[0])
    np.testing.assert_allclose(labels.translate, layer_transform(result.mpp, sub)[1])
    assert list(labels.features["class"]) == ["background", *CLASSES], "status bar names the class"
    # the labels layer ends at the slide's edge (to within one layer pixel), not a tile past it
    mpp = slide_layer.scale[-1]
    assert result.mpp == pytest.approx(mpp)
    h0, w0 = slide_layer.data[0].shape[:2]
    rows, cols = result.grid.grid_shape
    assert rows * result.cell - h0 >= sub or cols * result.cell - w0 >= sub, "the grid overhangs the slide"
    assert 0 <= labels.data.shape[0] * sub - h0 < sub and 0 <= labels.data.shape[1] * sub - w0 < sub
    assert [p.name for p in widget.prob_layers] == [f"{slide_layer.name} p({c})" for c in CLASSES]
    assert [p.visible for p in widget.prob_layers] == [True, False, False]
    for k_, layer in enumerate(widget.prob_layers):
        np.testing.assert_allclose(
            layer.data[::k, ::k], result.prob_maps[k_][: labels.data[::k].shape[0], : labels.data[0, ::k].shape[0]]
        )
        assert layer.data.shape == labels.data.shape
        np.testing.assert_allclose(layer.translate, labels.translate)
    assert str(result.n_tiles) in widget.status.text()

    # legible: class colours from napari_pathfm.colors in the layer and the legend, own colormaps, the tissue shows
    from napari_pathfm.colors import class_colors

    expected = class_colors(result.label_names())
    assert sorted(expected) == [1, 2, 3]
    rgba = labels.colormap.map(np.array([0, 1, 2, 3]))
    assert rgba[0][3] == 0, "background (no tissue tile) is transparent"
    assert [tuple(int(round(c * 255)) for c in rgba[v][:3]) for v in (1, 2, 3)] == [expected[v] for v in (1, 2, 3)]
    classes_entry, prob_entry = widget.legend.entries
    assert widget.legend.isVisibleTo(widget) and classes_entry["kind"] == "classes"
    assert classes_entry["classes"] == [(c, expected[k + 1]) for k, c in enumerate(CLASSES)]
    assert prob_entry["kind"] == "colorbar" and prob_entry["range"] == (0.0, 1.0)
    assert labels.opacity == 0.5 and all(p.opacity == 0.5 for p in widget.prob_layers)

    # the GeoJSON written from the Labels layer (napari's save, our writer) has the layer's colours
    import json

    out = tmp_path / "classes.geojson"
    labels.save(str(out), plugin="napari-pathfm")
    features = json.loads(out.read_text())["features"]
    assert features
    for feature in features:
        cls = feature["properties"]["classification"]
        value = feature["properties"]["label"]
        assert cls["name"] == CLASSES[value - 1] and tuple(cls["color"]) == expected[value]

    # a second Run replaces the layers: same count, same layer objects, new data
    n_layers, layer_ids = len(viewer.layers), [id(layer) for layer in viewer.layers]
    _wait(qtbot, widget) if widget.run() is not None else pytest.fail(widget.status.text())
    assert len(viewer.layers) == n_layers and [id(layer) for layer in viewer.layers] == layer_ids
    assert widget.labels_layer is labels and "run 2" in widget.legend.title()
    result = widget.result

    # a click on a tissue tile -> Grad-CAM of that tile, placed on it
    i = result.n_tiles // 2
    y, x = result.grid.tiles[i] + result.cell / 2
    widget.click_btn.setChecked(True)
    assert widget._on_click in viewer.mouse_drag_callbacks
    widget._on_click(viewer, SimpleNamespace(type="mouse_press", position=(y * mpp, x * mpp)))
    _wait(qtbot, widget)
    cam = viewer.layers[f"{slide_layer.name} Grad-CAM"]
    t = result.grid.tile_size
    assert cam.data.shape == (t, t) and 0 <= cam.data.min() and cam.data.max() <= 1
    names = {labels.colormap.name, widget.prob_layers[0].colormap.name, cam.colormap.name}
    assert len(names) == 3, f"class map, probabilities and Grad-CAM share a colormap: {names}"
    assert [e["layer"] for e in widget.legend.entries][-1] == cam.name
    assert widget.gradcam.indices.tolist() == [i] and widget.gradcam.targets.tolist() == [result.predicted[i]]
    first_px = np.asarray(cam.translate) / mpp - (result.grid.scale - 1) / 2  # level-0 px of its first pixel
    np.testing.assert_allclose(first_px, result.grid.tiles[i], atol=1.0)
    widget.click_btn.setChecked(False)
    assert widget._on_click not in viewer.mouse_drag_callbacks
    assert widget.gradcam_at((-50.0, -50.0)) is None and "background" in widget.status.text()

    # the current view: the whole slide in view -> capped at MAX_TILES, said so; a chosen class
    viewer.reset_view()
    widget.cam_class.setCurrentIndex(1 + 2)  # "fat"
    _wait(qtbot, widget) if widget.gradcam_view() is not None else pytest.fail(widget.status.text())
    shown = widget.gradcam.indices
    assert len(shown) == min(result.n_tiles, MAX_TILES) and (widget.gradcam.targets == 2).all()
    if result.n_tiles > MAX_TILES:
        assert "left out" in widget.status.text()
    # zoomed in on one tile: only the tiles in view
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.center = (y * mpp, x * mpp)
    camera.zoom = 4.0 * max(viewer.canvas.size) / (result.cell * mpp)  # about a quarter of a tile across
    _wait(qtbot, widget) if widget.gradcam_view() is not None else pytest.fail(widget.status.text())
    assert widget.gradcam.indices.tolist() == [i]
