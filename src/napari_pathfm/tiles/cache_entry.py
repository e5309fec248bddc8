"""One entry of the tile-embedding cache: its zarr layout, checksums, write lock and packed rows.

See :mod:`napari_pathfm.tiles.embedding_cache` for the key and the layout; this module reads,
verifies, repairs and writes one ``<encoder>-<key hash>.zarr`` store.

Three arrays, every chunk of each ending in a CRC32C (zarr's ``crc32c`` codec), so a flipped or
truncated chunk fails to decode instead of giving other numbers:

- ``data`` ``(capacity, bytes per tile)`` uint8: one packed row of encoder outputs per stored tile;
- ``rows`` ``(capacity, 3)`` int64: for each data row the grid row and column of its tile and the
  CRC32C of the row (``-1`` = unused), written after the row and before the index. It catches what
  a chunk checksum cannot: a missing data chunk (zarr reads it as zeros) and a row that is not the
  tile the index says;
- ``index`` ``(grid rows, grid cols)`` int32: the data row of each tile (``-1`` = not stored).

The index and the row table are two records of the same thing: a tile counts as stored only when
both agree and its row's checksum matches. A damaged index is rebuilt from the table; a tile whose
row, table entry or chunk is damaged is dropped (and recomputed by the run that asked for it).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .cache_rows import as_tensor, pack_rows, row_checksum, to_numpy, unpack_rows

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "CacheEntry", "EntryOwner", "as_tensor", "lock_holder_alive"]

#: Version of the entry layout in every key: entries of another version are never opened.
FORMAT = "pathfm-tile-embeddings/2"
INDEX = "index"
DATA = "data"
TABLE = "rows"
LOCK = ".lock"
USED = ".last-used"
#: Target bytes of one zarr chunk of the data rows (several tiles per chunk when they are small).
CHUNK_BYTES = 4 << 20
#: Rows of the row table per chunk.
TABLE_CHUNK = 4096
#: Size of the checksum zarr's crc32c codec appends to every chunk.
CRC_BYTES = 4


class EntryOwner(Protocol):
    """What an entry needs of the cache folder that holds it (an
    :class:`~napari_pathfm.tiles.embedding_cache.EmbeddingCache`, which imports this module, not the
    reverse: the two would otherwise import each other)."""

    #: Store every encoded tile, even when storing is slower than encoding.
    always_store: bool

    def trim(self, keep: Path | None = None) -> Any:
        """Delete least recently used entries (never ``keep``) until the cache fits its cap."""


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


def chunk_file(array_dir: Path, coords: tuple[int, ...]) -> Path:
    """Where zarr 3 (default chunk key encoding) keeps the chunk at ``coords`` of an array."""
    return array_dir.joinpath("c", *(str(int(c)) for c in coords))


class CacheEntry:
    """Stored embeddings of one slide, tile geometry and encoder (see the module docstring).

    Use :meth:`lookup` to find which tiles are stored, :meth:`read` to get them (verified) and
    :meth:`append` to add the ones a run computed; :meth:`close` (or ``with``) releases the write
    lock and keeps the cache under its size cap. Damage found on the way is repaired (damaged tiles
    dropped, the index rebuilt, an unreadable entry started again) unless ``repair`` is False or the
    entry cannot be written; :attr:`damaged`, :attr:`rebuilt` and :attr:`unrepaired` say what happened.
    """

    def __init__(
        self,
        cache: EntryOwner,
        path: Path,
        key: dict,
        grid_shape: tuple[int, int],
        *,
        n_tiles: int = 0,
        repair: bool = True,
    ):
        self.cache, self.path, self.key, self.grid_shape = cache, path, key, tuple(grid_shape)
        self.n_tiles, self.repair = int(n_tiles), bool(repair)
        self._group = self._data = self._tab = None
        self._index: np.ndarray | None = None
        self._table: np.ndarray | None = None
        self._next = 0
        self._declined: str | None = None
        self._locked = False
        self._lock_problem: str | None = None
        self._opened = False
        self.added = 0
        self.read_tiles = 0
        self.writable = True
        #: Tiles (grid mask) found damaged and dropped in this process.
        self.damaged = np.zeros(self.grid_shape, bool)
        #: Why the entry's metadata was unreadable (it was then started again, or left alone when not ``repair``).
        self.rebuilt: str | None = None
        #: The index was damaged and rebuilt from the row table.
        self.index_fixed = False
        #: Why damage found could not be repaired (read-only folder, lock held, …).
        self.unrepaired: str | None = None
        #: Why the entry cannot be used at all in this run (unreadable and not removable).
        self.unusable: str | None = None

    # -- opening and checking ------------------------------------------------------------------
    def _open_existing(self) -> None:
        """Open the stored entry once: read index and row table, check that the chunks they need are
        there at their full size, and repair what is not (or note it when repairing is not possible)."""
        if self._opened:
            return
        self._opened = True
        if not (self.path / "zarr.json").exists():
            return
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - any unreadable metadata: the entry is started again
            self._start_again(_reason(exc))

    def _load(self) -> None:
        import zarr

        group = zarr.open_group(str(self.path), mode="r+")
        attrs = dict(group.attrs)
        if attrs.get("key") != self.key:
            raise ValueError("its key differs from the one its name stands for")
        if attrs.get("declined"):
            self._declined, self.writable = str(attrs["declined"]), False
            if DATA not in group:
                return
        data, tab = group[DATA], group[TABLE]
        width = sum(int(item["nbytes"]) for item in attrs["layout"])
        if data.ndim != 2 or data.shape[1] != width or tab.shape != (data.shape[0], 3):
            raise ValueError(f"data {data.shape} and row table {tab.shape} do not fit the layout")
        index = _read_whole(group, INDEX, self.grid_shape)  # None when damaged; read before the table (see append)
        table, bad_table = _read_table(tab)
        self._group, self._data, self._tab, self._table = (
            group,
            data.with_config({"write_empty_chunks": True}),
            tab,
            table,
        )
        self._reconcile(index, bad_table)

    def _reconcile(self, index: np.ndarray | None, bad_table: np.ndarray) -> None:
        """Make the index agree with the row table, drop tiles whose rows the table does not back or whose
        data chunk is missing or truncated, and write the repaired index and table (when allowed).

        Rows the table has and the index lacks (a run stopped between writing them and indexing them, or
        a lost index chunk) are adopted: their checksums are checked when they are read."""
        derived = _index_from_table(self._table, self.grid_shape)
        if index is None:
            self.index_fixed = True
        else:
            pos = index >= 0
            lost = np.zeros(self.grid_shape, bool)
            lost[pos] = derived[pos] < 0  # the index says stored, the table knows no row of the tile
            self.damaged |= lost
            self.index_fixed = bool(lost.any())
        self._index = derived
        used = np.nonzero(self._table[:, 0] >= 0)[0]
        self._next = int(used.max()) + 1 if len(used) else 0
        bad_chunks = self._missing_data_chunks()
        table_rows = np.nonzero(bad_table)[0]
        if bad_chunks or len(table_rows):
            self._drop(rows=table_rows, chunks=bad_chunks)
        elif self.index_fixed:
            self._save(rows=np.zeros(0, np.int64))
        elif not np.array_equal(index, derived):
            self._write_index_quietly()

    def _missing_data_chunks(self) -> list[int]:
        """Data chunks holding stored rows whose file is missing or not of the full size (cheap: no reads)."""
        used = self._index[self._index >= 0].astype(np.int64)
        per, width = self._data.chunks[0], self._data.shape[1]
        want = per * width + CRC_BYTES
        bad = []
        for c in np.unique(used // per).tolist():
            try:
                size = chunk_file(self.path / DATA, (c, 0)).stat().st_size
            except OSError:
                size = -1
            if size != want:
                bad.append(int(c))
        return bad

    def _start_again(self, reason: str) -> None:
        """The entry's metadata is unreadable: delete it (keeping the lock) so this run builds it anew."""
        self.rebuilt = reason
        self._group = self._data = self._tab = self._index = self._table = None
        problem = self._cannot_write()
        if problem is None:
            try:
                for child in self.path.iterdir():
                    if child.name != LOCK:
                        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                return
            except OSError as exc:
                problem = f"could not remove it: {_reason(exc)}"
        self.unusable = problem
        self.writable = False

    def verify(self, rows: np.ndarray | None = None, batch_bytes: int = 64 << 20) -> int:
        """Read and check the data rows ``rows`` (default: every stored row), about ``batch_bytes`` at a
        time; damaged ones are dropped as :meth:`read` does. Returns the number of tiles found damaged."""
        self._open_existing()
        if self._index is None or self._data is None:
            return int(self.damaged.sum())
        if rows is None:
            rows = self._index[self._index >= 0]
        rows = np.sort(np.asarray(rows, np.int64))
        step = max(1, batch_bytes // max(1, self._data.shape[1]))
        for i in range(0, len(rows), step):
            self._read_raw(rows[i : i + step])
        return int(self.damaged.sum())

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, tile_index: np.ndarray) -> np.ndarray:
        """Row of each tile (``tile_index``: ``(N, 2)`` grid row/col) in the stored arrays; -1 = not stored."""
        self._open_existing()
        tile_index = np.asarray(tile_index, np.int64).reshape(-1, 2)
        if self._index is None:
            return np.full(len(tile_index), -1, np.int64)
        return self._index[tile_index[:, 0], tile_index[:, 1]].astype(np.int64)

    def read(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Stored outputs of the rows ``rows`` (from :meth:`lookup`, all ≥ 0) that pass their checks, and
        a bool mask of which did. Outputs are numpy arrays of their storage dtype, in the order of the
        good rows (:func:`as_tensor` turns them back into the encoder's tensors). Rows that fail (chunk
        checksum, truncated or missing chunk, row checksum) are dropped from the entry and repaired."""
        rows = np.asarray(rows, np.int64)
        if self._group is None or (rows < 0).any():
            raise KeyError("asked for tiles that are not stored")
        raw, ok = self._read_raw(rows)
        self.read_tiles += int(ok.sum())
        return unpack_rows(raw[ok] if len(rows) else None, self._group.attrs["layout"], int(ok.sum())), ok

    def _read_raw(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(len(rows), width)`` bytes of ``rows`` and which of them verified; drops the others."""
        width, per = self._data.shape[1], self._data.chunks[0]
        raw = np.zeros((len(rows), width), np.uint8)
        ok = np.ones(len(rows), bool)
        chunk_of = rows // per
        bad_chunks = []
        for c in np.unique(chunk_of).tolist():
            sel = np.nonzero(chunk_of == c)[0]
            lo, hi = int(rows[sel].min()), int(rows[sel].max()) + 1
            try:
                block = self._data[lo:hi]
            except Exception as exc:  # noqa: BLE001 - checksum mismatch, truncated chunk, unreadable file
                log.debug("embedding cache %s: data chunk %d: %s", self.path, c, _reason(exc))
                ok[sel] = False
                bad_chunks.append(int(c))
                continue
            raw[sel] = block[rows[sel] - lo]
        want = self._table[rows, 2]
        for i in np.nonzero(ok)[0].tolist():
            ok[i] = row_checksum(raw[i]) == want[i]
        bad_rows = rows[~ok]
        if len(bad_rows):
            self._drop(rows=bad_rows, chunks=bad_chunks)
        return raw, ok

    @property
    def dtypes(self) -> dict[str, str]:
        """Torch dtype name of each stored output (``bfloat16`` outputs are stored as their int16 bits)."""
        layout = self._group.attrs["layout"] if self._group is not None else []
        return {item["name"]: item["dtype"] for item in layout}

    # -- repairing --------------------------------------------------------------------------
    def _drop(self, *, rows: Any = (), chunks: Any = ()) -> None:
        """Forget damaged data ``rows`` and every row of the damaged data ``chunks``: their tiles leave the
        index and are marked :attr:`damaged`; on disk the index and table are rewritten and the chunk
        files deleted (when this entry may be repaired)."""
        per = self._data.chunks[0]
        rows = [np.asarray(rows, np.int64).reshape(-1)]
        rows += [np.arange(c * per, min((c + 1) * per, len(self._table)), dtype=np.int64) for c in chunks]
        rows = np.unique(np.concatenate(rows))
        hit = np.isin(self._index, rows)
        self.damaged |= hit
        self._index[hit] = -1
        self._table[rows] = -1
        self._save(rows=rows, delete_chunks=list(chunks))

    def _save(self, *, rows: np.ndarray, delete_chunks: list[int] = ()) -> None:
        """Write the repaired index, then the table chunks holding ``rows``, then delete damaged chunks."""
        problem = self._cannot_write()
        if problem is None:
            try:
                self._write_index()
                self._write_table(rows)
                for c in delete_chunks:
                    chunk_file(self.path / DATA, (c, 0)).unlink(missing_ok=True)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. a read-only file system, a directory in the way
                problem = f"could not write it: {_reason(exc)}"
        self.unrepaired = self.unrepaired or problem
        self.writable = False

    def _write_index_quietly(self) -> None:
        """Point the index at rows that were written but not yet indexed (a run stopped in between)."""
        if self._cannot_write() is None:
            try:
                self._write_index()
            except OSError:
                pass

    def _cannot_write(self) -> str | None:
        """None when this process may write the entry now (takes the lock), else why not."""
        if not self.repair:
            return "checking only"
        if not self._lock():
            return self._lock_problem
        return None

    def _write_index(self, tiles: np.ndarray | None = None) -> None:
        """Write the index from memory: all of it, or the chunks holding ``tiles``; always whole chunks,
        so a damaged chunk on disk is replaced without being read."""
        import zarr

        rows, cols = self.grid_shape
        try:
            arr = self._group[INDEX]
            if tuple(arr.shape) != (rows, cols):
                raise ValueError("index shape")
        except Exception:  # noqa: BLE001 - damaged metadata: the index is made again
            group = zarr.open_group(str(self.path), mode="r+")
            arr = _create_index(group, rows, cols)
        if tiles is None:
            arr[...] = self._index
            return
        ch, cw = arr.chunks
        tiles = np.asarray(tiles, np.int64).reshape(-1, 2)
        for i, j in {(int(r) // ch, int(c) // cw) for r, c in tiles}:
            sl = (slice(i * ch, min((i + 1) * ch, rows)), slice(j * cw, min((j + 1) * cw, cols)))
            arr[sl] = self._index[sl]

    def _write_table(self, rows: np.ndarray) -> None:
        """Write the table chunks that hold ``rows``, whole, from memory."""
        for k in np.unique(np.asarray(rows, np.int64) // TABLE_CHUNK).tolist():
            lo, hi = k * TABLE_CHUNK, min((k + 1) * TABLE_CHUNK, len(self._table))
            self._tab[lo:hi] = self._table[lo:hi]

    def _lock(self) -> bool:
        """Take the write lock (once); False when another live process holds it or the folder is read-only."""
        if self._locked:
            return True
        if not self.writable:
            self._lock_problem = self._lock_problem or "not writable in this run"
            return False
        lock = self.path / LOCK
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    if lock_holder_alive(lock):
                        log.info("embedding cache entry %s is being written by another process: not storing", self.path)
                        return self._not_writable("another process is writing it")
                    lock.unlink(missing_ok=True)  # left by a process that died
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(f"{socket.gethostname()} {os.getpid()}\n")
                self._locked = True
                return True
        except OSError as exc:
            return self._not_writable(f"the cache folder is not writable: {_reason(exc)}")
        return self._not_writable("its lock could not be taken")

    def _not_writable(self, why: str) -> bool:
        self.writable, self._lock_problem = False, why
        return False

    # -- writing ----------------------------------------------------------------------------
    def append(self, tile_index: np.ndarray, outputs: dict[str, Any]) -> bool:
        """Store the outputs of the tiles at ``tile_index`` (``(B, 2)``); False when this entry is read-only.

        Order: data rows, then their table entries, then the index, so a crash leaves at worst rows
        the index does not point to (and the next opening adopts them once their checksums match)."""
        self._open_existing()
        if self.unusable or not self._lock():
            return False
        tile_index = np.asarray(tile_index, np.int64).reshape(-1, 2)
        want = self.dtypes
        arrays, dtypes = {}, {}
        for k, v in outputs.items():
            arrays[k], dtypes[k] = to_numpy(v, want.get(k))
        b = len(tile_index)
        if any(a.shape[0] != b for a in arrays.values()):
            raise ValueError("every output needs one row per tile")
        if self._group is None:
            self._create(arrays, dtypes)
        if not self.added:
            self._note_wanted()
        packed = pack_rows(arrays, self._group.attrs["layout"], b)
        start = self._next
        self._grow(start + b)
        self._write_data(start, packed)
        rows = np.arange(start, start + b, dtype=np.int64)
        self._table[rows, 0], self._table[rows, 1] = tile_index[:, 0], tile_index[:, 1]
        self._table[rows, 2] = [row_checksum(r) for r in packed]
        self._write_table(rows)
        self._index[tile_index[:, 0], tile_index[:, 1]] = rows.astype(np.int32)
        self._write_index(tile_index)
        self._next = start + b
        self.added += b
        return True

    def _write_data(self, start: int, packed: np.ndarray) -> None:
        """Write rows from ``start``; a chunk shared with earlier rows that turns out damaged is dropped first."""
        try:
            self._data[start : start + len(packed)] = packed
        except OSError:
            raise
        except Exception as exc:
            per = self._data.chunks[0]
            log.debug("embedding cache %s: rewriting a damaged chunk (%s)", self.path, _reason(exc))
            self._drop(chunks=[start // per, (start + len(packed) - 1) // per])
            if not self.writable:
                raise OSError(self.unrepaired) from exc
            self._data[start : start + len(packed)] = packed

    def _grow(self, n: int) -> None:
        """Make room for ``n`` rows (rows of dropped tiles are not reused, so repairs need more)."""
        cap = self._data.shape[0]
        if n <= cap:
            return
        new = max(n, cap + max(cap // 8, 1))
        self._data.resize((new, self._data.shape[1]))
        self._tab.resize((new, 3))
        self._table = np.concatenate([self._table, np.full((new - cap, 3), -1, np.int64)])

    def _note_wanted(self) -> None:
        """Remember the most tiles a run asked for (``pathfm cache list`` calls fewer stored "partial")."""
        if self.n_tiles > int(self._group.attrs.get("tiles_wanted", 0)):
            self._group.attrs["tiles_wanted"] = self.n_tiles

    def _create(self, arrays: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
        import zarr
        from zarr.codecs import Crc32cCodec

        for name in (INDEX, DATA, TABLE):
            shutil.rmtree(self.path / name, ignore_errors=True)
        group = zarr.open_group(str(self.path), mode="a")
        layout, offset = [], 0
        for name in sorted(arrays):
            a = arrays[name]
            layout.append(
                {
                    "name": name,
                    "dtype": dtypes[name],
                    "storage": a.dtype.str,
                    "shape": list(a.shape[1:]),
                    "offset": offset,
                    "nbytes": int(a[0].nbytes) if len(a) else 0,
                }
            )
            offset += layout[-1]["nbytes"]
        capacity = max(1, self.grid_shape[0] * self.grid_shape[1])  # unwritten chunks take no space
        per_chunk = int(min(256, max(1, CHUNK_BYTES // max(1, offset))))
        data = group.create_array(
            DATA,
            shape=(capacity, offset),
            chunks=(per_chunk, offset),
            dtype="uint8",
            compressors=[Crc32cCodec()],
            overwrite=True,
        )
        tab = group.create_array(
            TABLE,
            shape=(capacity, 3),
            chunks=(TABLE_CHUNK, 3),
            dtype="int64",
            fill_value=-1,
            compressors=[Crc32cCodec()],
            overwrite=True,
        )
        _create_index(group, *self.grid_shape)
        group.attrs.update({"key": self.key, "layout": layout})
        self._group, self._data, self._tab = group, data.with_config({"write_empty_chunks": True}), tab
        self._index, self._next = np.full(self.grid_shape, -1, np.int32), 0
        self._table = np.full((capacity, 3), -1, np.int64)

    def decline(self, reason: str, *, discard: bool) -> None:
        """Store nothing more for this key, now and in later runs (``reason`` says why: storing costs more
        than encoding). ``discard`` deletes what this run stored; the entry keeps the key and the reason,
        so later runs neither store nor time anything (``pathfm cache clear`` forgets it)."""
        import zarr

        self.writable = False
        if not self._locked:
            return
        if discard:
            for child in self.path.iterdir():
                if child.name != LOCK:
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            self._group = self._data = self._tab = self._index = self._table = None
            group = zarr.open_group(str(self.path), mode="a")
            group.attrs.update({"key": self.key, "declined": reason})
        elif self._group is not None:
            self._group.attrs["declined"] = reason

    @property
    def declined(self) -> str | None:
        """Why tiles of this key are not stored (a decision of an earlier run), or None."""
        self._open_existing()
        return self._declined

    @property
    def stored(self) -> int:
        """Tiles stored (and not found damaged)."""
        self._open_existing()
        return 0 if self._index is None else int((self._index >= 0).sum())

    @property
    def wanted(self) -> int:
        """The most tiles a run on this entry asked for (0 when unknown)."""
        return int(self._group.attrs.get("tiles_wanted", 0)) if self._group is not None else 0

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
        try:
            if self.path.exists() and self._group is None and not any(self.path.iterdir()):
                self.path.rmdir()
        except OSError:
            pass

    def __enter__(self) -> CacheEntry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reason(exc: BaseException) -> str:
    """A short one-line description of an exception."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _create_index(group: Any, rows: int, cols: int) -> Any:
    from zarr.codecs import Crc32cCodec

    return group.create_array(
        INDEX,
        shape=(rows, cols),
        chunks=(min(rows, 1024), min(cols, 1024)),
        dtype="int32",
        fill_value=-1,
        compressors=[Crc32cCodec()],
        overwrite=True,
    )


def _read_whole(group: Any, name: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The index, or None when its metadata or a chunk is damaged (or a chunk of it is missing while
    the table says tiles are stored: found by :meth:`CacheEntry._reconcile`)."""
    try:
        arr = group[name]
        if tuple(arr.shape) != tuple(shape):
            return None
        return np.asarray(arr[...], np.int32)
    except Exception:  # noqa: BLE001 - any damage: rebuilt from the table
        return None


def _read_table(tab: Any) -> tuple[np.ndarray, np.ndarray]:
    """The row table, chunk by chunk: ``(table, bad)`` where the rows of damaged chunks read as unused
    (``-1``) and ``bad`` marks them."""
    n = tab.shape[0]
    table = np.full((n, 3), -1, np.int64)
    bad = np.zeros(n, bool)
    for lo in range(0, n, TABLE_CHUNK):
        hi = min(lo + TABLE_CHUNK, n)
        try:
            table[lo:hi] = tab[lo:hi]
        except Exception:  # noqa: BLE001 - checksum mismatch or truncated chunk
            bad[lo:hi] = True
    return table, bad


def _index_from_table(table: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Grid → row from the table: the last row written for a tile wins (a recomputed tile is appended)."""
    index = np.full(grid_shape, -1, np.int32)
    valid = (table[:, 0] >= 0) & (table[:, 0] < grid_shape[0]) & (table[:, 1] >= 0) & (table[:, 1] < grid_shape[1])
    rows = np.nonzero(valid)[0]
    index[table[rows, 0], table[rows, 1]] = rows.astype(np.int32)
    return index
