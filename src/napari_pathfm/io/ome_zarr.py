"""Multiscale OME-Zarr (OME-NGFF 0.4) writer/reader for slide-level results.

Format choice: OME-NGFF **0.4 on zarr format 2** (``.zarray``/``.zattrs``, ``/`` chunk-key
separator), written with zarr-python 3. NGFF 0.5 (zarr format 3) is newer but, at the time of
writing, napari-ome-zarr, QuPath/Bio-Formats and most viewers read 0.4 reliably and 0.5 only
partly, so 0.4 is the interoperable choice; zarr 3 reads and writes it natively.

Layout: a group whose ``multiscales`` attribute lists datasets ``"0"``, ``"1"``, ... with
``scale`` coordinate transforms in micrometers (``mpp * 2**k``; pixel units when mpp is
unknown). Axes are ``yx`` or ``cyx`` (NGFF puts channels before space, so RGB ``YXC`` data are
stored as ``cyx``). Labels additionally carry ``image-label`` (colors and class names as
properties). Class names, channel names and user metadata are kept under the ``pathfm``
attribute. Levels are written band by band (never a whole level in memory), each level
computed from the previous one; labels downsample by 2x2 mode, images by 2x2 mean. The
store is written to a hidden temporary directory and renamed into place
(:func:`.atomic.atomic_path`), so a crash or cancel leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from ..progress import check_cancel, report
from .atomic import atomic_path
from .ome_tiff import _json_payload, downsample2, iter_bands, prepare_planes, pyramid_shapes

__all__ = ["read_ome_zarr", "write_ome_zarr"]

_UNIT_TO_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


def _label_attrs(class_names, colors) -> dict:
    from .geojson import class_color, normalize_class_names

    names = normalize_class_names(class_names)
    values = sorted(k for k in names if k != 0)
    return {
        "version": "0.4",
        "colors": [{"label-value": k, "rgba": [*class_color(k, colors), 255]} for k in values],
        "properties": [{"label-value": k, "class": names[k]} for k in values],
    }


def write_ome_zarr(
    path: str | os.PathLike,
    data: Any,
    *,
    mpp: float | None = None,
    axes: str = "YX",
    channel_names: Sequence[str] | None = None,
    is_labels: bool = False,
    class_names: dict[int, str] | Sequence[str] | None = None,
    colors: dict[int, Sequence[int]] | None = None,
    chunks: int = 512,
    levels: int | str = "auto",
    min_size: int = 1024,
    metadata: dict | None = None,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> Path:
    """Write ``data`` as a multiscale OME-Zarr (NGFF 0.4, zarr format 2) directory.

    Parameters are those of :func:`.ome_tiff.write_ome_tiff`; ``chunks`` is the chunk edge in
    pixels (even), ``colors`` optional ``{label: (r, g, b)}`` for the ``image-label`` metadata.
    An existing store at ``path`` is replaced only once the new one is complete.
    """
    import dask.array as da
    import zarr

    if chunks <= 0 or chunks % 2:
        raise ValueError(f"chunks must be a positive even number, got {chunks}")
    planes, store_axes = prepare_planes(data, axes, rgb_ok=False)
    dtype = np.dtype(np.uint8) if planes[0].dtype == bool else np.dtype(planes[0].dtype)
    shapes = pyramid_shapes(planes[0].shape[:2], levels, min_size)
    lead = (len(planes),) if store_axes == "CYX" else ()
    total = sum(len(planes) * h for h, _ in shapes)
    done = 0
    what = f"writing {Path(path).name}"

    ngff_axes = [{"name": "c", "type": "channel"}] if lead else []
    for name in ("y", "x"):
        ngff_axes.append({"name": name, "type": "space", **({"unit": "micrometer"} if mpp else {})})
    datasets = []
    path = Path(path)
    with atomic_path(path, directory=True) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
        arrays = []
        for k, hw in enumerate(shapes):
            arrays.append(
                root.create_array(
                    str(k),
                    shape=lead + hw,
                    dtype=dtype,
                    chunks=(1,) * len(lead) + (chunks, chunks),
                    fill_value=0,
                    chunk_key_encoding={"name": "v2", "separator": "/"},
                )
            )
            step = float(mpp or 1.0) * 2**k
            datasets.append(
                {
                    "path": str(k),
                    "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(lead) + [step, step]}],
                }
            )
        src = planes
        for k, arr in enumerate(arrays):
            for p, plane in enumerate(src):
                for y0, band in iter_bands(plane, chunks, dtype):
                    check_cancel(cancel, what)
                    arr[(p,) * len(lead) + (slice(y0, y0 + band.shape[0]),)] = band
                    done += band.shape[0]
                    report(progress, done, total, what)
            if k + 1 < len(arrays):
                whole = da.from_array(arr, chunks=arr.chunks)
                halves = [whole[p] for p in range(len(planes))] if lead else [whole]
                src = [_Halved(h, is_labels) for h in halves]
        multiscale = {
            "version": "0.4",
            "name": path.name.split(".")[0],
            "axes": ngff_axes,
            "datasets": datasets,
            "type": "mode" if is_labels else "mean",
            "metadata": {"method": "napari_pathfm.io.ome_zarr.write_ome_zarr"},
        }
        attrs: dict[str, Any] = {"multiscales": [multiscale]}
        if is_labels:
            attrs["image-label"] = _label_attrs(class_names, colors)
        elif channel_names:
            attrs["omero"] = {"channels": [{"label": str(c), "active": True} for c in channel_names]}
        attrs["pathfm"] = json.loads(_json_payload(store_axes, is_labels, class_names, channel_names, mpp, metadata))
        root.attrs.update(attrs)
    report(progress, total, total, f"wrote {path.name}")
    return path


class _Halved:
    """Sliceable view of a level halved by 2 along Y and X, computed band by band on access.

    ``view[y0:y1]`` reads rows ``2*y0 : 2*y1`` of the finer level (one dask read) and
    downsamples them, so the next level is built from the previous one in bands.
    """

    def __init__(self, finer: Any, is_labels: bool):
        self.finer, self.is_labels = finer, is_labels
        h, w = finer.shape[:2]
        self.shape = ((h + 1) // 2, (w + 1) // 2) + tuple(finer.shape[2:])
        self.dtype = finer.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        block = np.asarray(self.finer[2 * start : 2 * stop].compute())
        return downsample2(block, self.is_labels)


def read_ome_zarr(path: str | os.PathLike) -> tuple[list[Any], float | None, dict]:
    """Read a multiscale OME-Zarr image; returns ``(levels, mpp, metadata)``.

    ``levels`` are dask arrays (full resolution first); ``mpp`` comes from the first dataset's
    ``scale`` when its axes have a length unit, else None; ``metadata`` holds the writer's user
    metadata plus ``axes`` (e.g. ``"CYX"``), ``is_labels``, ``class_names`` ``{int: str}`` and
    ``channel_names``. Raises :class:`~napari_pathfm.errors.SlideError` if it is not one.
    """
    import dask.array as da
    import zarr

    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
        ms = (attrs.get("ome") or attrs)["multiscales"][0]
        levels = [da.from_zarr(root[d["path"]]) for d in ms["datasets"]]
    except (KeyError, IndexError, OSError, ValueError, TypeError) as exc:
        raise SlideError(
            path,
            f"is not a readable OME-Zarr multiscale image ({exc!r}).",
            "Point to the image group that has a 'multiscales' attribute.",
        ) from exc
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])).upper()
    mpp = None
    space = [a for a in ms.get("axes", []) if isinstance(a, dict) and a.get("type") == "space"]
    scales = [t for t in ms["datasets"][0].get("coordinateTransformations", []) if t["type"] == "scale"]
    if space and scales and space[-1].get("unit") in _UNIT_TO_UM:
        mpp = float(scales[0]["scale"][-1]) * _UNIT_TO_UM[space[-1]["unit"]]
    payload = attrs.get("pathfm") or {}
    meta = dict(payload.get("metadata") or {})
    names = payload.get("class_names")
    if names is None and "image-label" in attrs:
        props = attrs["image-label"].get("properties", [])
        names = {p["label-value"]: p["class"] for p in props if "class" in p} or None
    meta.update(
        axes=axes or payload.get("axes"),
        is_labels=bool(payload.get("is_labels", "image-label" in attrs)),
        class_names={int(k): v for k, v in names.items()} if names else None,
        channel_names=payload.get("channel_names"),
    )
    return levels, mpp, meta
