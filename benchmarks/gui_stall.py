"""GUI-thread stalls of napari-pathfm against napari's own cost of showing equal layers, in one run.

A 10 ms ``QTimer`` heartbeat runs on the GUI thread of a real napari Viewer (run under Xvfb); the
longest gap between two beats while a step runs is that step's *stall*: the time a user's click or
paint stroke would wait. Each opening step is followed by napari showing in-memory layers of the same
shapes/dtypes, measured the same way, so the table gives the plugin's share beyond what napari itself
needs: for the opening steps napari's ``viewer.open`` of ``.npy`` files of the same shapes (its own
reader, in-memory arrays, same progress bar) and ``add_image`` of an in-memory multiscale list / stack;
for the overlays ``add_labels`` / ``add_shapes`` with the same shapes, scale and units.
Each step runs ``--repeats`` times (median). Contract 10: the plugin's share should stay under 100 ms.

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python benchmarks/gui_stall.py [--repeats 3] [--no-segment]

Docks are opened in a fresh process each time only by ``--fresh-docks`` (their first opening pays
for imports; later openings in the same process do not), otherwise once per run (the first opening).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT / "src" / "napari_pathfm" / "data" / "CMU-1-Small-Region.svs"
ZSTACK = Path("/work/shared/data/isl-blue-sample")
DOCKS = [
    "Slide",
    "Segment (Path-SAM2)",
    "Classify tiles (SLCA)",
    "MIL slide prediction",
    "Translate z-stack (HASTE)",
    "Train a model",
]


class Heartbeat:
    """A 10 ms QTimer on the GUI thread; :meth:`measure` returns the longest gap (ms) while a step runs.

    The gap includes the time spent in the step's own synchronous GUI-thread code (no beat can fire
    while it runs) and everything the event loop does afterwards until ``until()`` holds and
    ``settle_ms`` have passed (napari's drawing, queued worker callbacks).
    """

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import QTimer

        self.interval_ms = interval_ms
        self._last = time.perf_counter()
        self.max_gap = 0.0
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._beat)
        self.timer.start()

    def _beat(self) -> None:
        now = time.perf_counter()
        self.max_gap = max(self.max_gap, now - self._last)
        self._last = now

    def pump(self, seconds: float, until=None) -> None:
        """Run the Qt event loop for ``seconds`` (or until ``until()`` is true, then ``seconds`` more)."""
        from qtpy.QtCore import QEventLoop, QTimer

        def once(s: float) -> None:
            loop = QEventLoop()
            QTimer.singleShot(int(s * 1000), loop.quit)
            loop.exec_() if hasattr(loop, "exec_") else loop.exec()

        if until is not None:
            deadline = time.perf_counter() + 600
            while not until() and time.perf_counter() < deadline:
                once(0.05)
        once(seconds)

    def measure(self, step, *, until=None, settle: float = 0.5) -> float:
        """Longest beat gap in ms from just before ``step()`` to ``settle`` s after ``until()``."""
        self.pump(0.1)  # let pending paints finish first
        self._last = time.perf_counter()
        self.max_gap = 0.0
        step()
        self._beat()
        self.pump(settle, until)
        return self.max_gap * 1000


_IMPORT_PROBE = """
import threading, time
from qtpy.QtCore import QEventLoop, QTimer
from qtpy.QtWidgets import QApplication
app = QApplication([])
last, gaps, done = [time.perf_counter()], [0.0], threading.Event()
def beat():
    now = time.perf_counter(); gaps.append(now - last[0]); last[0] = now
timer = QTimer(); timer.setInterval(10); timer.timeout.connect(beat); timer.start()
def work():
    import torch, timm  # noqa: F401
    done.set()
threading.Thread(target=work).start()
while not done.is_set():
    loop = QEventLoop(); QTimer.singleShot(50, loop.quit); loop.exec()
print(round(max(gaps) * 1000))
"""


def torch_import_stall() -> float:
    """Longest GUI-thread stall (ms) while a worker thread imports torch and timm, in a fresh process.

    What any plugin running a torch model pays once per session, whichever thread imports it.
    """
    import subprocess

    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _remove_all(viewer) -> None:
    while len(viewer.layers):
        viewer.layers.pop()


def prompt_rows(hb, viewer, seg, labels, plain) -> list:
    """The Segment dock's Prompt row: switching it on (three layers) and clicks on segmented glands, each
    drawn as a new object; napari's share: adding the same three layers, and ``data_setitem`` of the
    same object's pixels into a plain Labels layer."""
    row, rows = seg.prompts, []
    place = {"scale": labels.scale, "translate": labels.translate, "units": labels.units}
    ours = hb.measure(lambda: row.button.click())
    own = hb.measure(
        lambda: (
            viewer.add_labels(np.zeros(labels.data.shape, np.uint16), **place),
            viewer.add_points(ndim=2, **place),
            viewer.add_shapes(ndim=2, **place),
        )
    )
    rows.append(("Prompt on (3 layers)", ours, own, None))
    ys, xs = np.nonzero(np.asarray(labels.data) > 0)
    for i, step in enumerate(("prompt click, first (loads model)", "prompt click", "prompt click")):
        k = (2 * i + 1) * len(ys) // 6
        idle = lambda: not row.runner.running and not row.queue
        ours = hb.measure(lambda k=k: row.points.add([ys[k], xs[k]]), until=idle, settle=0.5)
        drawn = np.nonzero(np.asarray(row.objects.data) == i + 1)
        own = hb.measure(lambda d=drawn, v=i + 1: plain.data_setitem(d, v), settle=0.5)
        rows.append((step, ours, own, None))
    row.button.click()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-segment", action="store_true", help="skip the Segment run and the painting step")
    ap.add_argument("--zstack", default=str(ZSTACK))
    args = ap.parse_args(argv)
    os.environ.setdefault("PATHFM_DATA_DIR", tempfile.mkdtemp(prefix="pathfm-gui-stall-"))

    import napari

    viewer = napari.Viewer(show=True)
    hb = Heartbeat()
    hb.pump(1.0)
    rows: list[tuple[str, float, float | None]] = []
    tmp = Path(tempfile.mkdtemp(prefix="pathfm-gui-stall-npy-"))

    def med(fn, until=None, settle=0.5, before=None):
        values = []
        for _ in range(args.repeats):
            if before:
                before()
            values.append(hb.measure(fn, until=until, settle=settle))
        return statistics.median(values)

    # -- open the slide -------------------------------------------------------------
    from napari_pathfm.io.slide import open_slide

    with open_slide(SLIDE) as s:
        shapes, mpp = [tuple(level.shape) for level in s.pyramid], s.mpp
    um = ("micrometer", "micrometer")
    clear = lambda: _remove_all(viewer)
    np.save(tmp / "slide.npy", np.zeros(shapes[0], np.uint8))
    ours = med(lambda: viewer.open(str(SLIDE), plugin="napari-pathfm"), before=clear)
    own = med(
        lambda: viewer.add_image(
            [np.zeros(sh, np.uint8) for sh in shapes],
            multiscale=True,
            rgb=True,
            contrast_limits=(0, 255),
            scale=(mpp, mpp),
            units=um,
        ),
        before=clear,
    )
    own_open = med(lambda: viewer.open(str(tmp / "slide.npy"), plugin="napari"), before=clear)
    rows.append(("open slide (reader)", ours, own, own_open))
    # the plugin's own code in that step: the reader function alone, as napari.yaml names it (napari then
    # adds what it returns)
    from napari_pathfm._reader import napari_get_reader

    reader_only = med(lambda: napari_get_reader(str(SLIDE))(str(SLIDE)))
    rows.append(("  of which the slide reader function", reader_only, 0.0, None))

    # -- open the z-stack -------------------------------------------------------------
    zpath = Path(args.zstack)
    if zpath.exists():
        from napari_pathfm.io.zstack import open_zstack

        zs = open_zstack(zpath)
        zshape, zdtype, tshapes = zs.shape, zs.dtype, [(t.shape, t.dtype) for t in zs.targets.values()]

        def own_zstack():
            viewer.add_image(np.zeros(zshape, zdtype), colormap="gray", contrast_limits=(0, 1))
            for sh, dt in tshapes:
                viewer.add_image(np.zeros(sh, dt), blending="additive", contrast_limits=(0, 1))

        np.save(tmp / "stack.npy", np.zeros(zshape, zdtype))
        npys = [str(tmp / "stack.npy")]
        for i, (sh, dt) in enumerate(tshapes):
            np.save(tmp / f"target{i}.npy", np.zeros(sh, dt))
            npys.append(str(tmp / f"target{i}.npy"))
        ours = med(lambda: viewer.open(str(zpath), plugin="napari-pathfm"), before=clear)
        own = med(own_zstack, before=clear)
        own_open = med(lambda: viewer.open(npys, plugin="napari", stack=False), before=clear)
        rows.append(("open z-stack (reader)", ours, own, own_open))
        reader_only = med(lambda: napari_get_reader(str(zpath))(str(zpath)))
        rows.append(("  of which the z-stack reader function", reader_only, 0.0, None))
    clear()

    # -- docks (first opening in this process: includes their imports) -----------------
    from qtpy.QtWidgets import QLabel

    own_dock = med(lambda: viewer.window.add_dock_widget(QLabel("empty"), name=f"empty {time.perf_counter()}"))
    viewer.open(str(SLIDE), plugin="napari-pathfm")
    hb.pump(0.5)
    docks = {}
    for name in DOCKS:

        def open_dock(name=name):
            docks[name] = viewer.window.add_plugin_dock_widget("napari-pathfm", name)[1]

        rows.append((f"open dock: {name}", hb.measure(open_dock), own_dock, None))

    # -- Slide dock: tissue & tile overlay --------------------------------------------------
    slide_dock = docks["Slide"]
    slide_layer = viewer.layers[0]

    def tissue():
        slide_dock.compute_tissue()

    ours = med(tissue, until=lambda: not slide_dock.runner.running)
    tissue_layer = viewer.layers[f"{slide_layer.name} tissue"]
    tiles_layer = viewer.layers[f"{slide_layer.name} tiles"] if f"{slide_layer.name} tiles" in viewer.layers else None
    mask_shape, mask_scale = tissue_layer.data.shape, tissue_layer.scale
    boxes = [np.asarray(b) for b in tiles_layer.data] if tiles_layer is not None else []

    def own_tissue():
        viewer.add_labels(np.zeros(mask_shape, np.uint8), scale=mask_scale, opacity=0.8, units=tissue_layer.units)
        if boxes:
            viewer.add_shapes(
                boxes,
                shape_type="rectangle",
                edge_color="royalblue",
                face_color="transparent",
                scale=tiles_layer.scale,
                units=tiles_layer.units,
            )

    own = med(own_tissue)
    rows.append(("Slide dock: tissue & tiles", ours, own, None))

    # -- Segment run + painting ---------------------------------------------------------------
    seg = docks["Segment (Path-SAM2)"]
    if not args.no_segment and seg.layer_combo.findText(slide_layer.name) >= 0:
        seg.layer_combo.setCurrentText(slide_layer.name)
        # napari's one-time cost of the session's first Labels layer (its controls, its shaders), paid by
        # whoever adds one first: taken here so that the runs below and napari's add compare like with like
        first = hb.measure(lambda: viewer.add_labels(np.zeros((64, 64), np.uint8)))
        viewer.layers.pop()
        rows.append(("napari: first Labels layer of a session", first, first, None))
        # the first run imports torch and timm in its worker; their C extensions hold Python's GIL while
        # they initialise, which stalls the GUI thread whichever thread imports them (measured alone below)
        imports = torch_import_stall()
        ours = hb.measure(lambda: seg.run(), until=lambda: not seg.runner.running, settle=1.0)
        labels = seg.labels_layer
        if labels is not None:
            own = hb.measure(
                lambda: viewer.add_labels(
                    np.zeros(labels.data.shape, labels.data.dtype),
                    scale=labels.scale,
                    translate=labels.translate,
                    units=labels.units,
                )
            )
            rows.append(("import torch+timm in a thread (alone)", imports, imports, None))
            rows.append(("Segment run, first (imports torch)", ours, max(own, imports), None))
            plain = viewer.layers[-1]
            ours = med(lambda: seg.run(), until=lambda: not seg.runner.running, settle=1.0)
            rows.append(("Segment run again (start → layer)", ours, own, None))
            h, w = labels.data.shape[:2]

            def stroke(layer):
                def go():
                    layer.brush_size = 20
                    for i in range(10):
                        layer.paint(layer.data_to_world((h // 2, w // 4 + 4 * i)), 1, refresh=True)

                return go

            ours = med(stroke(labels), settle=1.0)
            own = med(stroke(plain), settle=1.0)
            rows.append(("paint a stroke on segmentation", ours, own, None))

            # Fine-tune on the painted tiles: the click, the worker's start (imports, data, model) and the
            # first training steps, for 3 s; then Stop. napari's share: nothing (no layer is shown).
            seg.epochs.setValue(1)
            for label in ("fine-tune start (first)", "fine-tune start (again)"):
                if seg.recorder is not None:
                    seg.recorder.flush()
                started = time.perf_counter()
                ours = hb.measure(
                    lambda: seg.finetune(), until=lambda t0=started: time.perf_counter() - t0 > 3.0, settle=0.1
                )
                seg.runner.cancel()
                hb.pump(0.5, until=lambda: not seg.runner.running)
                rows.append((label, ours, 0.0, None))
            rows += prompt_rows(hb, viewer, seg, labels, plain)
        else:
            rows.append((f"Segment run: {seg.status.text()[:60]}", ours, None, None))

    # napari ms: napari adding equal in-memory layers; napari open ms: napari's viewer.open of equal .npy
    # files (same open path and progress bar as our reader); share: beyond the larger of the two.
    print(
        f"\n| {'step':<38} | {'stall ms':>8} | {'napari add ms':>13} | {'napari open ms':>14} | {'plugin share ms':>15} |"
    )
    print(f"|{'-' * 40}|{'-' * 10}:|{'-' * 15}:|{'-' * 16}:|{'-' * 17}:|")
    fmt = lambda v, n: f"{v:{n}.0f}" if v is not None else f"{'—':>{n}}"
    for step, ours, own, own_open in rows:
        base = max(v for v in (own, own_open, 0.0) if v is not None)
        share = max(0.0, ours - base) if own is not None else None
        print(f"| {step:<38} | {ours:8.0f} | {fmt(own, 13)} | {fmt(own_open, 14)} | {fmt(share, 15)} |")
    sys.stdout.flush()
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
