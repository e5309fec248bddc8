"""Whole-slide semantic segmentation: tissue tiles → model → blended logits → class map at level 0.

:func:`segment_slide` runs a segmentation model (``create_model("pathsam2", ...)`` or any module
with the same contract) over a slide or a plain image and returns the class map at the input's
level-0 size (uint8, 0 = background), placed with the slide's µm/px:

1. Tissue mask at low resolution and a tile grid at the model's µm/px with overlap
   (:mod:`napari_pathfm.tiles`); only tiles that touch tissue are run, the rest is background.
2. Tiles are decoded by the prefetching loader in background threads while the model runs
   (the tile-run frame of :mod:`.tile_run`).
3. Per-class logits of overlapping tiles are blended with pyramidal weights
   (:class:`~napari_pathfm.tiles.canvas.BandedCanvas`), so there are no seams at tile borders.
4. The blended logits are resampled bilinearly from the model's µm/px to level 0 and the
   class map is their argmax.

Memory stays bounded on any slide: logits are blended in horizontal bands of the model-resolution
canvas (each band holds the tiles that reach into it, plus a margin so that tiles keep exactly
the weights they would have on the full canvas), and a band is turned into level-0 labels and
dropped as soon as no later tile can reach it. The level-0 class map lives in memory for slides up
to :data:`IN_MEMORY_PIXELS` and in a compressed temporary zarr array beyond. Results are written
as a pyramidal OME-TIFF (class names in its metadata) and optionally QuPath GeoJSON, both
atomically: a cancel or an error leaves no file behind. The per-batch model call and blending live in
:mod:`.segment_tiles`, the writers in :mod:`.segment_outputs`. Importing this module does not import torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..instances import ObjectOptions, object_options, separate, split_objects
from ..io.scratch import scratch_dir
from . import segment_model as _sm
from .segment_model import class_names, default_segment_checkpoint, load_segmentation_model, tile_geometry
from .segment_outputs import SegmentOutputs, check_suffix, write_segmentation
from .segment_result import SegmentationResult
from .segment_tiles import SegmentTiles
from .tile_run import opened_slide, plan_tiles, run_mpp, run_tiles, tile_encoder, uses_flips

__all__ = [
    "IN_MEMORY_PIXELS",
    "SegmentOptions",
    "SegmentationResult",
    "default_segment_checkpoint",
    "load_segmentation_model",
    "segment_slide",
    "write_segmentation",
]

log = logging.getLogger(__name__)

#: Level-0 class maps up to this many pixels are kept in memory; larger ones in a temporary zarr.
IN_MEMORY_PIXELS = 256 * 2**20

PathLike = str | Path


@dataclass
class SegmentOptions:
    """How :func:`segment_slide` runs the model over a slide (its keyword arguments of the same names).

    ``mpp``/``tile_size`` None take the model card's; ``workers`` None the device's default.
    ``objects``: see :func:`~napari_pathfm.instances.object_options` (None: the card's settings).
    ``flips`` None: the card's ``flips`` (default off).
    """

    mpp: float | None = None
    tile_size: int | None = None
    overlap: float = 0.25
    tissue_only: bool = True
    min_tissue: float = 0.0
    batch_size: int = 8
    device: str = "auto"
    weights: str = "pyramidal"
    workers: int | None = None
    cache: Any = None
    objects: Any = None
    flips: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


def segment_slide(
    slide_or_image: Any,
    model_or_checkpoint: Any = None,
    *,
    mpp: float | None = None,
    image_mpp: float | None = None,
    tile_size: int | None = None,
    overlap: float = 0.25,
    tissue_only: bool = True,
    min_tissue: float = 0.0,
    batch_size: int = 8,
    device: str = "auto",
    weights: str = "pyramidal",
    workers: int | None = None,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    out: PathLike | None = None,
    geojson: PathLike | None = None,
    cache: Any = None,
    objects: Any = None,
    flips: bool | None = None,
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
    objects : None, bool, dict or ObjectOptions
        Turn each foreground class into objects (:func:`napari_pathfm.instances.split_objects`: holes
        filled, crumbs dropped, touching glands split; a background line drawn between objects, so
        the Labels layer's and the GeoJSON's regions are the objects; ``instances`` holds their
        ids). None (default): with the settings in the model card's ``objects`` (the bundled GlaS
        model has them), no objects for a card without. True: the card's or the default settings.
        False: the model's class map as it is. Done for class maps held in memory (up to
        :data:`IN_MEMORY_PIXELS`); larger ones keep the model's map and say so in ``messages``.
    flips : bool, optional
        Average each tile's logits over the tile and its mirror images (left-right, up-down, both):
        4x the model's compute, and no embedding cache. None (default): the model card's ``flips``.

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
    out = check_suffix(out, (".ome.tif", ".ome.tiff"), "mask output")
    geojson = check_suffix(geojson, (".geojson", ".json"), "GeoJSON output")
    options = SegmentOptions(
        mpp=mpp,
        tile_size=tile_size,
        overlap=overlap,
        tissue_only=tissue_only,
        min_tissue=min_tissue,
        batch_size=batch_size,
        device=device,
        weights=weights,
        workers=workers,
        cache=cache,
        objects=objects,
        flips=flips,
    )
    with opened_slide(slide_or_image, image_mpp) as slide:
        return _segment(slide, model_or_checkpoint, options, out=out, geojson=geojson, progress=progress, cancel=cancel)


def _segment(
    slide: Any,
    model_or_checkpoint: Any,
    o: SegmentOptions,
    *,
    out: Path | None,
    geojson: Path | None,
    progress: Any,
    cancel: Any,
) -> SegmentationResult:
    from ..device import reader_workers, resolve_device
    from .notes import merge_notes, model_notes

    dev = resolve_device(o.device)
    model, card, source = load_segmentation_model(model_or_checkpoint, device=dev)
    workers = reader_workers(dev) if o.workers is None else o.workers
    k = getattr(model, "num_classes", None)
    classes = class_names(card, k)
    k = int(k) if k is not None else (len(classes) if classes else None)
    messages: list[str] = []
    target = run_mpp(slide, o.mpp, card, "segmented", "segment")
    t, ov = tile_geometry(model, card, o.tile_size, o.overlap)
    flips = uses_flips(o.flips, card)
    # the level the tissue mask and the tiles both read is decoded only once
    reader, grid, tissue = plan_tiles(
        slide,
        target,
        t,
        what="segmentation",
        tissue_only=o.tissue_only,
        min_tissue=max(o.min_tissue, 1e-9),
        overlap=ov,
        workers=workers,
        progress=progress,
        cancel=cancel,
    )

    tmp_dir = None
    if grid.level0_shape[0] * grid.level0_shape[1] > IN_MEMORY_PIXELS:
        tmp_dir = scratch_dir("segment", dir=out.parent if out and out.parent.is_dir() else None)
    try:
        store = _label_store(grid.level0_shape, Path(tmp_dir.name) if tmp_dir else None)
        if not len(grid):
            messages.append(f"no tissue found in {Path(slide.path).name}: the mask is all background.")
        notes = model_notes(
            card,
            source,
            slide_mpp=slide.mpp,
            run_mpp=grid.mpp,
            slide_name=Path(slide.path).name,
            tissue_fraction=float(tissue.mask.mean()) if tissue is not None else None,
            stain=tissue.stain if tissue is not None else None,
        )
        messages[:] = merge_notes(notes, messages)  # before the OME-TIFF writer starts: its metadata has both
        result = SegmentationResult(
            labels=store,
            classes=classes or [],
            mpp=slide.mpp,
            model_mpp=grid.mpp,
            grid=grid,
            tissue=tissue,
            source=str(slide.path),
            checkpoint=source,
            messages=messages,
            notes=notes,
            flips=flips,
            _tmp=tmp_dir,
        )
        meta = {"overlap": ov, "tile_size": t, "blend": o.weights, "flips": flips}
        outputs = SegmentOutputs(result, out=out, geojson=geojson, metadata=meta, progress=progress, cancel=cancel)
        objects = object_options(o.objects, card)
        split = objects is not None and isinstance(store, np.ndarray)
        if objects is not None and not split:
            messages.append(
                f"glands were not split into objects: the class map ({store.shape[1]} x {store.shape[0]} px) "
                "is too large to hold in memory; touching glands may be one region."
            )
        with outputs:
            if classes is not None and not split:
                outputs.start()  # the OME-TIFF is written while the tiles run, band by band
            if len(grid):
                prep = _sm.encoder_preprocess(model)
                cache = False if flips else o.cache  # the cache holds unflipped tiles only
                with tile_encoder(model, slide, grid, dev, cache=cache, preprocess=prep) as encoder:
                    tiles = SegmentTiles(
                        model,
                        grid,
                        dev,
                        k,
                        store,
                        weights=o.weights,
                        source=source,
                        outputs=outputs,
                        encoder=encoder,
                        cancel=cancel,
                        flips=flips,
                    )
                    run_tiles(
                        reader,
                        grid,
                        tiles.task(),
                        batch_size=o.batch_size,
                        workers=workers,
                        encoder=encoder,
                        progress=progress,
                        cancel=cancel,
                    )
                    k = tiles.k
                result.cache = encoder.summary()
            if classes is None:
                result.classes = class_names({}, k or 2)
            if split:
                _split_objects(result, objects, progress, cancel)
            outputs.finish()
    except BaseException:
        if tmp_dir is not None:
            tmp_dir.cleanup()
        raise
    for m in messages:
        log.info(m)
    return result


def _split_objects(result: SegmentationResult, options: ObjectOptions, progress: Any, cancel: Any) -> None:
    """Objects of the in-memory class map (:mod:`napari_pathfm.instances`), gaps drawn into it."""
    from ..progress import check_cancel, report

    check_cancel(cancel, "splitting glands")
    report(progress, 0, 1, "splitting glands into objects")
    instances, object_classes = split_objects(result.labels, result.mpp, options=options)
    result.labels[...] = separate(instances, object_classes)
    result.instances, result.object_classes = instances, object_classes
    report(progress, 1, 1, f"{len(object_classes) - 1} objects")
    check_cancel(cancel, "splitting glands")


def _label_store(shape: tuple[int, int], tmp: Path | None) -> Any:
    """The level-0 class map, zeros: in memory up to :data:`IN_MEMORY_PIXELS`, else a zarr array in ``tmp``."""
    if shape[0] * shape[1] <= IN_MEMORY_PIXELS or tmp is None:
        return np.zeros(shape, np.uint8)
    import zarr

    return zarr.create_array(
        store=str(tmp / "labels.zarr"), shape=shape, dtype=np.uint8, chunks=(512, 4096), fill_value=0
    )
