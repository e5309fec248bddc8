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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache_entry import FORMAT, INDEX, LOCK, USED, CacheEntry, lock_holder_alive

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "CacheEntry",
    "EmbeddingCache",
    "EntryInfo",
    "default_cache_dir",
    "resolve_cache",
    "weights_sha256",
]

PathLike = str | Path


def default_cache_dir() -> Path:
    """``$PATHFM_CACHE_DIR``, or ``~/.napari-pathfm/cache`` beside the models folder."""
    env = os.environ.get("PATHFM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".napari-pathfm" / "cache"


def _max_bytes() -> int:
    return int(float(os.environ.get("PATHFM_CACHE_MAX_GB", "50")) * (1 << 30))


def resolve_cache(cache: Any = None) -> EmbeddingCache | None:
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
        "level": int(grid.level),
        "level_downsample": float(grid.level_downsample),
        "read_size": int(grid.read_size),
        "tile_size": int(grid.tile_size),
        "overlap": int(grid.overlap),
        "grid_shape": [int(v) for v in grid.grid_shape],
        "target_mpp": None if grid.target_mpp is None else float(grid.target_mpp),
        "mpp": None if grid.mpp is None else round(float(grid.mpp), 9),
    }


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
    """One stored entry, as ``pathfm cache list`` and ``pathfm cache verify`` show it.

    ``health`` is one of ``healthy`` (every row read and checked), ``unverified`` (index, row table
    and chunk files are in order; the data were not read), ``damaged`` (``damaged`` tiles failed their
    checks), ``repaired`` (damage found and fixed: damaged tiles dropped, to be recomputed by the next
    run; or an unreadable entry removed), ``partial`` (fewer tiles stored than a run asked for),
    ``declined`` (storing was slower than encoding), ``unreadable`` (its metadata cannot be read) or
    ``old format`` (made by an older version; never used). ``stale``: its slide changed or is gone.
    """

    path: Path
    slide: str
    encoder: str
    tiles: int
    bytes: int
    last_used: float
    stale: bool
    declined: str | None = None
    health: str = "unverified"
    damaged: int = 0
    wanted: int = 0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        """False while damage remains (damaged, unreadable)."""
        return self.health not in ("damaged", "unreadable")

    def status(self) -> str:
        """One phrase: the health with its counts and reasons (``damaged (12 tiles)``)."""
        text = self.health
        if self.health in ("damaged", "repaired") and self.damaged:
            text += f" ({self.damaged} tiles)"
        elif self.health == "partial":
            text += f" ({self.tiles} of {self.wanted} tiles)"
        if self.problem:
            text += f": {self.problem}"
        return text

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "slide": self.slide,
            "encoder": self.encoder,
            "tiles": self.tiles,
            "bytes": self.bytes,
            "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_used)),
            "stale": self.stale,
            "declined": self.declined,
            "health": self.health,
            "damaged": self.damaged,
            "wanted": self.wanted,
            "problem": self.problem,
        }


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

    def __init__(self, root: PathLike | None = None, max_bytes: int | None = None, always_store: bool = False):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_bytes = _max_bytes() if max_bytes is None else int(max_bytes)
        self.always_store = bool(always_store)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.root)!r})"

    def open(self, slide: Any, grid: Any, encoder: dict) -> CacheEntry:
        """The entry of ``slide`` tiled as ``grid`` for ``encoder`` (a JSON-able description that
        includes its weights hash); created on the first :meth:`CacheEntry.append`."""
        sig = slide.signature()
        key = {
            "format": FORMAT,
            "slide": {
                "path": sig.path,
                "size": sig.size,
                "mtime_ns": sig.mtime_ns,
                "level_shapes": [list(s) for s in sig.level_shapes],
            },
            "encoder": encoder,
            "tiles": grid_key(grid),
        }
        folder = self.root / f"{_safe(Path(sig.path).stem)}-{sig.key()}"
        path = folder / f"{_safe(str(encoder.get('name', 'encoder')))}-{_hash(key)}.zarr"
        return CacheEntry(self, path, key, tuple(int(v) for v in grid.grid_shape), n_tiles=len(grid))

    # -- housekeeping -----------------------------------------------------------------------
    def entries(self, *, check: bool = True) -> list[EntryInfo]:
        """Every entry in the cache, most recently used first.

        ``check`` opens each entry for a cheap structural check (index, row table, data chunk files
        present at their full size) and sets its health; without it only the attributes are read."""
        out = []
        for path in sorted(self.root.glob("*/*.zarr")) if self.root.is_dir() else []:
            out.append(self.inspect(path) if check else _quick_info(path))
        return sorted(out, key=lambda e: -e.last_used)

    def inspect(self, path: Path, *, full: bool = False, repair: bool = False) -> EntryInfo:
        """The health of the entry at ``path``: a structural check, or with ``full`` every row read and
        checked; ``repair`` drops damaged tiles (the next run recomputes them) and removes entries that
        are unreadable or of an old format."""
        info = _quick_info(path)
        if info.health in ("unreadable", "old format"):
            if repair and _remove_entry(path):
                info.problem, info.health = f"removed ({info.health})", "repaired"
            return info
        attrs = _read_attrs(path)
        key = attrs["key"]
        grid_shape = tuple(int(v) for v in key["tiles"]["grid_shape"])
        entry = CacheEntry(self, path, key, grid_shape, repair=repair)
        try:
            entry.verify() if full else entry.lookup(np.zeros((0, 2), np.int64))
        finally:
            entry.close()
        return _health(info, entry, full=full, repair=repair)

    def clear(self, slide: PathLike | None = None, *, stale_only: bool = False) -> list[EntryInfo]:
        """Delete entries: all of them, those of one ``slide`` file, or those whose slide changed or is gone."""
        target = str(Path(slide).expanduser().resolve()) if slide is not None else None
        removed = []
        for e in self.entries(check=False):
            if (target is None or e.slide == target) and (not stale_only or e.stale) and _remove_entry(e.path):
                removed.append(e)
        return removed

    def trim(self, keep: Path | None = None) -> list[EntryInfo]:
        """Delete least recently used entries (never ``keep``) until the cache fits :attr:`max_bytes`."""
        entries = self.entries(check=False)
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


def _read_attrs(path: Path, any_format: bool = False) -> dict | None:
    """The attributes of an entry's group (its ``key``, ``layout``, ``declined``); None if it is not one
    (of this :data:`FORMAT`, unless ``any_format``)."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        key = attrs.get("key")
        ok = isinstance(key, dict) and (any_format or (key.get("format") == FORMAT and _key_complete(key)))
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if ok else None


def _key_complete(key: dict) -> bool:
    """The key has what listing and checking an entry need (slide path, encoder, grid shape)."""
    try:
        return (
            len([int(v) for v in key["tiles"]["grid_shape"]]) == 2
            and isinstance(key["slide"]["path"], str)
            and isinstance(key["encoder"], dict)
        )
    except (KeyError, TypeError, ValueError):
        return False


def _quick_info(path: Path) -> EntryInfo:
    """What the attributes alone say about an entry (tiles counted from its index when readable)."""
    attrs = _read_attrs(path)
    common = {"path": path, "bytes": _dir_bytes(path), "last_used": _last_used(path)}
    if attrs is None:
        old = _read_attrs(path, any_format=True)
        if old is not None:
            key = old["key"]
            slide = key.get("slide") if isinstance(key.get("slide"), dict) else {}
            return EntryInfo(
                slide=str(slide.get("path", path.parent.name)),
                encoder=str(path.stem.rsplit("-", 1)[0]),
                tiles=0,
                stale=_is_stale(slide),
                health="old format",
                problem=f"{key.get('format')}, never used",
                **common,
            )
        return EntryInfo(
            slide=path.parent.name,
            encoder=str(path.stem.rsplit("-", 1)[0]),
            tiles=0,
            stale=False,
            health="unreadable",
            problem="its zarr.json cannot be read",
            **common,
        )
    key = attrs["key"]
    slide = key["slide"]
    return EntryInfo(
        slide=slide["path"],
        encoder=str(key["encoder"].get("name")),
        tiles=_count_tiles(path),
        stale=_is_stale(slide),
        declined=attrs.get("declined"),
        health="declined" if attrs.get("declined") else "unverified",
        **common,
    )


def _health(info: EntryInfo, entry: CacheEntry, *, full: bool, repair: bool) -> EntryInfo:
    """``info`` with the health :meth:`EmbeddingCache.inspect` found in ``entry``."""
    info.tiles, info.wanted, info.bytes = entry.stored, entry.wanted, _dir_bytes(info.path)
    info.damaged = int(entry.damaged.sum())
    if entry.rebuilt is not None:
        done = repair and entry.unusable is None
        info.health, info.problem = (
            ("repaired", f"removed (unreadable: {entry.rebuilt})")
            if done
            else ("unreadable", entry.rebuilt + (f"; {entry.unusable}" if repair and entry.unusable else ""))
        )
        return info
    if info.damaged or entry.index_fixed:
        fixed = repair and entry.unrepaired is None
        info.health = "repaired" if fixed else "damaged"
        what = [("index rebuilt" if fixed else "index damaged")] if entry.index_fixed else []
        if fixed and info.damaged:
            what.append("damaged tiles dropped: the next run recomputes them")
        if not fixed and repair:
            what.append(f"not repaired: {entry.unrepaired}")
        info.problem = "; ".join(what) or None
    elif info.declined and not info.tiles:
        info.health = "declined"
    elif info.wanted and info.tiles < info.wanted:
        info.health = "partial"
    else:
        info.health = "healthy" if full else "unverified"
    return info


def _count_tiles(path: Path) -> int:
    try:
        import zarr

        index = zarr.open_array(str(path / INDEX), mode="r")[...]
        return int((index >= 0).sum())
    except Exception:  # noqa: BLE001 - an entry another process is creating or a damaged one: counted as empty
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
    if lock_holder_alive(path / LOCK):
        return False
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.parent.rmdir()  # the slide's folder, once its last entry is gone
    except OSError:
        pass
    return not path.exists()
