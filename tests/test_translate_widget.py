"""The Translate z-stack (HASTE) dock widget in a real viewer: bundled ISL models on the bundled ISL crop.

The rows come from the checkpoints' targets (DAPI, MAP2, NFH here), not from fixed roles.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def models(tmp_path, monkeypatch):
    """Only the bundled models plus one user model: a copy of the MAP2 net whose card says it predicts GFAP."""
    import napari_pathfm.checkpoints as ck
    from napari_pathfm.demo import demo_translate_checkpoints

    bundled = demo_translate_checkpoints()
    if len(bundled) != 3:
        pytest.skip("the bundled haste-isl-* models are not installed")
    user = tmp_path / "models"
    user.mkdir()
    monkeypatch.setenv("PATHFM_MODELS", str(user))
    monkeypatch.setattr(ck, "_EXTRA", [])  # folders other tests' training runs registered
    card = json.loads(bundled[1].with_suffix(".json").read_text())
    card["channels"] = ["GFAP"]
    card.pop("channel_roles")
    (user / "isl-gfap.json").write_text(json.dumps(card))
    shutil.copy(bundled[1], user / "isl-gfap.safetensors")
    return bundled, user / "isl-gfap.safetensors"


def _dock(make_napari_viewer):
    from napari_pathfm.demo import demo_zstack_paths
    from napari_pathfm.widgets.translate_widget import TranslateWidget

    viewer = make_napari_viewer()
    viewer.open(str(demo_zstack_paths()[0]), plugin="napari-pathfm")
    _, widget = viewer.window.add_plugin_dock_widget("napari-pathfm", "Translate z-stack (HASTE)")
    assert isinstance(widget, TranslateWidget)
    return viewer, widget


def _run(qtbot, widget):
    if widget.run() is None:
        pytest.fail(widget.status.text())
    qtbot.waitUntil(lambda: not widget.runner.running, timeout=60_000)
    assert widget.runner.last_error is None, widget.runner.last_error


def test_rows_from_targets_run_dapi_map2_nfh_and_live_threshold(make_napari_viewer, qtbot, models, monkeypatch):
    import napari_pathfm.pipelines.translate as tr

    (dapi_ckpt, map2_ckpt, nfh_ckpt), _gfap = models  # the user's GFAP model: listed, but only 3 rows pre-fill
    viewer, widget = _dock(make_napari_viewer)
    stack = viewer.layers[0]
    assert widget.layer_combo.currentText() == stack.name and stack.data.shape == (13, 256, 256)
    # three rows pre-filled with the bundled models, one per target, each labelled with its card's channel
    assert widget.checkpoints() == [str(dapi_ckpt), str(map2_ckpt), str(nfh_ckpt)]
    assert [row.targets() for row in widget.rows] == [[("DAPI", "nuclei")], [("MAP2", "map2")], [("NFH", "nfh")]]
    assert "DAPI" in widget.rows[0].label.text() and "color:blue" in widget.rows[0].label.text()
    assert "MAP2" in widget.rows[1].label.text() and "NFH" in widget.rows[2].label.text()
    assert widget.lupi_checkpoint() == str(dapi_ckpt) and widget.threshold.isEnabled()
    widget.tile.setValue(256)
    widget.threshold.setValue(30)  # the bundled LUPI model's confidence stays below 0.5 on this crop

    _run(qtbot, widget)
    pred = {c: viewer.layers[f"{stack.name} {c} (predicted)"] for c in ("DAPI", "MAP2", "NFH")}
    conf = viewer.layers[f"{stack.name} nuclei confidence"]
    nuclei = viewer.layers[f"{stack.name} nuclei (predicted)"]
    assert len(viewer.layers) == 1 + 3 + 2
    assert {c: layer.colormap.name for c, layer in pred.items()} == {"DAPI": "blue", "MAP2": "magenta", "NFH": "green"}
    for layer in pred.values():
        assert layer.blending == "additive" and layer.data.shape == (256, 256) and layer.data.dtype == np.uint16
        assert np.asarray(layer.data).std() > 0
    assert type(nuclei).__name__ == "Labels" and 0 < float(conf.data.max()) <= 1.0
    # legible: per-channel contrast from the data (worker), lower opacity for 3 additive channels, translucent mask
    for cname, layer in pred.items():
        data = np.asarray(layer.data)
        lo, hi = layer.contrast_limits
        assert data.min() <= lo < hi <= data.max(), cname
        assert (lo, hi) == pytest.approx(tuple(np.percentile(data, [1, 99.5])), rel=1e-6), cname
        assert layer.opacity == pytest.approx(0.67)
    assert len({tuple(layer.contrast_limits) for layer in pred.values()}) == 3, "each channel has its own limits"
    assert nuclei.blending == "translucent_no_depth" and conf.blending == "translucent"
    bars = {e["layer"]: e for e in widget.legend.entries}
    assert set(bars) == {*(layer.name for layer in pred.values()), conf.name}
    assert bars[pred["DAPI"].name]["range"] == pytest.approx(tuple(pred["DAPI"].contrast_limits))
    assert widget.result.nuclei_labels.max() > 0 and "nuclei" in widget.status.text()

    # the slider re-labels from the LUPI confidence map without running any model again
    calls = []
    monkeypatch.setattr(tr, "translate_stack", lambda *a, **k: calls.append(1))
    widget.threshold.setValue(20)
    loose = (np.asarray(nuclei.data) > 0).sum()
    widget.threshold.setValue(40)
    strict = (np.asarray(nuclei.data) > 0).sum()
    assert strict < loose and calls == [] and widget.runner.worker is None
    assert np.array_equal(np.asarray(nuclei.data) > 0, np.asarray(widget.result.nuclei_mask(0.4)) > 0)
    assert nuclei.metadata["threshold"] == pytest.approx(0.4)


def test_add_remove_rows_refuse_duplicates_and_colour_other_targets(make_napari_viewer, qtbot, models):
    from napari_pathfm.demo import demo_classify_checkpoint
    from napari_pathfm.widgets._checkpoint_picker import refresh_all_pickers

    (dapi_ckpt, map2_ckpt, nfh_ckpt), gfap_ckpt = models
    viewer, widget = _dock(make_napari_viewer)
    widget.tile.setValue(256)

    # "+ add channel" picks the first listed checkpoint with a target no row has: the user's GFAP model
    widget.add_btn.click()
    assert len(widget.rows) == 4 and widget.rows[3].path() == str(gfap_ckpt)
    assert widget.rows[3].targets() == [("GFAP", "GFAP")] and "cyan" in widget.rows[3].label.text()
    # a fifth row finds nothing new: it starts empty and Run says which row lacks a checkpoint
    widget.add_btn.click()
    assert widget.rows[4].path() is None and widget.run() is None
    assert "Row 5 has no checkpoint" in widget.status.text()
    # the same target twice is refused before anything runs
    widget.rows[4].picker.set_path(dapi_ckpt)
    assert widget.run() is None and widget.runner.worker is None
    assert "Rows 1 (haste-isl-dapi.safetensors) and 5 (haste-isl-dapi.safetensors) both predict nuclei" in (
        widget.status.text()
    )
    # a checkpoint of another family is refused, naming it
    widget.rows[4].picker.set_path(demo_classify_checkpoint())
    assert widget.run() is None and "not a translation one" in widget.status.text()
    widget.rows[4].remove_btn.click()
    assert len(widget.rows) == 4 and widget.problem() is None

    # removing the LUPI row unties the slider; set_checkpoint by target name adds a row, None removes one
    widget.set_checkpoint("nuclei", None)
    widget.set_checkpoint("MAP2", None)
    assert widget.checkpoints() == [str(nfh_ckpt), str(gfap_ckpt)]
    assert widget.lupi_checkpoint() is None and not widget.threshold.isEnabled()
    assert refresh_all_pickers() >= 2 and widget.checkpoints() == [str(nfh_ckpt), str(gfap_ckpt)]

    _run(qtbot, widget)
    name = viewer.layers[0].name
    gfap, nfh = viewer.layers[f"{name} GFAP (predicted)"], viewer.layers[f"{name} NFH (predicted)"]
    assert gfap.colormap.name == "cyan" and nfh.colormap.name == "green" and gfap.blending == "additive"
    assert widget.result.confidence is None and not widget.threshold.isEnabled()
    # GFAP is the MAP2 net under another name: the same prediction
    widget.set_checkpoint("DAPI", dapi_ckpt)
    widget.set_checkpoint("GFAP", None)
    widget.set_checkpoint("MAP2", map2_ckpt)
    assert [r.targets()[0][0] for r in widget.rows] == ["NFH", "DAPI", "MAP2"] and widget.threshold.isEnabled()
    before = np.asarray(gfap.data).copy()
    _run(qtbot, widget)
    assert np.array_equal(np.asarray(viewer.layers[f"{name} MAP2 (predicted)"].data), before)
    assert widget.result.confidence is not None and f"{name} nuclei (predicted)" in viewer.layers
    # the re-run replaced the results: NFH updated in place, the GFAP layer no row predicts any more removed
    assert viewer.layers[f"{name} NFH (predicted)"] is nfh and gfap not in viewer.layers
    assert len(viewer.layers) == 1 + 3 + 2 and "run 2" in widget.legend.title()


def test_default_rows_colours_and_duplicates_from_cards():
    """Which checkpoints pre-fill the rows, their colours and the duplicate check, from model cards alone."""
    from pathlib import Path

    from napari_pathfm.pipelines.translate_channels import (
        card_targets,
        channel_colormaps,
        default_checkpoints,
        duplicate_targets,
    )
    from napari_pathfm.widgets.translate_widget import ROLES, layer_colormap

    def ckpt(name, channels, roles=None):
        return Path(f"{name}.safetensors"), {
            "name": "dense_unet",
            "channels": channels,
            **({"channel_roles": roles} if roles else {}),
        }

    isl = [ckpt("dapi", ["DAPI"], ["nuclei"]), ckpt("map2", ["MAP2"], ["map2"]), ckpt("nfh", ["NFH"], ["nfh"])]
    haste = [ckpt("hoechst", ["Hoechst"]), ckpt("bodipy", ["BODIPY"]), ckpt("cellmask", ["CellMask"])]
    assert default_checkpoints(isl, ROLES) == ["dapi.safetensors", "map2.safetensors", "nfh.safetensors"]
    # HASTE's three roles come first; the second nuclei model (Hoechst) is not pre-filled next to DAPI
    assert default_checkpoints(isl + haste, ROLES) == ["dapi.safetensors", "bodipy.safetensors", "cellmask.safetensors"]
    assert default_checkpoints([], ROLES) == []
    assert card_targets({}, "x/gfap-net.safetensors") == [("gfap-net", "gfap-net")]
    assert card_targets({"target": "GFAP", "role": "astrocytes"}) == [("GFAP", "astrocytes")]
    targets = [t for _p, card in isl + haste[1:] for t in card_targets(card)]
    assert channel_colormaps(targets) == {
        "DAPI": "blue",
        "MAP2": "magenta",
        "NFH": "green",
        "BODIPY": "cyan",
        "CellMask": "red",
    }  # lipids' green is NFH's already: a spare colour
    assert layer_colormap("lipids", "lipids") == "green" and layer_colormap("XYZ", "XYZ") == "cyan"
    assert duplicate_targets([card_targets(c) for _p, c in isl]) is None
    assert duplicate_targets([[("MAP2", "map2")], [("Hoechst", "nuclei")], [("map2", "MAP2")]]) == (0, 2, "MAP2")
