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
import tempfile
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ..errors import CheckpointError, PathFMError, SlideError
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
        Things the user should know (no tissue found, resolution fallback, ...).
    written : dict of str to Path
        Files written (``"mask"``, ``"geojson"``).
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
                         "source": self.source, "checkpoint": self.checkpoint, "model_mpp": self.model_mpp},
        }  # fmt: skip

    def summary(self) -> dict:
        return {
            "input": self.source,
            "checkpoint": self.checkpoint,
            "shape": list(self.shape),
            "mpp": self.mpp,
            "model_mpp": self.model_mpp,
            "classes": self.classes,
            "tiles": self.n_tiles,
            "messages": self.messages,
            "written": {k: str(v) for k, v in self.written.items()},
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
    return sorted(found, key=rank)[0][0]


def load_segmentation_model(model_or_checkpoint: Any = None, device: str = "cpu") -> tuple[Any, dict, Optional[str]]:
    """``(model, card, source)`` from a checkpoint path, a ``(model, card)`` pair or a module.

    ``None`` loads :func:`default_segment_checkpoint`. A checkpoint of another family, or a card
    whose class list does not match the model's number of outputs, is a
    :class:`~napari_pathfm.errors.CheckpointError`.
    """
    if model_or_checkpoint is None:
        model_or_checkpoint = default_segment_checkpoint()
    if isinstance(model_or_checkpoint, (str, Path)):
        from ..models.checkpoint import load_checkpoint, read_card

        source = str(model_or_checkpoint)
        family = read_card(model_or_checkpoint).get("family")
        if family and family != "segment":
            raise CheckpointError(
                source, f"is a {family!r} checkpoint, not a segmentation model.",
                "Pick a checkpoint of family 'segment' (e.g. a trained pathsam2 model).",
            )  # fmt: skip
        model, card = load_checkpoint(model_or_checkpoint, device=device)
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


class _BandedCanvas:
    """Blend tile logits on the model-resolution canvas band by band; write level-0 labels.

    Band ``k`` owns canvas rows ``[k*core, (k+1)*core)``; it receives every tile reaching within
    ``_HALO`` rows of them. Its accumulator spans one tile height more on each side, so no such
    tile ever touches the accumulator's top or bottom edge unless that edge is the canvas edge:
    each tile then gets the same weights (tapered, or flat at the canvas edge) as on a canvas of
    the whole slide, and bands join without a seam. Tiles arrive row-major (non-decreasing y).
    """

    def __init__(self, grid: Any, n_classes: int, store: Any, *, weights: str = "pyramidal"):
        self.grid, self.k, self.store, self.weights = grid, int(n_classes), store, weights
        self.hc, self.wc = grid.output_shape
        self.t = grid.tile_size
        self.s = float(grid.scale)
        self.h0, self.w0 = grid.level0_shape
        row_bytes = self.wc * (self.k + 1) * 4
        rows = max(1, BAND_BYTES // row_bytes - 2 * (self.t + _HALO))
        self.core = max(grid.stride, rows // grid.stride * grid.stride)
        self.bands: dict[int, Any] = {}
        if self.s != 1.0:
            x = np.arange(self.w0, dtype=np.float64)
            self.cols = self._lerp_index(x, self.wc)

    def _lerp_index(self, j: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Bilinear source indices/weights and nearest index of level-0 pixels ``j`` on an ``n``-canvas."""
        u = np.clip((j + 0.5) / self.s - 0.5, 0.0, n - 1.0)
        i0 = np.floor(u).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        near = np.minimum(np.floor((j + 0.5) / self.s).astype(np.int64), n - 1)
        return i0, i1, (u - i0).astype(np.float32), near

    def _band(self, k: int) -> Any:
        from ..tiles import TileBlender

        if k not in self.bands:
            top = max(0, k * self.core - _HALO - self.t)
            bottom = min(self.hc, (k + 1) * self.core + _HALO + self.t)
            self.bands[k] = (top, TileBlender((bottom - top, self.wc, self.k), weights=self.weights))
        return self.bands[k]

    def add(self, y: int, x: int, logits: np.ndarray) -> None:
        """Add one tile's logits ``(T, T, K)`` at canvas ``(y, x)``."""
        for k in [k for k in self.bands if y >= (k + 1) * self.core + _HALO]:
            self._finish(k)
        k_lo = max(0, (y - _HALO) // self.core - 1)
        k_hi = min((self.hc - 1) // self.core, (y + self.t + _HALO) // self.core)
        for k in range(k_lo, k_hi + 1):
            if y < (k + 1) * self.core + _HALO and y + self.t > k * self.core - _HALO:
                top, band = self._band(k)
                band.add(y - top, x, logits)

    def finish(self) -> None:
        for k in sorted(self.bands):
            self._finish(k)

    def _finish(self, k: int) -> None:
        top, band = self.bands.pop(k)
        values = band.result()
        covered = np.asarray(band.weight_sum) > 0
        c0, c1 = k * self.core, min((k + 1) * self.core, self.hc)
        if self.s == 1.0:
            lab = np.argmax(values[c0 - top : c1 - top], axis=-1).astype(np.uint8)
            lab[~covered[c0 - top : c1 - top]] = 0
            self.store[c0:c1] = lab[:, : self.w0]
            return
        j0 = max(0, math.ceil(c0 * self.s - 0.5))
        j1 = self.h0 if c1 >= self.hc else min(self.h0, math.ceil(c1 * self.s - 0.5))
        step = max(1, min(512, _RESAMPLE_BYTES // max(1, self.wc * self.k * 4)))
        ci0, ci1, ct, cnear = self.cols
        col_step = max(256, _RESAMPLE_BYTES // max(1, step * self.k * 4))
        for ja in range(j0, j1, step):
            jb = min(j1, ja + step)
            i0, i1, t, near = self._lerp_index(np.arange(ja, jb, dtype=np.float64), self.hc)
            t = t[:, None, None]
            rows = values[i0 - top] * (1 - t) + values[i1 - top] * t
            rcov = covered[near - top]
            for xa in range(0, self.w0, col_step):
                xs = slice(xa, min(self.w0, xa + col_step))
                tx = ct[xs][None, :, None]
                vals = rows[:, ci0[xs]] * (1 - tx) + rows[:, ci1[xs]] * tx
                lab = np.argmax(vals, axis=-1).astype(np.uint8)
                lab[~rcov[:, cnear[xs]]] = 0
                self.store[ja:jb, xs] = lab


# -- the pipeline ------------------------------------------------------------------------------


def _tile_logits(model: Any, images: np.ndarray, dev: str, t: int, k: Optional[int], source: Any):
    """Model logits of a batch of uint8 tiles as ``(B, T, T, K)`` float32 numpy."""
    import torch
    import torch.nn.functional as F

    x = model.preprocess(torch.from_numpy(images).to(dev))
    out = model(x.to(dev))
    logits = out["logits"] if isinstance(out, dict) else out
    if logits.ndim != 4 or (k is not None and logits.shape[1] != k):
        raise CheckpointError(
            source or "the model", f"produced logits of shape {tuple(logits.shape)}, expected {k} classes "
            "(B, K, H, W) as its model card says.", "Use the card saved with these weights.",
        )  # fmt: skip
    if tuple(logits.shape[-2:]) != (t, t):
        logits = F.interpolate(logits.float(), size=(t, t), mode="bilinear", align_corners=False)
    return logits.float().permute(0, 2, 3, 1).cpu().numpy()


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
    messages.append(
        f"{Path(slide.path).name} has no pixel size; segmented at its own resolution instead of the model's "
        f"{target} µm/px (give --image-mpp to resample)."
    )
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
        raise PathFMError(f"{path}: the {what} must end in {' or '.join(suffixes)}.")
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
    workers: int = 2,
    progress: Optional[Callable[..., Any]] = None,
    cancel: Any = None,
    out: Optional[PathLike] = None,
    geojson: Optional[PathLike] = None,
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
    workers : int
        Tile reader threads (0 reads in this thread).
    progress, cancel
        See :mod:`napari_pathfm.progress`; cancel is checked between batches and while writing
        and raises :class:`~napari_pathfm.errors.Cancelled`, leaving no output file.
    out : path, optional
        Write the class map as a pyramidal OME-TIFF (``.ome.tif``), with the input's µm/px and
        the class names in its metadata.
    geojson : path, optional
        Also write the classes as QuPath GeoJSON polygons in level-0 pixel coordinates.

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
                        geojson=geojson)  # fmt: skip
    finally:
        slide.mpp = saved_mpp
        if own:
            slide.close()


def _segment(slide, model_or_checkpoint, *, mpp, tile_size, overlap, tissue_only, min_tissue, batch_size, device,
             weights, workers, progress, cancel, out, geojson) -> SegmentationResult:  # fmt: skip
    from ..device import resolve_device
    from ..tiles import tile_grid
    from .tissue_tiles import compute_tissue_tiles

    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise PathFMError(str(exc)) from None
    model, card, source = load_segmentation_model(model_or_checkpoint, device=dev)
    k = getattr(model, "num_classes", None)
    classes = _class_names(card, k)
    k = int(k) if k is not None else (len(classes) if classes else None)
    messages: list[str] = []
    target = _resolve_mpp(slide, mpp, card, messages)
    t, ov = _tile_geometry(model, card, tile_size, overlap)

    if tissue_only:
        tt = compute_tissue_tiles(slide, tile_size=t, mpp=target, overlap=ov, min_tissue=max(min_tissue, 1e-9),
                                  progress=progress, cancel=cancel)  # fmt: skip
        grid, tissue = tt.grid, tt.tissue
    else:
        grid, tissue = tile_grid(slide, t, mpp=target, overlap=ov), None
    check_cancel(cancel, "segmentation")

    tmp_dir = None
    if grid.level0_shape[0] * grid.level0_shape[1] > IN_MEMORY_PIXELS:
        tmp_dir = tempfile.TemporaryDirectory(prefix="pathfm-segment-", dir=out.parent if out and out.parent.is_dir() else None)
    try:
        store = _label_store(grid.level0_shape, Path(tmp_dir.name) if tmp_dir else None)
        if len(grid):
            k = _run_tiles(slide, grid, model, dev, k, store, batch_size=batch_size, weights=weights,
                           workers=workers, source=source, progress=progress, cancel=cancel)  # fmt: skip
        else:
            messages.append(f"no tissue found in {Path(slide.path).name}: the mask is all background.")
        if classes is None:
            classes = _class_names({}, k or 2)
        result = SegmentationResult(
            labels=store, classes=classes, mpp=slide.mpp, model_mpp=grid.mpp, grid=grid, tissue=tissue,
            source=str(slide.path), checkpoint=source, messages=messages, _tmp=tmp_dir,
        )  # fmt: skip
        if out is not None or geojson is not None:
            write_segmentation(result, out=out, geojson=geojson, progress=progress, cancel=cancel,
                               metadata={"overlap": ov, "tile_size": t, "blend": weights})  # fmt: skip
    except BaseException:
        if tmp_dir is not None:
            tmp_dir.cleanup()
        raise
    for m in messages:
        log.info(m)
    return result


def _run_tiles(slide, grid, model, dev, k, store, *, batch_size, weights, workers, source, progress, cancel) -> int:
    """Run the model on every tile of ``grid`` and write blended level-0 labels into ``store``."""
    import torch

    from ..device import autocast_dtype
    from ..tiles import iter_tile_batches

    model.to(dev).eval()
    amp = autocast_dtype(dev)
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else nullcontext()
    coords = grid.output_coords
    n, done, canvas = len(grid), 0, None
    name = Path(slide.path).name
    report(progress, 0, n, f"{name}: segmenting")
    batches = iter_tile_batches(slide, grid, batch_size, prefetch=max(2 * batch_size, 8), workers=workers,
                                cancel=cancel)  # fmt: skip
    with torch.inference_mode(), autocast:
        try:
            for batch in batches:
                check_cancel(cancel, "segmentation")
                logits = _tile_logits(model, batch.images, dev, grid.tile_size, k, source)
                if canvas is None:
                    k = logits.shape[-1]
                    canvas = _BandedCanvas(grid, k, store, weights=weights)
                for i, idx in enumerate(batch.indices):
                    y, x = coords[idx]
                    canvas.add(int(y), int(x), logits[i])
                done += len(batch.indices)
                report(progress, done, n, f"{name}: segmenting")
        finally:
            batches.close()
    check_cancel(cancel, "segmentation")
    canvas.finish()
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
    complete; a cancel or an error leaves existing files untouched and no new ones. Large class
    maps are traced for GeoJSON after 2x2-mode downsampling to at most :data:`GEOJSON_MAX_PIXELS`
    (coordinates stay level-0 pixels).
    """
    from ..io.atomic import atomic_path
    from ..io.geojson import write_geojson
    from ..io.ome_tiff import write_ome_tiff

    out = _check_suffix(out, (".ome.tif", ".ome.tiff"), "mask output")
    geojson = _check_suffix(geojson, (".geojson", ".json"), "GeoJSON output")
    meta = {
        "kind": "segmentation", "source": result.source, "checkpoint": result.checkpoint,
        "model_mpp": result.model_mpp, "tiles": result.n_tiles, "messages": result.messages, "downsample": 1.0,
        **(metadata or {}),
    }  # fmt: skip
    # The GeoJSON goes to a temporary file first and is renamed only after the OME-TIFF (itself
    # atomic) is complete, so a cancel or an error at any point leaves neither file.
    with ExitStack() as stack:
        if geojson is not None:
            tmp_geo = stack.enter_context(atomic_path(geojson))
            check_cancel(cancel, "writing GeoJSON")
            report(progress, 0, 1, f"writing {geojson.name}")
            small, ds = _geojson_labels(result.labels)
            names = {i: n for i, n in enumerate(result.classes) if i}
            write_geojson(tmp_geo, small, names, downsample=ds)
            report(progress, 1, 1, f"wrote {geojson.name}")
        if out is not None:
            write_ome_tiff(out, result.labels, mpp=result.mpp, is_labels=True, class_names=result.classes,
                           metadata=meta, progress=progress, cancel=cancel)  # fmt: skip
    if out is not None:
        result.written["mask"] = out
    if geojson is not None:
        result.written["geojson"] = geojson
    return dict(result.written)
