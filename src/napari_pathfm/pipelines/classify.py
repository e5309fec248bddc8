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
threads while the model runs; cancel is checked between batches and raises
:class:`~napari_pathfm.errors.Cancelled` before anything is written. :func:`write_classify_outputs`
writes the class map (OME-TIFF labels with class names), the probabilities (multi-channel OME-TIFF),
a per-tile CSV, a GeoJSON of the classified tiles and a JSON summary, each atomically.
Importing this module does not import torch.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, SlideError
from ..progress import check_cancel, report

__all__ = [
    "BACKGROUND",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassifyResult",
    "classify_slide",
    "load_classifier",
    "preprocess_tiles",
    "write_classify_outputs",
]  # fmt: skip

log = logging.getLogger(__name__)

PathLike = str | Path
#: Name of label 0 of the class map (grid cells without a tissue tile).
BACKGROUND = "background"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ClassifyResult:
    """Per-tile classes and probabilities of one slide, and where they sit.

    Attributes
    ----------
    classes : list of str
        Class names of the model, in logit order.
    probabilities : ndarray float32 (N, C)
        Softmax probabilities of each classified tile (rows sum to 1).
    grid : TileGrid
        The classified tiles (row-major); ``grid.tiles`` are their level-0 (y, x).
    mpp : float or None
        µm/px of the slide's level 0 (None: the slide does not say; layers are then in pixels).
    model_mpp : float or None
        µm/px of the tiles the model saw.
    source, checkpoint : str or None
        The slide and checkpoint paths.
    messages : list of str
        Things the user should know (no tissue found, resolution fallback), ``notes`` first.
    notes : list of str
        What the model is and how far the run is from its training domain
        (:func:`~napari_pathfm.pipelines.notes.model_notes`); also in summary.json and the OME-TIFFs.
    cache : dict
        What the tile-embedding cache did (entry, tiles encoded, tiles read from it).
    """

    classes: list[str]
    probabilities: np.ndarray
    grid: Any
    mpp: float | None
    model_mpp: float | None
    source: str | None = None
    checkpoint: str | None = None
    messages: list[str] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        return len(self.grid)

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) level-0 (y, x) of each tile's top-left corner."""
        return self.grid.tiles

    @property
    def predicted(self) -> np.ndarray:
        """(N,) int64 index of the most probable class of each tile (ties: the first)."""
        return np.argmax(self.probabilities, axis=1) if self.n_tiles else np.zeros(0, np.int64)

    @property
    def cell(self) -> float:
        """Level-0 pixels per grid cell (the tile side)."""
        return float(self.grid.level0_size)

    @property
    def map_shape(self) -> tuple[int, int]:
        return tuple(self.grid.grid_shape)  # type: ignore[return-value]

    @property
    def class_map(self) -> np.ndarray:
        """(rows, cols) labels: 0 = background (no tile), class ``k`` → ``k + 1``."""
        dtype = np.uint8 if len(self.classes) < 255 else np.uint16
        out = np.zeros(self.map_shape, dtype)
        r, c = self.grid.tile_index.T
        out[r, c] = self.predicted + 1
        return out

    @property
    def prob_maps(self) -> np.ndarray:
        """(C, rows, cols) float32 probability of each class; 0 where there is no tile."""
        out = np.zeros((len(self.classes), *self.map_shape), np.float32)
        r, c = self.grid.tile_index.T
        out[:, r, c] = self.probabilities.T
        return out

    def label_names(self) -> dict[int, str]:
        """``{label value: name}`` of the class map: 0 is background, ``k + 1`` is ``classes[k]``."""
        return {0: BACKGROUND, **{k + 1: name for k, name in enumerate(self.classes)}}

    @property
    def scale(self) -> tuple[float, float]:
        return self.transform()[0]

    @property
    def translate(self) -> tuple[float, float]:
        return self.transform()[1]

    def transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``(scale, translate)`` of the grid maps over the slide layer."""
        from ..coords import layer_transform

        return layer_transform(self.mpp, self.cell)

    def tile_at(self, y0: float, x0: float) -> int | None:
        """Index of the classified tile holding level-0 pixel ``(y0, x0)``, or None."""
        if y0 < 0 or x0 < 0:
            return None
        r, c = int(y0 // self.cell), int(x0 // self.cell)
        hit = np.nonzero((self.grid.tile_index[:, 0] == r) & (self.grid.tile_index[:, 1] == c))[0]
        return int(hit[0]) if hit.size else None

    def tiles_in_box(self, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
        """Indices of tiles that overlap the level-0 box ``[y0, y1) x [x0, x1)``, in grid order."""
        t = self.grid.tiles
        s = self.cell
        keep = (t[:, 0] < y1) & (t[:, 0] + s > y0) & (t[:, 1] < x1) & (t[:, 1] + s > x0)
        return np.nonzero(keep)[0]

    def class_fractions(self) -> dict[str, float]:
        """Share of the classified tiles predicted as each class."""
        n = max(1, self.n_tiles)
        counts = np.bincount(self.predicted, minlength=len(self.classes))
        return {name: float(counts[k] / n) for k, name in enumerate(self.classes)}

    def layer_kwargs(self) -> dict:
        """Common napari keyword arguments (scale, translate, units, metadata) of the result's layers."""
        from ..coords import layer_units

        scale, translate = self.transform()
        return {
            "scale": scale, "translate": translate, "units": layer_units(self.mpp),
            "metadata": {"pathfm_kind": "classify", "classes": self.label_names(), "downsample": self.cell,
                         "source": self.source, "checkpoint": self.checkpoint, "model_mpp": self.model_mpp,
                         "pathfm_notes": list(self.notes)},
        }  # fmt: skip

    def summary(self) -> dict:
        counts = np.bincount(self.predicted, minlength=len(self.classes))
        return {
            "input": self.source,
            "checkpoint": self.checkpoint,
            "notes": self.notes,
            "classes": self.classes,
            "tiles": self.n_tiles,
            "grid_shape": list(self.map_shape),
            "tile_size": int(self.grid.tile_size),
            "level0_tile_size": self.cell,
            "mpp": self.mpp,
            "model_mpp": self.model_mpp,
            "class_counts": {name: int(counts[k]) for k, name in enumerate(self.classes)},
            "class_fractions": self.class_fractions(),
            "mean_probabilities": {
                name: float(self.probabilities[:, k].mean()) if self.n_tiles else 0.0
                for k, name in enumerate(self.classes)
            },
            "label_values": {str(k): v for k, v in self.label_names().items()},
            "messages": self.messages,
            "written": {k: str(v) for k, v in self.written.items()},
            "cache": self.cache,
        }


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


def _normalization(card: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _logits(out: Any):
    return out["logits"] if isinstance(out, dict) else out


# -- run ---------------------------------------------------------------------------------------


def _target_mpp(slide: Any, mpp: float | None, card: dict, messages: list[str]) -> float | None:
    target = mpp if mpp is not None else card.get("input_mpp")
    if target is None:
        return None
    if slide.mpp is None:
        if mpp is not None:
            raise SlideError(
                slide.path, f"has no pixel size (µm/px) in its metadata, so it cannot be classified at {mpp} µm/px.",
                "Give the image's µm/px (image_mpp / --image-mpp), or leave out mpp to classify it at its own "
                "resolution.",
            )  # fmt: skip
        # the card's µm/px is not reached: model_notes says so ("has no pixel size (µm/px unknown) ...")
        return None
    return float(target)


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
    from ..io.slide import open_slide

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if image_mpp is not None and not image_mpp > 0:
        raise ValueError(f"image_mpp must be positive, got {image_mpp}")
    own = not hasattr(slide, "read")
    s = open_slide(slide) if own else slide
    saved_mpp = s.mpp
    try:
        if image_mpp is not None:
            s.mpp = float(image_mpp)
        return _classify(s, model_or_checkpoint, mpp=mpp, tile=tile, batch_size=batch_size, device=device,
                         tissue_only=tissue_only, min_tissue=min_tissue, workers=workers, progress=progress,
                         cancel=cancel, cache=cache)  # fmt: skip
    finally:
        s.mpp = saved_mpp
        if own:
            s.close()


def _classify(slide, model_or_checkpoint, *, mpp, tile, batch_size, device, tissue_only, min_tissue, workers,
              progress, cancel, cache=None) -> ClassifyResult:  # fmt: skip
    from ..device import autocast_dtype, reader_workers, resolve_device
    from ..tiles import tile_grid
    from ..tiles.cached_encoder import CachedEncoder
    from ..tiles.loader import native_tile_cache
    from .notes import merge_notes, model_notes
    from .segment import _shared_level
    from .tissue_tiles import compute_tissue_tiles

    dev = resolve_device(device)
    model, card, source = load_classifier(model_or_checkpoint, device=dev)
    if workers is None:
        workers = reader_workers(dev)
    messages: list[str] = []
    target = _target_mpp(slide, mpp, card, messages)
    t = int(tile or card.get("tile_size") or 224)
    if t < 8:
        raise ValueError(f"tile must be at least 8 pixels, got {t}")

    reader = _shared_level(slide, target, tissue_only, workers, cancel)  # decode a level read twice only once
    tissue = None
    if tissue_only:
        tt = compute_tissue_tiles(reader, tile_size=t, mpp=target, min_tissue=min_tissue, progress=progress,
                                  cancel=cancel)  # fmt: skip
        grid, tissue = tt.grid, tt.tissue
    else:
        grid = tile_grid(reader, t, mpp=target)
    check_cancel(cancel, "classification")
    if reader is slide:
        reader = native_tile_cache(slide, grid)
    if not len(grid):
        messages.append(f"no tissue found in {Path(slide.path).name}: nothing was classified.")
    amp = autocast_dtype(dev)
    mean, std = _normalization(card)
    prep = {"mean": list(mean), "std": list(std), "tile_size": int(grid.tile_size)}
    with CachedEncoder(model, slide, grid, cache=cache, preprocess=prep, precision=str(amp) if amp else None) as enc:
        probs = _run_tiles(reader, grid, model, dev, card, source, batch_size=batch_size, workers=workers,
                           progress=progress, cancel=cancel, encoder=enc)  # fmt: skip
    classes = _classes(card, probs.shape[1] if probs.size else getattr(model, "num_classes", None))
    if classes is None:
        classes = []
    if probs.size and len(classes) != probs.shape[1]:
        raise CheckpointError(
            source or "the model card", f"lists {len(classes)} classes ({', '.join(classes)}) but the model "
            f"predicts {probs.shape[1]}.", "Use the card that was saved with these weights, or fix its 'classes'.",
        )  # fmt: skip
    if not probs.size:
        probs = np.zeros((0, len(classes)), np.float32)
    notes = model_notes(card, source, slide_mpp=slide.mpp, run_mpp=grid.mpp, slide_name=Path(slide.path).name,
                        run_tile=t, tissue_fraction=float(tissue.mask.mean()) if tissue is not None else None)  # fmt: skip
    messages = merge_notes(notes, messages)
    for m in messages:
        log.info(m)
    return ClassifyResult(classes=classes, probabilities=probs, grid=grid, mpp=slide.mpp, model_mpp=grid.mpp,
                          source=str(slide.path), checkpoint=source, messages=messages,
                          cache=enc.summary(), notes=notes)  # fmt: skip


def _run_tiles(slide, grid, model, dev, card, source, *, batch_size, workers, progress, cancel,
               encoder=None) -> np.ndarray:  # fmt: skip
    """Softmax probabilities ``(N, C)`` float32 of every tile of ``grid``, in grid order.

    With an active ``encoder`` (:class:`~napari_pathfm.tiles.cached_encoder.CachedEncoder`) the frozen
    encoder's outputs come from the embedding cache where stored.
    """
    import torch

    from ..device import autocast_dtype
    from ..tiles import iter_tile_batches

    n = len(grid)
    if not n:
        return np.zeros((0, 0), np.float32)
    mean, std = _normalization(card)
    model.to(dev).eval()
    amp = autocast_dtype(dev)
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else nullcontext()
    name = Path(slide.path).name
    out: np.ndarray | None = None
    done = 0
    report(progress, 0, n, f"{name}: classifying")
    batches = iter_tile_batches(slide, grid, batch_size, prefetch=max(2 * batch_size, 4 * workers), workers=workers,
                                cancel=cancel)  # fmt: skip
    try:
        with torch.inference_mode():
            for batch in batches:
                check_cancel(cancel, "classification")
                with autocast:
                    x = preprocess_tiles(batch.images, dev, mean, std)
                    if encoder is not None and encoder.active:
                        logits = _logits(model.decode(x, encoder(batch.indices, x, dev)))
                    else:
                        logits = _logits(model(x))
                if logits.ndim != 2 or logits.shape[0] != len(batch.indices):
                    raise CheckpointError(
                        source or "the model", f"produced output of shape {tuple(logits.shape)}; a tile classifier "
                        f"must give (batch, classes) logits, here ({len(batch.indices)}, C).",
                        "Pick a checkpoint of family 'classify'.",
                    )  # fmt: skip
                p = torch.softmax(logits.float(), dim=1).cpu().numpy()
                if out is None:
                    out = np.empty((n, p.shape[1]), np.float32)
                out[batch.indices] = p
                done += len(batch.indices)
                report(progress, done, n, f"{name}: classifying")
    finally:
        batches.close()
    check_cancel(cancel, "classification")
    return out


# -- writing -----------------------------------------------------------------------------------


def _write_csv(result: ClassifyResult, path: Path) -> Path:
    pred = result.predicted
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "row", "col", "y0", "x0", "size0", "class", "label", *[f"p_{c}" for c in result.classes]])
        size0 = f"{result.cell:.6g}"
        for i, ((y, x), (r, c)) in enumerate(zip(result.grid.tiles, result.grid.tile_index)):
            k = int(pred[i])
            probs = [f"{v:.6f}" for v in result.probabilities[i]]
            w.writerow([i, int(r), int(c), int(y), int(x), size0, result.classes[k], k + 1, *probs])
    return path


def write_classify_outputs(
    result: ClassifyResult,
    out_dir: PathLike,
    *,
    geojson: bool = True,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> dict[str, Path]:
    """Write the result into ``out_dir``, all files or none.

    Files: ``class-map.ome.tif`` (labels, one pixel per tile, class names in the metadata, pixel
    size = tile side in µm), ``probabilities.ome.tif`` (float32 CYX, one channel per class, named),
    ``tiles.csv`` (one row per tile: level-0 position, class, probabilities), ``tiles.geojson``
    (classified tile regions as QuPath polygons in level-0 pixels; with ``geojson``) and
    ``summary.json`` (counts and fractions per class, geometry, the files written).

    Everything is written into a hidden temporary folder inside ``out_dir`` and moved into place
    (``os.replace``, ``summary.json`` last) only when all files are complete: a cancel or an error
    leaves earlier outputs untouched and no new ones.
    """
    from ..io.geojson import write_geojson
    from ..io.scratch import scratch_dir
    from ..io.ome_tiff import write_ome_tiff

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cell_mpp = result.mpp * result.cell if result.mpp else None
    meta = {"kind": "classify", "slide": result.source, "checkpoint": result.checkpoint, "downsample": result.cell,
            "model_mpp": result.model_mpp, "classes": result.classes, "tile_size": int(result.grid.tile_size),
            "notes": result.notes}  # fmt: skip
    names = {"class_map": "class-map.ome.tif", "probabilities": "probabilities.ome.tif", "tiles_csv": "tiles.csv",
             **({"geojson": "tiles.geojson"} if geojson else {}), "summary": "summary.json"}  # fmt: skip
    steps = len(names)
    with scratch_dir("classify", dir=out) as tmp_dir:
        tmp = {k: Path(tmp_dir) / v for k, v in names.items()}
        report(progress, 0, steps, "writing class map")
        write_ome_tiff(tmp["class_map"], result.class_map, mpp=cell_mpp, is_labels=True,
                       class_names=result.label_names(), metadata=meta, cancel=cancel)  # fmt: skip
        report(progress, 1, steps, "writing probabilities")
        write_ome_tiff(tmp["probabilities"], result.prob_maps, mpp=cell_mpp, axes="CYX", channel_names=result.classes,
                       metadata=meta, cancel=cancel)  # fmt: skip
        check_cancel(cancel, "writing")
        report(progress, 2, steps, "writing tiles.csv")
        _write_csv(result, tmp["tiles_csv"])
        if geojson:
            write_geojson(tmp["geojson"], result.class_map, result.label_names(), downsample=result.cell)
        check_cancel(cancel, "writing")
        result.written = {**result.written, **{k: out / v for k, v in names.items()}}
        from ..io.jsonsafe import dumps as strict_dumps  # undefined metrics -> null, with a warning

        text = strict_dumps(result.summary(), where=str(out / "summary.json"), indent=2, default=str)
        tmp["summary"].write_text(text, encoding="utf-8")
        for key, name in names.items():  # summary.json last: its presence means the set is complete
            os.replace(tmp[key], out / name)
    report(progress, steps, steps, "written")
    return dict(result.written)
