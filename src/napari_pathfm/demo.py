"""``pathfm demo``: the main job on the bundled H&E slide, end to end.

It opens the bundled CMU-1 small region (CC0), finds the tissue, lays the tile
grid, writes the mask as pyramidal OME-TIFF and QuPath GeoJSON, the grid as
CSV/JSON and an overview PNG; then runs the bundled S4 MIL demo model
(:data:`DEMO_MIL`, trained on GlaS gland bags; see its card) for a slide-level
prediction, a patch heatmap OME-TIFF and the top patches; segments the slide
with the default Path-SAM2 model (class map OME-TIFF + QuPath GeoJSON); and
renders PNGs of the napari canvas (slide + tissue/tiles, slide + MIL heatmap,
slide + class map, with the widgets docked). It then classifies the slide's tiles with the bundled SLCA demo
model (:data:`DEMO_CLASSIFY`: class map, probabilities, per-tile CSV into ``classify/``) and translates the
bundled ISL z-stack crop (13 phase-contrast planes) into DAPI, MAP2 and NFH with the bundled ``haste-isl-*``
models (:data:`DEMO_TRANSLATE`, into ``translate/``, with the Pearson r of each channel against the real
confocal stain), each with its canvas PNG (Classify / Translate widget docked). Without a display the canvases
are rendered on a virtual X server (``xvfb-run``) in a child process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .progress import check_cancel, report

DEMO_MIL = "s4mil-glas-glands-demo"
#: Bundled SLCA tile classifier of the demo (GlaS gland / non-gland; see its card).
DEMO_CLASSIFY = "slca-glas-glands-demo"
#: Bundled translation models run on the demo z-stack: nuclei (LUPI, also gives nuclei), MAP2, NFH.
DEMO_TRANSLATE = ("haste-isl-dapi", "haste-isl-map2", "haste-isl-nfh")
#: Bundled z-stack sample (13 planes) and its real confocal targets (DAPI, MAP2, NFH).
DEMO_ZSTACK, DEMO_ZSTACK_TARGETS = "isl-blue-crop.ome.tif", "isl-blue-crop-targets.ome.tif"
#: Nuclei confidence threshold of the demo: the bundled LUPI model is briefly trained and its confidence stays
#: below the default 0.5 on the demo crop (max 0.45), so 0.3 is used to show its nuclei (the widget's slider
#: changes it live).
DEMO_NUCLEI_THRESHOLD = 0.3


def demo_mil_checkpoint() -> Path:
    """The bundled demo S4 MIL checkpoint (rebuilt by ``benchmarks/mil_glas/make_demo_model.py``)."""
    from .checkpoints import BUNDLED_MODELS

    return BUNDLED_MODELS / f"{DEMO_MIL}.safetensors"


def demo_classify_checkpoint() -> Path:
    """The bundled demo SLCA classifier (rebuilt by ``training/slca/glas_demo_cpu.yaml``; see its card)."""
    from .checkpoints import BUNDLED_MODELS

    return BUNDLED_MODELS / f"{DEMO_CLASSIFY}.safetensors"


def demo_translate_checkpoints() -> list[Path]:
    """The bundled translation checkpoints of the demo that are installed (nuclei first)."""
    from .checkpoints import BUNDLED_MODELS

    return [p for p in (BUNDLED_MODELS / f"{n}.safetensors" for n in DEMO_TRANSLATE) if p.is_file()]


def demo_zstack_paths() -> tuple[Path, Path]:
    """``(z-stack, targets)`` of the bundled ISL crop (see ``data/README.md``)."""
    data = Path(__file__).parent / "data"
    return data / DEMO_ZSTACK, data / DEMO_ZSTACK_TARGETS


def display_available() -> bool:
    """True when a GUI can open (Windows/macOS, or an X/Wayland display on Linux)."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def demo_slide_path() -> Path:
    """The bundled H&E slide (CMU-1 small region, CC0): the demo's default slide and the benchmarks'."""
    from ._sample_data import sample_slide_path

    return sample_slide_path()


def _default_slide(slide: Path | None) -> Path:
    return Path(slide) if slide is not None else demo_slide_path()


def build_viewer(
    slide_path: Path,
    *,
    show: bool = False,
    tile_mpp: float = 0.5,
    tile_size: int = 256,
    mil: bool = True,
    segment: bool = True,
    classify: bool = True,
):
    """A napari viewer with the slide, its tissue mask and tile grid, and the Slide widget docked.

    With ``mil`` the MIL widget is docked too, set to the bundled demo model, and
    its prediction is started (in a worker; the heatmap layer appears when it ends);
    with ``segment`` likewise the Segment widget with the default segmentation model,
    and with ``classify`` the Classify widget with the bundled SLCA demo model.
    Returns ``(viewer, {"mil": widget or None, "segment": widget or None, "classify": widget or None})``.
    """
    import napari

    from .pipelines.tissue_tiles import compute_tissue_tiles
    from .widgets.slide_widget import SlideWidget, add_tissue_tiles_layers

    viewer = napari.Viewer(show=show, title="napari-pathfm demo")
    widget = SlideWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Slide (napari-pathfm)", area="right")
    layer = widget.open_path(slide_path)
    result = compute_tissue_tiles(widget.current_slide(), tile_size=tile_size, mpp=tile_mpp)
    widget.status.setText(add_tissue_tiles_layers(viewer, layer.name, result))
    viewer.reset_view()
    mil_widget = None
    if mil and demo_mil_checkpoint().is_file():
        from .widgets.mil_widget import MILWidget

        mil_widget = MILWidget(viewer)
        viewer.window.add_dock_widget(
            mil_widget, name="MIL slide prediction (napari-pathfm)", area="right", tabify=True
        )  # one dock tall: the window (and canvas) keeps its size
        mil_widget.layer_combo.setCurrentText(layer.name)
        mil_widget.set_checkpoint(demo_mil_checkpoint())
        mil_widget.run()
    seg_widget, seg_checkpoint = None, _segment_checkpoint() if segment else None
    if seg_checkpoint is not None:
        from .widgets.segment_widget import SegmentWidget

        seg_widget = SegmentWidget(viewer)
        viewer.window.add_dock_widget(
            seg_widget, name="Segment (napari-pathfm)", area="right", tabify=True
        )  # one dock tall: the window (and canvas) keeps its size
        seg_widget.layer_combo.setCurrentText(layer.name)
        seg_widget.checkpoint.set_path(seg_checkpoint)
        seg_widget.run()
    cls_widget = None
    if classify and demo_classify_checkpoint().is_file():
        from .widgets.classify_widget import ClassifyWidget

        cls_widget = ClassifyWidget(viewer)
        viewer.window.add_dock_widget(
            cls_widget, name="Classify tiles (napari-pathfm)", area="right", tabify=True
        )  # one dock tall: the window (and canvas) keeps its size
        cls_widget.layer_combo.setCurrentText(layer.name)
        cls_widget.checkpoint.set_path(demo_classify_checkpoint())
        cls_widget.run()
    return viewer, {"mil": mil_widget, "segment": seg_widget, "classify": cls_widget}


def build_translate_viewer(*, show: bool = False):
    """A napari viewer with the bundled ISL z-stack crop, its real stains and the Translate widget docked.

    The widget gets one row per bundled ``haste-isl-*`` model (DAPI, the LUPI nuclei model, then
    MAP2 and NFH), the demo's nuclei threshold, and its run is started (worker; the DAPI, MAP2
    and NFH layers, the nuclei confidence and the nuclei appear when it ends). The real confocal
    stains are added hidden, for comparison. Returns ``(viewer, widget or None)``.
    """
    import napari
    import tifffile

    from .io.zstack_layers import TARGET_COLORMAPS, estimate_contrast_limits, zstack_layer_data
    from .widgets.translate_widget import TranslateWidget

    stack_path, targets_path = demo_zstack_paths()
    viewer = napari.Viewer(show=show, title="napari-pathfm demo: z-stack translation")
    stack_name = None
    for data, kwargs, _kind in zstack_layer_data(stack_path):
        stack_name = stack_name or viewer.add_image(data, **kwargs).name
    names = ("DAPI", "MAP2", "NFH")
    for name, target in zip(names, tifffile.imread(targets_path)):
        viewer.add_image(
            target,
            name=f"{name} (real confocal)",
            blending="additive",
            visible=False,
            colormap=TARGET_COLORMAPS[name.lower()],
            contrast_limits=estimate_contrast_limits(target),
            metadata={"pathfm_kind": "translate-target", "target": name},
        )
    checkpoints = demo_translate_checkpoints()
    widget = None
    if checkpoints:
        widget = TranslateWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Translate z-stack (napari-pathfm)", area="right")
        widget.layer_combo.setCurrentText(stack_name)
        widget.set_checkpoints(checkpoints)
        widget.tile.setValue(256)
        widget.threshold.setValue(round(100 * DEMO_NUCLEI_THRESHOLD))
        widget.run()
    return viewer, widget


def _segment_checkpoint() -> Path | None:
    """The default segmentation checkpoint, or None when none is installed."""
    from .errors import CheckpointError
    from .pipelines.segment import default_segment_checkpoint

    try:
        return default_segment_checkpoint()
    except CheckpointError:
        return None


def _settle(viewer, turns: int = 20) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(turns):
        QApplication.processEvents()
    viewer.reset_view()
    for _ in range(turns):
        QApplication.processEvents()


def await_run(widget, key: str, deadline: float) -> None:
    """Turn the Qt event loop until ``widget``'s run ends; raise if it failed or outlived ``deadline``.

    Public for scripts that drive the docks without a user (``docs/screenshots.py``).
    """
    from qtpy.QtWidgets import QApplication

    while widget.runner.running and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    if widget.runner.running or widget.runner.last_error is not None:
        raise RuntimeError(f"the {key} widget did not finish: {widget.runner.last_error or 'timed out'}")


def _export(viewer, target: Path) -> None:
    from .io.atomic import atomic_path

    _settle(viewer)
    with atomic_path(target) as tmp:
        viewer.export_figure(str(tmp))


def render_canvas_png(
    slide_path: Path,
    png: Path,
    mil_png: Path | None = None,
    segment_png: Path | None = None,
    classify_png: Path | None = None,
    translate_png: Path | None = None,
    timeout: float = 300.0,
) -> Path:
    """Render the napari canvas (slide + tissue + tiles) to ``png`` in this process.

    With ``mil_png`` / ``segment_png`` / ``classify_png``, the MIL / Segment / Classify
    widget's run is awaited and one more canvas is written for each: the slide with only
    that widget's layer (heatmap / class map / tile classes) shown. With ``translate_png``
    a second viewer (:func:`build_translate_viewer`) is rendered once its Translate widget's
    run of the DAPI, MAP2 and NFH models ends: the z-stack with the predicted stains. Needs OpenGL and a (possibly virtual) display: a hidden viewer renders
    black, so the window is shown and Qt gets a few event-loop turns to load the tiles.
    """
    viewer, widgets = build_viewer(
        slide_path,
        show=True,
        mil=mil_png is not None,
        segment=segment_png is not None,
        classify=classify_png is not None,
    )
    deadline = time.monotonic() + timeout
    try:
        _export(viewer, png)
        for key, target in (("mil", mil_png), ("segment", segment_png), ("classify", classify_png)):
            widget = widgets.get(key)
            if widget is None or target is None:
                continue
            await_run(widget, key, deadline)
            kind = {"mil": "mil-heatmap", "segment": "segment"}.get(key)
            only = getattr(widget, "labels_layer", None) if key == "classify" else None  # not the probabilities
            for layer in viewer.layers:
                shown = layer is only if only is not None else layer.metadata.get("pathfm_kind") == kind
                layer.visible = "pathfm_path" in layer.metadata or shown
            _export(viewer, target)
    finally:
        viewer.close()
    if translate_png is not None:
        tviewer, twidget = build_translate_viewer(show=True)
        try:
            if twidget is not None:
                await_run(twidget, "translate", deadline)
                for layer in tviewer.layers:
                    if layer.metadata.get("pathfm_kind") in ("translate-confidence", "translate-nuclei"):
                        layer.visible = False
            _export(tviewer, translate_png)
        finally:
            tviewer.close()
    return png


def _render_canvas_elsewhere(slide_path: Path, png: Path, *extra: Path | None) -> str | None:
    """Render in a child process, on a virtual X server when there is no display. Returns an error text or None.

    ``extra``: the MIL, segmentation, classify and translate canvases (None to skip one).
    """
    cmd = [sys.executable, "-m", "napari_pathfm.demo", "--canvas", str(slide_path), str(png)]
    cmd += [str(p) if p is not None else "-" for p in extra]
    if not display_available():
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            return "no display and no xvfb-run (apt-get install xvfb) to render the napari canvas"
        cmd = [xvfb, "-a", "-s", "-screen 0 1280x1024x24"] + cmd
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not png.exists() or any(p is not None and not p.exists() for p in extra):
        return f"napari canvas rendering failed: {proc.stderr.strip()[-800:]}"
    return None


def run_demo(
    out: Path = Path("pathfm-demo"),
    *,
    slide: Path | None = None,
    show: bool = False,
    render_canvas: bool = True,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> dict[str, Path]:
    """Run every demo step on ``slide`` (default: the bundled slide); return {name: written path}."""
    from .io.slide import open_slide
    from .pipelines.tissue_tiles import compute_tissue_tiles, write_tissue_tiles

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slide_path = _default_slide(slide)
    checkpoint = demo_mil_checkpoint()
    seg_checkpoint = _segment_checkpoint()
    steps = 7 if render_canvas else 6
    t0 = time.perf_counter()
    report(progress, 0, steps, "tissue & tiles")
    with open_slide(slide_path) as s:
        result = compute_tissue_tiles(s, tile_size=256, mpp=0.5, cancel=cancel)
        written = write_tissue_tiles(result, out)
        summary = {
            "slide": str(slide_path),
            "slide_shape": list(s.shape),
            "mpp": s.mpp,
            "tissue_fraction": round(float(result.tissue.tissue_fraction), 4),
            "tissue_tiles": len(result.grid.tiles),
            "tile_size": result.grid.tile_size,
            "tile_mpp": result.grid.mpp,
        }
        check_cancel(cancel, "demo")
        report(progress, 1, steps, "MIL slide prediction")
        summary["mil"] = _mil_step(s, checkpoint, out, written, cancel)
        check_cancel(cancel, "demo")
        report(progress, 2, steps, "segmentation")
        summary["segment"] = _segment_step(s, seg_checkpoint, out, written, cancel)
        check_cancel(cancel, "demo")
        report(progress, 3, steps, "tile classification")
        summary["classify"] = _classify_step(s, out / "classify", written, cancel)
    check_cancel(cancel, "demo")
    report(progress, 4, steps, "z-stack translation")
    summary["translate"] = _translate_step(out / "translate", written, cancel)
    check_cancel(cancel, "demo")
    report(progress, 5, steps, "napari canvas")
    if render_canvas:
        png, mil_png = out / "napari-canvas-slide.png", out / "napari-canvas-mil.png"
        seg_png = out / "napari-canvas-segment.png" if seg_checkpoint is not None else None
        cls_png = out / "napari-canvas-classify.png" if isinstance(summary["classify"], dict) else None
        tr_png = out / "napari-canvas-translate.png" if isinstance(summary["translate"], dict) else None
        error = _render_canvas_elsewhere(slide_path, png, mil_png, seg_png, cls_png, tr_png)
        if error is None:
            written["napari_canvas_png"] = png
            written["napari_canvas_mil_png"] = mil_png
            for key, path in (("segment", seg_png), ("classify", cls_png), ("translate", tr_png)):
                if path is not None:
                    written[f"napari_canvas_{key}_png"] = path
        else:
            summary["napari_canvas_png"] = error
        report(progress, 6, steps, "summary")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["files"] = {k: str(v) for k, v in written.items()}
    summary_path = out / "demo-summary.json"
    from .io.atomic import atomic_path

    with atomic_path(summary_path) as tmp:
        from .io.jsonsafe import dumps as strict_dumps  # undefined metrics -> null, with a warning

        tmp.write_text(strict_dumps(summary, where=str(summary_path), indent=2))
    written["summary"] = summary_path
    report(progress, steps, steps, "done")
    if show:
        show_in_napari(out, slide=slide)
    return written


def _segment_step(slide, checkpoint: Path | None, out: Path, written: dict, cancel) -> Any:
    """Class map of the default segmentation model as OME-TIFF + GeoJSON, and what it found."""
    if checkpoint is None:
        return "no segmentation model installed (see docs/segment.md)"
    import numpy as np

    from .models.checkpoint import read_card
    from .pipelines.segment import segment_slide

    res = segment_slide(
        slide,
        checkpoint,
        device="cpu",
        cancel=cancel,
        out=out / "segmentation.ome.tif",
        geojson=out / "segmentation.geojson",
    )
    written.update({"segmentation_mask": res.written["mask"], "segmentation_geojson": res.written["geojson"]})
    labels = np.asarray(res.labels)
    card = read_card(checkpoint.with_suffix(".json"))
    return {
        "model": checkpoint.name,
        "model_metrics": card.get("test_metrics") or (card.get("metrics") or {}).get("best"),
        "classes": res.classes,
        "fraction": {c: round(float((labels == i).mean()), 4) for i, c in enumerate(res.classes)},
        "tiles": res.n_tiles,
        "model_mpp": res.model_mpp,
        "messages": res.messages,
    }


def _classify_step(slide, out_dir: Path, written: dict, cancel) -> Any:
    """Tile classes of the bundled SLCA demo model: class map, probabilities, tiles CSV/GeoJSON, summary."""
    checkpoint = demo_classify_checkpoint()
    if not checkpoint.is_file():
        return f"the demo classifier {checkpoint.name} is not installed"
    from .models.checkpoint import read_card
    from .pipelines.classify import classify_slide, write_classify_outputs

    res = classify_slide(slide, checkpoint, device="cpu", cancel=cancel)
    files = write_classify_outputs(res, out_dir, cancel=cancel)
    written.update({f"classify_{k}": v for k, v in files.items()})
    card = read_card(checkpoint.with_suffix(".json"))
    return {
        "model": checkpoint.name,
        "model_test_metrics": card.get("test_metrics"),
        "classes": res.classes,
        "tiles": res.n_tiles,
        "class_fractions": {c: round(float(v), 4) for c, v in res.class_fractions().items()},
        "model_mpp": res.model_mpp,
        "messages": res.messages,
        "note": "demo model: random-init SAM encoder, trained on GlaS colon glands; CMU-1 is skin; not diagnostic",
    }


def _translate_step(out_dir: Path, written: dict, cancel) -> Any:
    """Bundled haste-isl-* models on the bundled ISL z-stack crop; Pearson r of each channel vs the real stain."""
    checkpoints = demo_translate_checkpoints()
    stack_path, targets_path = demo_zstack_paths()
    if not checkpoints or not stack_path.is_file():
        return "no bundled translation model or z-stack sample installed"
    import numpy as np
    import tifffile

    from .io.zstack import open_zstack
    from .pipelines.translate import translate_stack, write_translation

    res = translate_stack(
        open_zstack(stack_path), checkpoints, tile=256, device="cpu", threshold=DEMO_NUCLEI_THRESHOLD, cancel=cancel
    )
    files = write_translation(res, out_dir, cancel=cancel)
    written.update({f"translate_{k.replace('channel:', '')}": v for k, v in files.items()})
    real = dict(zip(("DAPI", "MAP2", "NFH"), tifffile.imread(targets_path).astype(np.float64)))
    pearson = {
        c: round(float(np.corrcoef(np.asarray(a, np.float64).ravel(), real[c].ravel())[0, 1]), 4)
        for c, a in res.channels.items()
        if c in real
    }
    return {
        "input": stack_path.name,
        "models": [p.name for p in checkpoints],
        "channels": {c: res.roles[c] for c in res.channels},
        "pearson_r_vs_real": pearson,
        "nuclei": int(res.nuclei_labels.max()) if res.nuclei_labels is not None else None,
        "nuclei_threshold": DEMO_NUCLEI_THRESHOLD,
        "shape": list(res.shape),
        "note": "models trained on rows 0:768 of the same ISL well for a few CPU minutes; the crop is from rows "
        "768:1024 (held out)",
    }


def _mil_step(slide, checkpoint: Path, out: Path, written: dict, cancel) -> dict:
    """Slide-level prediction, heatmap OME-TIFF and top patches of the bundled S4 MIL model."""
    from .models.checkpoint import read_card
    from .pipelines.mil import mil_predict, write_mil_outputs

    pred = mil_predict(checkpoint, slide=slide, device="cpu", cancel=cancel)
    files = write_mil_outputs(
        pred, heatmap=out / "mil-heatmap.ome.tif", json_path=out / "mil-prediction.json", mpp=slide.mpp
    )
    written.update({"mil_heatmap": files["heatmap"], "mil_json": files["json"]})
    card = read_card(checkpoint.with_suffix(".json"))
    return {
        "model": checkpoint.name,
        "model_test_metrics": card.get("test_metrics"),
        "predicted": pred.predicted,
        "probabilities": {c: round(float(p), 4) for c, p in zip(pred.classes, pred.probabilities)},
        "patches": len(pred.coords),
        "note": "demo model: random-init feature extractor trained on GlaS colon-gland bags; not diagnostic",
    }


def show_in_napari(out: Path, *, slide: Path | None = None) -> None:
    """Open napari with the demo slide, its overlays and the plugin's widgets docked; blocks until closed.

    A second window holds the z-stack translation: the bundled ISL crop, with the Translate widget
    running the bundled DAPI, MAP2 and NFH models on it (the demo wrote the same to ``out/translate``).
    """
    import napari

    _viewer, _widgets = build_viewer(_default_slide(slide), show=True)  # keep the widgets referenced
    _tviewer, _twidget = build_translate_viewer(show=True)
    napari.run()


if __name__ == "__main__":
    if 4 <= len(sys.argv) <= 8 and sys.argv[1] == "--canvas":
        more = [Path(a) if a != "-" else None for a in sys.argv[4:]] + [None] * 4
        render_canvas_png(Path(sys.argv[2]), Path(sys.argv[3]), *more[:4])
    else:
        print(
            "usage: python -m napari_pathfm.demo --canvas SLIDE OUT.png [MIL.png|-] [SEGMENT.png|-] "
            "[CLASSIFY.png|-] [TRANSLATE.png|-]",
            file=sys.stderr,
        )
        sys.exit(2)
