"""Shared cache of frozen-encoder tile embeddings, one zarr store per slide and encoder.

Segmentation (Path-SAM2: SAM2 Hiera + UNI), classification (SLCA: the SAM ViT taps) and
MIL features (ResNet / UNI extractors) all start by running a large frozen encoder on every
tissue tile. Only the part after it changes when a user fine-tunes a decoder, retrains a
head, changes a threshold or re-runs a slide, so the encoder outputs are worth keeping.

Key (never a hash of pixel data): the slide signature (resolved path, size, mtime, level
shapes), the encoder (its name, a SHA-256 of its weights, input size, normalisation,
compute precision) and the tile geometry (level, read size, tile size, overlap, grid shape,
µm/px). An entry is shared by every pipeline that asks for the same key, whichever asked
first.

Layout: ``ROOT/<slide stem>-<signature>/<encoder>-<key hash>.zarr`` holds the key in its
attributes, ``data``, one row of bytes per stored tile holding all its encoder outputs packed
(their names, dtypes, shapes and offsets are in the attributes; bfloat16 kept as its bits, so a
cached output is bit for bit what the encoder gave; uncompressed: encoder outputs hardly compress
and one write per batch keeps storing cheap), filled in the order tiles are stored, and ``index``,
``(rows, cols)`` int32 over the full tile grid giving each tile's row (``-1`` = not stored). Rows are
written before the index points to them and zarr writes every chunk to a temporary file
that is renamed into place, so a crash or cancel leaves at worst unused rows; nothing half
written is ever read. One process writes an entry at a time (a lock file with host and
pid); others read it and compute what is missing without storing it.

The cache lives in ``$PATHFM_CACHE_DIR`` (default ``~/.napari-pathfm/cache``), is capped at
``$PATHFM_CACHE_MAX_GB`` (default 50; least recently used entries are deleted first) and
is switched off with ``PATHFM_CACHE=0`` or ``cache=False`` / ``--no-cache``.
``pathfm cache list`` and ``pathfm cache clear`` show and empty it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["EmbeddingCache", "CacheEntry", "EntryInfo", "resolve_cache", "weights_sha256", "default_cache_dir"]

FORMAT = "pathfm-tile-embeddings/1"
INDEX = "index"
DATA = "data"
LOCK = ".lock"
USED = ".last-used"
#: Target bytes of one zarr chunk of an output array (rows of several tiles per chunk when they are small).
CHUNK_BYTES = 4 << 20

PathLike = Union[str, Path]


def default_cache_dir() -> Path:
    """``$PATHFM_CACHE_DIR``, or ``~/.napari-pathfm/cache`` beside the models folder."""
    env = os.environ.get("PATHFM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".napari-pathfm" / "cache"


def _max_bytes() -> int:
    return int(float(os.environ.get("PATHFM_CACHE_MAX_GB", "50")) * (1 << 30))


def resolve_cache(cache: Any = None) -> Optional["EmbeddingCache"]:
    """The cache a pipeline should use: ``None`` → the default one unless ``PATHFM_CACHE=0``;
    ``False`` → none; a folder → a cache there; an :class:`EmbeddingCache` → itself."""
    if cache is False:
        return None
    if isinstance(cache, EmbeddingCache):
        return cache
    if cache is None or cache is True:
        if os.environ.get("PATHFM_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        return EmbeddingCache()
    return EmbeddingCache(cache)


def weights_sha256(modules: Iterable[Any]) -> str:
    """SHA-256 of the weights of ``modules`` (names, dtypes, shapes and bytes of their state dicts).

    Remembered on each module until one of its tensors is replaced or changed in place (torch's
    version counters), so asking again for the same model costs nothing.
    """
    import torch

    h = hashlib.sha256()
    for m in modules:
        state = m.state_dict(keep_vars=True)
        stamp = tuple((k, t.data_ptr(), t._version) for k, t in state.items())
        memo = getattr(m, "_pathfm_weights_sha", None)
        if memo is None or memo[0] != stamp:
            mh = hashlib.sha256()
            with torch.no_grad():
                for k, t in state.items():
                    t = t.detach()
                    mh.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
                    mh.update(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
            memo = (stamp, mh.hexdigest())
            object.__setattr__(m, "_pathfm_weights_sha", memo)
        h.update(memo[1].encode())
    return h.hexdigest()


def grid_key(grid: Any) -> dict:
    """The geometry part of a cache key: where and how big every tile of ``grid`` is."""
    return {
        "level": int(grid.level), "level_downsample": float(grid.level_downsample), "read_size": int(grid.read_size),
        "tile_size": int(grid.tile_size), "overlap": int(grid.overlap), "grid_shape": [int(v) for v in grid.grid_shape],
        "target_mpp": None if grid.target_mpp is None else float(grid.target_mpp),
        "mpp": None if grid.mpp is None else round(float(grid.mpp), 9),
    }  # fmt: skip


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _safe(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return keep[:60] or "x"


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


@dataclass
class EntryInfo:
    """One stored entry, as ``pathfm cache list`` shows it."""

    path: Path
    slide: str
    encoder: str
    tiles: int
    bytes: int
    last_used: float
    stale: bool

    def as_dict(self) -> dict:
        return {"path": str(self.path), "slide": self.slide, "encoder": self.encoder, "tiles": self.tiles,
                "bytes": self.bytes, "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_used)),
                "stale": self.stale}  # fmt: skip


class EmbeddingCache:
    """A folder of cached tile embeddings (see the module docstring).

    Parameters
    ----------
    root : path, optional
        The cache folder (default :func:`default_cache_dir`).
    max_bytes : int, optional
        Size cap; after a run adds rows, least recently used entries are deleted until the
        cache is below it (default ``$PATHFM_CACHE_MAX_GB``, 50 GB).
    always_store : bool
        Store every encoded tile, even when storing takes longer than encoding (by default a run
        stops storing then; see :class:`~napari_pathfm.tiles.cached_encoder.CachedEncoder`).
    """

    def __init__(self, root: Optional[PathLike] = None, max_bytes: Optional[int] = None, always_store: bool = False):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_bytes = _max_bytes() if max_bytes is None else int(max_bytes)
        self.always_store = bool(always_store)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    def open(self, slide: Any, grid: Any, encoder: dict) -> "CacheEntry":
        """The entry of ``slide`` tiled as ``grid`` for ``encoder`` (a JSON-able description that
        includes its weights hash); created on the first :meth:`CacheEntry.append`."""
        sig = slide.signature()
        key = {
            "format": FORMAT,
            "slide": {"path": sig.path, "size": sig.size, "mtime_ns": sig.mtime_ns,
                      "level_shapes": [list(s) for s in sig.level_shapes]},
            "encoder": encoder,
            "tiles": grid_key(grid),
        }  # fmt: skip
        folder = self.root / f"{_safe(Path(sig.path).stem)}-{sig.key()}"
        path = folder / f"{_safe(str(encoder.get('name', 'encoder')))}-{_hash(key)}.zarr"
        return CacheEntry(self, path, key, tuple(int(v) for v in grid.grid_shape))

    # -- housekeeping -----------------------------------------------------------------------
    def entries(self) -> list[EntryInfo]:
        """Every entry in the cache, most recently used first."""
        out = []
        for path in sorted(self.root.glob("*/*.zarr")) if self.root.is_dir() else []:
            key = _read_key(path)
            if key is None:
                continue
            slide = key["slide"]
            out.append(EntryInfo(
                path=path, slide=slide["path"], encoder=str(key["encoder"].get("name")), tiles=_count_tiles(path),
                bytes=_dir_bytes(path), last_used=_last_used(path), stale=_is_stale(slide),
            ))  # fmt: skip
        return sorted(out, key=lambda e: -e.last_used)

    def clear(self, slide: Optional[PathLike] = None, *, stale_only: bool = False) -> list[EntryInfo]:
        """Delete entries: all of them, those of one ``slide`` file, or those whose slide changed or is gone."""
        target = str(Path(slide).expanduser().resolve()) if slide is not None else None
        removed = []
        for e in self.entries():
            if (target is None or e.slide == target) and (not stale_only or e.stale):
                if _remove_entry(e.path):
                    removed.append(e)
        return removed

    def trim(self, keep: Optional[Path] = None) -> list[EntryInfo]:
        """Delete least recently used entries (never ``keep``) until the cache fits :attr:`max_bytes`."""
        entries = self.entries()
        total = sum(e.bytes for e in entries)
        removed = []
        for e in sorted(entries, key=lambda e: e.last_used):
            if total <= self.max_bytes:
                break
            if keep is not None and e.path == keep:
                continue
            if _remove_entry(e.path):
                total -= e.bytes
                removed.append(e)
                log.info("embedding cache over %.1f GB: removed %s", self.max_bytes / (1 << 30), e.path)
        return removed


def _read_key(path: Path) -> Optional[dict]:
    try:
        meta = json.loads((path / "zarr.json").read_text())
        key = meta.get("attributes", {}).get("key")
        return key if isinstance(key, dict) and key.get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def _count_tiles(path: Path) -> int:
    try:
        import zarr

        index = zarr.open_array(str(path / INDEX), mode="r")[...]
        return int((index >= 0).sum())
    except Exception:  # an entry another process is creating or a damaged one: counted as empty
        return 0


def _last_used(path: Path) -> float:
    try:
        return (path / USED).stat().st_mtime
    except OSError:
        return path.stat().st_mtime if path.exists() else 0.0


def _is_stale(slide: dict) -> bool:
    try:
        st = os.stat(slide["path"])
    except OSError:
        return True
    return st.st_size != slide["size"] or st.st_mtime_ns != slide["mtime_ns"]


def _remove_entry(path: Path) -> bool:
    if _lock_holder_alive(path / LOCK):
        return False
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.parent.rmdir()  # the slide's folder, once its last entry is gone
    except OSError:
        pass
    return not path.exists()


def _lock_holder_alive(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()[:2]
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True  # another machine's process: assume it is still running
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


class CacheEntry:
    """Stored embeddings of one slide, tile geometry and encoder (see the module docstring).

    Use :meth:`lookup` to find which tiles are stored, :meth:`read` to get them and
    :meth:`append` to add the ones a run computed; :meth:`close` (or ``with``) releases
    the write lock and keeps the cache under its size cap.
    """

    def __init__(self, cache: EmbeddingCache, path: Path, key: dict, grid_shape: tuple[int, int]):
        self.cache, self.path, self.key, self.grid_shape = cache, path, key, grid_shape
        self._group = None
        self._index: Optional[np.ndarray] = None
        self._next = 0
        self._declined: Optional[str] = None
        self._locked = False
        self.added = 0
        self.read_tiles = 0
        self.writable = True

    # -- state ------------------------------------------------------------------------------
    def _open_existing(self) -> None:
        import zarr

        if self._group is not None or self._declined or not (self.path / "zarr.json").exists():
            return
        try:
            group = zarr.open_group(str(self.path), mode="r+")
            if group.attrs.get("key") != self.key:
                raise ValueError("key mismatch")
            if group.attrs.get("declined"):
                self._declined, self.writable = str(group.attrs["declined"]), False
                if INDEX not in group:
                    return
            index = group[INDEX][...]
            if tuple(index.shape) != self.grid_shape:
                raise ValueError("index shape")
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
            log.warning("embedding cache entry %s is unreadable (%s): starting it again", self.path, exc)
            if self._lock():
                shutil.rmtree(self.path, ignore_errors=True)
            return
        self._group, self._index = group, index
        self._next = int(index.max()) + 1 if index.size else 0

    def _lock(self) -> bool:
        """Take the write lock (once); False when another live process holds it."""
        if self._locked:
            return True
        if not self.writable:
            return False
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _lock_holder_alive(lock):
                    log.info("embedding cache entry %s is being written by another process: not storing", self.path)
                    self.writable = False
                    return False
                lock.unlink(missing_ok=True)  # left by a process that died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}\n")
            self._locked = True
            return True
        self.writable = False
        return False

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, tile_index: np.ndarray) -> np.ndarray:
        """Row of each tile (``tile_index``: ``(N, 2)`` grid row/col) in the stored arrays; -1 = not stored."""
        self._open_existing()
        tile_index = np.asarray(tile_index, np.int64).reshape(-1, 2)
        if self._index is None:
            return np.full(len(tile_index), -1, np.int64)
        return self._index[tile_index[:, 0], tile_index[:, 1]].astype(np.int64)

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Stored outputs of the tiles at ``rows`` (from :meth:`lookup`, all ≥ 0), in that order, as numpy
        arrays of their storage dtype (:func:`as_tensor` turns them back into the encoder's tensors)."""
        rows = np.asarray(rows, np.int64)
        if self._group is None or (rows < 0).any():
            raise KeyError("asked for tiles that are not stored")
        order = np.argsort(rows, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        raw = self._group[DATA].oindex[rows[order]][back] if len(rows) else None
        self.read_tiles += len(rows)
        return _unpack(raw, self._group.attrs["layout"], len(rows))

    @property
    def dtypes(self) -> dict[str, str]:
        """Torch dtype name of each stored output (``bfloat16`` outputs are stored as their int16 bits)."""
        layout = self._group.attrs["layout"] if self._group is not None else []
        return {item["name"]: item["dtype"] for item in layout}

    # -- writing ----------------------------------------------------------------------------
    def append(self, tile_index: np.ndarray, outputs: dict[str, Any]) -> bool:
        """Store the outputs of the tiles at ``tile_index`` (``(B, 2)``); False when this entry is read-only."""
        if not self._lock():
            return False
        tile_index = np.asarray(tile_index, np.int64).reshape(-1, 2)
        self._open_existing()
        want = self.dtypes
        arrays, dtypes = {}, {}
        for k, v in outputs.items():
            arrays[k], dtypes[k] = _to_numpy(v, want.get(k))
        b = len(tile_index)
        if any(a.shape[0] != b for a in arrays.values()):
            raise ValueError("every output needs one row per tile")
        if self._group is None:
            self._create(arrays, dtypes)
        group = self._group
        packed = _pack(arrays, group.attrs["layout"], b)
        start = self._next
        data = group[DATA]
        if start + b > data.shape[0]:
            raise ValueError("more tiles than the grid has: tiles stored twice?")
        data[start : start + b] = packed
        self._index[tile_index[:, 0], tile_index[:, 1]] = np.arange(start, start + b, dtype=np.int32)
        self._next = start + b
        index = group[INDEX]
        r0, r1 = int(tile_index[:, 0].min()), int(tile_index[:, 0].max()) + 1
        index[r0:r1] = self._index[r0:r1]  # after the rows it points to
        self.added += b
        return True

    def _create(self, arrays: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
        import zarr

        shutil.rmtree(self.path / INDEX, ignore_errors=True)
        group = zarr.open_group(str(self.path), mode="a")
        layout, offset = [], 0
        for name in sorted(arrays):
            a = arrays[name]
            layout.append({"name": name, "dtype": dtypes[name], "storage": a.dtype.str, "shape": list(a.shape[1:]),
                           "offset": offset, "nbytes": int(a[0].nbytes) if len(a) else 0})  # fmt: skip
            offset += layout[-1]["nbytes"]
        capacity = self.grid_shape[0] * self.grid_shape[1]  # unwritten chunks take no space
        per_chunk = int(min(256, max(1, CHUNK_BYTES // max(1, offset))))
        group.create_array(DATA, shape=(capacity, offset), chunks=(per_chunk, offset), dtype="uint8",
                           compressors=None, overwrite=True)  # fmt: skip
        rows, cols = self.grid_shape
        group.create_array(INDEX, shape=(rows, cols), chunks=(min(rows, 1024), min(cols, 1024)), dtype="int32",
                           fill_value=-1, overwrite=True)  # fmt: skip
        group.attrs.update({"key": self.key, "layout": layout})
        self._group, self._index, self._next = group, np.full((rows, cols), -1, np.int32), 0

    def decline(self, reason: str, *, discard: bool) -> None:
        """Store nothing more for this key, now and in later runs (``reason`` says why: storing costs more
        than encoding). ``discard`` deletes what this run stored; the entry keeps the key and the reason,
        so later runs neither store nor time anything (``pathfm cache clear`` forgets it)."""
        import zarr

        self.writable = False
        if not self._locked:
            return
        if discard:
            shutil.rmtree(self.path, ignore_errors=True)
            self._group, self._index = None, None
            group = zarr.open_group(str(self.path), mode="a")
            group.attrs.update({"key": self.key, "declined": reason})
            (self.path / LOCK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        elif self._group is not None:
            self._group.attrs["declined"] = reason

    @property
    def declined(self) -> Optional[str]:
        """Why tiles of this key are not stored (a decision of an earlier run), or None."""
        self._open_existing()
        return self._declined

    def close(self) -> None:
        """Release the write lock, mark the entry used now, and trim the cache to its cap."""
        if self.path.exists() and (self._group is not None or self._locked):
            try:
                (self.path / USED).touch()
            except OSError:
                pass
        if self._locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self._locked = False
            if self.added:
                self.cache.trim(keep=self.path)
        if self.path.exists() and self._group is None and not any(self.path.iterdir()):
            self.path.rmdir()

    def __enter__(self) -> "CacheEntry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_STORED = {"float32": "float32", "float16": "float16", "bfloat16": "int16"}


def _to_numpy(v: Any, want: Optional[str] = None) -> tuple[np.ndarray, str]:
    """``(array to store, torch dtype name)``: float32 and float16 as they are, bfloat16 as its int16
    bits (numpy has no bfloat16), so a cached output is bit for bit the one the encoder gave."""
    if not hasattr(v, "detach"):
        return np.ascontiguousarray(v, dtype=np.float32), "float32"
    import torch

    v = v.detach()
    name = want or {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(v.dtype, "float32")
    v = v.to(getattr(torch, name)).cpu().contiguous()
    if name == "bfloat16":
        return v.view(torch.int16).numpy(), name
    return v.numpy(), name


def _pack(arrays: dict[str, np.ndarray], layout: list, b: int) -> np.ndarray:
    """``(b, bytes per tile)`` uint8 rows holding every output of ``layout`` side by side."""
    if sorted(arrays) != sorted(item["name"] for item in layout):
        raise ValueError(f"outputs {sorted(arrays)} differ from the stored {[item['name'] for item in layout]}")
    rows = np.empty((b, sum(item["nbytes"] for item in layout)), np.uint8)
    for item in layout:
        a = arrays[item["name"]]
        if list(a.shape[1:]) != item["shape"] or a.dtype.str != item["storage"]:
            raise ValueError(f"output {item['name']!r} is {a.dtype} {a.shape[1:]}, stored {item['storage']} "
                             f"{tuple(item['shape'])}")  # fmt: skip
        rows[:, item["offset"] : item["offset"] + item["nbytes"]] = np.ascontiguousarray(a).reshape(b, -1).view(np.uint8)
    return rows


def _unpack(raw: Optional[np.ndarray], layout: list, b: int) -> dict[str, np.ndarray]:
    out = {}
    for item in layout:
        dt = np.dtype(item["storage"])
        if raw is None:
            out[item["name"]] = np.empty((0, *item["shape"]), dt)
            continue
        part = np.ascontiguousarray(raw[:, item["offset"] : item["offset"] + item["nbytes"]])
        out[item["name"]] = part.view(dt).reshape(b, *item["shape"])
    return out


def as_tensor(a: np.ndarray, dtype_name: str, device: Any):
    """A stored array back as the torch tensor the encoder gave (see :func:`_to_numpy`)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype_name == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device)
