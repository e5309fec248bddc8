"""One entry of the tile-embedding cache: its zarr layout, write lock and packed rows.

See :mod:`napari_pathfm.tiles.embedding_cache` for the key and the layout; this module reads and
writes one ``<encoder>-<key hash>.zarr`` store.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:
    from .embedding_cache import EmbeddingCache

log = logging.getLogger(__name__)

__all__ = ["CacheEntry", "as_tensor", "lock_holder_alive"]

INDEX = "index"
DATA = "data"
LOCK = ".lock"
USED = ".last-used"
#: Target bytes of one zarr chunk of the data rows (several tiles per chunk when they are small).
CHUNK_BYTES = 4 << 20


def lock_holder_alive(lock: Path) -> bool:
    """True unless the lock is readable and names a process of this host that no longer exists."""
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
                if lock_holder_alive(lock):
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
