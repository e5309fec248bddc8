"""Lazy per-level array views that dask can chunk on a slide's native tiles.

A :class:`RegionArray` looks like a read-only numpy array of shape (Y, X, 3)
uint8 to ``dask.array.from_array``; slicing it calls the backend's region reader
for exactly the requested window, so dask reads one native tile per chunk and
napari only touches the tiles it shows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RegionReader = Callable[[int, int, int, int], np.ndarray]


def composite_rgba(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Composite non-premultiplied RGBA uint8 onto an opaque background colour.

    Unscanned areas of a slide come back fully transparent; compositing makes them
    the slide's background colour (white by default) instead of black.

    >>> px = np.array([[[10, 20, 30, 0]]], np.uint8)
    >>> composite_rgba(px, (255, 255, 255)).tolist()
    [[[255, 255, 255]]]
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.size and alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    bg = np.asarray(background, dtype=np.uint16)
    out = (rgb.astype(np.uint16) * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class RegionArray:
    """Array-like (height, width, 3) uint8 whose slices are read on demand.

    Parameters
    ----------
    shape : (height, width)
        Size of the level in its own pixels.
    reader : callable
        ``reader(y, x, h, w) -> ndarray (h, w, 3) uint8`` in level pixels.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, shape: tuple[int, int], reader: RegionReader):
        self.shape = (int(shape[0]), int(shape[1]), 3)
        self._reader = reader

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = key
        if not (isinstance(ys, slice) and isinstance(xs, slice)):
            raise TypeError("RegionArray supports slicing only on Y and X")
        y0, y1, ystep = ys.indices(self.shape[0])
        x0, x1, xstep = xs.indices(self.shape[1])
        h, w = max(0, y1 - y0), max(0, x1 - x0)
        if h == 0 or w == 0:
            region = np.empty((h, w, 3), np.uint8)
        else:
            region = self._reader(y0, x0, h, w)
        if ystep != 1 or xstep != 1:
            region = region[::ystep, ::xstep]
        return region[:, :, cs]


class TileCache:
    """Thread-safe LRU cache of decoded native tiles, bounded in bytes.

    Viewing re-reads the same tiles constantly while panning and zooming; keeping
    the decoded, composited RGB tiles avoids decoding them again. The bound keeps
    memory flat however large the slide is.
    """

    def __init__(self, max_bytes: int = 64 * 2**20):
        import threading
        from collections import OrderedDict

        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes


class TiledReader:
    """Region reader that decodes whole native tiles once and serves windows from a :class:`TileCache`.

    Parameters
    ----------
    read : callable
        ``read(y, x, h, w)`` of the level (uncached backend read).
    shape, tile : (height, width)
        Level size and native tile size.
    cache : TileCache
    key : hashable
        Distinguishes this level's tiles in a cache shared by several levels.
    """

    def __init__(self, read: RegionReader, shape: tuple[int, int], tile: tuple[int, int], cache: TileCache, key):
        self._read, self.shape, self.tile, self.cache, self.key = read, shape, tile, cache, key

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        k = (self.key, ty, tx)
        arr = self.cache.get(k)
        if arr is None:
            th, tw = self.tile
            y, x = ty * th, tx * tw
            arr = self._read(y, x, min(th, self.shape[0] - y), min(tw, self.shape[1] - x))
            self.cache.put(k, arr)
        return arr

    def __call__(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        th, tw = self.tile
        ty0, ty1 = y // th, (y + h - 1) // th
        tx0, tx1 = x // tw, (x + w - 1) // tw
        if ty0 == ty1 and tx0 == tx1:
            oy, ox = y - ty0 * th, x - tx0 * tw
            return self._tile(ty0, tx0)[oy : oy + h, ox : ox + w]
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                t = self._tile(ty, tx)
                sy0, sx0 = max(y, ty * th), max(x, tx * tw)
                sy1, sx1 = min(y + h, ty * th + t.shape[0]), min(x + w, tx * tw + t.shape[1])
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = t[
                    sy0 - ty * th : sy1 - ty * th, sx0 - tx * tw : sx1 - tx * tw
                ]
        return out
