"""Patch features of whole slides for MIL: tissue tiles → feature extractor → one zarr per slide.

:func:`extract_features` runs one slide and decides when an existing feature file may be reused
(:data:`MATCH_KEYS`); many slides, and what ``pathfm features`` calls, are :mod:`.features_many`.
The file format and its reader live in :mod:`napari_pathfm.io.features` and are re-exported here.

Patch order: rows follow the tile grid, row-major over tissue tiles (top to bottom,
then left to right, by level-0 (y, x)); S4 MIL treats a bag as a sequence, so the
same slide always yields the same sequence. Features are streamed into the zarr
array batch by batch, inside a temporary folder that is renamed into place only
after the last row; a cancel or a crash leaves no output and a later run redoes
the slide. Importing this module does not import torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.features import (
    PATCH_ORDER,
    FeatureBag,
    RowWriter,
    _jsonable,
    check_feature_dim,
    create_feature_store,
    feature_path,
    finish_feature_store,
    read_features,
    reusable_feature_attrs,
    write_features,
)
from ..progress import check_cancel

__all__ = [
    "PATCH_ORDER",
    "FeatureBag",
    "FeatureOptions",
    "check_feature_dim",
    "extract_features",
    "feature_path",
    "read_features",
    "write_features",
]

log = logging.getLogger(__name__)

PathLike = str | Path
#: Attributes that must match for an existing feature file to be reused.
MATCH_KEYS = (
    "extractor",
    "backbone",
    "weights_sha256",
    "input_size",
    "mean",
    "std",
    "feature_dim",
    "target_mpp",
    "tile_size",
    "min_tissue",
    "tissue_mpp",
    "slide_bytes",
)


@dataclass
class FeatureOptions:
    """How slides are tiled and run through the extractor (the keyword arguments of the same names of
    :func:`extract_features` and :func:`~.features_many.extract_features_many`)."""

    mpp: float | None = 0.5
    tile_size: int = 256
    min_tissue: float = 0.25
    batch_size: int = 32
    device: str = "auto"
    tissue_mpp: float = 8.0
    cache: Any = None


def as_extractor(extractor: Any, kwargs: dict | None = None):
    """``extractor`` as is, or the ``features``-family model of that registry name built with ``kwargs``."""
    if isinstance(extractor, str):
        from ..models.registry import create_model

        return create_model(extractor, **(kwargs or {}))
    return extractor


def feature_settings(extractor: Any, o: FeatureOptions, slide_path: Path) -> dict:
    """What a feature file records of how it was made (its reuse key, :data:`MATCH_KEYS`)."""
    if not hasattr(extractor, "describe"):
        raise TypeError(f"expected a feature extractor of the 'features' model family, got {type(extractor).__name__}")
    return {
        **extractor.describe(),
        "target_mpp": None if o.mpp is None else float(o.mpp),
        "tile_size": int(o.tile_size),
        "min_tissue": float(o.min_tissue),
        "tissue_mpp": float(o.tissue_mpp),
        "slide_bytes": slide_path.stat().st_size if slide_path.is_file() else None,
    }


def up_to_date_attrs(path: Path, settings: dict, slide_path: Path | None = None) -> dict | None:
    """The attributes of an existing feature file that may be reused as is, else None.

    A file is reused only when it is complete, passes its checksums and was made with the same
    settings; a damaged or incomplete one is recomputed, with a warning naming the slide.
    """
    attrs, problem = reusable_feature_attrs(path)
    if problem:
        log.warning(
            "%s: the existing feature file %s is damaged or incomplete (%s); recomputing it",
            Path(slide_path or path).name,
            path,
            problem,
        )
    wanted = _jsonable(settings)
    if attrs is None:
        return None
    made, now = attrs.get("weights_sha256"), wanted.get("weights_sha256")
    if made and now and made != now and attrs.get("backbone") == wanted.get("backbone"):
        log.warning(
            "%s: the existing feature file %s was made with other %s weights (sha256 %s…, now %s…); recomputing it",
            Path(slide_path or path).name,
            path,
            wanted.get("backbone"),
            made[:12],
            now[:12],
        )
    return attrs if all(attrs.get(k) == wanted.get(k) for k in MATCH_KEYS) else None


def extract_open_slide(
    slide: Any, extractor: Any, out_path: Path, settings: dict, o: FeatureOptions, *, progress: Any, cancel: Any
) -> int:
    """Write the feature file of one open slide (atomically); returns the number of tiles."""
    from ..device import resolve_device
    from ..io.atomic import atomic_path
    from .tile_run import plan_tiles, run_tiles, tile_encoder

    _, grid, tissue = plan_tiles(
        slide,
        settings["target_mpp"],
        settings["tile_size"],
        what="feature extraction",
        min_tissue=settings["min_tissue"],
        mask_mpp=settings["tissue_mpp"],
        share=False,
        progress=progress,
        cancel=cancel,
    )
    if slide.mpp is None:
        log.warning("%s has no pixel size: tiles are read at level 0 without resizing (mpp None)", slide.path)
    n, dim = len(grid), int(extractor.out_dim)
    sig = slide.signature()
    attrs = {
        "slide": str(slide.path),
        "slide_signature": sig.key(),
        "slide_mpp": slide.mpp,
        "level0_shape": list(grid.level0_shape),
        "grid_shape": list(grid.grid_shape),
        "mpp": grid.mpp,
        "level": grid.level,
        "read_size": grid.read_size,
        "level0_tile_size": float(grid.level0_size),
        "stain": tissue.stain if tissue is not None else None,  # the MIL notes compare it with the card's
        **settings,
    }
    dev = resolve_device(o.device)
    extractor.to(dev).eval()
    with atomic_path(out_path, directory=True) as tmp:
        group = create_feature_store(tmp, n, dim, attrs)
        if n:
            group["coords"][:] = grid.tiles
        writer = RowWriter(group["features"])
        prep = {"mean": list(extractor.mean), "std": list(extractor.std), "input_size": extractor.input_size}
        with tile_encoder(extractor, slide, grid, dev, cache=o.cache, preprocess=prep) as encoder:
            task = _feature_task(extractor, dev, dim, writer, encoder)
            run_tiles(
                slide,
                grid,
                task,
                batch_size=o.batch_size,
                prefetch=2 * o.batch_size,
                encoder=encoder,
                progress=progress,
                cancel=cancel,
            )
        check_cancel(cancel, "feature extraction")
        finish_feature_store(group)
    return n


def _feature_task(extractor: Any, dev: str, dim: int, writer: RowWriter, encoder: Any) -> Any:
    """Feature extraction's part of the tile run: one ``dim`` vector per tile, appended to ``writer`` in grid order.

    The extractor's frozen trunk runs through ``encoder`` (the embedding cache), so a run whose tiles are
    all stored reads no pixels (``batch.images`` None).
    """
    from .tile_run import TileTask, autocast

    amp = autocast(dev)

    def infer(batch: Any) -> Any:
        with amp:
            x = None if batch.images is None else extractor.preprocess(batch.images, dev)
            out = extractor.decode(x, encoder(batch.indices, x, dev))
            if tuple(out.shape) != (len(batch.indices), dim):
                raise RuntimeError(f"extractor returned {tuple(out.shape)}, expected ({len(batch.indices)}, {dim})")
            return out.float().cpu().numpy()

    return TileTask("feature extraction", "features", infer, lambda batch, rows: writer.append(rows), writer.close)


def extract_features(
    slide: Any,
    extractor: Any,
    out_path: PathLike,
    *,
    mpp: float | None = 0.5,
    tile_size: int = 256,
    min_tissue: float = 0.25,
    batch_size: int = 32,
    device: str = "auto",
    tissue_mpp: float = 8.0,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    cache: Any = None,
) -> Path:
    """Extract one feature vector per tissue tile of a slide into a zarr feature file.

    Parameters
    ----------
    slide : Slide or path
        From :func:`napari_pathfm.io.open_slide` (a path is opened and closed here).
        Plain images (PNG/JPEG) work; without a pixel size they are tiled at level 0
        without resizing and the file records ``mpp: None``.
    extractor : FeatureExtractor or str
        A model of family ``"features"`` (e.g. ``create_model("resnet50_trunc",
        weights=...)``) or a registry name.
    out_path : path
        The ``.features.zarr`` folder to write; an existing one is replaced once the
        new one is complete.
    mpp : float
        Target µm per pixel of the tiles the extractor sees.
    tile_size : int
        Tile side in pixels at ``mpp`` (the extractor resizes to its ``input_size``).
    min_tissue : float
        Minimum tissue fraction of a kept tile.
    batch_size : int
        Tiles per forward pass.
    device : str
        ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``...; bf16/fp16 autocast on CUDA.
    tissue_mpp : float
        µm per pixel of the tissue mask.
    progress, cancel
        See :mod:`napari_pathfm.progress`; cancel is checked between batches and
        raises :class:`~napari_pathfm.errors.Cancelled`, leaving no output.
    cache : None, False, path or EmbeddingCache
        Tile-embedding cache (:mod:`napari_pathfm.tiles.embedding_cache`): None = the default one
        (off with ``PATHFM_CACHE=0``), False = none. Tiles encoded before with the same extractor
        weights are read from it instead of the slide.

    Returns
    -------
    Path
        ``out_path``. Read it with :func:`read_features`.
    """
    from .tile_run import opened_slide

    extractor = as_extractor(extractor)
    o = FeatureOptions(
        mpp=mpp,
        tile_size=tile_size,
        min_tissue=min_tissue,
        batch_size=batch_size,
        device=device,
        tissue_mpp=tissue_mpp,
        cache=cache,
    )
    with opened_slide(slide) as s:
        settings = feature_settings(extractor, o, Path(s.path))
        extract_open_slide(s, extractor, Path(out_path), settings, o, progress=progress, cancel=cancel)
    return Path(out_path)
