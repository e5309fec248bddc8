"""Legible overlays without a model: one class colour in napari, the legend and GeoJSON; robust contrast limits.

The docks' runs on the bundled slide and models are tested in test_classify_widget.py,
test_mil_predict.py and test_translate_widget.py; these check the shared pieces quickly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_pathfm.colors import PALETTE, class_colors, robust_limits
from napari_pathfm.widgets._colormaps import label_colormap

NAMES = {0: "background", 1: "gland", 2: "stroma", 4: "necrosis"}


@pytest.fixture
def viewer(make_napari_viewer):
    """A real viewer, with Triton kept out first, as the docks do (a later ``import torch`` in this process
    would otherwise load Triton's LLVM next to Mesa's and crash; see ``widgets/_gl_safety.py``)."""
    from napari_pathfm.widgets._gl_safety import keep_triton_out

    keep_triton_out()
    return make_napari_viewer()


def _rgb255(rgba) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in rgba[:3])


def test_class_colours_stable_background_transparent_and_pinned():
    colors = class_colors(NAMES)
    assert colors == {1: PALETTE[0], 2: PALETTE[1], 4: PALETTE[2]}, "k-th foreground class → k-th palette colour"
    assert class_colors(["background", "gland", "stroma", "x", "necrosis"])[4] == PALETTE[3]
    assert 0 not in class_colors({0: "tissue", 1: "gland"}), "value 0 is always transparent"
    assert class_colors({1: "Background", 2: "gland"}) == {2: PALETTE[0]}, "a class named background is too"
    assert class_colors(NAMES, pinned={"Stroma": [1, 2, 3]})[2] == (1, 2, 3)
    cmap = label_colormap(NAMES)
    rgba = cmap.map(np.array([0, 1, 2, 3, 4, 99]))
    assert rgba[0][3] == 0 and rgba[3][3] == 0 and rgba[5][3] == 0, "background, unnamed values: transparent"
    assert [_rgb255(rgba[v]) for v in (1, 2, 4)] == [colors[v] for v in (1, 2, 4)]


def test_geojson_of_a_labels_layer_has_the_layer_colours(viewer, tmp_path):
    """napari's own save of a Labels layer (our writer) writes each class in the colour the layer shows,
    also after the user recolours a class in napari; the legend shows the same colours."""
    from napari_pathfm.widgets._legend import Legend

    labels = np.zeros((40, 60), np.int32)
    labels[2:12, 3:20], labels[20:35, 10:30], labels[5:15, 40:55] = 1, 2, 4
    layer = viewer.add_labels(labels, colormap=label_colormap(NAMES), metadata={"classes": NAMES})
    legend = Legend()
    legend.show_layers([layer])
    [entry] = legend.entries
    assert entry["classes"] == [(NAMES[v], class_colors(NAMES)[v]) for v in (1, 2, 4)]

    def written() -> dict[str, tuple]:
        out = tmp_path / "layer.geojson"
        layer.save(str(out), plugin="napari-pathfm")
        return {
            f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
            for f in json.loads(out.read_text())["features"]
        }

    shown = {NAMES[v]: _rgb255(layer.colormap.map(np.array([v]))[0]) for v in (1, 2, 4)}
    assert written() == shown
    # recolour "stroma" in napari: the export and the legend follow the layer
    colors = dict(layer.colormap.color_dict)
    colors[2] = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    from napari.utils.colormaps import DirectLabelColormap

    layer.colormap = DirectLabelColormap(color_dict=colors)
    assert written()["stroma"] == (0, 0, 255)
    assert dict(legend.entries[0]["classes"])["stroma"] == (0, 0, 255)


def test_legend_colorbar_follows_contrast_limits(viewer):
    from napari_pathfm.widgets._colormaps import napari_colormap
    from napari_pathfm.widgets._legend import Legend

    layer = viewer.add_image(
        np.linspace(0, 3, 100, dtype=np.float32).reshape(10, 10),
        colormap=napari_colormap("attention"),
        contrast_limits=(0.5, 2.5),
    )
    legend = Legend()
    legend.show_layers([layer], title="run 1")
    assert legend.entries == [
        {"layer": layer.name, "kind": "colorbar", "colormap": "pathfm-attention", "range": (0.5, 2.5)}
    ]
    layer.contrast_limits = (1.0, 2.0)
    assert legend.entries[0]["range"] == (1.0, 2.0)
    legend.clear()
    assert legend.entries == [] and not legend.isVisibleTo(None)


def test_robust_limits_ignore_nan_outliers_and_flat_maps():
    data = np.r_[np.full(5, np.nan), np.linspace(0.40, 0.45, 1000), 50.0].astype(np.float32)
    lo, hi = robust_limits(data)
    assert 0.40 <= lo < hi <= 0.45, "percentiles of the finite values, one outlier does not flatten the map"
    assert robust_limits(np.full((4, 4), 7.0)) == pytest.approx((7.0, 7.007))
    assert robust_limits(np.full(3, np.nan)) == (0.0, 1.0)
    big = np.arange(3000 * 3000, dtype=np.uint16).reshape(3000, 3000)  # strided sample, not every pixel
    lo, hi = robust_limits(big)
    assert 0 < lo < hi < 65535


def test_per_tile_maps_stop_at_the_slide_edge_and_class_planes_match():
    from napari_pathfm.layers import clip_to_slide

    grid = np.arange(12).reshape(3, 4)
    refined, sub = clip_to_slide(grid, 512, (1200, 1800))
    assert sub == 16.0 and refined.shape == (75, 113), "ends within one refined pixel of the edge"
    assert refined.shape[0] * sub >= 1200 > (refined.shape[0] - 1) * sub
    np.testing.assert_array_equal(refined[::32, ::32], grid)
    # a big grid: refined less, the same way for a map and its per-class planes
    big = np.zeros((300, 400), np.uint8)
    one, s1 = clip_to_slide(big, 512, (300 * 512 - 100, 400 * 512 - 100))
    three, s3 = clip_to_slide(np.zeros((3, 300, 400), np.float32), 512, (300 * 512 - 100, 400 * 512 - 100))
    assert s1 == s3 and three.shape[1:] == one.shape and one.size <= 4_000_000
