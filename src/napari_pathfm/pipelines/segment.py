"""Whole-slide semantic segmentation: tissue tiles → model → blended logits → class map at level 0.

:func:`segment_slide` runs a segmentation model (``create_model("pathsam2", ...)`` or any module
with the same contract) over a slide or a plain image and returns the class map at the input's
level-0 size (uint8, 0 = background), placed with the slide's µm/px:

1. Tissue mask at low resolution and a tile grid at the model's µm/px with overlap
   (:mod:`napari_pathfm.tiles`); only tiles that touch tissue are run, the rest is background.
2. Tiles are decoded by the prefetching loader in background threads while the model runs.
3. Per-class logits of overlapping tiles are blended with pyramidal weights
   (:class:`~napari_pathfm.tiles.TileBlender`), so there are no seams at tile borders.
4. The blended logits are resampled bilinearly from the model's µm/px to level 0 and the
   class map is their argmax.

Memory stays bounded on any slide: logits are blended in horizontal bands of the model-resolution
canvas (each band holds the tiles that reach into it, plus a margin so that tiles keep exactly
the weights they would have on the full canvas), and a band is turned into level-0 labels and
dropped as soon as no later tile can reach it. The level-0 class map lives in memory for slides up
to :data:`IN_MEMORY_PIXELS` and in a compressed temporary zarr array beyond. Results are written
as a pyramidal OME-TIFF (class names in its metadata) and optionally QuPath GeoJSON, both
atomically: a cancel or an error leaves no file behind. Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import Cancelled, CheckpointError, OutputError, SlideError
from ..io.scratch import scratch_dir
from ..progress import check_cancel, report

__all__ = [
    "SegmentationResult", "segment_slide", "default_segment_checkpoint", "load_segmentation_model",
    "IN_MEMORY_PIXELS", "BAND_BYTES",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Level-0 class maps up to this many pixels are kept in memory; larger ones in a temporary zarr.
IN_MEMORY_PIXELS = 256 * 2**20
#: Memory budget of the blending accumulators of one band (float32 sums + weights).
BAND_BYTES = 256 * 2**20
#: Memory budget of one block of level-0 logits while resampling to level 0.
_RESAMPLE_BYTES = 64 * 2**20
#: GeoJSON is traced on the class map downsampled by 2 until it has at most this many pixels.
GEOJSON_MAX_PIXELS = 64 * 2**20
_BAND_TILES = 4  # a band's core is at most this many tile sides tall (fewer when memory is short)
_HALO = 1  # model-resolution rows beyond a band's core that bilinear resampling reads

PathLike = Union[str, Path]


@dataclass
class SegmentationResult:
    """A slide's class map and where it sits.

    Attributes
    ----------
    labels : ndarray (H, W) uint8, or a zarr/dask array for large slides
        Class per level-0 pixel of the input; 0 = background (and everything outside tissue).
    classes : list of str
        Class names indexed by label value (``classes[0]`` is the background).
    mpp : float or None
        µm per pixel of ``labels`` (the input's level 0), None when the input does not say.
    model_mpp : float or None
        µm per pixel the model actually saw.
    grid : TileGrid
        The tiles that were run (model-resolution geometry, level-0 positions).
    tissue : TissueMask or None
        The tissue mask used to choose tiles (None with ``tissue_only=False``).
    messages : list of str
        Things the user should know (no tissue found, resolution fallback, ...), ``notes`` first.
    notes : list of str
        What the model is and how far the run is from its training domain
        (:func:`~napari_pathfm.pipelines.notes.model_notes`): a bundled demonstration model, µm/px
        far from or unknown to the card's. Also in the written files' metadata.
    written : dict of str to Path
        Files written (``"mask"``, ``"geojson"``).
    cache : dict
        What the tile-embedding cache did: its entry, tiles encoded, tiles read from it.
    """

    labels: Any
    classes: list[str]
    mpp: Optional[float]
    model_mpp: Optional[float]
    grid: Any
    tissue: Any = None
    source: Optional[str] = None
    checkpoint: Optional[str] = None
    messages: list[str] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _tmp: Any = field(default=None, repr=False)

    @property
    def n_tiles(self) -> int:
        return len(self.grid)

    @property
    def empty(self) -> bool:
        """True when no tile was run (no tissue found): the class map is all background."""
        return self.n_tiles == 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.labels.shape[:2])  # type: ignore[return-value]

    def class_names(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    def layer_kwargs(self) -> dict:
        """Keyword arguments for ``viewer.add_labels(result.labels, **kw)``: scale, translate, units
        and metadata (class names, downsample 1) so the mask overlays the slide layer."""
        from ..coords import layer_transform, layer_units

        scale, translate = layer_transform(self.mpp, 1.0)
        return {
            "name": "segmentation",
            "scale": scale,
            "translate": translate,
            "units": layer_units(self.mpp),
            "metadata": {"pathfm_kind": "segment", "classes": self.class_names(), "downsample": 1.0,
                         "source": self.source, "checkpoint": self.checkpoint, "model_mpp": self.model_mpp,
                         "pathfm_notes": list(self.notes)},
        }  # fmt: skip

    def summary(self) -> dict:
        return {
            "input": self.source,
            "checkpoint": self.checkpoint,
            "notes": self.notes,
            "shape": list(self.shape),
            "mpp": self.mpp,
            "model_mpp": self.model_mpp,
            "classes": self.classes,
            "tiles": self.n_tiles,
            "messages": self.messages,
            "written": {k: str(v) for k, v in self.written.items()},
            "cache": self.cache,
        }

    def close(self) -> None:
        """Delete the temporary store of a large class map (a no-op for in-memory results)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# -- model -------------------------------------------------------------------------------------


def default_segment_checkpoint() -> Path:
    """The checkpoint ``pathfm segment`` uses without ``--checkpoint``.

    The first checkpoint of family ``"segment"`` found by
    :func:`napari_pathfm.checkpoints.find_checkpoints`, preferring the bundled
    ``pathsam2-glas-*`` model, then other bundled ones, then the user's model folder.

    Raises
    ------
    CheckpointError
        No segmentation checkpoint is installed; the message says how to get one.
    """
    from ..checkpoints import BUNDLED_MODELS, find_checkpoints, user_models_dir

    found = find_checkpoints("segment")

    def rank(item: tuple[Path, dict]) -> tuple[int, int]:
        path = item[0]
        bundled = path.parent.resolve() == BUNDLED_MODELS.resolve()
        return (0 if bundled else 1, 0 if path.name.startswith("pathsam2-glas") else 1)

    if not found:
        raise CheckpointError(
            BUNDLED_MODELS,
            "holds no segmentation model, and none was found in "
            f"{user_models_dir()} either.",
            "Pass a checkpoint with --checkpoint (a .safetensors + .json pair of family 'segment'), "
            "train one with `pathfm train training/pathsam2/<recipe>.yaml`, or copy one into the user "
            "model folder (set PATHFM_MODELS to use another folder).",
        )
    return min(found, key=rank)[0]


def load_segmentation_model(model_or_checkpoint: Any = None, device: str = "cpu") -> tuple[Any, dict, Optional[str]]:
    """``(model, card, source)`` from a checkpoint path, a ``(model, card)`` pair or a module.

    ``None`` loads :func:`default_segment_checkpoint`. A checkpoint of another family, or a card
    whose class list does not match the model's number of outputs, is a
    :class:`~napari_pathfm.errors.CheckpointError`.
    """
    if model_or_checkpoint is None:
        model_or_checkpoint = default_segment_checkpoint()
    if isinstance(model_or_checkpoint, (str, Path)):
        from ..models.checkpoint import load_family_checkpoint

        source = str(model_or_checkpoint)
        model, card = load_family_checkpoint(model_or_checkpoint, "segment", device=device)
    elif isinstance(model_or_checkpoint, tuple):
        model, card = model_or_checkpoint
        source = card.get("weights_file")
    else:
        model, card, source = model_or_checkpoint, dict(getattr(model_or_checkpoint, "pathfm_card", None) or {}), None
    k = getattr(model, "num_classes", None)
    names = card.get("classes")
    if names is not None and k is not None and len(names) != int(k):
        raise CheckpointError(
            source or "the model card", f"lists {len(names)} classes ({', '.join(map(str, names))}) but the model "
            f"predicts {int(k)}.", "Use the card that was saved with these weights, or fix its 'classes'.",
        )  # fmt: skip
    return model, dict(card), source


def _class_names(card: dict, k: Optional[int]) -> Optional[list[str]]:
    names = card.get("classes")
    if names:
        return [str(n) for n in names]
    if k is None:
        return None
    return ["background"] + [f"class {i}" for i in range(1, int(k))]


# -- blending in bands -------------------------------------------------------------------------


def _first_argmax(v: Any) -> tuple[Any, Any]:
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


class _BandedCanvas:
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

    def __init__(self, grid: Any, n_classes: int, store: Any, device: Any = None, *, weights: str = "pyramidal",
                 on_rows: Optional[Callable[[int], None]] = None):  # fmt: skip
        from ..tiles import TileBlender

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
            from concurrent.futures import ThreadPoolExecutor

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
            _, lab = _first_argmax(acc[:, c0 - top : c1 - top])
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
            best, lab = _first_argmax(vals)
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


# -- the pipeline ------------------------------------------------------------------------------


def _tile_logits(model: Any, batch: Any, dev: str, t: int, k: Optional[int], source: Any, encoder: Any = None):
    """Model logits of a batch of uint8 tiles as ``(B, K, T, T)`` float32 torch on ``dev``.

    With an active :class:`~napari_pathfm.tiles.cached_encoder.CachedEncoder` the encoder outputs come
    from the embedding cache where stored (``batch.images`` is None when all of them are).
    """
    import torch
    import torch.nn.functional as F

    x = None if batch.images is None else model.preprocess(torch.from_numpy(batch.images).to(dev)).to(dev)
    if encoder is not None and encoder.active:
        out = model.decode(x, encoder(batch.indices, x, dev))
    else:
        out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out
    if logits.ndim != 4 or (k is not None and logits.shape[1] != k):
        raise CheckpointError(
            source or "the model", f"produced logits of shape {tuple(logits.shape)}, expected {k} classes "
            "(B, K, H, W) as its model card says.", "Use the card saved with these weights.",
        )  # fmt: skip
    logits = logits.float()
    if tuple(logits.shape[-2:]) != (t, t):
        logits = F.interpolate(logits, size=(t, t), mode="bilinear", align_corners=False)
    return logits


def _label_store(shape: tuple[int, int], tmp: Optional[Path]) -> Any:
    if shape[0] * shape[1] <= IN_MEMORY_PIXELS or tmp is None:
        return np.zeros(shape, np.uint8)
    import zarr

    return zarr.create_array(store=str(tmp / "labels.zarr"), shape=shape, dtype=np.uint8,
                             chunks=(512, 4096), fill_value=0)  # fmt: skip


def _resolve_mpp(slide: Any, mpp: Optional[float], card: dict, messages: list[str]) -> Optional[float]:
    target = mpp if mpp is not None else card.get("input_mpp")
    if target is None or slide.mpp is not None:
        return None if target is None else float(target)
    if mpp is not None:
        raise SlideError(
            slide.path, f"has no pixel size (µm/px) in its metadata, so it cannot be segmented at {mpp} µm/px.",
            "Give the image's µm/px (image_mpp / --image-mpp), or leave out mpp to segment it at its own resolution.",
        )  # fmt: skip
    # the card's µm/px is not reached: model_notes says so ("has no pixel size (µm/px unknown) ...")
    return None


def _tile_geometry(model: Any, card: dict, tile_size: Optional[int], overlap: float) -> tuple[int, int]:
    t = int(tile_size or card.get("tile_size") or getattr(model, "input_size", 0) or 256)
    if t < 16:
        raise ValueError(f"tile_size must be at least 16 pixels, got {t}")
    px = int(round(overlap * t)) if 0 <= overlap < 1 else int(overlap)
    if not 0 <= px < t:
        raise ValueError(f"overlap must be a fraction in [0, 1) or a pixel count below the tile size, got {overlap}")
    return t, px


def _check_suffix(path: Optional[PathLike], suffixes: tuple[str, ...], what: str) -> Optional[Path]:
    if path is None:
        return None
    path = Path(path)
    if not path.name.lower().endswith(suffixes):
        raise OutputError(path, f"the {what} must end in {' or '.join(suffixes)}.", "Change the file name.")
    return path


def segment_slide(
    slide_or_image: Any,
    model_or_checkpoint: Any = None,
    *,
    mpp: Optional[float] = None,
    image_mpp: Optional[float] = None,
    tile_size: Optional[int] = None,
    overlap: float = 0.25,
    tissue_only: bool = True,
    min_tissue: float = 0.0,
    batch_size: int = 8,
    device: str = "auto",
    weights: str = "pyramidal",
    workers: Optional[int] = None,
    progress: Optional[Callable[..., Any]] = None,
    cancel: Any = None,
    out: Optional[PathLike] = None,
    geojson: Optional[PathLike] = None,
    cache: Any = None,
) -> SegmentationResult:
    """Segment a whole slide (or a plain image) into classes at the input's level-0 size.

    Parameters
    ----------
    slide_or_image : Slide or path
        From :func:`napari_pathfm.io.open_slide` (any slide, OME-TIFF, TIFF, PNG/JPEG); a path
        is opened and closed here.
    model_or_checkpoint : path, (model, card), module or None
        A segmentation checkpoint (``.safetensors`` + card), a loaded pair, or a module with
        ``preprocess(uint8 (B,T,T,3)) -> (B,3,S,S)``, ``forward -> {"logits": (B,K,S,S)}``,
        ``num_classes`` and ``input_size``. None: :func:`default_segment_checkpoint`.
    mpp : float, optional
        µm per pixel the model runs at. Default: the card's ``input_mpp``; without one (or when
        the input has no pixel size) the input's own level 0.
    image_mpp : float, optional
        µm per pixel of the input, for images whose file does not record it (e.g. PNG).
    tile_size : int, optional
        Tile side in pixels at ``mpp`` (default: the card's ``tile_size``, else ``model.input_size``).
        The model resizes tiles to its input size; logits are resized back.
    overlap : float
        Overlap of neighbouring tiles: a fraction of the tile side (< 1) or pixels (>= 1).
    tissue_only : bool
        Run only tiles that touch tissue (tissue mask at 8 µm/px); the rest is background.
        False runs every tile.
    min_tissue : float
        With ``tissue_only``, skip tiles with at most this tissue fraction (0: any tissue).
    batch_size : int
        Tiles per forward pass.
    device : str
        ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``...; bf16/fp16 autocast on CUDA.
    weights : {"pyramidal", "gaussian"}
        Blending weight profile of a tile.
    workers : int, optional
        Tile reader threads (0 reads in this thread). Default: 2 when the model runs on the CPU
        (which is busy with the model), up to 8 on a GPU.
    progress, cancel
        See :mod:`napari_pathfm.progress`; cancel is checked between batches and while writing
        and raises :class:`~napari_pathfm.errors.Cancelled`, leaving no output file.
    out : path, optional
        Write the class map as a pyramidal OME-TIFF (``.ome.tif``), with the input's µm/px and
        the class names in its metadata.
    geojson : path, optional
        Also write the classes as QuPath GeoJSON polygons in level-0 pixel coordinates.
    cache : None, False, path or EmbeddingCache
        Tile-embedding cache of the frozen encoders (:mod:`napari_pathfm.tiles.embedding_cache`):
        None uses the default one (off with ``PATHFM_CACHE=0``), False none. A second run on the
        same slide and tiles with the same encoder weights reads no pixels and skips the encoder.

    Returns
    -------
    SegmentationResult
        ``labels`` (H, W) uint8 at the input's level-0 size; ``messages`` says when no tissue was
        found (all background) or the resolution could not be matched.

    Examples
    --------
    >>> res = segment_slide("slide.svs", "pathsam2-glas.safetensors", out="mask.ome.tif")  # doctest: +SKIP
    >>> res.labels.shape == open_slide("slide.svs").shape  # doctest: +SKIP
    True
    """
    from ..io.slide import open_slide

    out = _check_suffix(out, (".ome.tif", ".ome.tiff"), "mask output")
    geojson = _check_suffix(geojson, (".geojson", ".json"), "GeoJSON output")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    own = not hasattr(slide_or_image, "read")
    slide = open_slide(slide_or_image) if own else slide_or_image
    saved_mpp = slide.mpp
    try:
        if image_mpp is not None:
            if not image_mpp > 0:
                raise ValueError(f"image_mpp must be positive, got {image_mpp}")
            slide.mpp = float(image_mpp)
        return _segment(slide, model_or_checkpoint, mpp=mpp, tile_size=tile_size, overlap=overlap,
                        tissue_only=tissue_only, min_tissue=min_tissue, batch_size=batch_size, device=device,
                        weights=weights, workers=workers, progress=progress, cancel=cancel, out=out,
                        geojson=geojson, cache=cache)  # fmt: skip
    finally:
        slide.mpp = saved_mpp
        if own:
            slide.close()


def _segment(slide, model_or_checkpoint, *, mpp, tile_size, overlap, tissue_only, min_tissue, batch_size, device,
             weights, workers, progress, cancel, out, geojson, cache=None) -> SegmentationResult:  # fmt: skip
    from ..device import autocast_dtype, reader_workers, resolve_device
    from ..tiles import tile_grid
    from ..tiles.cached_encoder import CachedEncoder
    from ..tiles.loader import native_tile_cache
    from .notes import merge_notes, model_notes
    from .tissue_tiles import compute_tissue_tiles

    dev = resolve_device(device)
    model, card, source = load_segmentation_model(model_or_checkpoint, device=dev)
    if workers is None:
        workers = reader_workers(dev)
    k = getattr(model, "num_classes", None)
    classes = _class_names(card, k)
    k = int(k) if k is not None else (len(classes) if classes else None)
    messages: list[str] = []
    target = _resolve_mpp(slide, mpp, card, messages)
    t, ov = _tile_geometry(model, card, tile_size, overlap)

    reader = _shared_level(slide, target, tissue_only, workers, cancel)  # decode a level read twice only once
    if tissue_only:
        tt = compute_tissue_tiles(reader, tile_size=t, mpp=target, overlap=ov, min_tissue=max(min_tissue, 1e-9),
                                  progress=progress, cancel=cancel)  # fmt: skip
        grid, tissue = tt.grid, tt.tissue
    else:
        grid, tissue = tile_grid(reader, t, mpp=target, overlap=ov), None
    check_cancel(cancel, "segmentation")
    if reader is slide:
        reader = native_tile_cache(slide, grid)

    tmp_dir = None
    if grid.level0_shape[0] * grid.level0_shape[1] > IN_MEMORY_PIXELS:
        tmp_dir = scratch_dir("segment", dir=out.parent if out and out.parent.is_dir() else None)
    try:
        store = _label_store(grid.level0_shape, Path(tmp_dir.name) if tmp_dir else None)
        if not len(grid):
            messages.append(f"no tissue found in {Path(slide.path).name}: the mask is all background.")
        notes = model_notes(card, source, slide_mpp=slide.mpp, run_mpp=grid.mpp, slide_name=Path(slide.path).name,
                            tissue_fraction=float(tissue.mask.mean()) if tissue is not None else None)  # fmt: skip
        messages[:] = merge_notes(notes, messages)  # before the OME-TIFF writer starts: its metadata has both
        result = SegmentationResult(
            labels=store, classes=classes or [], mpp=slide.mpp, model_mpp=grid.mpp, grid=grid, tissue=tissue,
            source=str(slide.path), checkpoint=source, messages=messages, notes=notes, _tmp=tmp_dir,
        )  # fmt: skip
        meta = {"overlap": ov, "tile_size": t, "blend": weights}
        with _Outputs(result, out=out, geojson=geojson, metadata=meta, progress=progress, cancel=cancel) as outputs:
            if classes is not None:
                outputs.start()  # the OME-TIFF is written while the tiles run, band by band
            if len(grid):
                amp = autocast_dtype(dev)
                prep = {"mean": list(getattr(model, "mean", ())), "std": list(getattr(model, "std", ())),
                        "input_size": getattr(model, "input_size", None)}  # fmt: skip
                with CachedEncoder(model, slide, grid, cache=cache, preprocess=prep,
                                   precision=str(amp) if amp else None) as encoder:  # fmt: skip
                    k = _run_tiles(reader, grid, model, dev, k, store, batch_size=batch_size, weights=weights,
                                   workers=workers, source=source, progress=progress, cancel=cancel,
                                   on_rows=outputs.rows_done, poll=outputs.poll, encoder=encoder)  # fmt: skip
                result.cache = encoder.summary()
            if classes is None:
                result.classes = _class_names({}, k or 2)
            outputs.finish()
    except BaseException:
        if tmp_dir is not None:
            tmp_dir.cleanup()
        raise
    for m in messages:
        log.info(m)
    return result


def _shared_level(slide: Any, target: Optional[float], tissue_only: bool, workers: int, cancel: Any) -> Any:
    """``slide``, with the level the tiles are read from held in memory when it is read whole anyway.

    On a slide without a pyramid the tissue mask decodes all of level 0, and the tiles (25 %
    overlap) decode most of it again, ~1.6 times over: when the tissue mask and the tiles read the
    same level and it fits :data:`~napari_pathfm.tiles.loader.LEVEL_CACHE_BYTES`, it is decoded
    once (by several threads) and both read it from memory. Same pixels either way.
    """
    from ..tiles.grid import choose_level
    from ..tiles.loader import level_in_memory

    level = choose_level(slide, target) if target is not None and slide.mpp else 0
    if tissue_only:  # the level compute_tissue_tiles / tissue_mask read (8 µm/px, or 2048 px across)
        ds = 8.0 / slide.mpp if slide.mpp else max(slide.shape) / 2048
        if slide.best_level_for_downsample(max(1.0, ds)) != level:
            return slide
    return level_in_memory(slide, level, workers=max(2, workers), cancel=cancel)


def _run_tiles(slide, grid, model, dev, k, store, *, batch_size, weights, workers, source, progress, cancel,
               on_rows=None, poll=None, encoder=None) -> int:  # fmt: skip
    """Run the model on every tile of ``grid`` and write blended level-0 labels into ``store``.

    Reader threads decode tiles ahead while this thread runs the model and blends on its device;
    ``on_rows(n)`` hears when the first ``n`` level-0 rows are final, ``poll()`` runs per batch.
    """
    import torch

    from ..device import autocast_dtype
    from ..tiles import iter_tile_batches
    from ..tiles.cached_encoder import stored_batches

    model.to(dev).eval()
    amp = autocast_dtype(dev)
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else nullcontext()
    coords = grid.output_coords.tolist()
    n, done, canvas = len(grid), 0, None
    name = Path(slide.path).name
    report(progress, 0, n, f"{name}: segmenting")
    if encoder is not None and encoder.all_stored:  # a second run: no pixels to read, no encoder to run
        batches = stored_batches(grid, batch_size)
    else:
        batches = iter_tile_batches(slide, grid, batch_size, prefetch=max(2 * batch_size, 4 * workers),
                                    workers=workers, cancel=cancel)  # fmt: skip
    # On the CPU, blending a batch (numpy, releases the GIL) runs in one helper thread while the model runs the
    # next batch; one thread keeps the adds in order, so the result is the same as blending inline.
    blender = ThreadPoolExecutor(1, thread_name_prefix="pathfm-blend") if dev == "cpu" else None
    pending: list = []

    def blend(canvas, indices, logits):
        for i, idx in enumerate(indices):
            canvas.add(*coords[idx], logits[i])

    try:
        with torch.inference_mode():
            for batch in batches:
                check_cancel(cancel, "segmentation")
                if poll is not None:
                    poll()
                with autocast:
                    logits = _tile_logits(model, batch, dev, grid.tile_size, k, source, encoder)
                if dev == "cpu":
                    logits = logits.numpy()
                if canvas is None:
                    k = logits.shape[1]
                    canvas = _BandedCanvas(grid, k, store, None if dev == "cpu" else dev, weights=weights, on_rows=on_rows)
                if blender is None:
                    blend(canvas, batch.indices.tolist(), logits)
                else:
                    pending.append(blender.submit(blend, canvas, batch.indices.tolist(), logits))
                    while len(pending) > 2:  # bounded: at most two batches of logits wait
                        pending.pop(0).result()
                done += len(batch.indices)
                report(progress, done, n, f"{name}: segmenting")
            for future in pending:
                future.result()
            pending.clear()
            check_cancel(cancel, "segmentation")
            canvas.finish()
    finally:
        batches.close()
        if blender is not None:
            for future in pending:
                future.cancel()
            blender.shutdown(wait=True)
        if canvas is not None:
            canvas.close()
    return int(k)


# -- writing -----------------------------------------------------------------------------------


def _geojson_labels(labels: Any) -> tuple[np.ndarray, float]:
    """The class map (downsampled by 2x2 mode until small enough to trace) and its downsample."""
    from ..io.ome_tiff import downsample2, iter_bands

    h, w = labels.shape
    f = 1
    while (h // f) * (w // f) > GEOJSON_MAX_PIXELS:
        f *= 2
    if f == 1:
        return np.asarray(labels), 1.0
    parts = []
    for _, band in iter_bands(labels, f):
        for _ in range(int(math.log2(f))):
            band = downsample2(band, True)
        parts.append(band)
    return np.concatenate(parts), float(f)


class _RowsReady:
    """The level-0 class map as a sliceable array that blocks until the rows asked for are final.

    Lets :func:`~napari_pathfm.io.ome_tiff.write_ome_tiff` run in a thread while the tiles are
    still being segmented (bands finish top to bottom); :meth:`fail` releases a waiting reader
    with :class:`~napari_pathfm.errors.Cancelled` when the run stops.
    """

    def __init__(self, labels: Any):
        self.labels = labels
        self.shape, self.dtype, self.ndim = tuple(labels.shape), np.dtype(labels.dtype), 2
        self.chunks = tuple(getattr(labels, "chunks", None) or (256, self.shape[1]))
        self._done, self._failed = 0, False
        self._cond = threading.Condition()

    def __dask_tokenize__(self) -> str:
        return f"pathfm-rows-{id(self)}"

    def mark(self, rows: int) -> None:
        with self._cond:
            self._done = max(self._done, int(rows))
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = key[0] if isinstance(key, tuple) else key
        need = self.shape[0] if not isinstance(rows, slice) or rows.stop is None else min(rows.stop, self.shape[0])
        with self._cond:
            self._cond.wait_for(lambda: self._failed or self._done >= need)
            if self._done < need:
                raise Cancelled("segmentation stopped before the mask was complete")
        return np.asarray(self.labels[key])


class _Outputs:
    """Write a segmentation's OME-TIFF and GeoJSON all or nothing.

    Both go to temporary names (:func:`~napari_pathfm.io.atomic.atomic_path`) and replace their
    targets only when the ``with`` block ends without error. :meth:`start` begins the OME-TIFF
    in a background thread that reads rows as :meth:`rows_done` releases them; :meth:`finish`
    waits for it and traces the GeoJSON.
    """

    def __init__(self, result: SegmentationResult, *, out, geojson, metadata=None, progress=None, cancel=None):
        self.result, self.progress, self.cancel = result, progress, cancel
        self.out = _check_suffix(out, (".ome.tif", ".ome.tiff"), "mask output")
        self.geojson = _check_suffix(geojson, (".geojson", ".json"), "GeoJSON output")
        self.metadata = metadata or {}
        self.rows = _RowsReady(result.labels)
        self.writer = None

    def __enter__(self) -> "_Outputs":
        from concurrent.futures import ThreadPoolExecutor

        from ..io.atomic import atomic_path

        self._stack = stack = ExitStack().__enter__()
        try:
            self._tmp_out = stack.enter_context(atomic_path(self.out)) if self.out is not None else None
            self._tmp_geo = stack.enter_context(atomic_path(self.geojson)) if self.geojson is not None else None
            self._pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="pathfm-write"))
            stack.callback(self.rows.fail)  # unwinds first: a stopped run never leaves the writer waiting
        except BaseException:
            stack.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> Any:
        suppress = self._stack.__exit__(*exc)
        if exc[0] is None:  # both files are in place now
            if self.out is not None:
                self.result.written["mask"] = self.out
            if self.geojson is not None:
                self.result.written["geojson"] = self.geojson
        return suppress

    def start(self) -> None:
        from ..io.ome_tiff import write_ome_tiff

        if self._tmp_out is None or self.writer is not None:
            return
        r = self.result
        meta = {
            "kind": "segmentation", "source": r.source, "checkpoint": r.checkpoint, "model_mpp": r.model_mpp,
            "tiles": r.n_tiles, "messages": r.messages, "notes": r.notes, "downsample": 1.0, **self.metadata,
        }  # fmt: skip
        self.writer = self._pool.submit(write_ome_tiff, self._tmp_out, self.rows, mpp=r.mpp, is_labels=True,
                                        class_names=r.classes, metadata=meta, cancel=self.cancel,
                                        compressionargs={"level": 1})  # fast zlib: ~1.3x larger masks  # fmt: skip

    def rows_done(self, rows: int) -> None:
        self.rows.mark(rows)

    def poll(self) -> None:
        """Raise the background writer's error (e.g. a full disk) in the segmenting thread."""
        if self.writer is not None and self.writer.done() and self.writer.exception() is not None:
            raise self.writer.exception()

    def finish(self) -> None:
        from ..io.geojson import write_geojson

        r = self.result
        self.rows.mark(r.labels.shape[0])
        if self._tmp_out is not None:
            self.start()
            report(self.progress, 0, 1, f"writing {self.out.name}")
            self.writer.result()
            report(self.progress, 1, 1, f"wrote {self.out.name}")
        if self._tmp_geo is not None:
            check_cancel(self.cancel, "writing GeoJSON")
            report(self.progress, 0, 1, f"writing {self.geojson.name}")
            small, ds = _geojson_labels(r.labels)
            write_geojson(self._tmp_geo, small, {i: n for i, n in enumerate(r.classes) if i}, downsample=ds)
            report(self.progress, 1, 1, f"wrote {self.geojson.name}")
        check_cancel(self.cancel, "writing the segmentation")


def write_segmentation(
    result: SegmentationResult,
    *,
    out: Optional[PathLike] = None,
    geojson: Optional[PathLike] = None,
    metadata: Optional[dict] = None,
    progress: Optional[Callable[..., Any]] = None,
    cancel: Any = None,
) -> dict[str, Path]:
    """Write the class map as pyramidal OME-TIFF and/or QuPath GeoJSON, all or nothing.

    Both files go to temporary names first and replace their targets only when both are
    complete; a cancel or an error leaves existing files untouched and no new ones. The
    OME-TIFF stores the input's µm/px and the class names; large class maps are traced for
    GeoJSON after 2x2-mode downsampling to at most :data:`GEOJSON_MAX_PIXELS` pixels
    (coordinates stay level-0 pixels).
    """
    with _Outputs(result, out=out, geojson=geojson, metadata=metadata, progress=progress, cancel=cancel) as o:
        o.finish()
    return dict(result.written)
