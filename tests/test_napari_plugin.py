"""The plugin inside a real napari viewer (headless under Xvfb): manifest, reader, sample, Slide widget."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_pathfm._reader import napari_get_reader
from napari_pathfm.coords import layer_transform

pytestmark = pytest.mark.gui


def test_manifest_validates():
    out = subprocess.run([sys.executable, "-m", "npe2", "validate", "napari-pathfm"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in (out.stdout + out.stderr).lower()


def test_manifest_is_shipped_inside_the_package():
    from importlib.resources import files

    text = files("napari_pathfm").joinpath("napari.yaml").read_text()
    assert "napari-pathfm.get_reader" in text


def test_reader_opens_slide_as_multiscale_rgb_in_micrometres(make_napari_viewer, cmu_small):
    viewer = make_napari_viewer()
    layers = viewer.open(str(cmu_small), plugin="napari-pathfm")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert str(layer.units[0]) in {"micrometer", "µm", "um"}
    assert layer.metadata["pathfm_slide"]["vendor"] == "aperio"
    assert layer.data[0].shape == (2967, 2220, 3)


def test_reader_opens_pyramidal_tiff_with_all_levels(make_napari_viewer, wsi_dir):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(wsi_dir / "boxes.tiff"), plugin="napari-pathfm")
    assert len(layer.data) == 4
    assert tuple(layer.scale) == (1.0, 1.0), "unknown µm/px → pixel units"


@pytest.mark.parametrize("name", ["unreadable.svs", "unopenable.tiff"])
def test_reader_declines_unreadable_files(wsi_dir, name):
    assert napari_get_reader(str(wsi_dir / name)) is None


def test_reader_declines_junk_and_plain_folders(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00garbage")
    assert napari_get_reader(str(junk)) is None
    assert napari_get_reader(str(tmp_path)) is None


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-pathfm", "cmu1-small-region")
    assert viewer.layers[0].multiscale
    assert tuple(viewer.layers[0].scale) == pytest.approx((0.499, 0.499))


def test_slide_widget_shows_properties_and_tissue_overlay(make_napari_viewer, qtbot, cmu_small):
    from napari_pathfm.widgets.slide_widget import SlideWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-pathfm", "Slide")
    assert isinstance(widget, SlideWidget)
    layer = widget.open_path(cmu_small)
    assert layer is not None and widget.layer_combo.currentText() == layer.name
    props = {widget.table.item(r, 0).text(): widget.table.item(r, 1).text() for r in range(widget.table.rowCount())}
    assert props["µm/px"] == "0.499" and props["magnification"] == "20x"
    assert [widget.assoc_combo.itemText(i) for i in range(widget.assoc_combo.count())] == [
        "label",
        "macro",
        "thumbnail",
    ]
    widget.assoc_combo.setCurrentText("macro")
    assert widget.assoc_label.pixmap() is not None and not widget.assoc_label.pixmap().isNull()

    worker = widget.compute_tissue()
    assert not widget.run_btn.isEnabled(), "the run button is disabled while the task runs"
    with qtbot.waitSignal(worker.finished, timeout=60_000):
        pass
    qtbot.waitUntil(lambda: f"{layer.name} tissue" in viewer.layers, timeout=10_000)
    tissue = viewer.layers[f"{layer.name} tissue"]
    ds = 8.0 / 0.499
    scale, _translate = layer_transform(0.499, tissue.metadata.get("downsample", round(ds)))
    assert tissue.scale[0] == pytest.approx(scale[0], rel=0.07)
    assert 0.2 < tissue.data.mean() < 0.9
    tiles = viewer.layers[f"{layer.name} tiles"]
    assert len(tiles.data) > 10
    assert widget.run_btn.isEnabled()
    assert "tissue tiles" in widget.status.text()
    # the tissue overlay lies over the tissue: sample the slide under tissue vs background pixels
    world_to_px = lambda p: np.round((np.asarray(p) - tissue.translate) / tissue.scale).astype(int)
    ys, xs = np.nonzero(tissue.data)
    centre_world = np.array([ys.mean(), xs.mean()]) * tissue.scale + tissue.translate
    r, c = world_to_px(centre_world)
    assert tissue.data[r, c] == 1


def test_slide_widget_reports_unreadable_file_without_crashing(make_napari_viewer, wsi_dir):
    from napari_pathfm.widgets.slide_widget import SlideWidget

    viewer = make_napari_viewer()
    widget = SlideWidget(viewer)
    assert widget.open_path(wsi_dir / "unreadable.svs") is None
    assert "unreadable.svs" in widget.status.text()
    assert len(viewer.layers) == 0


def test_reader_opens_zstack_folder_with_z_slider(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    layers = viewer.open(str(shared_data / "isl-blue-sample"), plugin="napari-pathfm")
    stack = layers[0]
    assert stack.data.shape == (13, 1024, 1024) and stack.data.dtype == np.uint16
    assert viewer.dims.ndim == 3 and viewer.dims.nsteps[0] == 13, "a Z slider with 13 planes"
    assert {layer.name.split()[-1] for layer in layers[1:]} >= {"DAPI", "MAP2", "NFH"} or len(layers) == 4


def test_labels_writer_saves_ome_tiff_and_qupath_geojson(make_napari_viewer, qtbot, cmu_small, tmp_path):
    from napari_pathfm.io.geojson import geojson_to_labels
    from napari_pathfm.io.ome_tiff import read_ome_tiff
    from napari_pathfm.io.slide import open_slide
    from napari_pathfm.pipelines.tissue_tiles import compute_tissue_tiles
    from napari_pathfm.widgets.slide_widget import SlideWidget, add_tissue_tiles_layers

    viewer = make_napari_viewer()
    widget = SlideWidget(viewer)
    layer = widget.open_path(cmu_small)
    result = compute_tissue_tiles(open_slide(cmu_small))
    add_tissue_tiles_layers(viewer, layer.name, result)
    tissue = viewer.layers[f"{layer.name} tissue"]
    tif = tmp_path / "tissue.ome.tif"
    gj = tmp_path / "tissue.geojson"
    tissue.save(str(tif), plugin="napari-pathfm")
    tissue.save(str(gj), plugin="napari-pathfm")
    levels, mpp, _meta = read_ome_tiff(tif)
    np.testing.assert_array_equal(np.asarray(levels[0]), tissue.data)
    assert mpp == pytest.approx(tissue.scale[0])
    back = geojson_to_labels(gj, tissue.data.shape, {1: "Tissue"}, downsample=result.tissue.downsample)
    np.testing.assert_array_equal(back, tissue.data)


def test_image_writer_saves_a_heatmap_as_ome_tiff_with_its_pixel_size(make_napari_viewer, tmp_path):
    from napari_pathfm.io.ome_tiff import read_ome_tiff

    viewer = make_napari_viewer()
    heat = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    layer = viewer.add_image(heat, name="heatmap", scale=(2.0, 2.0))
    out = tmp_path / "heatmap.ome.tif"
    layer.save(str(out), plugin="napari-pathfm")
    levels, mpp, _ = read_ome_tiff(out)
    np.testing.assert_allclose(np.asarray(levels[0]), heat)
    assert mpp == pytest.approx(2.0)
