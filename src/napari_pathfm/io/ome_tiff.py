"""Pyramidal OME-TIFF writer/reader for slide-level results (masks, class maps, heatmaps, RGB).

Results can be larger than memory (a level-0 mask of a 100k x 100k slide), so the writer never
materialises a whole level: the source (numpy, dask, zarr or anything sliceable) is read in
horizontal bands, each band is cut into tiles for :class:`tifffile.TiffWriter` (which accepts an
iterator of tiles) and, in the same pass, downsampled by 2 into a buffer for the next pyramid
level (in memory when small, else a temporary zarr array). Each level is therefore computed once
from the previous one, and an expensive dask graph (model inference) is evaluated only once.

Pyramid levels go into SubIFDs (the layout QuPath, Bio-Formats and tifffile read as OME
pyramids). Labels are downsampled by the 2x2 mode, images by the 2x2 mean. The pixel size is
written both as OME ``PhysicalSizeX/Y`` in µm and as TIFF resolution tags; class names,
channel names and user metadata go into an OME ``MapAnnotation`` (namespace
:data:`NAMESPACE`) as JSON. The file is written atomically (:func:`.atomic.atomic_path`).

The band/downsample helpers here are shared with :mod:`.ome_zarr`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PathFMError, SlideError
from ..progress import check_cancel, report
from .atomic import atomic_path

__all__ = [
    "NAMESPACE",
    "downsample2",
    "iter_bands",
    "prepare_planes",
    "pyramid_shapes",
    "read_ome_tiff",
    "write_ome_tiff",
]

NAMESPACE = "napari-pathfm"
_BAND_BYTES = 256 * 2**20
_LOSSLESS = {"zlib", "deflate", "adobe_deflate", "lzw", "zstd", "lzma"}
_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_OME_DTYPE = {"bool": "uint8", "float16": "float32", "int64": "int32", "uint64": "uint32"}


def pyramid_shapes(shape_yx: Sequence[int], levels: int | str = "auto", min_size: int = 1024) -> list:
    """Return the (Y, X) shape of each pyramid level, halving (rounding up) each time.

    ``levels="auto"`` adds levels until the longest side is at most ``min_size``; an int is the
    total number of levels (1 = no pyramid), stopping early when a level would reach 1 pixel.

    >>> pyramid_shapes((5000, 3000))
    [(5000, 3000), (2500, 1500), (1250, 750), (625, 375)]
    """
    h, w = int(shape_yx[0]), int(shape_yx[1])
    shapes = [(h, w)]
    if levels == "auto":
        wanted = 64
    elif isinstance(levels, (int, np.integer)) and levels >= 1:
        wanted, min_size = int(levels), 1
    else:
        raise ValueError(f"levels must be 'auto' or a positive int, got {levels!r}")
    while len(shapes) < wanted and max(shapes[-1]) > min_size and min(shapes[-1]) > 1:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def downsample2(block: np.ndarray, is_labels: bool) -> np.ndarray:
    """Halve a (Y, X) or (Y, X, S) block: 2x2 mode for labels, 2x2 mean for images.

    Odd sizes are padded by edge replication, so the result has shape ``ceil(n / 2)``. For
    labels, ties in the mode go to the top-left pixel; integer means are rounded half up.
    """
    h, w = block.shape[:2]
    if h % 2 or w % 2:
        pad = [(0, h % 2), (0, w % 2)] + [(0, 0)] * (block.ndim - 2)
        block = np.pad(block, pad, mode="edge")
    quads = [block[0::2, 0::2], block[0::2, 1::2], block[1::2, 0::2], block[1::2, 1::2]]
    if not is_labels:
        mean = (quads[0].astype(np.float64) + quads[1] + quads[2] + quads[3]) / 4.0
        if np.issubdtype(block.dtype, np.integer):
            mean = np.floor(mean + 0.5)
        return mean.astype(block.dtype)
    out = quads[0].copy()
    # Most 2x2 blocks of a label map hold one label (the mode is then the top-left pixel):
    # count votes only where they do not.
    mixed = quads[0] != quads[1]
    mixed |= quads[0] != quads[2]
    mixed |= quads[0] != quads[3]
    if not mixed.any():
        return out
    q = [quad[mixed] for quad in quads]
    best = np.argmax(np.stack([sum((a == b).astype(np.uint8) for b in q) for a in q]), axis=0)
    vals = q[0].copy()
    for i in (1, 2, 3):
        sel = best == i
        vals[sel] = q[i][sel]
    out[mixed] = vals
    return out


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """OME has no bool, float16 or 64-bit integers; map them to the nearest supported type."""
    return np.dtype(_OME_DTYPE.get(np.dtype(dtype).name, dtype))


def prepare_planes(data: Any, axes: str, *, rgb_ok: bool = True) -> tuple[list[Any], str]:
    """Split ``data`` into lazily sliceable planes of shape (Y, X) or (Y, X, S).

    Returns ``(planes, storage_axes)`` with storage axes ``"YX"``, ``"YXS"`` (interleaved RGB/
    RGBA, only when ``rgb_ok``) or ``"CYX"``. ``"YXC"`` with 3 or 4 uint8 channels is stored as
    RGB; other ``"YXC"`` data are stored channel-first. Non-numpy inputs (zarr, ...) are wrapped
    in dask with their own chunks so slicing a plane reads only what is needed.
    """
    import dask.array as da

    axes = axes.upper()
    if axes not in ("YX", "YXC", "YXS", "CYX"):
        raise ValueError(f"axes must be one of YX, YXC, YXS, CYX; got {axes!r}")
    if not isinstance(data, (np.ndarray, da.Array)):
        if hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "__getitem__"):
            data = da.from_array(data, chunks=getattr(data, "chunks", "auto"))
        else:
            data = np.asarray(data)
    if data.ndim != len(axes):
        raise ValueError(f"data has {data.ndim} dimensions but axes {axes!r} has {len(axes)}")
    if axes == "YX":
        return [data], "YX"
    if axes in ("YXS", "YXC"):
        rgb = data.shape[2] in (3, 4) and (axes == "YXS" or data.dtype == np.uint8)
        if rgb and rgb_ok:
            return [data], "YXS"
        if axes == "YXS" and rgb_ok:
            raise ValueError(f"axes 'YXS' needs 3 or 4 samples, got {data.shape[2]}")
        return [data[:, :, c] for c in range(data.shape[2])], "CYX"
    return [data[c] for c in range(data.shape[0])], "CYX"


def _band_rows(plane: Any, unit: int) -> int:
    """Rows per band: a multiple of ``unit`` covering one dask chunk row, within a memory budget."""
    rows = unit
    chunks = getattr(plane, "chunks", None)
    if chunks and isinstance(chunks[0], tuple):
        rows = unit * math.ceil(max(chunks[0]) / unit)
    row_bytes = max(1, int(np.prod(plane.shape[1:])) * np.dtype(plane.dtype).itemsize)
    cap = max(unit, (_BAND_BYTES // row_bytes) // unit * unit)
    return min(rows, cap)


def _read_spans(plane: Any, rows: int) -> Iterator[tuple[int, int]]:
    """Row spans to read: whole dask chunk rows (so no chunk is computed twice), about ``rows``."""
    height = plane.shape[0]
    chunks = getattr(plane, "chunks", None)
    if not (chunks and isinstance(chunks[0], tuple)):
        yield from ((y, min(y + rows, height)) for y in range(0, height, rows))
        return
    start = stop = 0
    for size in chunks[0]:
        stop += size
        if stop - start >= rows:
            yield start, stop
            start = stop
    if stop > start:
        yield start, stop


def _read(plane: Any, y0: int, y1: int, dtype: np.dtype | None) -> np.ndarray:
    band = plane[y0:y1]
    band = np.asarray(band.compute() if hasattr(band, "compute") else band)
    if dtype is not None and band.dtype != dtype:
        if np.issubdtype(dtype, np.integer) and band.dtype != bool and band.size:
            info = np.iinfo(dtype)
            if band.min() < info.min or band.max() > info.max:
                raise PathFMError(
                    f"values {band.min()}..{band.max()} do not fit {dtype}; relabel "
                    "to fewer labels or convert to float before writing"
                )
        band = band.astype(dtype)
    return band


def iter_bands(plane: Any, unit: int, dtype: np.dtype | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(y0, band)`` numpy bands of a plane, a multiple of ``unit`` (even) rows each.

    The source is read along its own chunk rows and re-cut into bands, so each dask chunk is
    computed once. Integer casts that would overflow (int64 labels stored as 32 bit) raise
    :class:`~napari_pathfm.errors.PathFMError` instead of wrapping around.
    """
    rows = _band_rows(plane, unit)
    pending: list[np.ndarray] = []
    y_out = 0
    for y0, y1 in _read_spans(plane, rows):
        pending.append(_read(plane, y0, y1, dtype))
        last = y1 >= plane.shape[0]
        while pending and (sum(len(p) for p in pending) >= rows or last):
            buf = pending[0] if len(pending) == 1 else np.concatenate(pending)
            band, rest = buf[:rows], buf[rows:]
            pending = [rest] if len(rest) else []
            yield y_out, band
            y_out += len(band)


def _buffers(n: int, shape: tuple, dtype: np.dtype, chunk_rows: int, scratch: Path, level: int) -> list:
    """Per-plane buffers for the next level: numpy when small, else on-disk zarr (compressed)."""
    if n * int(np.prod(shape)) * dtype.itemsize <= _BAND_BYTES:
        return [np.zeros(shape, dtype) for _ in range(n)]
    import zarr

    chunks = (max(1, chunk_rows), min(shape[1], 4096)) + tuple(shape[2:])
    return [
        zarr.create_array(
            store=str(scratch / f"level{level}_plane{i}.zarr"), shape=shape, dtype=dtype, chunks=chunks, fill_value=0
        )
        for i in range(n)
    ]


def _tiles(planes, tile, dtype, is_labels, nxt, step: Callable[[], None]) -> Iterator[np.ndarray]:
    """Tiles of every plane in TIFF order; fills ``nxt`` with the halved level on the way."""
    th, tw = tile
    for p, plane in enumerate(planes):
        for y0, band in iter_bands(plane, th, dtype):
            if nxt is not None:
                small = downsample2(band, is_labels)
                nxt[p][y0 // 2 : y0 // 2 + small.shape[0]] = small
            for ty in range(0, band.shape[0], th):
                for tx in range(0, band.shape[1], tw):
                    step()
                    yield band[ty : ty + th, tx : tx + tw]


def _encoded_label_tiles(
    tiles: Iterator[np.ndarray], tile: tuple[int, int], dtype: np.dtype, compressionargs: dict | None
) -> Iterator[bytes]:
    """zlib-encode (horizontal predictor) label tiles as tifffile would, for its iterator of bytes.

    Tiles of a single label (background, mostly) are encoded once per label and reused; the others
    are encoded by as many threads as tifffile would use.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tifffile import TIFF, TiffWriter

    compress, predict = TIFF.COMPRESSORS[8], TIFF.PREDICTORS[2]
    kwargs = dict(compressionargs or {})
    th, tw = tile
    constant: dict[Any, bytes] = {}

    def encode(t: np.ndarray) -> bytes:
        t = np.ascontiguousarray(t, dtype)
        if t.shape != (th, tw):
            t = np.pad(t, ((0, th - t.shape[0]), (0, tw - t.shape[1])))
        first = t.flat[0]
        if (t == first).all():
            key = first.item()
            if key not in constant:
                constant[key] = compress(predict(t, axis=-1), **kwargs)
            return constant[key]
        return compress(predict(t, axis=-1), **kwargs)

    workers = TiffWriter._maxworkers(None, 2, th * tw * dtype.itemsize, 8)
    if workers < 2:
        yield from map(encode, tiles)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="pathfm-tiff") as pool:
        pending: deque = deque()
        for t in tiles:
            pending.append(pool.submit(encode, t))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _json_payload(axes, is_labels, class_names, channel_names, mpp, metadata) -> str:
    if class_names is not None and not isinstance(class_names, dict):
        class_names = dict(enumerate(class_names))
    payload = {
        "version": 1,
        "axes": axes,
        "is_labels": bool(is_labels),
        "class_names": {str(int(k)): str(v) for k, v in class_names.items()} if class_names else None,
        "channel_names": list(channel_names) if channel_names else None,
        "mpp": mpp,
        "downsampling": "mode" if is_labels else "mean",
        "metadata": metadata or {},
    }
    return json.dumps(payload, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def write_ome_tiff(
    path: str | os.PathLike,
    data: Any,
    *,
    mpp: float | None = None,
    axes: str = "YX",
    channel_names: Sequence[str] | None = None,
    is_labels: bool = False,
    class_names: dict[int, str] | Sequence[str] | None = None,
    tile: int | tuple[int, int] = 256,
    compression: str | None = "zlib",
    levels: int | str = "auto",
    min_size: int = 1024,
    metadata: dict | None = None,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    compressionargs: dict | None = None,
) -> Path:
    """Write a tiled, pyramidal OME-TIFF without holding a whole level in memory.

    Parameters
    ----------
    path : output ``*.ome.tif``; replaced atomically on success, returned.
    data : numpy, dask or zarr array (anything with shape/dtype/slicing) laid out as ``axes``.
    mpp : level-0 pixel size in µm; stored as OME PhysicalSizeX/Y and TIFF resolution tags.
    axes : ``"YX"``, ``"YXS"`` (RGB/RGBA), ``"YXC"`` (RGB if 3-4 uint8 channels, else
        channels) or ``"CYX"``.
    is_labels, class_names : integer labels (mode downsampling) and ``{value: name}`` or a
        list indexed by value.
    tile : tile edge(s) in pixels, multiples of 16.
    compression : a tifffile codec; default ``"zlib"`` is lossless; lossy codecs refused for
        labels.
    levels, min_size : ``"auto"`` halves until the longest side is <= ``min_size``; an int is
        the total number of levels.
    metadata : JSON-serialisable dict stored in the file (see :func:`read_ome_tiff`).
    progress, cancel : ``progress(done, total, message)`` and ``cancel`` per tile;
        :class:`~napari_pathfm.errors.Cancelled` leaves nothing on disk.
    compressionargs : options of the codec, e.g. ``{"level": 1}`` for faster, larger zlib.

    Channel-first dask data are computed once per channel: persist an expensive graph first.
    """
    import tifffile

    if is_labels and compression in ("jpeg", "jpegxl", "jpeg2000", "webp"):
        raise ValueError(f"lossy compression {compression!r} would corrupt labels; use 'zlib'")
    th, tw = (tile, tile) if isinstance(tile, (int, np.integer)) else (int(tile[0]), int(tile[1]))
    if th % 16 or tw % 16 or th <= 0 or tw <= 0:
        raise ValueError(f"tile sides must be positive multiples of 16, got {(th, tw)}")
    planes, store_axes = prepare_planes(data, axes)
    dtype = _storage_dtype(planes[0].dtype)
    samples = tuple(planes[0].shape[2:])
    shapes = pyramid_shapes(planes[0].shape[:2], levels, min_size)
    total = sum(len(planes) * math.ceil(h / th) * math.ceil(w / tw) for h, w in shapes)
    what, done = f"writing {Path(path).name}", [0]

    def step() -> None:
        check_cancel(cancel, what)
        done[0] += 1
        report(progress, done[0], total, what)

    def full_shape(hw):
        return ((len(planes),) if store_axes == "CYX" else ()) + tuple(hw) + samples

    ome: dict[str, Any] = {"axes": store_axes}
    if mpp:
        ome.update(PhysicalSizeX=float(mpp), PhysicalSizeXUnit="µm", PhysicalSizeY=float(mpp), PhysicalSizeYUnit="µm")
    if channel_names and store_axes == "CYX":
        if len(channel_names) != len(planes):
            raise ValueError(f"{len(channel_names)} channel names for {len(planes)} channels")
        ome["Channel"] = {"Name": [str(c) for c in channel_names]}
    payload = _json_payload(store_axes, is_labels, class_names, channel_names, mpp, metadata)
    ome["MapAnnotation"] = {"Namespace": NAMESPACE, "Value": {"pathfm": payload}}
    rgb = store_axes == "YXS"
    common: dict[str, Any] = dict(tile=(th, tw), compression=compression, photometric="rgb" if rgb else "minisblack")
    if compression in _LOSSLESS and np.issubdtype(dtype, np.integer):
        common["predictor"] = "horizontal"  # not all readers (Bio-Formats) know the float one
    if rgb:
        common["planarconfig"] = "contig"
    # Single-plane integer labels: tiles are encoded here, so that the many constant ones are encoded once.
    encode_labels = (
        is_labels and store_axes == "YX" and compression == "zlib" and common.get("predictor") == "horizontal"
    )
    raw_bytes = sum(int(np.prod(full_shape(s))) for s in shapes) * dtype.itemsize
    path = Path(path)
    with (
        atomic_path(path) as tmp,
        tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f"{tmp.name}.") as scratch,
        tifffile.TiffWriter(tmp, bigtiff=raw_bytes > 2**31, ome=True) as tw_,
    ):
        src = planes
        for k, hw in enumerate(shapes):
            nxt = None
            if k + 1 < len(shapes):
                nxt = _buffers(
                    len(planes), shapes[k + 1] + samples, dtype, _band_rows(src[0], th) // 2, Path(scratch), k + 1
                )
            kwargs = dict(common)
            if mpp:
                res = 1e4 / (float(mpp) * 2**k)
                kwargs.update(resolution=(res, res), resolutionunit="CENTIMETER")
            kwargs.update(dict(metadata=ome, subifds=len(shapes) - 1) if k == 0 else dict(metadata=None, subfiletype=1))
            tiles = _tiles(src, (th, tw), dtype, is_labels, nxt, step)
            if encode_labels:
                tiles = _encoded_label_tiles(tiles, (th, tw), dtype, compressionargs)
            elif compressionargs:
                kwargs["compressionargs"] = compressionargs
            tw_.write(tiles, shape=full_shape(hw), dtype=dtype, **kwargs)
            src = nxt
    report(progress, total, total, f"wrote {path.name}")
    return path


def _mpp_from_ome(xml: str | None) -> tuple[float | None, dict]:
    """PhysicalSizeX in µm and the napari-pathfm JSON payload from OME-XML."""
    if not xml:
        return None, {}
    root = ET.fromstring(xml)
    mpp = None
    payload: dict = {}
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "Pixels" and mpp is None and "PhysicalSizeX" in el.attrib:
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            mpp = float(el.attrib["PhysicalSizeX"]) * _UNIT_TO_UM.get(unit, 1.0)
        elif tag == "MapAnnotation" and el.attrib.get("Namespace") == NAMESPACE:
            for m in el.iter():
                if m.tag.rsplit("}", 1)[-1] == "M" and m.attrib.get("K") == "pathfm":
                    payload = json.loads(m.text or "{}")
    return mpp, payload


def _mpp_from_tags(page) -> float | None:
    if "XResolution" not in page.tags or page.tags.valueof(296, default=1) not in (2, 3):
        return None
    per_um = page.get_resolution("MICROMETER")[0]
    return 1.0 / per_um if per_um > 0 else None


def read_ome_tiff(path: str | os.PathLike, *, lazy: bool = False) -> tuple[list[Any], float | None, dict]:
    """Read a (pyramidal) OME-TIFF written by :func:`write_ome_tiff` or another tool.

    Returns ``(levels, mpp, metadata)``: ``levels`` are numpy arrays (``lazy=False``) or dask
    arrays backed by tifffile's zarr store (``lazy=True``), full resolution first, laid out as
    ``metadata["axes"]``. ``metadata`` is the user metadata given to the writer plus the
    reserved keys ``axes``, ``is_labels``, ``class_names`` (``{int: str}`` or None) and
    ``channel_names``. Raises :class:`~napari_pathfm.errors.SlideError` if unreadable.
    """
    import tifffile

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            mpp, payload = _mpp_from_ome(tif.ome_metadata)
            if mpp is None:
                mpp = _mpp_from_tags(series.pages[0])
            axes, nlevels = series.axes, len(series.levels)
            levels = [] if lazy else [lvl.asarray() for lvl in series.levels]
    except (OSError, ValueError, tifffile.TiffFileError, ET.ParseError) as exc:
        raise SlideError(
            path, f"cannot be read as OME-TIFF ({exc}).", "Check that the file is complete and was written as OME-TIFF."
        ) from exc
    if lazy:
        import dask.array as da
        import zarr

        stores = [tifffile.imread(path, aszarr=True, level=k) for k in range(nlevels)]
        levels = [da.from_zarr(zarr.open_array(st, mode="r")) for st in stores]
    meta = dict(payload.get("metadata") or {})
    names = payload.get("class_names")
    meta.update(
        axes=payload.get("axes", axes),
        is_labels=bool(payload.get("is_labels", False)),
        class_names={int(k): v for k, v in names.items()} if names else None,
        channel_names=payload.get("channel_names"),
    )
    return levels, mpp, meta
