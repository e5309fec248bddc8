"""Frozen-encoder outputs of tile batches, read from the embedding cache or computed and stored.

A model takes part when it has the three methods of the cache protocol:

- ``embedding_spec()`` → a dict with ``name`` (shown by ``pathfm cache list``), ``modules`` (the
  encoder modules, whose weights are hashed into the key, so an entry never outlives the weights
  that made it) and ``config`` (anything else that changes their output, e.g. the input size),
  or ``None`` to opt out;
- ``encode(x)`` → ``{name: (B, ...) tensor}``, the frozen encoder outputs of a preprocessed batch;
- ``decode(x, encoded)`` → what ``forward(x)`` returns, computed from those outputs (``x`` may be
  ``None`` when the rest of the model does not look at pixels, as in Path-SAM2).

Path-SAM2 (segment), SLCA (classify) and the MIL feature extractors implement it; any other
model runs unchanged through ``forward``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ResourceError
from .cache_rows import as_tensor
from .embedding_cache import resolve_cache, weights_sha256

log = logging.getLogger(__name__)

__all__ = ["CachedEncoder", "cache_note", "encoder_key", "stored_batches"]

#: Tiles timed (after the first batch) before deciding whether storing pays off.
MIN_TILES = 8


def encoder_key(spec: dict, preprocess: dict, precision: str | None) -> dict:
    """The encoder part of a cache key: name, config, weights hash, how pixels were normalised, precision."""
    return {
        "name": str(spec["name"]),
        "config": spec.get("config", {}),
        "weights_sha256": weights_sha256(spec["modules"]),
        "preprocess": preprocess,
        "precision": precision or "float32",
    }


class CachedEncoder:
    """Encoder outputs for batches of the tiles of ``grid`` on ``slide`` (see the module docstring).

    Parameters
    ----------
    model : torch.nn.Module
        Anything; only models with the cache protocol use the cache (:attr:`active`).
    slide, grid
        The open slide and the tile grid the run covers (both are part of the key).
    cache : see :func:`~napari_pathfm.tiles.embedding_cache.resolve_cache`
        ``None`` = the default cache, ``False`` = none, a folder or an ``EmbeddingCache``.
    preprocess : dict
        How tiles become the encoder's input (normalisation, resize), part of the key.
    precision : str, optional
        Autocast dtype the encoder runs in (None = float32), part of the key.
    """

    def __init__(
        self, model: Any, slide: Any, grid: Any, *, cache: Any = None, preprocess: dict, precision: str | None = None
    ):
        self.model, self.grid = model, grid
        self.entry = None
        self.rows: np.ndarray | None = None
        self.computed = self.reused = 0
        self.decision: str | None = None
        self._batches, self._timed, self._encode_s, self._store_s = 0, 0, 0.0, 0.0
        self._rows_before = 0
        self._verified = False
        self.slide_name = Path(str(getattr(slide, "path", "") or "slide")).name
        #: One line about damage found and repaired in this run (or why it was not), "" when none.
        self.note = ""
        spec = model.embedding_spec() if hasattr(model, "embedding_spec") and hasattr(model, "decode") else None
        self.protocol = spec is not None
        store = resolve_cache(cache) if spec is not None and len(grid) else None
        if store is not None and getattr(slide, "path", None) is not None and hasattr(slide, "signature"):
            try:
                self.entry = store.open(slide, grid, encoder_key(spec, preprocess, precision))
                self.rows = self.entry.lookup(grid.tile_index)
                self._rows_before = int((self.rows >= 0).sum())
                self.decision = self.entry.declined  # an earlier run found storing slower than encoding
            except OSError as exc:
                self.note = f"embedding cache {store.root} is not usable ({exc}): computing every tile without it"
                log.warning(self.note)
                self.entry, self.rows = None, None

    @property
    def active(self) -> bool:
        """True when the run goes through ``encode``/``decode`` (the model has the protocol)."""
        return self.protocol

    @property
    def all_stored(self) -> bool:
        """Every tile of the grid is in the cache and its stored outputs pass their checks: the run need
        not read a single pixel. Checked once by reading every row (a run without pixels could not
        recompute a tile found damaged later); damaged tiles are dropped, so the answer is then False."""
        if self.rows is None or not len(self.rows) or not bool((self.rows >= 0).all()):
            return False
        if not self._verified:
            self._verified = True
            self._check_rows(np.arange(len(self.rows)), self.entry.verify)
        return bool((self.rows >= 0).all())

    def _check_rows(self, indices: np.ndarray, check) -> Any:
        """Run ``check(rows)`` on the stored rows of ``indices``; tiles it drops as damaged become
        misses (``-1`` in :attr:`rows`). Returns what ``check`` returned."""
        rows = self.rows[indices]
        out = check(rows)
        damaged = self.entry.damaged[self.grid.tile_index[indices, 0], self.grid.tile_index[indices, 1]]
        self.rows[indices[damaged]] = -1
        return out

    def __call__(self, indices: np.ndarray, x: Any, device: Any) -> dict:
        """Encoder outputs ``{name: (B, ...)}`` on ``device`` for the grid tiles ``indices``.

        ``x`` is their preprocessed batch; it may be ``None`` when all of them are stored.
        """
        indices = np.asarray(indices, np.int64)
        if self.entry is None:
            self.computed += len(indices)
            return self.model.encode(x)
        hit = self.rows[indices] >= 0
        cached, ok = ({}, np.zeros(0, bool)) if not hit.any() else self._check_rows(indices[hit], self.entry.read)
        hit[hit] = ok  # rows that failed their checks are computed like misses (and the entry repaired)
        if hit.all():
            self.reused += len(indices)
            dtypes = self.entry.dtypes
            return {k: as_tensor(v, dtypes[k], device) for k, v in cached.items()}
        if x is None:
            raise ResourceError(
                self.entry.path,
                f"the cached tiles of {self.slide_name} changed during the run "
                "(damaged on disk or by another process).",
                "Run the command again: damaged tiles are recomputed.",
            )
        fresh = self._encode(indices, x, hit)
        self.computed += int((~hit).sum())
        if not hit.any():
            return fresh
        self.reused += int(hit.sum())
        return _merge(fresh, cached, self.entry.dtypes, hit, device)

    def _encode(self, indices: np.ndarray, x: Any, hit: np.ndarray) -> dict:
        """Run the encoder on the tiles of the batch that are not ``hit``, store them, time both."""
        import torch

        t0 = time.perf_counter()
        fresh = self.model.encode(x[torch.as_tensor(~hit, device=x.device)] if hit.any() else x)
        if x.device.type == "cuda" and self.entry.writable and self.decision is None:
            torch.cuda.synchronize(x.device)  # time the encoder, not its launch (only until decided)
        t1 = time.perf_counter()
        if self.entry.writable:
            self._store(indices[~hit], fresh)
            self._weigh(t1 - t0, time.perf_counter() - t1, int((~hit).sum()))
        return fresh

    def _weigh(self, encode_s: float, store_s: float, n: int) -> None:
        """Stop storing when writing the outputs costs more than computing them (a fast GPU and a big
        encoder output, e.g. UNI's 1024 x 64 x 64 map): reading them back would not be faster either.
        The first batch (warm-up) is not counted; the decision is made once, after MIN_TILES tiles."""
        self._batches += 1
        if self.entry.cache.always_store:
            self.decision = "stored (always_store)"
        if self._batches == 1 or self.decision is not None:
            return
        self._encode_s, self._store_s, self._timed = self._encode_s + encode_s, self._store_s + store_s, self._timed + n
        if self._timed < MIN_TILES:
            return
        enc, st = 1e3 * self._encode_s / self._timed, 1e3 * self._store_s / self._timed
        if st <= enc:
            self.decision = f"stored: {st:.1f} ms per tile to store, {enc:.1f} ms to encode"
            return
        self.decision = f"not stored: {st:.1f} ms per tile to store, {enc:.1f} ms to encode"
        log.info("embedding cache: %s (cheaper to recompute)", self.decision)
        self.entry.decline(self.decision, discard=self._rows_before == 0)

    def _store(self, indices: np.ndarray, fresh: dict) -> None:
        try:
            self.entry.append(self.grid.tile_index[indices], fresh)
        except OSError as exc:  # a full or read-only disk never fails the run
            log.warning("could not add to the embedding cache %s (%s): not storing this run", self.entry.path, exc)
            self.entry.writable = False

    def damage_note(self) -> str:
        """One line about damage this run found in its entry and what became of it ("" when none)."""
        e = self.entry
        if e is None:
            return self.note
        head = f"embedding cache for {self.slide_name}: "
        if e.unusable:
            return head + f"the entry is unreadable ({e.rebuilt}) and {e.unusable}; computed every tile without it"
        if e.rebuilt:
            return head + f"the entry was unreadable ({e.rebuilt}); rebuilt it, {self.computed} tiles recomputed"
        n = int(e.damaged[self.grid.tile_index[:, 0], self.grid.tile_index[:, 1]].sum()) if len(self.grid) else 0
        if not n and not e.index_fixed:
            return ""
        what = f"{n} damaged tiles recomputed" + (" (damaged index rebuilt)" if e.index_fixed else "")
        if e.unrepaired:
            return head + f"{what}; the entry could not be repaired ({e.unrepaired}), so it was not stored to"
        return head + f"{what} and repaired"

    def summary(self) -> dict:
        """What the cache did in this run (for summaries and logs)."""
        return {
            "cache": str(self.entry.path) if self.entry is not None else None,
            "tiles_encoded": self.computed,
            "tiles_from_cache": self.reused,
            "storing": self.decision,
            "damage": self.note or None,
        }

    def close(self) -> None:
        """Release the entry (lock, last-used stamp, size cap)."""
        note = self.damage_note()
        if note and note != self.note:
            self.note = note
            log.warning(note)
        if self.entry is not None:
            try:
                self.entry.close()
            except OSError as exc:
                log.warning("embedding cache %s: %s", self.entry.path, exc)
            if self.computed or self.reused:
                log.info(
                    "embedding cache: %d tiles encoded, %d read from %s", self.computed, self.reused, self.entry.path
                )

    def __enter__(self) -> CachedEncoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stored_batches(grid: Any, batch_size: int):
    """Batches of ``grid`` positions without pixels (``images`` None), for runs served by the cache alone."""
    from .loader import TileBatch

    tiles = np.asarray(grid.tiles, np.int64).reshape(-1, 2)
    for i in range(0, len(tiles), batch_size):
        idx = np.arange(i, min(i + batch_size, len(tiles)), dtype=np.int64)
        yield TileBatch(idx, tiles[idx], None)


def cache_note(summary: dict | None) -> str:
    """One sentence for a widget's status line about what the cache did in a run, with the damage it found
    and repaired ("" when nothing)."""
    n = int((summary or {}).get("tiles_from_cache") or 0)
    damage = (summary or {}).get("damage") or ""
    text = f"Encoder outputs of {n} tiles read from the embedding cache." if n else ""
    return " ".join(t for t in (text, damage[:1].upper() + damage[1:] + "." if damage else "") if t)


def _merge(fresh: dict, cached: dict, dtypes: dict, hit: np.ndarray, device: Any) -> dict:
    """One batch from freshly encoded outputs (tiles not ``hit``) and stored ones (tiles ``hit``)."""
    import torch

    hit_t = torch.as_tensor(hit, device=device)
    out = {}
    for k, v in fresh.items():
        c = as_tensor(cached[k], dtypes[k], device)
        full = torch.empty((len(hit), *v.shape[1:]), dtype=c.dtype, device=device)
        full[~hit_t] = v.to(device, c.dtype)
        full[hit_t] = c
        out[k] = full
    return out
