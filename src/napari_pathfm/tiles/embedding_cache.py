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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from .cache_entry import INDEX, LOCK, USED, CacheEntry, lock_holder_alive

log = logging.getLogger(__name__)

__all__ = ["EmbeddingCache", "CacheEntry", "EntryInfo", "resolve_cache", "weights_sha256", "default_cache_dir"]

FORMAT = "pathfm-tile-embeddings/1"

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
    declined: Optional[str] = None

    def as_dict(self) -> dict:
        return {"path": str(self.path), "slide": self.slide, "encoder": self.encoder, "tiles": self.tiles,
                "bytes": self.bytes, "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_used)),
                "stale": self.stale, "declined": self.declined}  # fmt: skip


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
            attrs = _read_attrs(path)
            if attrs is None:
                continue
            key = attrs["key"]
            slide = key["slide"]
            out.append(EntryInfo(
                path=path, slide=slide["path"], encoder=str(key["encoder"].get("name")), tiles=_count_tiles(path),
                bytes=_dir_bytes(path), last_used=_last_used(path), stale=_is_stale(slide),
                declined=attrs.get("declined"),
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


def _read_attrs(path: Path) -> Optional[dict]:
    """The attributes of an entry's group (its ``key``, ``layout``, ``declined``); None if it is not one."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    key = attrs.get("key")
    return attrs if isinstance(key, dict) and key.get("format") == FORMAT else None


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
    if lock_holder_alive(path / LOCK):
        return False
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.parent.rmdir()  # the slide's folder, once its last entry is gone
    except OSError:
        pass
    return not path.exists()
