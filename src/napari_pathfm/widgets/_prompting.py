"""The Segment dock's prompting row: a click or a box on the slide → that object as a new label.

*Prompt* adds three layers over the dock's slide, placed like it (their data coordinates are the
slide's level-0 pixels): ``<slide> prompts`` (Points, in add mode), ``<slide> prompt boxes`` (Shapes,
rectangles) and ``<slide> prompted objects`` (Labels). Each new point is a positive click and each new
rectangle a box: the object under it (:class:`~napari_pathfm.pipelines.prompt.PromptSession`, in this
row's own worker, one prompt at a time, later ones queued) becomes the next label of the objects layer,
drawn only where that layer is still 0 and through napari's ``data_setitem`` (so Ctrl-Z undoes it and
only the changed pixels are redrawn: the GUI thread never waits for the model). With *negative* on, a
click refines the last object instead (SAM's "not this"): it is prompted again with the new negative
click and redrawn. The objects layer holds class names per label (``metadata["classes"]``) and is an
annotation layer, so the dock's *From annotations* turns (corrected) prompted objects into corrections
for *Fine-tune*, and saving it as .geojson gives QuPath one object per prompt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QPushButton, QWidget

from ._runner import TaskRunner

__all__ = ["PromptRow"]


class PromptRow(QWidget):
    """Prompt toggle + negative-click switch of a Segment dock (``dock``: a SegmentWidget)."""

    def __init__(self, dock: Any):
        super().__init__()
        self.dock, self.viewer = dock, dock.viewer
        self.button = QPushButton("Prompt")
        self.button.setCheckable(True)
        self.button.setToolTip(
            "Click a gland (Points) or draw a box (Shapes) on the slide: the object under it becomes a new label"
        )
        self.button.toggled.connect(self._toggled)
        self.negative = QCheckBox("negative")
        self.negative.setToolTip("Clicks refine the last object: 'not this' (SAM's negative click)")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.button)
        row.addWidget(self.negative)
        self.runner = TaskRunner(on_state=lambda state: None, parent=self)
        self.queue: list[tuple[Any, int]] = []  # (Prompt, object id)
        self.points = self.boxes = self.objects = None
        self.session: Any = None  # used by the worker only; made there on the first prompt
        self._key: tuple | None = None
        self._slide_path: str | None = None
        self._windows: dict[int, tuple] = {}  # each object's level-0 box (y0, x0, y1, x1)
        self._seen = {"points": 0, "boxes": 0}
        self.last: tuple[Any, int] | None = None  # the last object's prompt and id
        self.next_id = 1

    # -- on / off --------------------------------------------------------------------------
    def _toggled(self, on: bool) -> None:
        if on and not self.start():
            self.button.setChecked(False)
        elif not on:
            self.stop()

    def start(self) -> bool:
        """Add the prompt layers over the dock's slide; False (reason in the status) without a slide."""
        name = self.dock.layer_combo.currentText()
        if not name or name not in self.viewer.layers:
            self.dock.status.setText("Open a slide first: prompts are clicks on a slide.")
            return False
        slide = self.viewer.layers[name]
        self._slide_path = slide.metadata["pathfm_path"]
        self._use_current_model()
        place = {"scale": slide.scale, "translate": slide.translate, "units": slide.units}
        data = slide.data[0] if getattr(slide, "multiscale", False) else slide.data
        shape = tuple(int(v) for v in data.shape[:2])
        layers = self.viewer.layers
        objects = f"{name} prompted objects"
        if objects not in layers or layers[objects].data.shape != shape:
            self.dock.remove_layers([objects])
            meta = {"pathfm_kind": "annotations", "classes": {}, "pathfm_prompted": True}
            self.objects = self.viewer.add_labels(self._blank(shape), name=objects, metadata=meta, **place)
            self.next_id, self.last = 1, None
            self._windows.clear()
        else:  # an earlier session's objects stay; new ones get the next free labels
            self.objects = layers[objects]
            self.next_id = max((int(k) for k in self.objects.metadata.get("classes", {})), default=0) + 1
            self.last = None
        self.boxes = self._layer(f"{name} prompt boxes", "shapes", place)
        self.points = self._layer(f"{name} prompts", "points", place)
        self._seen = {"points": len(self.points.data), "boxes": len(self.boxes.data)}
        self.points.events.data.connect(self._on_points)
        self.boxes.events.data.connect(self._on_boxes)
        QTimer.singleShot(0, self._activate)  # its own event: adding layers and switching controls each cost napari
        self.dock.status.setText(
            "Click a gland to segment it (or draw a rectangle on the boxes layer); each prompt becomes a label."
        )
        return True

    def _blank(self, shape: tuple[int, int]) -> Any:
        """Zeros at the slide's level-0 size: in memory (allocated lazily by the OS) up to the size the
        segmentation keeps in memory, else a zarr array in a temporary folder kept by this row."""
        from ..pipelines.segment import IN_MEMORY_PIXELS

        if shape[0] * shape[1] <= IN_MEMORY_PIXELS:
            return np.zeros(shape, np.uint16)
        import tempfile

        import zarr

        self._tmp = tempfile.TemporaryDirectory(prefix="pathfm-prompted-")
        store = f"{self._tmp.name}/objects.zarr"
        return zarr.create_array(store=store, shape=shape, dtype=np.uint16, chunks=(512, 4096), fill_value=0)

    def _activate(self) -> None:
        """Select the prompts layer in add mode: the next click on the canvas is a prompt."""
        if self.points is not None and self.points in self.viewer.layers:
            self.viewer.layers.selection.active = self.points
            self.points.mode = "add"

    def _layer(self, name: str, kind: str, place: dict) -> Any:
        if name in self.viewer.layers:
            return self.viewer.layers[name]
        if kind == "points":
            layer = self.viewer.add_points(ndim=2, name=name, size=12, face_color="lime", border_color="black", **place)
            layer.canvas_size_limits = (10, 40)  # a click stays visible at any zoom of a whole slide
            return layer
        layer = self.viewer.add_shapes(ndim=2, name=name, edge_color="yellow", face_color="transparent", **place)
        layer.mode = "add_rectangle"
        return layer

    def stop(self) -> None:
        """Stop listening to the prompt layers (they and the objects stay)."""
        for layer, handler in ((self.points, self._on_points), (self.boxes, self._on_boxes)):
            if layer is not None:
                layer.events.data.disconnect(handler)
        self.points = self.boxes = None
        self.queue.clear()

    def _use_current_model(self) -> None:
        """Follow the dock's checkpoint and resolution: a change starts a new session at the next prompt."""
        key = (self._slide_path, self.dock.checkpoint.path() or None, self.dock.mpp.value() or None)
        if key != self._key:
            self._forget_session()
            self._key = key

    def _forget_session(self) -> None:
        """Close the session and the slide it opened (a running prompt's worker still holds them: left be)."""
        session, self.session = self.session, None
        if session is not None and not self.runner.running:
            session.close()
            session.slide.close()

    def close(self) -> None:
        """The dock closes: stop listening, close the session and the slide it opened (the layers stay, and
        with them a large slide's zarr scratch folder, removed when the row goes)."""
        self.stop()
        self._forget_session()

    # -- prompts ---------------------------------------------------------------------------
    def _new(self, kind: str, layer: Any) -> list[np.ndarray]:
        n, seen = len(layer.data), self._seen[kind]
        self._seen[kind] = n
        return [np.asarray(layer.data[i]) for i in range(seen, n)] if n > seen else []

    def _on_points(self, _event=None) -> None:
        from ..pipelines.prompt import Prompt

        for yx in self._new("points", self.points):
            xy = (float(yx[-1]), float(yx[-2]))
            if self.negative.isChecked():
                if self.last is None:
                    self.dock.status.setText("A negative click refines an object: click a gland first.")
                    continue
                last, oid = self.last
                prompt = Prompt(points=(*last.points, xy), labels=(*last.labels, 0), box=last.box)
                self.last = (prompt, oid)
                self._queue(prompt, oid)
            else:
                self._queue(Prompt(points=(xy,)), None)

    def _on_boxes(self, _event=None) -> None:
        from ..pipelines.prompt import Prompt

        for verts in self._new("boxes", self.boxes):
            ys, xs = verts[:, -2], verts[:, -1]
            if xs.max() - xs.min() < 1 or ys.max() - ys.min() < 1:
                continue
            self._queue(Prompt(box=(float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))), None)

    def _queue(self, prompt: Any, oid: int | None) -> None:
        if oid is None:
            oid, self.next_id = self.next_id, self.next_id + 1
            self.last = (prompt, oid)
        self.queue.append((prompt, oid))
        self._pump()

    def _pump(self) -> None:
        if self.runner.running or not self.queue:
            return
        prompt, oid = self.queue.pop(0)
        self._use_current_model()
        slide_path, checkpoint, mpp = self._key
        image_mpp = self.dock.slide_image_mpp(self.dock.layer_combo.currentText())

        def job(progress, cancel):
            session = self.session  # this job's own reference: the GUI may forget the session meanwhile
            if session is None:
                from ..io.slide import open_slide
                from ..pipelines.prompt import PromptSession

                slide = open_slide(slide_path)
                if image_mpp is not None and slide.mpp is None:
                    slide.mpp = image_mpp
                session = self.session = PromptSession(slide, checkpoint or None, mpp=mpp)
            return session.segment(prompt), session.card

        self.runner.start(job, description="Prompt", on_done=lambda done: self._draw(done, oid), on_error=self._failed)

    def _draw(self, done: tuple, oid: int) -> None:
        """Draw the object as label ``oid`` (GUI thread: a crop-sized ``data_setitem``)."""
        obj, card = done
        layer = self.objects
        if layer is not None and layer in self.viewer.layers:
            classes = list(card.get("classes") or ["background", "object"])
            n, self._windows[oid] = _paint(layer, obj, oid, self._windows.get(oid))
            if n:
                layer.metadata["classes"][oid] = classes[1] if len(classes) > 1 else classes[0]
            else:  # refined to nothing: no class for a label that is not there
                layer.metadata["classes"].pop(oid, None)
            if n:
                text = f"Object {oid}: {n} px."
            elif obj.area:
                text = f"Prompt {oid}: its object is already labelled (objects never overwrite each other)."
            else:
                text = f"Prompt {oid}: no object found there."
            if obj.at_edge:
                from ..pipelines.prompt import edge_note

                text += f" It {edge_note(len(obj.tiles))}"
            self.dock.status.setText(text)
        self._pump()

    def _failed(self, exc: BaseException) -> None:
        self.queue.clear()
        self._forget_session()
        self.dock.status.setText(f"Prompt failed: {self.runner.last_message}")
        self.button.setChecked(False)


def _paint(layer: Any, obj: Any, oid: int, before: tuple | None) -> tuple[int, tuple | None]:
    """Draw ``obj`` as ``oid`` where the layer is 0, after clearing ``oid`` inside its earlier box ``before``
    (a refined object); returns the pixels drawn and the box to remember.

    In-memory layers go through ``data_setitem`` (undoable, only the changed pixels redrawn); a zarr-backed
    layer of a large slide gets the region written and refreshed."""
    h, w = obj.mask.shape
    boxes = [b for b in (before, (obj.y0, obj.x0, obj.y0 + h, obj.x0 + w) if obj.area else None) if b]
    if not boxes:
        return 0, None
    y0, x0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    y1, x1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    current = np.asarray(layer.data[y0:y1, x0:x1])
    new = np.where(current == oid, 0, current)
    if obj.area:
        part = new[obj.y0 - y0 : obj.y0 - y0 + h, obj.x0 - x0 : obj.x0 - x0 + w]
        part[obj.mask & (part == 0)] = oid
    if isinstance(layer.data, np.ndarray):
        changed = np.nonzero(new != current)
        if len(changed[0]):
            layer.data_setitem((changed[0] + y0, changed[1] + x0), new[changed])
    else:
        layer.data[y0:y1, x0:x1] = new.astype(current.dtype)
        layer.refresh()
    n = int((new == oid).sum())
    return n, ((obj.y0, obj.x0, obj.y0 + h, obj.x0 + w) if n else None)
