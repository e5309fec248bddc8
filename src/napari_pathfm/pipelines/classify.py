"""Whole-slide tile classification: tissue tiles → classifier → per-tile class map and probabilities.

:func:`classify_slide` runs a ``classify`` checkpoint (a ``timm_classifier``, an ``slca`` model, or
any module mapping normalised ``(B, 3, T, T)`` images to ``(B, C)`` logits) over the tissue tiles
of a slide and returns, per tile, the softmax probabilities, plus the same numbers laid out on
the tile grid so that napari can overlay them on the slide:

- ``class_map`` (rows, cols) integer labels: **0 = background** (no tissue tile there), and
  class ``k`` of the model (0-based, the card's ``classes[k]``) is stored as ``k + 1``.
- ``prob_maps`` (C, rows, cols) float32: the probability of each class; 0 where there is no tile.

One grid cell is one tile; with the result's ``scale``/``translate`` (level-0 µm when the slide's
µm/px is known, else level-0 pixels) both layers sit exactly over the slide (contract 4).

Tile size, µm/px and normalisation come from the checkpoint's model card (``tile_size``,
``input_mpp``, ``normalization``, ``classes``, written by the classify trainer), so the model sees
tiles as it saw them in training. Tiles are decoded by the prefetching loader in background
threads while the model runs (the tile-run frame of :mod:`.tile_run`); cancel is checked between
batches and raises :class:`~napari_pathfm.errors.Cancelled` before anything is written.
:func:`write_classify_outputs` (:mod:`.classify_result`) writes the class map (OME-TIFF labels with
class names), the probabilities (multi-channel OME-TIFF), a per-tile CSV, a GeoJSON of the
classified tiles and a JSON summary, each atomically.
Importing this module does not import torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from .classify_result import BACKGROUND, ClassifyResult, write_classify_outputs
from .tile_run import TileTask, autocast, opened_slide, plan_tiles, run_mpp, run_tiles, tile_encoder

__all__ = [
    "BACKGROUND",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassifyOptions",
    "ClassifyResult",
    "card_normalization",
    "class_logits",
    "classify_slide",
    "load_classifier",
    "preprocess_tiles",
    "write_classify_outputs",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ClassifyOptions:
    """How :func:`classify_slide` runs the classifier over a slide (its keyword arguments of the same names).

    ``mpp``/``tile`` None take the model card's; ``workers`` None the device's default.
    """

    mpp: float | None = None
    tile: int | None = None
    batch_size: int = 32
    device: str = "auto"
    tissue_only: bool = True
    min_tissue: float = 0.25
    workers: int | None = None
    cache: Any = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


# -- model -------------------------------------------------------------------------------------


def load_classifier(model_or_checkpoint: Any, device: str = "cpu") -> tuple[Any, dict, str | None]:
    """``(model, card, source)`` from a checkpoint path, a ``(model, card)`` pair or a module.

    Raises
    ------
    CheckpointError
        The checkpoint is of another family (segment, mil, features, ...): the message names
        the file, its family and what to pick instead.
    """
    if isinstance(model_or_checkpoint, (str, Path)):
        from ..models.checkpoint import load_family_checkpoint

        source = str(model_or_checkpoint)
        model, card = load_family_checkpoint(model_or_checkpoint, "classify", device=device)
        return model, dict(card), source
    if isinstance(model_or_checkpoint, tuple):
        model, card = model_or_checkpoint
        return model, dict(card), card.get("weights_file")
    card = dict(getattr(model_or_checkpoint, "pathfm_card", None) or {})
    return model_or_checkpoint, card, None


def _classes(card: dict, n: int | None) -> list[str] | None:
    names = card.get("classes")
    if names:
        return [str(c) for c in names]
    n = n or (card.get("config") or {}).get("num_classes")
    return [f"class {i}" for i in range(int(n))] if n else None


def card_normalization(card: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the classifier was trained with (its card's ``normalization``, else ImageNet's)."""
    norm = card.get("normalization") or {}
    return tuple(norm.get("mean") or IMAGENET_MEAN), tuple(norm.get("std") or IMAGENET_STD)


def preprocess_tiles(images: np.ndarray, dev: str, mean, std):
    """uint8 ``(B, T, T, 3)`` tiles → normalised float32 ``(B, 3, T, T)`` torch tensor on ``dev``.

    Same numbers as the classify trainer's ``ToDtype(scale=True)`` + ``Normalize(mean, std)``.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(dev, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def class_logits(out: Any):
    """The ``(B, C)`` logits of a classifier's output (a tensor, or a dict with ``logits``)."""
    return out["logits"] if isinstance(out, dict) else out


# -- run ---------------------------------------------------------------------------------------


def classify_slide(
    slide: Any,
    model_or_checkpoint: Any,
    *,
    mpp: float | None = None,
    image_mpp: float | None = None,
    tile: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    tissue_only: bool = True,
    min_tissue: float = 0.25,
    workers: int | None = None,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    cache: Any = None,
) -> ClassifyResult:
    """Classify every tissue tile of a slide; see the module docstring for the outputs.

    Parameters
    ----------
    slide : Slide or path
        From :func:`napari_pathfm.io.open_slide` (a path is opened and closed here).
    model_or_checkpoint : path, (model, card) or module
        A ``classify`` checkpoint (``.safetensors`` + card). A checkpoint of another family is a
        :class:`~napari_pathfm.errors.CheckpointError`.
    mpp : float, optional
        µm/px of the tiles the model sees. Default: the card's ``input_mpp``; without one (or
        when the slide has no pixel size) the slide's level 0.
    image_mpp : float, optional
        µm per pixel of the slide's level 0, for images whose file does not record it (e.g. PNG, a
        TIFF without resolution) or records it wrongly; it replaces the file's value for this run
        (as in :func:`~napari_pathfm.pipelines.segment.segment_slide`).
    tile : int, optional
        Tile side in pixels at ``mpp`` (default: the card's ``tile_size``, else 224). The model
        gets the tiles at this size.
    batch_size : int
        Tiles per forward pass.
    device : str
        ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``...; bf16/fp16 autocast on CUDA.
    tissue_only : bool
        Classify only tiles with at least ``min_tissue`` tissue (mask at 8 µm/px); False: all tiles.
    min_tissue : float
        Minimum tissue fraction of a classified tile.
    workers : int, optional
        Tile reader threads (default 2 on the CPU, up to 8 with a GPU).
    progress, cancel
        See :mod:`napari_pathfm.progress`; cancel is checked between batches.
    cache : None, False, path or EmbeddingCache
        Tile-embedding cache (:mod:`napari_pathfm.tiles.embedding_cache`) of the frozen SAM encoder
        of SLCA models: None = the default one (off with ``PATHFM_CACHE=0``), False = none.

    Returns
    -------
    ClassifyResult
        ``notes`` say when the model is a bundled demonstration or the slide is far from its
        training domain (µm/px, tile size).

    Examples
    --------
    >>> res = classify_slide("slide.svs", "crc-resnet18.safetensors")  # doctest: +SKIP
    >>> res.class_map.shape == res.grid.grid_shape  # doctest: +SKIP
    True
    """
    options = ClassifyOptions(
        mpp=mpp,
        tile=tile,
        batch_size=batch_size,
        device=device,
        tissue_only=tissue_only,
        min_tissue=min_tissue,
        workers=workers,
        cache=cache,
    )
    with opened_slide(slide, image_mpp) as s:
        return _classify(s, model_or_checkpoint, options, progress=progress, cancel=cancel)


def _classify(
    slide: Any, model_or_checkpoint: Any, o: ClassifyOptions, *, progress: Any, cancel: Any
) -> ClassifyResult:
    from ..device import reader_workers, resolve_device
    from .notes import merge_notes, model_notes

    dev = resolve_device(o.device)
    model, card, source = load_classifier(model_or_checkpoint, device=dev)
    workers = reader_workers(dev) if o.workers is None else o.workers
    messages: list[str] = []
    target = run_mpp(slide, o.mpp, card, "classified", "classify")
    t = int(o.tile or card.get("tile_size") or 224)
    if t < 8:
        raise ValueError(f"tile must be at least 8 pixels, got {t}")
    # the level the tissue mask and the tiles both read is decoded only once
    reader, grid, tissue = plan_tiles(
        slide,
        target,
        t,
        what="classification",
        tissue_only=o.tissue_only,
        min_tissue=o.min_tissue,
        workers=workers,
        progress=progress,
        cancel=cancel,
    )
    if not len(grid):
        messages.append(f"no tissue found in {Path(slide.path).name}: nothing was classified.")
    mean, std = card_normalization(card)
    prep = {"mean": list(mean), "std": list(std), "tile_size": int(grid.tile_size)}
    with tile_encoder(model, slide, grid, dev, cache=o.cache, preprocess=prep) as enc:
        probs = np.zeros((0, 0), np.float32)
        if len(grid):
            tiles = _ClassifyTiles(model, len(grid), dev, mean, std, source, enc)
            run_tiles(
                reader, grid, tiles.task(), batch_size=o.batch_size, workers=workers, progress=progress, cancel=cancel
            )
            probs = tiles.out
    classes = _classes(card, probs.shape[1] if probs.size else getattr(model, "num_classes", None))
    if classes is None:
        classes = []
    if probs.size and len(classes) != probs.shape[1]:
        raise CheckpointError(
            source or "the model card",
            f"lists {len(classes)} classes ({', '.join(classes)}) but the model predicts {probs.shape[1]}.",
            "Use the card that was saved with these weights, or fix its 'classes'.",
        )
    if not probs.size:
        probs = np.zeros((0, len(classes)), np.float32)
    notes = model_notes(
        card,
        source,
        slide_mpp=slide.mpp,
        run_mpp=grid.mpp,
        slide_name=Path(slide.path).name,
        run_tile=t,
        tissue_fraction=float(tissue.mask.mean()) if tissue is not None else None,
        stain=tissue.stain if tissue is not None else None,
    )
    messages = merge_notes(notes, messages)
    for m in messages:
        log.info(m)
    return ClassifyResult(
        classes=classes,
        probabilities=probs,
        grid=grid,
        mpp=slide.mpp,
        model_mpp=grid.mpp,
        source=str(slide.path),
        checkpoint=source,
        messages=messages,
        cache=enc.summary(),
        notes=notes,
    )


class _ClassifyTiles:
    """Classification's part of the tile run: softmax probabilities ``(N, C)`` float32 of every tile, in grid order.

    With an active ``encoder`` (:class:`~napari_pathfm.tiles.cached_encoder.CachedEncoder`) the frozen
    encoder's outputs come from the embedding cache where stored; the pixels are always read (the
    classifier's own branch looks at them).
    """

    def __init__(self, model: Any, n: int, dev: str, mean: tuple, std: tuple, source: Any, encoder: Any):
        model.to(dev).eval()
        self.model, self.n, self.dev, self.mean, self.std, self.source = model, n, dev, mean, std, source
        self.encoder, self.autocast = encoder, autocast(dev)
        self.out: np.ndarray | None = None

    def task(self) -> TileTask:
        return TileTask("classification", "classifying", self.infer, self.collect)

    def infer(self, batch: Any) -> np.ndarray:
        import torch

        with self.autocast:
            x = preprocess_tiles(batch.images, self.dev, self.mean, self.std)
            if self.encoder is not None and self.encoder.active:
                logits = class_logits(self.model.decode(x, self.encoder(batch.indices, x, self.dev)))
            else:
                logits = class_logits(self.model(x))
        if logits.ndim != 2 or logits.shape[0] != len(batch.indices):
            raise CheckpointError(
                self.source or "the model",
                f"produced output of shape {tuple(logits.shape)}; a tile classifier "
                f"must give (batch, classes) logits, here ({len(batch.indices)}, C).",
                "Pick a checkpoint of family 'classify'.",
            )
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def collect(self, batch: Any, p: np.ndarray) -> None:
        if self.out is None:
            self.out = np.empty((self.n, p.shape[1]), np.float32)
        self.out[batch.indices] = p
