"""Blending overlapping tile predictions into one seamless canvas.

Networks are least reliable near the edges of their input, and pasting tiles
side by side leaves visible seams. Tiles are therefore predicted with overlap and
averaged with weights that are largest at the tile centre and small (never zero)
at its border: ``out = sum(w * value) / sum(w)``. Because the weights are a
partition-of-unity after normalisation, a field that every tile agrees on is
reproduced exactly, and tiles that disagree fade into each other.

Segmentation (class logits) and translation (fluorescence channels) share this.
For outputs larger than memory the accumulators live in a zarr 3 directory and
are normalised chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TileBlender", "gaussian_weights", "pyramidal_weights"]

_MIN_GAUSSIAN = 1e-4
_NO_FLAT = (False, False, False, False)


def pyramidal_weights(h: int, w: int) -> np.ndarray:
    """Pyramid-shaped weights as in HASTE: distance to the nearest tile border + 1.

    Normalised to a maximum of 1; the border pixels get ``1 / (max distance + 1)``,
    so every pixel has a strictly positive weight.

    >>> pyramidal_weights(5, 5)[2].round(2).tolist()
    [0.33, 0.67, 1.0, 0.67, 0.33]
    """
    return _pyramidal(int(h), int(w), _NO_FLAT).copy()


@lru_cache(maxsize=64)
def _pyramidal(h: int, w: int, flat: tuple[bool, bool, bool, bool] = _NO_FLAT) -> np.ndarray:
    if h < 1 or w < 1:
        raise ValueError(f"tile shape must be positive, got {(h, w)}")
    dy = _side_distance(h, flat[0], flat[1])
    dx = _side_distance(w, flat[2], flat[3])
    peak = min(_side_distance(h, False, False).max(), _side_distance(w, False, False).max()) + 1.0
    wgt = np.minimum(np.minimum.outer(dy, dx) + 1.0, peak) / peak
    wgt.setflags(write=False)
    return wgt


def _side_distance(n: int, flat_start: bool, flat_end: bool) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    d = np.full(n, np.inf)
    if not flat_start:
        d = np.minimum(d, i)
    if not flat_end:
        d = np.minimum(d, i[::-1])
    return d


def gaussian_weights(h: int, w: int, sigma_scale: float = 1 / 8) -> np.ndarray:
    """Gaussian weights centred on the tile, sigma = ``sigma_scale`` x side (as in nnU-Net).

    Normalised to a maximum of 1 and floored at 1e-4, so corners keep a small
    positive weight and single-tile areas are still defined.
    """
    return _gaussian(int(h), int(w), float(sigma_scale), _NO_FLAT).copy()


@lru_cache(maxsize=64)
def _gaussian(h: int, w: int, sigma_scale: float, flat: tuple[bool, bool, bool, bool] = _NO_FLAT) -> np.ndarray:
    if h < 1 or w < 1:
        raise ValueError(f"tile shape must be positive, got {(h, w)}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
    gy = _gauss_1d(h, sigma_scale, flat[0], flat[1])
    gx = _gauss_1d(w, sigma_scale, flat[2], flat[3])
    wgt = np.maximum(np.outer(gy, gx), _MIN_GAUSSIAN)
    wgt.setflags(write=False)
    return wgt


def _gauss_1d(n: int, sigma_scale: float, flat_start: bool, flat_end: bool) -> np.ndarray:
    centre = (n - 1) / 2
    i = np.arange(n)
    g = np.exp(-0.5 * ((i - centre) / (sigma_scale * n)) ** 2)
    g /= g.max()
    if flat_start:
        g[i <= centre] = 1.0
    if flat_end:
        g[i >= centre] = 1.0
    return g


class TileBlender:
    """Accumulate overlapping tiles with weights, then normalise.

    Parameters
    ----------
    shape : (H, W) or (H, W, C)
        Canvas shape; C channels (e.g. class logits or fluorescence channels).
    dtype : numpy dtype
        Dtype of the accumulators and the result (float32 or float64).
    weights : {"pyramidal", "gaussian"} or ndarray (h, w)
        Weight profile of one tile. An array must match the shape of every tile
        added; weights must be positive.
    store : None, str, Path or zarr.Group
        None keeps the accumulators in memory. A path makes a zarr 3 directory
        (overwritten) holding arrays ``sum`` and ``weight``; use it when the
        canvas does not fit in RAM.
    chunks : (int, int), optional
        Chunk (Y, X) of the zarr arrays and block size of :meth:`result`
        (default 1024 x 1024).
    fill_value : float
        Value of pixels no tile covered (0, or ``np.nan`` to make gaps visible).
    sigma_scale : float
        Gaussian sigma as a fraction of the tile side, for ``weights="gaussian"``.
    flatten_canvas_edges : bool
        Do not taper the sides of a tile that lie on or beyond the canvas edge
        (for the named profiles). Those sides have no neighbour to blend with;
        tapering them would make two tiles overlapping along the canvas edge
        meet with equal weights there, i.e. with a seam.

    Notes
    -----
    ``add`` is not thread-safe: call it from one thread (the consumer of the
    tile loader). Tiles may hang over any canvas edge; the outside part is cut
    off.

    Examples
    --------
    >>> b = TileBlender((4, 6))
    >>> b.add(0, 0, np.ones((4, 4))); b.add(0, 2, np.ones((4, 4)))
    >>> bool(np.allclose(b.result(), 1))
    True
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        dtype: Any = np.float32,
        weights: str | np.ndarray = "pyramidal",
        store: Any = None,
        chunks: Sequence[int] | None = None,
        fill_value: float = 0.0,
        sigma_scale: float = 1 / 8,
        flatten_canvas_edges: bool = True,
    ):
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"shape must be (H, W) or (H, W, C) with positive sizes, got {shape}")
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.fill_value = fill_value
        self.sigma_scale = sigma_scale
        self.flatten_canvas_edges = bool(flatten_canvas_edges)
        if isinstance(weights, str):
            if weights not in ("pyramidal", "gaussian"):
                raise ValueError(f"weights must be 'pyramidal', 'gaussian' or an array, not {weights!r}")
        else:
            weights = np.asarray(weights, np.float64)
            if weights.ndim != 2 or not np.all(weights > 0):
                raise ValueError("a weight array must be 2-D and strictly positive")
        self.weights = weights
        self.chunks = tuple(int(c) for c in (chunks or (1024, 1024)))[:2]
        cshape = self.chunks + shape[2:]
        if store is None:
            self.group = None
            self._sum = np.zeros(shape, self.dtype)
            self._wsum = np.zeros(shape[:2], self.dtype)
        else:
            import zarr

            self.group = store if isinstance(store, zarr.Group) else zarr.open_group(str(Path(store)), mode="w")
            kw = dict(dtype=self.dtype, fill_value=0, compressors=None, overwrite=True)
            self._sum = self.group.create_array("sum", shape=shape, chunks=cshape, **kw)
            self._wsum = self.group.create_array("weight", shape=shape[:2], chunks=self.chunks, **kw)

    @property
    def weight_sum(self) -> Any:
        """Sum of weights per pixel (numpy or zarr array); 0 where no tile landed."""
        return self._wsum

    def tile_weights(self, h: int, w: int, y: int | None = None, x: int | None = None) -> np.ndarray:
        """The weight profile of an (h, w) tile, placed at (y, x) when given."""
        if isinstance(self.weights, np.ndarray):
            if self.weights.shape != (h, w):
                raise ValueError(f"weight array is {self.weights.shape} but the tile is {(h, w)}")
            return self.weights
        flat = _NO_FLAT
        if self.flatten_canvas_edges and y is not None and x is not None:
            H, W = self.shape[:2]
            flat = (y <= 0, y + h >= H, x <= 0, x + w >= W)
        if self.weights == "gaussian":
            return _gaussian(h, w, float(self.sigma_scale), flat)
        return _pyramidal(h, w, flat)

    def add(self, y: int, x: int, values: np.ndarray) -> None:
        """Add one tile whose top-left corner is at canvas (y, x).

        ``values`` is (h, w) or (h, w, C) matching the canvas channels.
        """
        values = np.asarray(values)
        if values.ndim != len(self.shape) or values.shape[2:] != self.shape[2:]:
            raise ValueError(f"tile of shape {values.shape} does not fit a canvas of shape {self.shape}")
        h, w = values.shape[:2]
        y, x = int(y), int(x)
        wgt = self.tile_weights(h, w, y, x)
        H, W = self.shape[:2]
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, H), min(x + w, W)
        if y1 <= y0 or x1 <= x0:
            return
        ty, tx = slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)
        wt = wgt[ty, tx].astype(self.dtype)
        v = values[ty, tx].astype(self.dtype)
        contrib = v * (wt[..., None] if v.ndim == 3 else wt)
        region = (slice(y0, y1), slice(x0, x1))
        if self.group is None:
            self._sum[region] += contrib
            self._wsum[region] += wt
        else:
            self._sum[region] = self._sum[region] + contrib
            self._wsum[region] = self._wsum[region] + wt

    def blocks(self) -> Iterator[tuple[slice, slice]]:
        """(Y, X) slices of the canvas in ``chunks``-sized blocks, row-major."""
        H, W = self.shape[:2]
        cy, cx = self.chunks
        for y in range(0, H, cy):
            for x in range(0, W, cx):
                yield slice(y, min(y + cy, H)), slice(x, min(x + cx, W))

    def _target(self, out: Any, name: str, shape: tuple, dtype: np.dtype, fill: Any) -> Any:
        if out is not None:
            if tuple(out.shape) != shape:
                raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
            return out
        if self.group is None:
            return np.empty(shape, dtype)
        chunks = self.chunks + shape[2:]
        return self.group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill, overwrite=True)

    def result(self, out: Any = None) -> Any:
        """Blended canvas: ``sum(w * value) / sum(w)``, ``fill_value`` where nothing landed.

        Computed block by block; with a zarr store the result is the zarr array
        ``result`` in the same group (or ``out``), so memory stays at one chunk.
        """
        out = self._target(out, "result", self.shape, self.dtype, self.fill_value)
        for by, bx in self.blocks():
            s = np.asarray(self._sum[by, bx], self.dtype)
            wsum = np.asarray(self._wsum[by, bx], self.dtype)
            covered = wsum > 0
            if s.ndim == 3:
                wsum, covered = wsum[..., None], covered[..., None]
            with np.errstate(invalid="ignore", divide="ignore"):
                block = np.where(covered, s / np.where(covered, wsum, 1), self.fill_value)
            out[by, bx] = block.astype(out.dtype, copy=False)
        return out

    def argmax_result(self, out: Any = None) -> Any:
        """Label image from class scores: index of the largest blended channel.

        Pixels no tile covered get label 0. Labels are uint8 for up to 256 classes,
        else uint16.
        """
        if len(self.shape) != 3:
            raise ValueError("argmax_result needs a canvas with a channel axis (H, W, C)")
        dtype = np.dtype(np.uint8 if self.shape[2] <= 256 else np.uint16)
        out = self._target(out, "labels", self.shape[:2], dtype, 0)
        for by, bx in self.blocks():
            s = np.asarray(self._sum[by, bx])
            covered = np.asarray(self._wsum[by, bx]) > 0
            out[by, bx] = np.where(covered, np.argmax(s, axis=-1), 0).astype(dtype)
        return out
