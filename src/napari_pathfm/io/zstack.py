"""Brightfield z-stack reading: per-plane file sets, multipage TIFF and OME-TIFF.

:func:`open_zstack` returns a :class:`ZStack` whose ``data`` is a lazy dask array
``(Z, Y, X)`` in the file dtype (uint16 stays uint16): one ``dask.delayed`` read per
plane file or TIFF page, so nothing is decoded until ``compute``. Only file headers
are read while opening, which is enough to reject missing planes and planes of a
different shape or dtype with a :class:`~napari_pathfm.errors.ZStackError` that
names the file and the fix.

Also here: :func:`looks_like_zstack` (cheap, never raises), what napari's reader asks
first; the napari layers it then makes come from :mod:`napari_pathfm.io.zstack_layers`.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ZStackError
from .zstack_naming import find_stack_files, parse_plane_name

if TYPE_CHECKING:  # pragma: no cover
    import dask.array as da

__all__ = ["ZStack", "looks_like_zstack", "open_zstack"]

_TIFF_SUFFIXES = (".tif", ".tiff")
_WSI_FLAGS = ("is_svs", "is_ndpi", "is_scn", "is_philips", "is_bif", "is_qpi")


@dataclass
class ZStack:
    """A z-stack opened lazily.

    Attributes
    ----------
    path : Path
        What the user opened (folder, plane file or TIFF).
    data : dask.array.Array
        ``(Z, Y, X)`` planes in the file dtype, sorted by plane index.
    plane_names, plane_files : list
        One entry per plane (``"z_depth-3"``, ``"Z03"``, ``"z3"``); for a multipage
        TIFF every plane file is the TIFF itself.
    targets : dict[str, dask.array.Array]
        ``(Y, X)`` fluorescence targets of the same site, e.g. ``{"DAPI": ...}`` or
        ``{"nuclei": ..., "lipids": ..., "cytoplasm": ...}``; may be empty.
    channel_name : str
        Channel of the input planes (``"C04"``, ``"PHASE_CONTRAST"``).
    metadata : dict
        ``format``, ``site``, ``z_indices``, ``target_files`` and, from OME, pixel sizes.
    """

    path: Path
    data: da.Array
    plane_names: list[str]
    plane_files: list[Path]
    targets: dict[str, da.Array] = field(default_factory=dict)
    channel_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_planes(self) -> int:
        return int(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def __repr__(self) -> str:
        return (
            f"ZStack({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, "
            f"channel={self.channel_name!r}, targets={sorted(self.targets)})"
        )


# --------------------------------------------------------------------------- plane files


def _probe(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a single-plane file from its header only."""
    try:
        if path.suffix.lower() in _TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                s = tif.series[0]
                shape, dtype = tuple(s.shape), np.dtype(s.dtype)
        else:
            with open(path, "rb") as fh:
                head = fh.read(26)
            if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
                raise ValueError("not a PNG file")
            width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
            shape = (height, width) if colour == 0 else (height, width, {2: 3, 4: 2, 6: 4}.get(colour, 1))
            dtype = np.dtype(np.uint16 if depth == 16 else np.uint8)
            if colour == 3:
                raise ValueError("palette PNGs are not grayscale planes")
    except ZStackError:
        raise
    except Exception as exc:  # unreadable header
        raise ZStackError(path, f"cannot be read as an image ({exc}).", "Check that the file is complete.") from exc
    if len(shape) != 2:
        raise ZStackError(
            path,
            f"holds an image of shape {shape}, not one grayscale 2-D plane.",
            "Save every plane as a single-channel (grayscale) image.",
        )
    return shape, dtype


def _read_plane(path: str, shape: tuple[int, ...], dtype: str, key: int | None = None) -> np.ndarray:
    """Decode one plane (a file, or page ``key`` of series 0 of a TIFF).

    Runs inside dask's lazy reads, so a plane that is truncated or damaged (its header,
    read at open, was fine) fails here with a :class:`ZStackError` naming the plane file.
    """
    p = Path(path)
    cached = _plane_cache.get(path, key)
    if cached is not None:
        return cached
    try:
        arr = _decode(p, key)
    except Exception as exc:  # tifffile / Pillow / imagecodecs raise many types for damaged files
        where = f"page {key} of it" if key is not None else "the plane"
        raise ZStackError(
            p,
            f"{where} could not be decoded ({type(exc).__name__}: {exc}); the file is truncated or damaged.",
            "Copy or re-export this plane file, then open the z-stack again.",
        ) from exc
    arr = np.squeeze(arr) if arr.ndim > 2 else arr
    if arr.shape != tuple(shape):
        raise ZStackError(
            p,
            f"decoded to shape {arr.shape} but its header said {tuple(shape)}.",
            "The file may have changed since the stack was opened; open it again.",
        )
    # Old Pillow decodes 16-bit PNGs as int32 ('I'); the header dtype is authoritative.
    arr = arr.astype(dtype, copy=False)
    _plane_cache.put(path, key, arr)
    return arr


class _PlaneCache:
    """The last few decoded planes (LRU, 64 MB), keyed by file, page, size and mtime.

    Opening a z-stack in napari decodes the shown plane twice otherwise: once for the contrast
    limits and once more when napari slices the layer, both on the GUI thread. Hits return a copy,
    so callers may modify what they get; a file changed on disk has a new key.
    """

    def __init__(self, max_bytes: int = 64 << 20):
        import threading
        from collections import OrderedDict

        self.max_bytes, self._bytes = max_bytes, 0
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: str, key: int | None) -> tuple | None:
        try:
            st = Path(path).stat()
        except OSError:
            return None
        return (path, key, st.st_size, st.st_mtime_ns)

    def get(self, path: str, key: int | None) -> np.ndarray | None:
        k = self._key(path, key)
        with self._lock:
            arr = self._items.get(k) if k else None
            if arr is None:
                return None
            self._items.move_to_end(k)
        return arr.copy()

    def put(self, path: str, key: int | None, arr: np.ndarray) -> None:
        k = self._key(path, key)
        if k is None or arr.nbytes > self.max_bytes // 4:
            return
        with self._lock:
            if k in self._items:
                return
            self._items[k] = arr.copy()
            self._bytes += arr.nbytes
            while self._bytes > self.max_bytes and self._items:
                self._bytes -= self._items.popitem(last=False)[1].nbytes


_plane_cache = _PlaneCache()


def _decode(p: Path, key: int | None) -> np.ndarray:
    if p.suffix.lower() in _TIFF_SUFFIXES:
        import tifffile

        return tifffile.imread(p, series=0, key=key) if key is not None else tifffile.imread(p)
    from PIL import Image

    with Image.open(p) as im:
        return np.asarray(im)


def _lazy_planes(reads: list[tuple[str, int | None]], shape: tuple[int, ...], dtype: np.dtype) -> da.Array:
    import dask
    import dask.array as da

    planes = [
        da.from_delayed(dask.delayed(_read_plane, pure=True)(f, shape, dtype.str, key), shape=shape, dtype=dtype)
        for f, key in reads
    ]
    return da.stack(planes)


def _open_folder(folder: Path, like: Path | None, **select: Any) -> ZStack:
    files = find_stack_files(folder, like=like, **select)
    ref_shape, ref_dtype = _probe(files.planes[0].path)
    for p in files.planes[1:]:
        shape, dtype = _probe(p.path)
        if shape != ref_shape or dtype != ref_dtype:
            raise ZStackError(
                p.path,
                f"plane {p.plane_name} is {shape} {dtype} but plane "
                f"{files.planes[0].plane_name} ({files.planes[0].path.name}) is {ref_shape} {ref_dtype}.",
                "All planes of a z-stack must have the same size and bit depth; re-export this plane.",
            )
    data = _lazy_planes([(str(p.path), None) for p in files.planes], ref_shape, ref_dtype)
    targets = {}
    for name, tfiles in files.targets.items():
        tshape, tdtype = _probe(tfiles[0].path)
        if tshape != ref_shape:
            raise ZStackError(
                tfiles[0].path,
                f"target {name} has shape {tshape} but the planes are {ref_shape} ({files.planes[0].path.name}).",
                "Targets must be registered to the z-stack; remove or re-export this file.",
            )
        for t in tfiles[1:]:  # a target made of several planes: every one like the first
            if _probe(t.path) != (tshape, tdtype):
                shape, dtype = _probe(t.path)
                raise ZStackError(
                    t.path,
                    f"target {name} plane is {shape} {dtype} but {tfiles[0].path.name} is {tshape} {tdtype}.",
                    "All planes of a target must match; re-export this file.",
                )
        stack = _lazy_planes([(str(t.path), None) for t in tfiles], tshape, tdtype)
        targets[name] = stack[0] if len(tfiles) == 1 else stack.max(axis=0)  # several planes: max projection
    return ZStack(
        path=like or folder,
        data=data,
        plane_names=[p.plane_name for p in files.planes],
        plane_files=[p.path for p in files.planes],
        targets=targets,
        channel_name=files.channel,
        metadata={
            "format": f"{files.scheme}-folder",
            "folder": str(folder),
            "site": files.site_label,
            "well": files.well,
            "field": files.field,
            "z_indices": [p.z for p in files.planes],
            "target_files": {k: [str(t.path) for t in v] for k, v in files.targets.items()},
        },
    )


# --------------------------------------------------------------------------- TIFF files


def _ome_info(tif: Any) -> dict[str, Any]:
    """Physical pixel sizes and channel names from OME-XML (empty when absent)."""
    info: dict[str, Any] = {}
    try:
        root = ET.fromstring(tif.ome_metadata)
        pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
        for key in ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeZ"):
            if key in pixels.attrib:
                info[key] = float(pixels.attrib[key])
        info["channel_names"] = [el.attrib.get("Name", "") for el in pixels if el.tag.endswith("Channel")]
    except Exception:  # noqa: BLE001, S110 - no or malformed OME-XML: sizes and names stay unknown
        pass
    return info


def _tiff_layout(tif: Any, path: Path, channel: int | str | None) -> tuple[Any, list[int]]:
    """Series 0 and the page index of every plane; raises ZStackError for non-stacks."""
    if any(getattr(tif, flag, False) for flag in _WSI_FLAGS) or any(len(s.levels) > 1 for s in tif.series):
        raise ZStackError(path, "is a pyramidal whole-slide image, not a z-stack.", "Open it with open_slide().")
    if len(tif.series) > 1:
        ref = tif.pages[0]
        for i, page in enumerate(tif.pages):
            if page.shape != ref.shape or page.dtype != ref.dtype:
                raise ZStackError(
                    path,
                    f"page {i} is {page.shape} {page.dtype} but page 0 is {ref.shape} {ref.dtype}.",
                    "All planes of a z-stack must have the same size and bit depth; re-export the file.",
                )
        raise ZStackError(path, f"holds {len(tif.series)} separate images.", "Save one z-stack per file.")
    s = tif.series[0]
    axes, shape = s.axes, s.shape
    if "S" in axes and shape[axes.index("S")] > 1:
        raise ZStackError(
            path,
            f"holds colour (RGB) planes, axes {axes} shape {shape}.",
            "Save the z-stack as single-channel (grayscale) planes.",
        )
    outer = [(a, n) for a, n in zip(axes, shape) if a not in "YXS"]
    zaxis = "Z" if "Z" in axes else next((a for a, n in outer if n > 1 and a != "C"), None)
    index = [0] * len(outer)
    for i, (a, n) in enumerate(outer):
        if a == "C" and n > 1 and a != zaxis:
            names = _ome_info(tif).get("channel_names") or []
            if channel is None:
                raise ZStackError(
                    path,
                    f"has {n} channels {names or ''}.",
                    "Choose the brightfield channel with open_zstack(path, channel=<index or name>).",
                )
            index[i] = names.index(channel) if isinstance(channel, str) and channel in names else int(channel)
        elif a != zaxis and n > 1:
            raise ZStackError(
                path,
                f"has a {a} axis of size {n} besides the planes (axes {axes}).",
                "Save one z-stack (one time point / position) per file.",
            )
    if len(s.pages) != int(np.prod([n for _, n in outer])):
        raise ZStackError(
            path, f"has an unsupported page layout (axes {axes}).", "Save it as an OME-TIFF with axes ZYX."
        )
    nz = dict(outer).get(zaxis, 1) if zaxis else 1
    pos = [a for a, _ in outer].index(zaxis) if zaxis else None
    keys = []
    for z in range(nz):
        if pos is not None:
            index[pos] = z
        keys.append(int(np.ravel_multi_index(index, [n for _, n in outer])) if outer else 0)
    return s, keys


def _open_tiff(path: Path, channel: int | str | None) -> ZStack:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise ZStackError(path, f"cannot be read as a TIFF ({exc}).", "Check that the file is complete.") from exc
    with tif:
        s, keys = _tiff_layout(tif, path, channel)
        shape2d = tuple(n for a, n in zip(s.axes, s.shape) if a in "YX")
        dtype, is_ome = np.dtype(s.dtype), bool(tif.is_ome)
        info = _ome_info(tif) if is_ome else {}
    data = _lazy_planes([(str(path), k) for k in keys], shape2d, dtype)
    return ZStack(
        path=path,
        data=data,
        plane_names=[f"z{i}" for i in range(len(keys))],
        plane_files=[path] * len(keys),
        targets={},
        channel_name=str(channel if channel is not None else ""),
        metadata={
            "format": "ome-tiff" if is_ome else "multipage-tiff",
            "axes": s.axes,
            "z_indices": list(range(len(keys))),
            "pages": keys,
            **info,
        },
    )


# --------------------------------------------------------------------------- public API


def open_zstack(
    path: str | Path, *, well: str | None = None, field: int | None = None, channel: int | str | None = None
) -> ZStack:
    """Open a brightfield z-stack lazily.

    Parameters
    ----------
    path : str or Path
        A folder of per-plane files (HASTE ``...Z01C04.tif`` or ``...z_depth-N,...png``
        naming), ONE plane file of such a folder (its whole stack is opened: siblings
        with the same well/field/channel), a multipage TIFF (pages = planes) or an
        OME-TIFF with a Z axis.
    well, field : optional
        Select one stack when a folder holds several, e.g. ``well="D04", field=6``.
    channel : str or int, optional
        Input channel: a name (``"C04"``, ``"PHASE_CONTRAST"``) for folders; an index
        or OME channel name for multi-channel OME-TIFFs. Other channels of a folder
        site become ``targets``.

    Returns
    -------
    ZStack
        ``data`` is a dask array ``(Z, Y, X)`` in the file dtype; no pixels are read yet.

    Raises
    ------
    ZStackError
        Missing or duplicated planes, planes of different shape/dtype, several
        stacks without a selection, or a file that is not a z-stack.

    Examples
    --------
    >>> zs = open_zstack("isl-blue-sample")                 # doctest: +SKIP
    >>> zs.shape, zs.dtype, sorted(zs.targets)              # doctest: +SKIP
    ((13, 1024, 1024), dtype('uint16'), ['DAPI', 'MAP2', 'NFH'])
    """
    path = Path(path)
    if path.is_dir():
        return _open_folder(path, None, well=well, field=field, channel=channel)
    if not path.exists():
        raise ZStackError(path, "does not exist.", "Check the path.")
    if parse_plane_name(path) is not None:
        return _open_folder(path.parent, path, well=well, field=field, channel=channel)
    if path.suffix.lower() in _TIFF_SUFFIXES:
        return _open_tiff(path, channel)
    raise ZStackError(
        path,
        "is neither a folder of plane files nor a TIFF.",
        "Pass a folder of per-plane images, one plane file, a multipage TIFF or an OME-TIFF.",
    )


def looks_like_zstack(path: str | Path) -> bool:
    """Cheap check for the napari reader; never raises.

    True for a folder (or one file of a folder) with at least two plane-named files,
    and for a TIFF whose series holds at least two single-channel 2-D planes of one
    shape. Pyramidal whole-slide TIFFs (SVS, NDPI, tiled pyramids) are not claimed.
    """
    try:
        path = Path(path)
        if path.is_dir():
            return sum(1 for e in path.iterdir() if (p := parse_plane_name(e)) is not None and p.z is not None) >= 2
        if not path.is_file():
            return False
        ref = parse_plane_name(path)
        if ref is not None:
            return (
                sum(
                    1
                    for e in path.parent.iterdir()
                    if (p := parse_plane_name(e)) is not None and p.site == ref.site and p.z is not None
                )
                >= 2
            )
        if path.suffix.lower() not in _TIFF_SUFFIXES:
            return False
        import tifffile

        with tifffile.TiffFile(path) as tif:
            _, keys = _tiff_layout(tif, path, None)
        return len(keys) >= 2
    except Exception:  # noqa: BLE001 - a probe: anything unreadable is not a z-stack
        return False
