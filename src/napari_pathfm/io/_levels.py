"""Lazy per-level array views that dask can chunk on a slide's native tiles.

A :class:`RegionArray` looks like a read-only numpy array of shape (Y, X, 3)
uint8 to ``dask.array.from_array``; slicing it calls the backend's region reader
for exactly the requested window, so dask reads one native tile per chunk and
napari only touches the tiles it shows.
"""

from __future__ import annotations

from typing import Callable

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
