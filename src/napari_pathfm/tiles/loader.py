"""Streaming tile reader: decode tiles in background threads ahead of the model.

Decoding JPEG tiles is the bottleneck of CPU-side slide work and releases the
GIL, so a few reader threads keep the model busy. Tiles come out in grid order
(row-major) whatever order the threads finish in. A read error is raised in the
consumer (never replaced by a blank tile); cancelling or abandoning the
iterator stops the threads before it returns.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from ..errors import Cancelled, PathFMError, SlideError
from ..progress import check_cancel, is_cancelled, report
from .grid import TileGrid

__all__ = [
    "Tile",
    "TileBatch",
    "iter_tile_batches",
    "iter_tiles",
    "level_in_memory",
    "native_tile_cache",
    "read_tile",
    "resize_tile",
]

#: Memory a decoded level may take to be held whole (:func:`level_in_memory`), or a few rows of
#: its native tiles (:func:`native_tile_cache`).
LEVEL_CACHE_BYTES = 256 * 2**20


class Tile(NamedTuple):
    """One tile: position in the grid, level-0 (y, x) and pixels (T, T, 3) uint8."""

    index: int
    yx: tuple[int, int]
    image: np.ndarray


class TileBatch(NamedTuple):
    """Consecutive tiles stacked: ``indices`` (B,), ``yx`` (B, 2) level-0, ``images`` (B, T, T, 3)."""

    indices: np.ndarray
    yx: np.ndarray
    images: np.ndarray


def resize_tile(region: np.ndarray, size: int) -> np.ndarray:
    """Resize a square RGB uint8 region to ``size`` x ``size``.

    Shrinking uses area averaging (PIL ``BOX``), which is what a coarser scan
    would record; enlarging (target finer than the scan) uses bilinear.
    """
    if region.shape[0] == size and region.shape[1] == size:
        return region
    shrink = region.shape[0] > size
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    out = Image.fromarray(np.ascontiguousarray(region)).resize((size, size), resample=resample)
    return np.asarray(out)


def read_tile(slide: Any, grid: TileGrid, i: int) -> np.ndarray:
    """Read tile ``i`` of ``grid`` as (tile_size, tile_size, 3) uint8.

    Parts outside the slide come back in the slide's background colour. Any
    failure to decode is raised as :class:`~napari_pathfm.errors.SlideError`
    naming the slide and the tile.
    """
    level, y, x, h, w = grid.read_box(i)
    try:
        region = slide.read(level, y, x, h, w)
    except PathFMError:
        raise
    except Exception as exc:
        y0, x0 = (int(v) for v in grid.tiles[i])
        raise SlideError(
            getattr(slide, "path", "slide"),
            f"tile {i} at level-0 (y={y0}, x={x0}) could not be read: {exc}",
            "The file may be damaged; re-export or rescan the slide.",
        ) from exc
    return resize_tile(np.asarray(region, np.uint8)[..., :3], grid.tile_size)


def iter_tiles(
    slide: Any,
    grid: TileGrid,
    *,
    indices: Sequence[int] | None = None,
    prefetch: int = 8,
    workers: int = 2,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> Iterator[Tile]:
    """Yield the tiles of ``grid`` in order, read ahead by background threads.

    Parameters
    ----------
    slide : Slide
        The slide the grid was made for; its ``read`` must be thread-safe
        (OpenSlide and the tifffile backend are).
    grid : TileGrid
    indices : sequence of int, optional
        Only these tiles, in this order (default: all, in grid order).
    prefetch : int
        How many tiles may be read ahead of the consumer (bounds memory).
    workers : int
        Reader threads; 0 reads in the consumer's thread.
    progress, cancel
        See :mod:`napari_pathfm.progress`; cancel is checked before every tile
        and raises :class:`~napari_pathfm.errors.Cancelled`.

    Yields
    ------
    Tile
        ``(index, (y, x), image)``; unpacks like a 3-tuple.

    Notes
    -----
    The threads are shut down when the iterator is exhausted, raises, or is
    closed (``break`` out of a ``for`` loop drops it; ``contextlib.closing``
    makes that immediate on every Python implementation).
    """
    order = np.arange(len(grid)) if indices is None else np.asarray(indices, np.int64)
    total = int(order.size)

    def make(i: int) -> Tile:
        y, x = grid.tiles[i]
        return Tile(int(i), (int(y), int(x)), read_tile(slide, grid, int(i)))

    if workers <= 0:
        for n, i in enumerate(order):
            check_cancel(cancel, "tile reading")
            tile = make(i)
            report(progress, n + 1, total, "reading tiles")
            yield tile
        return

    def job(i: int) -> Tile | None:
        if is_cancelled(cancel):
            return None
        return make(i)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pathfm-tiles")
    pending: deque[Future] = deque()
    it = iter(order)
    try:
        for i in it:
            pending.append(pool.submit(job, int(i)))
            if len(pending) >= max(1, prefetch):
                break
        n = 0
        while pending:
            check_cancel(cancel, "tile reading")
            tile = pending.popleft().result()
            check_cancel(cancel, "tile reading")
            if tile is None:  # a worker saw the cancel flag, even if it was cleared since
                raise Cancelled("tile reading cancelled by the user")
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(job, int(nxt)))
            n += 1
            report(progress, n, total, "reading tiles")
            yield tile
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def iter_tile_batches(
    slide: Any,
    grid: TileGrid,
    batch_size: int = 32,
    **kwargs: Any,
) -> Iterator[TileBatch]:
    """Like :func:`iter_tiles` but yields :class:`TileBatch` of up to ``batch_size`` tiles.

    The last batch may be smaller. Keyword arguments go to :func:`iter_tiles`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    gen = iter_tiles(slide, grid, **kwargs)
    try:
        buf: list[Tile] = []
        for tile in gen:
            buf.append(tile)
            if len(buf) == batch_size:
                yield _stack(buf)
                buf = []
        if buf:
            yield _stack(buf)
    finally:
        gen.close()


def _stack(tiles: list[Tile]) -> TileBatch:
    return TileBatch(
        np.array([t.index for t in tiles], np.int64),
        np.array([t.yx for t in tiles], np.int64).reshape(-1, 2),
        np.stack([t.image for t in tiles]),
    )


class _LevelView:
    """A slide whose reads of one level are served by ``_region``; everything else is the slide's."""

    def __init__(self, slide: Any, level: int):
        self._slide, self._level = slide, int(level)
        self._shape = tuple(slide.level_shapes[level])
        self._background = np.asarray(getattr(slide, "background", (255, 255, 255)), np.uint8)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._slide, name)

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        if level != self._level:
            return self._slide.read(level, y, x, h, w)
        y, x, h, w = int(y), int(x), int(h), int(w)
        H, W = self._shape
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        out = np.empty((h, w, 3), np.uint8)
        if (y0, x0, y1, x1) != (y, x, y + h, x + w):
            out[...] = self._background  # outside the level, as the backends fill it
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._region(y0, x0, y1 - y0, x1 - x0)
        return out

    def _region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        raise NotImplementedError


class _MemoryLevel(_LevelView):
    def __init__(self, slide: Any, level: int, pixels: np.ndarray):
        super().__init__(slide, level)
        self.pixels = pixels

    def _region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.pixels[y : y + h, x : x + w]


class _TileCachedLevel(_LevelView):
    def __init__(self, slide: Any, level: int, max_bytes: int):
        from ..io._levels import TileCache, TiledReader

        super().__init__(slide, level)

        def read(y: int, x: int, h: int, w: int) -> np.ndarray:
            return slide.read(level, y, x, h, w)

        self._reader = TiledReader(read, self._shape, tuple(slide.tile_sizes[level]), TileCache(max_bytes), level)

    def _region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self._reader(y, x, h, w)


def level_in_memory(
    slide: Any, level: int, *, workers: int = 2, max_bytes: int = LEVEL_CACHE_BYTES, cancel: Any = None
) -> Any:
    """``slide`` with ``level`` decoded once, whole, into memory (in strips, by ``workers`` threads).

    For slides whose level is read more than once, e.g. a one-level slide where the tissue mask and
    the tiles both read level 0: every later read of that level is a copy. Reads return exactly the
    pixels ``slide.read`` returns. A level larger than ``max_bytes`` is not loaded (``slide`` is
    returned as it is).
    """
    h, w = slide.level_shapes[level]
    if h * w * 3 > max_bytes:
        return slide
    pixels = np.empty((h, w, 3), np.uint8)
    rows = max(64, -(-h // max(1, 4 * workers)))

    def strip(y: int) -> None:
        check_cancel(cancel, "reading the slide")
        pixels[y : y + rows] = slide.read(level, y, 0, min(rows, h - y), w)

    if workers <= 1:
        for y in range(0, h, rows):
            strip(y)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pathfm-level") as pool:
            for f in [pool.submit(strip, y) for y in range(0, h, rows)]:
                f.result()
    return _MemoryLevel(slide, level, pixels)


def native_tile_cache(slide: Any, grid: TileGrid, *, max_bytes: int = LEVEL_CACHE_BYTES) -> Any:
    """``slide`` with reads of the grid's level served from whole native tiles decoded once.

    Overlapping tiles (and tiles that do not line up with the file's own tiles) otherwise decode
    the same native tiles again and again. Used for the tifffile backend, whose region reads
    decode whole native tiles; the LRU holds a few rows of native tiles across the level (the grid
    is read row by row), at most ``max_bytes``. Without room for them, ``slide`` is returned.
    """
    tiled = getattr(getattr(slide, "_backend", None), "native_tiled", None)  # tifffile backend only
    if getattr(slide, "backend", None) != "tifffile" or not tiled or not tiled[grid.level]:
        return slide
    th, tw = slide.tile_sizes[grid.level]
    width = slide.level_shapes[grid.level][1]
    need = (-(-grid.read_size // th) + 2) * th * (-(-width // tw) * tw) * 3
    if need > max_bytes:
        return slide
    return _TileCachedLevel(slide, grid.level, need)
