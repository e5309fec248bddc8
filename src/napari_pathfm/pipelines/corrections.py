"""Painted corrections of a segmentation, saved tile by tile as a training set.

The user paints on a Labels layer that holds the class map, either at level 0
(what ``pathfm segment`` and the Segment widget produce) or at any coarser
resolution (``labels_downsample`` level-0 px per label px; label pixel ``(r, c)``
covers level-0 ``[r·d, (r+1)·d)``). Corrections are saved on the model's grid:
``tile_size`` tiles at the model's µm/px (:func:`napari_pathfm.tiles.tile_grid`
without overlap), the labels sampled nearest-neighbour at the centres of the
model's pixels. :class:`CorrectionRecorder` listens to the layer's ``paint``
events (brush, eraser, fill, polygon: one event per finished stroke), works out
which ``tile_size`` tiles the stroke touched, and writes for each of them

- ``images/<slide>_r<row>_c<col>.png``: the slide tile at the model's µm/px,
- ``masks/<slide>_r<row>_c<col>.png``: the corrected class map of that tile
  (255 where the tile runs past the slide),

into the slide's folder in the per-user data folder
(:func:`napari_pathfm.userdata.corrections_dir`; never beside the slide, which may
sit on a read-only archive) or a folder you choose, plus ``corrections.json``
(slide, µm/px, tile size, classes, the tiles and when each was saved). Every
file is written to a temporary name and renamed, image before mask, manifest
last, so a crash loses at most the stroke in progress and never leaves a
half-written pair: the training data set (``images/`` + ``masks/`` with the same
stem) only pairs complete files.

Undo and redo of a stroke (``layer.undo()``/``redo()``, Ctrl+Z) re-save the tiles
it touched from the current labels; with a ``baseline`` (the unedited class map), a
tile that is back to the baseline is no correction any more and is removed.
:meth:`CorrectionRecorder.restore` writes saved corrections back into a class map
(a slide reopened in a new session). This module holds no GUI code: a caller that
must wait for napari to write a stroke's labels (see :meth:`CorrectionRecorder.on_paint`)
passes ``schedule``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CorrectionError
from ..io.atomic import atomic_path
from ..userdata import corrections_dir

__all__ = ["IGNORE", "CorrectionRecorder", "corrections_dir", "paint_boxes"]

IGNORE = 255


def paint_boxes(atoms: Iterable[Any]) -> list[tuple[int, int, int, int]]:
    """Bounding boxes ``(y0, y1, x0, x1)`` (half-open, last two axes) of napari Labels history atoms.

    An atom is either napari's masked paint atom (``slice_key`` = bounding box)
    or the ``(indices, old values, new values)`` tuple of ``data_setitem``.
    """
    boxes = []
    for atom in atoms:
        key = getattr(atom, "slice_key", None)
        if key is not None:
            ys, xs = key[-2], key[-1]
            boxes.append((int(ys.start or 0), int(ys.stop), int(xs.start or 0), int(xs.stop)))
            continue
        indices = atom[0]
        ys, xs = np.asarray(indices[-2]), np.asarray(indices[-1])
        if ys.size:
            boxes.append((int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1))
    return boxes


class CorrectionRecorder:
    """Save the tiles a user corrects on a Labels layer (see the module docstring).

    Parameters
    ----------
    slide : Slide
        The slide under the Labels layer (from :func:`napari_pathfm.io.open_slide`).
    labels : array-like (H, W)
        The class map (numpy or zarr; the Labels layer's ``data``).
    mpp : float
        The model's µm per pixel: corrections are saved at this resolution.
    classes : sequence of str
        Class names by index (0 = background).
    tile_size : int
        Side of a saved tile in label pixels.
    folder : path, optional
        Where to save (default :func:`~napari_pathfm.userdata.corrections_dir` of the slide).
    labels_downsample : float, optional
        Level-0 pixels per label pixel: 1 for a level-0 class map; default: the
        model grid's own scale (labels drawn at ``mpp``).
    baseline : array-like (H, W), optional
        The class map before any correction (same shape as ``labels``). A tile whose
        labels equal the baseline again (its strokes undone) is removed from the
        corrections; without it such a tile is re-saved as it now is.
    schedule : callable, optional
        ``schedule(fn)`` runs ``fn`` later; queued tiles are written through it
        (a GUI passes a zero-delay timer: napari emits ``paint`` before a single
        programmatic stroke reaches ``data``). Default: write at once.
    """

    def __init__(
        self,
        slide: Any,
        labels: Any,
        *,
        mpp: float,
        classes: Sequence[str],
        tile_size: int = 256,
        folder: str | Path | None = None,
        labels_downsample: float | None = None,
        baseline: Any = None,
        schedule: Callable[[Callable[[], Any]], Any] | None = None,
    ):
        from ..tiles import tile_grid

        self.slide, self.labels, self.baseline, self.schedule = slide, labels, baseline, schedule
        self.classes = [str(c) for c in classes]
        self.tile_size = int(tile_size)
        self.grid = tile_grid(slide, self.tile_size, mpp=mpp)
        self.mpp = float(self.grid.mpp or mpp)
        self.labels_downsample = float(labels_downsample or self.grid.scale)
        self.folder = Path(folder) if folder is not None else corrections_dir(slide.path)
        self.stem = Path(slide.path).name.split(".")[0]
        self.manifest_path = self.folder / "corrections.json"
        self.saved: dict[str, dict] = self._load_manifest()
        self.pending: set[int] = set()
        self._scheduled = False

    def _load_manifest(self) -> dict[str, dict]:
        if not self.manifest_path.is_file():
            return {}
        doc = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        same = (
            abs(float(doc.get("mpp", -1)) - self.mpp) < 1e-6 * max(1.0, self.mpp)
            and int(doc.get("tile_size", -1)) == self.tile_size
            and list(doc.get("classes", [])) == self.classes
        )
        if not same:
            raise CorrectionError(
                self.manifest_path,
                f"holds corrections at {doc.get('mpp')} µm/px, {doc.get('tile_size')} px tiles, classes "
                f"{doc.get('classes')}; this model works at {self.mpp:.4g} µm/px, {self.tile_size} px, {self.classes}.",
                "Choose another corrections folder for this model, or move the old one away.",
            )
        return dict(doc.get("tiles", {}))

    # -- geometry -------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """Level-0 pixels per label pixel."""
        return float(self.grid.scale)

    def tiles_in_box(self, y0: int, y1: int, x0: int, x1: int) -> list[int]:
        """Grid indices of the tiles that a label-pixel box (half-open) touches."""
        d, step = self.labels_downsample, self.grid.level0_size
        rows, cols = self.grid.grid_shape
        y1, x1 = max(y1, y0 + 1), max(x1, x0 + 1)
        r0, r1 = max(0, int(y0 * d // step)), min(rows - 1, int(math.ceil(y1 * d / step)) - 1)
        c0, c1 = max(0, int(x0 * d // step)), min(cols - 1, int(math.ceil(x1 * d / step)) - 1)
        return [r * cols + c for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]

    def tile_name(self, i: int) -> str:
        r, c = (int(v) for v in self.grid.tile_index[i])
        return f"{self.stem}_r{r:04d}_c{c:04d}"

    # -- saving ---------------------------------------------------------------------
    def mask_tile(self, i: int, source: Any = None) -> np.ndarray:
        """The current labels (or ``source``) under tile ``i``, ``tile_size`` square, 255 past the array's edge."""
        source = self.labels if source is None else source
        T, d = self.tile_size, self.labels_downsample
        H, W = source.shape[-2:]
        y, x = (float(v) for v in self.grid.tiles[i])
        centres = (np.arange(T) + 0.5) * self.grid.scale
        rows = np.floor((y + centres) / d).astype(np.int64)
        cols = np.floor((x + centres) / d).astype(np.int64)
        out = np.full((T, T), IGNORE, np.uint8)
        ry, cx = (rows >= 0) & (rows < H), (cols >= 0) & (cols < W)
        if ry.any() and cx.any():
            r0, r1, c0, c1 = rows[ry].min(), rows[ry].max() + 1, cols[cx].min(), cols[cx].max() + 1
            window = np.asarray(source[..., r0:r1, c0:c1]).reshape(r1 - r0, c1 - c0)
            out[np.ix_(ry, cx)] = window[np.ix_(rows[ry] - r0, cols[cx] - c0)]
        return out

    def save_tile(self, i: int) -> str:
        """Write image + corrected mask of tile ``i`` atomically; returns its name."""
        from PIL import Image

        from ..tiles.loader import read_tile

        name = self.tile_name(i)
        mask = self.mask_tile(i)
        labelled = mask[mask != IGNORE]
        if labelled.size and int(labelled.max()) >= len(self.classes):
            bad = sorted(set(np.unique(mask).tolist()) - set(range(len(self.classes))) - {IGNORE})
            raise CorrectionError(
                self.folder,
                f"tile {name} holds label values {bad}, but the model has classes 0..{len(self.classes) - 1}.",
                f"Paint with labels 0..{len(self.classes) - 1} ({', '.join(self.classes)}).",
            )
        image = read_tile(self.slide, self.grid, i)
        for sub, array in (("images", image), ("masks", mask)):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / sub / f"{name}.png") as tmp:
                Image.fromarray(array).save(tmp, format="PNG")
        y, x = (int(v) for v in self.grid.tiles[i])
        self.saved[name] = {"y": y, "x": x, "level0_size": self.grid.level0_size, "saved": time.time()}
        return name

    def is_unchanged(self, i: int) -> bool:
        """Whether tile ``i`` holds the baseline's labels (False without a baseline)."""
        if self.baseline is None:
            return False
        return bool(np.array_equal(self.mask_tile(i), self.mask_tile(i, self.baseline)))

    def remove_tile(self, i: int) -> str | None:
        """Drop tile ``i`` from the corrections (mask first, so no half pair trains); returns its name if saved."""
        name = self.tile_name(i)
        for sub in ("masks", "images"):
            (self.folder / sub / f"{name}.png").unlink(missing_ok=True)
        return name if self.saved.pop(name, None) is not None else None

    def save_tiles(self, indices: Iterable[int]) -> list[str]:
        """Save several tiles (removing those back to the baseline), then the manifest once.

        Returns the names saved; :attr:`removed` lists those removed by this call.
        """
        names, self.removed = [], []
        for i in sorted(set(indices)):
            if self.is_unchanged(i):
                gone = self.remove_tile(i)
                if gone:
                    self.removed.append(gone)
            else:
                names.append(self.save_tile(i))
        if names or self.removed:
            self._write_manifest()
        return names

    def tile_of_name(self, name: str) -> int | None:
        """Grid index of a saved tile name (``<stem>_r<row>_c<col>``), None if off this grid."""
        try:
            r, c = (int(part[1:]) for part in name.rsplit("_", 2)[-2:])
        except ValueError:
            return None
        rows, cols = self.grid.grid_shape
        return r * cols + c if 0 <= r < rows and 0 <= c < cols else None

    def restore(self, labels: Any = None) -> list[str]:
        """Write the saved corrected tiles back into ``labels`` (default: the recorder's).

        Each label pixel inside a saved tile takes the saved class of the model pixel under
        its centre (pixels saved as 255, past the slide's edge, are left as they are). Runs
        in any thread (the dock runs it in its worker); returns the names restored.
        """
        from PIL import Image

        labels = self.labels if labels is None else labels
        H, W = labels.shape[-2:]
        T, d, s = self.tile_size, self.labels_downsample, float(self.grid.scale)
        done = []
        for name in sorted(self.saved):
            i, path = self.tile_of_name(name), self.folder / "masks" / f"{name}.png"
            if i is None or not path.is_file():
                continue
            mask = np.asarray(Image.open(path))
            y, x = (float(v) for v in self.grid.tiles[i])
            r0, r1 = max(0, int(math.floor(y / d))), min(H, int(math.ceil((y + T * s) / d)))
            c0, c1 = max(0, int(math.floor(x / d))), min(W, int(math.ceil((x + T * s) / d)))
            if r0 >= r1 or c0 >= c1:
                continue
            ky = np.floor(((np.arange(r0, r1) + 0.5) * d - y) / s).astype(np.int64)
            kx = np.floor(((np.arange(c0, c1) + 0.5) * d - x) / s).astype(np.int64)
            vy, vx = (ky >= 0) & (ky < T), (kx >= 0) & (kx < T)
            window = np.asarray(labels[..., r0:r1, c0:c1]).reshape(r1 - r0, c1 - c0).copy()
            values = np.full(window.shape, IGNORE, np.uint8)
            values[np.ix_(vy, vx)] = mask[np.ix_(ky[vy], kx[vx])]
            keep = values != IGNORE
            window[keep] = values[keep]
            labels[..., r0:r1, c0:c1] = window.reshape(labels[..., r0:r1, c0:c1].shape)
            done.append(name)
        return done

    def _write_manifest(self) -> None:
        doc = {
            "slide": str(self.slide.path),
            "mpp": self.mpp,
            "tile_size": self.tile_size,
            "classes": self.classes,
            "ignore_index": IGNORE,
            "layout": "images/<name>.png (RGB at mpp) + masks/<name>.png (class index, 255 = outside the slide)",
            "tiles": self.saved,
        }
        with atomic_path(self.manifest_path) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1), encoding="utf-8")

    def on_paint(self, event: Any) -> None:
        """Handler for ``labels_layer.events.paint``: save every tile the stroke touched.

        napari can emit the event before the new labels reach ``data`` (a single
        programmatic ``paint()`` outside ``block_history``, or any write-back to a
        zarr array), so the tiles are queued and written through ``schedule``
        (at once without one).
        """
        self.on_history(event.value)

    def on_history(self, atoms: Iterable[Any]) -> None:
        """Queue the tiles under napari history atoms (a stroke, or an undone/redone one) for saving."""
        for box in paint_boxes(atoms):
            self.pending.update(self.tiles_in_box(*box))
        if self.schedule is None:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self.schedule(self.flush)

    def flush(self) -> list[str]:
        """Write the queued tiles now (the widget calls this before fine-tuning)."""
        self._scheduled = False
        tiles, self.pending = self.pending, set()
        return self.save_tiles(tiles)

    def attach(self, layer: Any) -> CorrectionRecorder:
        """Listen to ``layer``'s paint events and its undo/redo (call :meth:`detach` to stop).

        napari emits no event on undo/redo, so the layer's ``undo``/``redo`` are wrapped on
        this one layer object (napari's Ctrl+Z binding calls them): the history item about
        to be replayed names the tiles to save again afterwards.
        """
        self._layer = layer
        layer.events.paint.connect(self.on_paint)
        for name, queue in (("undo", "_undo_history"), ("redo", "_redo_history")):
            replay = getattr(type(layer), name)

            def wrapped(_replay=replay, _queue=queue) -> None:
                history = getattr(layer, _queue, None)
                atoms = list(history[-1]) if history else []
                _replay(layer)
                if atoms:
                    self.on_history(atoms)
                elif history is None:  # napari without these queues: check every saved tile
                    self.pending.update(i for i in map(self.tile_of_name, self.saved) if i is not None)
                    self.on_history([])

            setattr(layer, name, wrapped)
        return self

    def detach(self) -> None:
        layer = getattr(self, "_layer", None)
        if layer is not None:
            layer.events.paint.disconnect(self.on_paint)
            for name in ("undo", "redo"):
                layer.__dict__.pop(name, None)
            self._layer = None
