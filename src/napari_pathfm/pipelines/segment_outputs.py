"""Writing a segmentation: the class map as pyramidal OME-TIFF and QuPath GeoJSON, all or nothing.

:class:`SegmentOutputs` writes both to temporary names and moves them into place only when the run
ends without error; the OME-TIFF is written in a background thread while the tiles still run,
band by band as rows of the class map become final (:class:`RowsReady`).
:func:`write_segmentation` writes a finished :class:`~napari_pathfm.pipelines.segment.SegmentationResult`.
Importing this module does not import torch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cancelled, OutputError
from ..progress import check_cancel, report

__all__ = ["GEOJSON_MAX_PIXELS", "RowsReady", "SegmentOutputs", "check_suffix", "write_segmentation"]

#: GeoJSON is traced on the class map downsampled by 2 until it has at most this many pixels.
GEOJSON_MAX_PIXELS = 64 * 2**20

PathLike = str | Path


def check_suffix(path: PathLike | None, suffixes: tuple[str, ...], what: str) -> Path | None:
    """``path`` as a Path, or an OutputError when its name does not end in one of ``suffixes``."""
    if path is None:
        return None
    path = Path(path)
    if not path.name.lower().endswith(suffixes):
        raise OutputError(path, f"the {what} must end in {' or '.join(suffixes)}.", "Change the file name.")
    return path


def _geojson_labels(labels: Any) -> tuple[np.ndarray, float]:
    """The class map (downsampled by 2x2 mode until small enough to trace) and its downsample."""
    from ..io.ome_tiff import downsample2, iter_bands

    h, w = labels.shape
    f = 1
    while (h // f) * (w // f) > GEOJSON_MAX_PIXELS:
        f *= 2
    if f == 1:
        return np.asarray(labels), 1.0
    parts = []
    for _, band in iter_bands(labels, f):
        for _ in range(int(math.log2(f))):
            band = downsample2(band, True)
        parts.append(band)
    return np.concatenate(parts), float(f)


class RowsReady:
    """The level-0 class map as a sliceable array that blocks until the rows asked for are final.

    Lets :func:`~napari_pathfm.io.ome_tiff.write_ome_tiff` run in a thread while the tiles are
    still being segmented (bands finish top to bottom); :meth:`fail` releases a waiting reader
    with :class:`~napari_pathfm.errors.Cancelled` when the run stops.
    """

    def __init__(self, labels: Any):
        self.labels = labels
        self.shape, self.dtype, self.ndim = tuple(labels.shape), np.dtype(labels.dtype), 2
        self.chunks = tuple(getattr(labels, "chunks", None) or (256, self.shape[1]))
        self._done, self._failed = 0, False
        self._cond = threading.Condition()

    def __dask_tokenize__(self) -> str:
        return f"pathfm-rows-{id(self)}"

    def mark(self, rows: int) -> None:
        with self._cond:
            self._done = max(self._done, int(rows))
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = key[0] if isinstance(key, tuple) else key
        need = self.shape[0] if not isinstance(rows, slice) or rows.stop is None else min(rows.stop, self.shape[0])
        with self._cond:
            self._cond.wait_for(lambda: self._failed or self._done >= need)
            if self._done < need:
                raise Cancelled("segmentation stopped before the mask was complete")
        return np.asarray(self.labels[key])


class SegmentOutputs:
    """Write a segmentation's OME-TIFF and GeoJSON all or nothing.

    Both go to temporary names (:func:`~napari_pathfm.io.atomic.atomic_path`) and replace their
    targets only when the ``with`` block ends without error. :meth:`start` begins the OME-TIFF
    in a background thread that reads rows as :meth:`rows_done` releases them; :meth:`finish`
    waits for it and traces the GeoJSON.
    """

    def __init__(self, result: Any, *, out, geojson, metadata=None, progress=None, cancel=None):
        self.result, self.progress, self.cancel = result, progress, cancel
        self.out = check_suffix(out, (".ome.tif", ".ome.tiff"), "mask output")
        self.geojson = check_suffix(geojson, (".geojson", ".json"), "GeoJSON output")
        self.metadata = metadata or {}
        self.rows = RowsReady(result.labels)
        self.writer = None

    def __enter__(self) -> SegmentOutputs:
        from ..io.atomic import atomic_path

        self._stack = stack = ExitStack().__enter__()
        try:
            self._tmp_out = stack.enter_context(atomic_path(self.out)) if self.out is not None else None
            self._tmp_geo = stack.enter_context(atomic_path(self.geojson)) if self.geojson is not None else None
            self._pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathfm-write"))
            stack.callback(self.rows.fail)  # unwinds first: a stopped run never leaves the writer waiting
        except BaseException:
            stack.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> Any:
        suppress = self._stack.__exit__(*exc)
        if exc[0] is None:  # both files are in place now
            if self.out is not None:
                self.result.written["mask"] = self.out
            if self.geojson is not None:
                self.result.written["geojson"] = self.geojson
        return suppress

    def start(self) -> None:
        from ..io.ome_tiff import write_ome_tiff

        if self._tmp_out is None or self.writer is not None:
            return
        r = self.result
        meta = {
            "kind": "segmentation",
            "source": r.source,
            "checkpoint": r.checkpoint,
            "model_mpp": r.model_mpp,
            "tiles": r.n_tiles,
            "messages": r.messages,
            "notes": r.notes,
            "downsample": 1.0,
            **self.metadata,
        }
        self.writer = self._pool.submit(
            write_ome_tiff,
            self._tmp_out,
            self.rows,
            mpp=r.mpp,
            is_labels=True,
            class_names=r.classes,
            metadata=meta,
            cancel=self.cancel,
            compressionargs={"level": 1},
        )  # fast zlib: ~1.3x larger masks

    def rows_done(self, rows: int) -> None:
        self.rows.mark(rows)

    def poll(self) -> None:
        """Raise the background writer's error (e.g. a full disk) in the segmenting thread."""
        if self.writer is not None and self.writer.done() and self.writer.exception() is not None:
            raise self.writer.exception()

    def finish(self) -> None:
        from ..io.geojson import write_geojson

        r = self.result
        self.rows.mark(r.labels.shape[0])
        if self._tmp_out is not None:
            self.start()
            report(self.progress, 0, 1, f"writing {self.out.name}")
            self.writer.result()
            report(self.progress, 1, 1, f"wrote {self.out.name}")
        if self._tmp_geo is not None:
            check_cancel(self.cancel, "writing GeoJSON")
            report(self.progress, 0, 1, f"writing {self.geojson.name}")
            small, ds = _geojson_labels(r.labels)
            write_geojson(self._tmp_geo, small, {i: n for i, n in enumerate(r.classes) if i}, downsample=ds)
            report(self.progress, 1, 1, f"wrote {self.geojson.name}")
        check_cancel(self.cancel, "writing the segmentation")


def write_segmentation(
    result: Any,
    *,
    out: PathLike | None = None,
    geojson: PathLike | None = None,
    metadata: dict | None = None,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> dict[str, Path]:
    """Write the class map as pyramidal OME-TIFF and/or QuPath GeoJSON, all or nothing.

    Both files go to temporary names first and replace their targets only when both are
    complete; a cancel or an error leaves existing files untouched and no new ones. The
    OME-TIFF stores the input's µm/px and the class names; large class maps are traced for
    GeoJSON after 2x2-mode downsampling to at most :data:`GEOJSON_MAX_PIXELS` pixels
    (coordinates stay level-0 pixels).
    """
    with SegmentOutputs(result, out=out, geojson=geojson, metadata=metadata, progress=progress, cancel=cancel) as o:
        o.finish()
    return dict(result.written)
