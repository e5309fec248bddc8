"""Screenshots of each napari-pathfm dock after a run on the bundled data, for the docs.

    xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python docs/screenshots.py [--out docs/images] [DOCK ...]

For each dock (slide, segment, classify, mil, translate, train) it opens napari on the bundled
data (the CMU-1 small region; the ISL z-stack crop with its real stains for Translate), docks the
widget, runs it with the bundled model and waits for the run, then writes

* ``<dock>.png``: the whole napari window (canvas, layer list, dock), downscaled to ``--width`` px;
* ``<dock>-dock.png``: the dock alone (``QWidget.grab()``).

Two more pictures show a dock in a second state: ``annotations`` (the bundled model's glands saved
as QuPath GeoJSON and opened again over the slide, with the Segment dock) and ``review`` (the MIL
dock's review queue over a two-slide batch of the bundled demo model: the slide and its copy), and
``prompt`` (the Segment dock's Prompt row on a GlaS image shown as a 0.62 µm/px slide: five clicks
and a box, each gland a new label), and ``foundation`` (the Train dock's backbone row set to a model
found in a local Hugging Face cache: a small random ViT written there for the picture).

The Train dock is filled with ``training/classify/crc_tiny.yaml``; when the CRC tiles are present
(``$PATHFM_SHARED_DATA/crc-tiles``) one epoch is trained so that the plot and the run list show it
(into a temporary per-user data folder), else the form is shown as filled. The window has a fixed
size and the camera is reset to the data, so a rerun gives the same pictures up to model output.
PNGs are written atomically, reduced to 256 colours and optimised (about 0.25 MB a dock).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DOCKS = ("slide", "segment", "classify", "mil", "translate", "train", "annotations", "review", "prompt", "foundation")
#: Pictures of a dock in a second state: the picture's name → the dock whose window it shows.
SCENES = {"annotations": "segment", "review": "mil", "prompt": "segment", "foundation": "train"}
WINDOW = (1500, 900)  # napari main window size (px), fixed for every picture
DOCK_WIDTH = 400  # width given to the right dock area (px)
REPO = Path(__file__).resolve().parents[1]
# the data beside the checkout unless PATHFM_SHARED_DATA is set (the package's own default is a per-user folder)
os.environ.setdefault("PATHFM_SHARED_DATA", str(REPO.parent / "shared" / "data"))


def _dock(viewer, name: str):
    """The Qt dock (title bar + widget) that napari made for the widget docked as ``name``, or None."""
    inner = viewer.window.dock_widgets.get(name)
    return None if inner is None else inner.parent()


def _qapp_turns(n: int = 20) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()
        time.sleep(0.005)


def _fix_window(viewer, dock_name: str | None) -> None:
    """Fixed window size, the dock ``dock_name`` raised and given a fixed width, camera reset."""
    from qtpy.QtCore import Qt

    win = viewer.window._qt_window
    win.showNormal()
    win.resize(*WINDOW)
    _qapp_turns()
    dock = _dock(viewer, dock_name) if dock_name else None
    if dock is not None:
        dock.show()
        dock.raise_()
        win.resizeDocks([dock], [DOCK_WIDTH], Qt.Orientation.Horizontal)
    _qapp_turns()
    viewer.reset_view()
    _qapp_turns(40)


def _wait(widget, key: str, deadline: float) -> None:
    """Turn the event loop until ``widget``'s run (worker) ends; raise if it failed or timed out."""
    from napari_pathfm.demo import await_run

    await_run(widget, key, deadline)
    _qapp_turns(40)


def _save_png(rgb, target: Path, width: int | None, colors: int = 256) -> Path:
    """Write an RGB(A) array as an optimised PNG, downscaled to ``width`` px when wider; atomically.

    With ``colors`` the picture is reduced to a palette of that many colours (median cut, no dither):
    a third of the size, and the UI and slide look the same at this scale.
    """
    import numpy as np
    from PIL import Image

    from napari_pathfm.io.atomic import atomic_path

    img = Image.fromarray(np.ascontiguousarray(rgb)).convert("RGB")
    if width and img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    img = img.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) if colors else img
    with atomic_path(target) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return target


def _grab(widget, margin: int = 8):
    """``widget.grab()`` as an RGBA array, without the empty rows below the dock's content."""
    import numpy as np
    from napari._qt.utils import QImg2array

    rgba = QImg2array(widget.grab().toImage())
    rows = np.flatnonzero((rgba[..., :3] != rgba[-1:, :, :3]).any(axis=(1, 2)))  # differ from the bottom row
    return rgba[: min(len(rgba), rows[-1] + 1 + margin)] if len(rows) else rgba


def _show_only(viewer, keep) -> None:
    """Show the slide/z-stack layers and those ``keep(layer)`` accepts; hide the rest."""
    for layer in viewer.layers:
        layer.visible = "pathfm_path" in layer.metadata or bool(keep(layer))


def _slide_viewer(dock: str):
    """A viewer with the bundled slide, tissue + tiles and the Slide dock; with ``dock`` that dock too, run."""
    from napari_pathfm.demo import build_viewer, demo_slide_path

    viewer, widgets = build_viewer(
        demo_slide_path(), show=True, mil=dock == "mil", segment=dock == "segment", classify=dock == "classify"
    )
    return viewer, widgets


DOCK_NAMES = {
    "slide": "Slide (napari-pathfm)",
    "segment": "Segment (napari-pathfm)",
    "classify": "Classify tiles (napari-pathfm)",
    "mil": "MIL slide prediction (napari-pathfm)",
    "translate": "Translate z-stack (napari-pathfm)",
    "train": "Train a model (napari-pathfm)",
}


def _train(viewer, deadline: float, run: bool):
    """Dock the Train widget with crc_tiny.yaml; with ``run`` train one epoch and wait for it."""
    from napari_pathfm.widgets.train_widget import TrainWidget

    widget = TrainWidget(viewer)
    viewer.window.add_dock_widget(widget, name=DOCK_NAMES["train"], area="right", tabify=True)
    widget.set_recipe(REPO / "training" / "classify" / "crc_tiny.yaml")
    widget.form.set_value("trainer.max_epochs", 1)  # one tiny epoch
    widget.device.setCurrentText("cpu")
    if run:
        widget.start()
        while widget.state.value in ("training", "stopping") and time.monotonic() < deadline:
            _qapp_turns(5)
            time.sleep(0.05)
        if widget.state.value != "done":
            raise RuntimeError(f"the train run did not finish ({widget.state.value}): {widget.status.text()}")
    return widget


def _annotations(viewer, widget, deadline: float) -> None:
    """Save the Segment dock's objects as QuPath GeoJSON, open that file over the slide, show only it."""
    _wait(widget, "segment", deadline)
    objects = next(la for la in viewer.layers if la.metadata.get("pathfm_kind") == "segment_objects")
    path = Path(tempfile.mkdtemp()) / "CMU-1-Small-Region.geojson"
    objects.save(str(path), plugin="napari-pathfm")
    viewer.open(str(path), plugin="napari-pathfm")
    _show_only(viewer, lambda layer: layer.metadata.get("pathfm_kind") == "annotations")


def _review(viewer, widget, deadline: float) -> None:
    """A two-slide MIL batch (the bundled slide and a copy) reviewed in the MIL dock, the first verdict given."""
    from napari_pathfm.demo import demo_mil_checkpoint, demo_slide_path
    from napari_pathfm.pipelines.batch import run_batch

    _wait(widget, "mil", deadline)
    root = Path(tempfile.mkdtemp())
    copy = root / "case-002.svs"
    shutil.copy(demo_slide_path(), copy)
    (root / "manifest.csv").write_text(f"slide\n{demo_slide_path()}\n{copy}\n", encoding="utf-8")
    run_batch(root / "manifest.csv", "mil", root / "batch", n_workers=1, checkpoint=demo_mil_checkpoint())
    widget.review.load(root / "batch")
    while (widget.review.list.count() < 2 or widget.runner.running) and time.monotonic() < deadline:
        _qapp_turns(5)
    widget.review.record("agree")
    _wait(widget, "mil", deadline)
    _show_only(viewer, lambda layer: layer.metadata.get("pathfm_kind") in ("mil-heatmap", "mil-top-patch"))


def _hub_with_a_small_vit() -> str:
    """A Hugging Face cache in a temporary folder (``HF_HUB_CACHE``) holding one small random timm ViT,
    saved by timm's ``save_for_hf`` in the hub's layout: what the picker finds is real files, not a list."""
    import timm
    from timm.models._hub import save_for_hf

    cache = Path(tempfile.mkdtemp()) / "hub"
    commit = "0" * 40
    snap = cache / "models--pathfm-demo--small-vit" / "snapshots" / commit
    vit = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, depth=2, embed_dim=64, num_heads=2
    )
    save_for_hf(vit, snap, safe_serialization=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(commit)
    os.environ["HF_HUB_CACHE"] = str(cache)
    return "hf-hub:pathfm-demo/small-vit"


def _foundation(viewer, deadline: float):
    """The Train dock on ``classify/crc_tiny.yaml`` with the backbone row set to a model of the local Hugging
    Face cache, picked from the list the panel fills off the GUI thread."""
    name = _hub_with_a_small_vit()
    widget = _train(viewer, deadline, run=False)
    combo = widget.form.editors["model.backbone"][0]
    while combo.findText(name) < 0 and time.monotonic() < deadline:
        _qapp_turns(5)
    combo.setCurrentIndex(combo.findText(name))
    _show_only(viewer, lambda layer: False)
    return widget


GLAS_IMAGE = "train_12"  # a GlaS training image with many glands, shown as a 0.62 µm/px slide


def _glas_viewer():
    """A viewer with a GlaS image (written as an OME-TIFF at its 0.62 µm/px) and the Segment dock, run."""
    import napari
    import numpy as np
    from PIL import Image

    from napari_pathfm.io.ome_tiff import write_ome_tiff
    from napari_pathfm.widgets.segment_widget import SegmentWidget

    root = Path(os.environ["PATHFM_SHARED_DATA"]) / "glas" / "train"
    path = Path(tempfile.mkdtemp()) / f"glas-{GLAS_IMAGE}.ome.tif"
    rgb = np.asarray(Image.open(root / "images" / f"{GLAS_IMAGE}.png").convert("RGB"))
    write_ome_tiff(path, rgb, axes="YXS", mpp=0.62)
    viewer = napari.Viewer(show=True)
    viewer.open(str(path), plugin="napari-pathfm")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name=DOCK_NAMES["segment"], area="right")
    widget.run()
    return viewer, widget


def _prompt(viewer, widget, deadline: float) -> None:
    """Prompt mode on the GlaS image: a click in the middle of five glands and a box around a sixth
    (glands of the image's ground-truth mask, as a user would pick them by eye)."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage

    _wait(widget, "segment", deadline)
    root = Path(os.environ["PATHFM_SHARED_DATA"]) / "glas" / "train"
    parts, _ = ndimage.label(np.asarray(Image.open(root / "masks" / f"{GLAS_IMAGE}.png")) > 0)
    sizes = np.bincount(parts.ravel())
    glands = [k for k in np.argsort(sizes[1:])[::-1] + 1 if sizes[k] > 2000][:6]
    row = widget.prompts
    row.button.click()
    _qapp_turns(5)
    for k in glands[:-1]:
        inner = ndimage.distance_transform_edt(np.pad(parts == k, 1))[1:-1, 1:-1]
        row.points.add(list(np.unravel_index(int(np.argmax(inner)), inner.shape)))
    ys, xs = np.nonzero(parts == glands[-1])
    row.boxes.add_rectangles(np.array([[ys.min(), xs.min()], [ys.max(), xs.max()]]))
    while (row.runner.running or row.queue) and time.monotonic() < deadline:
        _qapp_turns(5)
    keep = (row.objects, row.points, row.boxes)
    _show_only(viewer, lambda layer: layer in keep)


def shoot(dock: str, out: Path, *, width: int = 1200, timeout: float = 600.0, train_run: bool | None = None) -> dict:
    """Render ``out/<dock>.png`` (window) and ``out/<dock>-dock.png`` (dock alone). Returns {kind: path}."""
    from napari_pathfm.widgets import keep_triton_out

    if dock not in DOCKS:
        raise ValueError(f"unknown dock {dock!r}; choose from {DOCKS}")
    keep_triton_out()  # before any viewer: a later torch import next to Mesa's LLVM segfaults otherwise
    deadline = time.monotonic() + timeout
    out = Path(out)
    if dock == "translate":
        from napari_pathfm.demo import build_translate_viewer

        viewer, widget = build_translate_viewer(show=True)
        if widget is None:
            raise RuntimeError("no bundled haste-isl-* model installed")
    elif dock == "prompt":
        viewer, widget = _glas_viewer()
    else:
        viewer, widgets = _slide_viewer(SCENES.get(dock, dock))  # the Slide dock has computed tissue & tiles already
        widget = widgets.get(SCENES.get(dock, dock))
    try:
        if dock == "foundation":
            widget = _foundation(viewer, deadline)
        elif dock == "train":
            if train_run is None:
                from napari_pathfm.training.recipes import default_shared_data

                train_run = (Path(default_shared_data()) / "crc-tiles").is_dir()
            widget = _train(viewer, deadline, train_run)
            _show_only(viewer, lambda layer: False)
        elif dock in ("segment", "classify", "mil"):
            if widget is None:
                raise RuntimeError(f"no bundled model for the {dock} dock")
            _wait(widget, dock, deadline)
            if dock == "classify":
                only = getattr(widget, "labels_layer", None)  # the tile classes, not the probabilities
                _show_only(viewer, lambda layer: layer is only)
            else:
                kind = {"mil": "mil-heatmap", "segment": "segment"}[dock]
                _show_only(viewer, lambda layer: layer.metadata.get("pathfm_kind") == kind)
        elif dock == "annotations":
            _annotations(viewer, widget, deadline)
        elif dock == "review":
            _review(viewer, widget, deadline)
        elif dock == "prompt":
            _prompt(viewer, widget, deadline)
        elif dock == "translate":
            _wait(widget, dock, deadline)
            for layer in viewer.layers:
                if layer.metadata.get("pathfm_kind") == "translate-confidence":
                    layer.visible = False
        name = DOCK_NAMES[SCENES.get(dock, dock)]
        _fix_window(viewer, name)
        window = viewer.screenshot(canvas_only=False, flash=False)
        dock_widget = _dock(viewer, name)
        written = {
            "window": _save_png(window, out / f"{dock}.png", width),
            "dock": _save_png(_grab(dock_widget), out / f"{dock}-dock.png", None),
        }
    finally:
        viewer.close()
        _qapp_turns()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("docks", nargs="*", help=f"docks to shoot (default: all of {DOCKS})")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--width", type=int, default=1200, help="width of the window pictures (px)")
    parser.add_argument("--no-train-run", action="store_true", help="show the Train form filled, without training")
    args = parser.parse_args(argv)
    docks = args.docks or list(DOCKS)
    bad = [d for d in docks if d not in DOCKS]
    if bad:
        parser.error(f"unknown dock(s) {bad}; choose from {DOCKS}")
    # Fresh, fixed user folders (their paths show in the docks' text), so that every run starts the same:
    # the Train run and the run list, an empty embedding cache (the encoders run), no user models.
    data_dir = Path(tempfile.gettempdir()) / "napari-pathfm-screenshots"
    shutil.rmtree(data_dir, ignore_errors=True)
    os.environ["PATHFM_DATA_DIR"] = str(data_dir)
    os.environ["PATHFM_CACHE_DIR"] = str(data_dir / "cache")
    os.environ["PATHFM_MODELS"] = str(data_dir / "models")
    failed = []
    for dock in docks:
        t0 = time.perf_counter()
        try:
            written = shoot(dock, args.out, width=args.width, train_run=False if args.no_train_run else None)
        except Exception as exc:  # noqa: BLE001  (one dock failing should not stop the others)
            failed.append(dock)
            print(f"{dock}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        sizes = ", ".join(f"{p.name} {p.stat().st_size // 1024} KiB" for p in written.values())
        print(f"{dock}: {sizes} ({time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
