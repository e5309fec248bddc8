"""``pathfm demo``: the main job on the bundled H&E slide, end to end.

It opens the bundled CMU-1 small region (CC0), finds the tissue, lays the tile
grid, writes the mask as pyramidal OME-TIFF and QuPath GeoJSON, the grid as
CSV/JSON, an overview PNG, and a PNG of the napari canvas (slide + overlays).
Without a display, the canvas is rendered on a virtual X server (``xvfb-run``)
in a child process. Later families add their models here.
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


def display_available() -> bool:
    """True when a GUI can open (Windows/macOS, or an X/Wayland display on Linux)."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _default_slide(slide: Optional[Path]) -> Path:
    from ._sample_data import sample_slide_path

    return Path(slide) if slide is not None else sample_slide_path()


def build_viewer(slide_path: Path, *, show: bool = False, tile_mpp: float = 0.5, tile_size: int = 256):
    """A napari viewer with the slide, its tissue mask and tile grid, and the Slide widget docked."""
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
    return viewer


def render_canvas_png(slide_path: Path, png: Path) -> Path:
    """Render the napari canvas (slide + tissue + tiles) to ``png`` in this process.

    Needs OpenGL and a (possibly virtual) display: a hidden viewer renders black,
    so the window is shown and Qt gets a few event-loop turns to load the tiles.
    """
    from qtpy.QtWidgets import QApplication

    from .io.atomic import atomic_path

    viewer = build_viewer(slide_path, show=True)
    try:
        for _ in range(10):
            QApplication.processEvents()
        viewer.reset_view()
        for _ in range(20):
            QApplication.processEvents()
        with atomic_path(png) as tmp:
            viewer.export_figure(str(tmp))
    finally:
        viewer.close()
    return png


def _render_canvas_elsewhere(slide_path: Path, png: Path) -> Optional[str]:
    """Render in a child process, on a virtual X server when there is no display. Returns an error text or None."""
    cmd = [sys.executable, "-m", "napari_pathfm.demo", "--canvas", str(slide_path), str(png)]
    if not display_available():
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            return "no display and no xvfb-run (apt-get install xvfb) to render the napari canvas"
        cmd = [xvfb, "-a", "-s", "-screen 0 1280x1024x24"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not png.exists():
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
    steps = 3 if render_canvas else 2
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
    report(progress, 1, steps, "napari canvas")
    if render_canvas:
        png = out / "napari-canvas-slide.png"
        error = _render_canvas_elsewhere(slide_path, png)
        if error is None:
            written["napari_canvas_png"] = png
        else:
            summary["napari_canvas_png"] = error
        report(progress, 2, steps, "summary")
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


def show_in_napari(out: Path, *, slide: Optional[Path] = None) -> None:
    """Open napari with the demo slide, its overlays and the plugin's widget docked; blocks until closed."""
    import napari

    build_viewer(_default_slide(slide), show=True)
    napari.run()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--canvas":
        render_canvas_png(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        print("usage: python -m napari_pathfm.demo --canvas SLIDE OUT.png", file=sys.stderr)
        sys.exit(2)
