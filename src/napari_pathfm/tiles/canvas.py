"""Blend overlapping tile outputs band by band on a model-resolution canvas; write level-0 labels.

:class:`BandedCanvas` is the blending canvas of whole-slide segmentation
(:func:`~napari_pathfm.pipelines.segment.segment_slide`): per-class logits of overlapping tiles
are summed with their :class:`~napari_pathfm.tiles.TileBlender` weights in horizontal bands of
the canvas, and a band is normalised, resampled bilinearly to level 0, turned into labels
(argmax) and dropped as soon as no later tile can reach it, so memory stays bounded on any
slide. It knows tiles, weights and arrays, nothing of models or files. Importing this module
does not import torch.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["BAND_BYTES", "BandedCanvas", "first_argmax"]

#: Memory budget of the blending accumulators of one band (float32 sums + weights).
BAND_BYTES = 256 * 2**20
#: Memory budget of one block of level-0 logits while resampling to level 0.
_RESAMPLE_BYTES = 64 * 2**20
_BAND_TILES = 4  # a band's core is at most this many tile sides tall (fewer when memory is short)
_HALO = 1  # model-resolution rows beyond a band's core that bilinear resampling reads


def first_argmax(v: Any) -> tuple[Any, Any]:
    """``(max, argmax as uint8)`` over the first axis of a numpy array or torch tensor (ties: first).

    A loop of element-wise maxima: torch's CPU argmax over a leading axis is slow, and this
    keeps one code path for numpy and torch.
    """
    if isinstance(v, np.ndarray):
        xp, best, arg = np, v[0].copy(), np.zeros(v.shape[1:], np.uint8)
    else:
        import torch

        xp, best, arg = torch, v[0].clone(), torch.zeros(v.shape[1:], dtype=torch.uint8, device=v.device)
    for c in range(1, v.shape[0]):
        arg[v[c] > best] = c
        xp.maximum(best, v[c], out=best)
    return best, arg


class BandedCanvas:
    """Blend tile logits on the model-resolution canvas band by band; write level-0 labels.

    Accumulates ``sum(w * logits)`` and ``sum(w)`` per pixel, each tile weighted with its
    :class:`~napari_pathfm.tiles.TileBlender` profile as on a canvas of the whole slide (tapered
    inside, flat on sides that lie on the canvas edge). With a GPU model the arrays are torch
    tensors on its device, so logits never leave it; on the CPU they are numpy arrays (torch's
    multi-threaded in-place slice updates are slow when the cores are busy with the model).
    Band ``k`` owns canvas rows ``[k*core, (k+1)*core)`` and accumulates ``_HALO`` rows more on
    each side for resampling; it is finished (normalised, resampled to level 0, argmax, written
    to ``store``) as soon as the incoming tiles (row-major, non-decreasing y) can no longer reach it.
    """

    def __init__(
        self,
        grid: Any,
        n_classes: int,
        store: Any,
        device: Any = None,
        *,
        weights: str = "pyramidal",
        on_rows: Callable[[int], None] | None = None,
    ):
        from .blend import TileBlender

        self.k, self.store, self.on_rows = int(n_classes), store, on_rows
        self.device = device  # None: numpy arrays; a torch device: tensors there
        self.hc, self.wc = grid.output_shape
        self.t = t = grid.tile_size
        self.s = float(grid.scale)
        self.h0, self.w0 = grid.level0_shape
        rows = max(1, BAND_BYTES // (self.wc * (self.k + 1) * 4) - 2 * _HALO)
        # Bands of ~4 tile rows at most, so that labels (and the OME-TIFF) stream out while tiles run.
        stream = -(-_BAND_TILES * t // grid.stride) * grid.stride
        self.core = max(grid.stride, min(rows // grid.stride * grid.stride, stream))
        self.bands: dict[int, tuple[int, Any, Any]] = {}
        # On the CPU, finished bands are resampled and written by one background thread (at most
        # one more band waits for it, which keeps the memory bound); in band order, so ``on_rows``
        # hears rows in order. On an accelerator this is cheap and stays in the caller's thread.
        self._pool = None
        self._pending: deque = deque()
        if device is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathfm-bands")
        # Weights depend only on which tile sides lie on the canvas edge: a canvas of at most
        # 3x3 tiles has every case, so it stands in for the whole slide.
        self._proxy = TileBlender((min(self.hc, 3 * t), min(self.wc, 3 * t)), weights=weights)
        self._weights: dict[tuple[bool, ...], Any] = {}
        if self.s != 1.0:
            self.cols = self._lerp_index(np.arange(self.w0, dtype=np.float64), self.wc)

    # numpy on the CPU, torch on an accelerator
    def _asarray(self, a: np.ndarray) -> Any:
        if self.device is None:
            return a
        import torch

        return torch.from_numpy(a).to(self.device)

    def _zeros(self, shape: tuple) -> Any:
        return self._asarray(np.zeros(shape, np.float32)) if self.device is None else self._torch_zeros(shape)

    def _torch_zeros(self, shape: tuple) -> Any:
        import torch

        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _numpy(self, x: Any) -> np.ndarray:
        return x if isinstance(x, np.ndarray) else x.cpu().numpy()

    def _tile_weights(self, y: int, x: int) -> Any:
        t = self.t
        flags = (y <= 0, y + t >= self.hc, x <= 0, x + t >= self.wc)
        if flags not in self._weights:

            def proxy(v: int, n: int, start: bool, end: bool) -> int:
                return v if n < 3 * t else 0 if start else 2 * t if end else t

            py, px = proxy(y, self.hc, *flags[:2]), proxy(x, self.wc, *flags[2:])
            self._weights[flags] = self._asarray(np.asarray(self._proxy.tile_weights(t, t, py, px), np.float32))
        return self._weights[flags]

    def _lerp_index(self, j: np.ndarray, n: int) -> tuple:
        """Bilinear source indices/weights and nearest index of level-0 pixels ``j`` on an ``n``-canvas."""
        u = np.clip((j + 0.5) / self.s - 0.5, 0.0, n - 1.0)
        i0 = np.floor(u).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        near = np.minimum(np.floor((j + 0.5) / self.s).astype(np.int64), n - 1)
        return tuple(self._asarray(a) for a in (i0, i1, (u - i0).astype(np.float32), near))

    def _band(self, k: int) -> tuple[int, Any, Any]:
        if k not in self.bands:
            top = max(0, k * self.core - _HALO)
            bottom = min(self.hc, (k + 1) * self.core + _HALO)
            self.bands[k] = (top, self._zeros((self.k, bottom - top, self.wc)), self._zeros((bottom - top, self.wc)))
        return self.bands[k]

    def add(self, y: int, x: int, logits: Any) -> None:
        """Add one tile's logits ``(K, T, T)`` (numpy, or torch on the device) at canvas ``(y, x)``."""
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()  # raises a background band's error here
        for k in sorted(k for k in self.bands if y >= (k + 1) * self.core + _HALO):
            self._finish(k)
        t = self.t
        w = self._tile_weights(y, x)
        x0, x1 = max(x, 0), min(x + t, self.wc)
        k_lo = max(0, (y - _HALO) // self.core - 1)
        k_hi = min((self.hc - 1) // self.core, (y + t + _HALO) // self.core)
        for k in range(k_lo, k_hi + 1):
            if not (y < (k + 1) * self.core + _HALO and y + t > k * self.core - _HALO):
                continue
            top, acc, wsum = self._band(k)
            y0, y1 = max(y, top), min(y + t, top + wsum.shape[0])
            if y1 <= y0 or x1 <= x0:
                continue
            wt = w[y0 - y : y1 - y, x0 - x : x1 - x]
            acc[:, y0 - top : y1 - top, x0:x1] += logits[:, y0 - y : y1 - y, x0 - x : x1 - x] * wt
            wsum[y0 - top : y1 - top, x0:x1] += wt

    def finish(self) -> None:
        for k in sorted(self.bands):
            self._finish(k)
        while self._pending:
            self._pending.popleft().result()
        self.close()

    def close(self) -> None:
        """Wait for the background band writer and stop it (also after an error or a cancel)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _finish(self, k: int) -> None:
        """Write band ``k``'s level-0 rows, then tell ``on_rows`` how many leading rows are final."""
        band = self.bands.pop(k)
        if self._pool is None:
            return self._finish_band(k, band)
        while len(self._pending) > 1:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._finish_band, k, band))

    def _finish_band(self, k: int, band: tuple) -> None:
        rows = self._write_band(k, band)
        if self.on_rows is not None:
            self.on_rows(rows)

    def _write_band(self, k: int, band: tuple) -> int:
        top, acc, wsum = band
        c0, c1 = k * self.core, min((k + 1) * self.core, self.hc)
        covered = wsum > 0
        if self.s == 1.0:  # level 0 is the canvas: argmax of the weighted sums (sum(w) > 0 changes nothing)
            _, lab = first_argmax(acc[:, c0 - top : c1 - top])
            lab[~covered[c0 - top : c1 - top]] = 0
            self.store[c0:c1] = self._numpy(lab[:, : self.w0])
            return c1
        # Interpolation is linear, so the argmax of interpolated blended logits is the argmax of
        # the interpolated differences to class 0 (class 0 itself being 0): one channel fewer.
        rel = (acc[1:] - acc[:1]) / wsum.clip(min=1e-12)
        del acc
        j0 = max(0, math.ceil(c0 * self.s - 0.5))
        j1 = self.h0 if c1 >= self.hc else min(self.h0, math.ceil(c1 * self.s - 0.5))
        if rel.shape[0] == 1 and isinstance(rel, np.ndarray):  # on an accelerator the general path is cheap
            self._write_two_classes(rel[0], covered, top, j0, j1)
            return j1
        ci0, ci1, ct, cnear = self.cols
        step = max(1, min(1024, _RESAMPLE_BYTES // (4 * rel.shape[0] * max(self.wc, self.w0) * 3)))
        for ja in range(j0, j1, step):
            jb = min(j1, ja + step)
            i0, i1, ty, near = self._lerp_index(np.arange(ja, jb, dtype=np.float64), self.hc)
            rcov = covered[near - top]
            if not bool(rcov.any()):
                continue  # no tile here: the store is already background
            ty = ty[None, :, None]
            rows = rel[:, i0 - top] * (1 - ty) + rel[:, i1 - top] * ty
            vals = rows[:, :, ci0] * (1 - ct) + rows[:, :, ci1] * ct
            best, lab = first_argmax(vals)
            lab += 1
            lab[~(best > 0) | ~rcov[:, cnear]] = 0
            self.store[ja:jb] = self._numpy(lab)
        return j1

    def _write_two_classes(self, rel: Any, covered: Any, top: int, j0: int, j1: int) -> None:
        """Level-0 rows ``[j0, j1)`` of a two-class band: label 1 where the interpolated ``rel``
        (class 1 minus class 0 logits) is > 0 and the nearest canvas pixel is covered.

        The result is exactly what the general path computes, at a fraction of its cost: a level-0
        pixel whose four bilinear sources all lie clearly on one side of 0 (|rel| > 1e-20) has
        that sign whatever the weights (a convex combination of such numbers keeps their sign in
        float32 too), so it is labelled by a nearest-neighbour upsampling of that sign map; only
        pixels next to a class border are interpolated, with the general path's float32
        operations in the same order.
        """
        ci0, ci1, ct, cnear = self.cols
        sign = np.full(rel.shape, 255, np.uint8)
        sign[rel > 1e-20] = 1
        sign[rel < -1e-20] = 0
        # uniform[i, c]: the sign shared by canvas pixels (i, c), (i, c+1), (i+1, c), (i+1, c+1), else 255
        # (neighbours clamped at the canvas edge, as the bilinear indices are; a band's last row
        # has its lower neighbour outside the band unless it is the canvas' last row)
        uniform = sign
        uniform[:, :-1][sign[:, :-1] != sign[:, 1:]] = 255
        uniform[:-1][uniform[:-1] != uniform[1:]] = 255
        if top + rel.shape[0] < self.hc:
            uniform[-1] = 255
        # Mostly borders (e.g. noise): interpolating every pixel is cheaper than picking them out.
        dense = np.count_nonzero(uniform == 255) > uniform.size // 5
        step = max(1, min(1024, _RESAMPLE_BYTES // (4 * max(self.wc, self.w0) * (3 if dense else 1))))
        for ja in range(j0, j1, step):
            jb = min(j1, ja + step)
            i0, i1, ty, near = self._lerp_index(np.arange(ja, jb, dtype=np.float64), self.hc)
            near = near - top
            if not bool(covered[near].any()):
                continue  # no tile here: the store is already background
            lo = int(near[0])
            cov = np.take(covered[lo : int(near[-1]) + 1], cnear, axis=1)[near - lo]
            a0, a1 = i0 - top, i1 - top
            if dense:
                tyc = ty[:, None]
                rows = rel[a0] * (1 - tyc) + rel[a1] * tyc
                vals = rows[:, ci0] * (1 - ct) + rows[:, ci1] * ct
                lab = vals > 0
                lab &= cov
                self.store[ja:jb] = lab.view(np.uint8)
                continue
            lo = int(a0[0])
            lab = np.take(uniform[lo : int(a0[-1]) + 1], ci0, axis=1)[a0 - lo]
            amb = lab == 255
            amb &= cov
            lab &= cov.view(np.uint8)
            rr, cc = np.nonzero(amb)
            if rr.size:
                tyv, r0, r1, c0, c1, ctv = ty[rr], a0[rr], a1[rr], ci0[cc], ci1[cc], ct[cc]
                v0 = rel[r0, c0] * (1 - tyv) + rel[r1, c0] * tyv
                v1 = rel[r0, c1] * (1 - tyv) + rel[r1, c1] * tyv
                lab[rr, cc] = (v0 * (1 - ctv) + v1 * ctv) > 0
            self.store[ja:jb] = lab
