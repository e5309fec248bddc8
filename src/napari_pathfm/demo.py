"""``pathfm demo``: the main job on the bundled H&E slide, end to end.

It opens the bundled CMU-1 small region (CC0), finds the tissue, lays the tile
grid, writes the mask as pyramidal OME-TIFF and QuPath GeoJSON, the grid as
CSV/JSON and an overview PNG; then runs the bundled S4 MIL demo model
(:data:`DEMO_MIL`, trained on GlaS gland bags; see its card) for a slide-level
prediction, a patch heatmap OME-TIFF and the top patches; segments the slide
with the default Path-SAM2 model (class map OME-TIFF + QuPath GeoJSON); and
renders PNGs of the napari canvas (slide + tissue/tiles, slide + MIL heatmap,
slide + class map, with the widgets docked). Without a display the canvases are rendered on a virtual X
server (``xvfb-run``) in a child process. Later families add their models here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .progress import check_cancel, report

DEMO_MIL = "s4mil-glas-glands-demo"


def demo_mil_checkpoint() -> Path:
    """The bundled demo S4 MIL checkpoint (rebuilt by ``benchmarks/mil_glas/make_demo_model.py``)."""
    from .checkpoints import BUNDLED_MODELS

    return BUNDLED_MODELS / f"{DEMO_MIL}.safetensors"


def display_available() -> bool:
    """True when a GUI can open (Windows/macOS, or an X/Wayland display on Linux)."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _default_slide(slide: Optional[Path]) -> Path:
    from ._sample_data import sample_slide_path

    return Path(slide) if slide is not None else sample_slide_path()


def build_viewer(
    slide_path: Path, *, show: bool = False, tile_mpp: float = 0.5, tile_size: int = 256, mil: bool = True,
    segment: bool = True,
):  # fmt: skip
    """A napari viewer with the slide, its tissue mask and tile grid, and the Slide widget docked.

    With ``mil`` the MIL widget is docked too, set to the bundled demo model, and
    its prediction is started (in a worker; the heatmap layer appears when it ends);
    with ``segment`` likewise the Segment widget with the default segmentation model.
    Returns ``(viewer, {"mil": widget or None, "segment": widget or None})``.
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
        viewer.window.add_dock_widget(mil_widget, name="MIL slide prediction (napari-pathfm)", area="right")
        mil_widget.layer_combo.setCurrentText(layer.name)
        mil_widget.set_checkpoint(demo_mil_checkpoint())
        mil_widget.run()
    seg_widget, seg_checkpoint = None, _segment_checkpoint() if segment else None
    if seg_checkpoint is not None:
        from .widgets.segment_widget import SegmentWidget

        seg_widget = SegmentWidget(viewer)
        viewer.window.add_dock_widget(seg_widget, name="Segment (napari-pathfm)", area="right")
        seg_widget.layer_combo.setCurrentText(layer.name)
        seg_widget.checkpoint.set_path(seg_checkpoint)
        seg_widget.run()
    return viewer, {"mil": mil_widget, "segment": seg_widget}


def _segment_checkpoint() -> Optional[Path]:
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


def render_canvas_png(
    slide_path: Path, png: Path, mil_png: Optional[Path] = None, segment_png: Optional[Path] = None,
    timeout: float = 300.0,
) -> Path:  # fmt: skip
    """Render the napari canvas (slide + tissue + tiles) to ``png`` in this process.

    With ``mil_png`` / ``segment_png``, the MIL / Segment widget's run is awaited
    and one more canvas is written for each: the slide with only that widget's
    layer (heatmap / class map) shown. Needs OpenGL and a (possibly virtual)
    display: a hidden viewer renders black, so the window is shown and Qt gets a
    few event-loop turns to load the tiles.
    """
    from qtpy.QtWidgets import QApplication

    from .io.atomic import atomic_path

    viewer, widgets = build_viewer(slide_path, show=True, mil=mil_png is not None, segment=segment_png is not None)
    try:
        _settle(viewer)
        with atomic_path(png) as tmp:
            viewer.export_figure(str(tmp))
        deadline = time.monotonic() + timeout
        for key, target, kind in (("mil", mil_png, "mil-heatmap"), ("segment", segment_png, "segment")):
            widget = widgets.get(key)
            if widget is None or target is None:
                continue
            while widget.runner.running and time.monotonic() < deadline:
                QApplication.processEvents()
                time.sleep(0.02)
            if widget.runner.running or widget.runner.last_error is not None:
                raise RuntimeError(f"the {key} widget did not finish: {widget.runner.last_error or 'timed out'}")
            for layer in viewer.layers:
                meta_kind = layer.metadata.get("pathfm_kind")
                layer.visible = "pathfm_path" in layer.metadata or meta_kind == kind
            _settle(viewer)
            with atomic_path(target) as tmp:
                viewer.export_figure(str(tmp))
    finally:
        viewer.close()
    return png


def _render_canvas_elsewhere(slide_path: Path, png: Path, *extra: Optional[Path]) -> Optional[str]:
    """Render in a child process, on a virtual X server when there is no display. Returns an error text or None.

    ``extra``: the MIL and segmentation canvases (None to skip one).
    """
    cmd = [sys.executable, "-m", "napari_pathfm.demo", "--canvas", str(slide_path), str(png)]
    cmd += [str(p) if p is not None else "-" for p in extra]
    if not display_available():
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            return "no display and no xvfb-run (apt-get install xvfb) to render the napari canvas"
        cmd = [xvfb, "-a", "-s", "-screen 0 1280x1024x24"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not png.exists() or any(p is not None and not p.exists() for p in extra):
        return f"napari canvas rendering failed: {proc.stderr.strip()[-800:]}"
    return None


def run_demo(
    out: Path = Path("pathfm-demo"),
    *,
    slide: Optional[Path] = None,
    show: bool = False,
    render_canvas: bool = True,
    progress: Optional[Callable[..., Any]] = None,
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
    steps = 5 if render_canvas else 4
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
            "tissue_tiles": int(len(result.grid.tiles)),
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
    report(progress, 3, steps, "napari canvas")
    if render_canvas:
        png, mil_png = out / "napari-canvas-slide.png", out / "napari-canvas-mil.png"
        seg_png = out / "napari-canvas-segment.png" if seg_checkpoint is not None else None
        error = _render_canvas_elsewhere(slide_path, png, mil_png, seg_png)
        if error is None:
            written["napari_canvas_png"] = png
            written["napari_canvas_mil_png"] = mil_png
            if seg_png is not None:
                written["napari_canvas_segment_png"] = seg_png
        else:
            summary["napari_canvas_png"] = error
        report(progress, 4, steps, "summary")
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["files"] = {k: str(v) for k, v in written.items()}
    summary_path = out / "demo-summary.json"
    from .io.atomic import atomic_path

    with atomic_path(summary_path) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    written["summary"] = summary_path
    report(progress, steps, steps, "done")
    if show:
        show_in_napari(out, slide=slide)
    return written


def _segment_step(slide, checkpoint: Optional[Path], out: Path, written: dict, cancel) -> Any:
    """Class map of the default segmentation model as OME-TIFF + GeoJSON, and what it found."""
    if checkpoint is None:
        return "no segmentation model installed (see docs/segment.md)"
    import numpy as np

    from .models.checkpoint import read_card
    from .pipelines.segment import segment_slide

    res = segment_slide(
        slide, checkpoint, device="cpu", cancel=cancel, out=out / "segmentation.ome.tif",
        geojson=out / "segmentation.geojson",
    )  # fmt: skip
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
        "patches": int(len(pred.coords)),
        "note": "demo model: random-init feature extractor trained on GlaS colon-gland bags; not diagnostic",
    }


def show_in_napari(out: Path, *, slide: Optional[Path] = None) -> None:
    """Open napari with the demo slide, its overlays and the plugin's widgets docked; blocks until closed."""
    import napari

    viewer, _widgets = build_viewer(_default_slide(slide), show=True)  # keep the widgets referenced
    napari.run()


if __name__ == "__main__":
    if 4 <= len(sys.argv) <= 6 and sys.argv[1] == "--canvas":
        more = [Path(a) if a != "-" else None for a in sys.argv[4:]] + [None, None]
        render_canvas_png(Path(sys.argv[2]), Path(sys.argv[3]), more[0], more[1])
    else:
        print("usage: python -m napari_pathfm.demo --canvas SLIDE OUT.png [MIL.png|-] [SEGMENT.png|-]", file=sys.stderr)
        sys.exit(2)
