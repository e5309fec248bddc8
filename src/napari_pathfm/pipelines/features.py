"""Patch features of whole slides for MIL: tissue tiles → feature extractor → one zarr per slide.

:func:`extract_features` runs one slide, :func:`extract_features_many` a list or a
folder of slides (resumable: finished slides with the same settings are skipped;
a slide that fails is reported and the others go on), and :func:`features_command`
is what ``pathfm features`` calls. The file format and its reader live in
:mod:`napari_pathfm.io.features` and are re-exported here.

Patch order: rows follow the tile grid, row-major over tissue tiles (top to bottom,
then left to right, by level-0 (y, x)); S4 MIL treats a bag as a sequence, so the
same slide always yields the same sequence. Features are streamed into the zarr
array batch by batch, inside a temporary folder that is renamed into place only
after the last row; a cancel or a crash leaves no output and a later run redoes
the slide. Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Cancelled, PathFMError
from ..io.features import (
    PATCH_ORDER,
    FeatureBag,
    RowWriter,
    _jsonable,
    check_feature_dim,
    create_feature_store,
    feature_path,
    feature_paths,
    finish_feature_store,
    read_features,
    reusable_feature_attrs,
    write_features,
)
from ..progress import check_cancel, report

__all__ = [
    "PATCH_ORDER",
    "FeatureBag",
    "FeatureOptions",
    "check_feature_dim",
    "extract_features",
    "extract_features_many",
    "feature_path",
    "features_command",
    "find_slides",
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
    :func:`extract_features` and :func:`extract_features_many`)."""

    mpp: float | None = 0.5
    tile_size: int = 256
    min_tissue: float = 0.25
    batch_size: int = 32
    device: str = "auto"
    tissue_mpp: float = 8.0
    cache: Any = None


@dataclass
class SlideResult:
    """Outcome for one slide of :func:`extract_features_many`.

    ``status`` is ``"written"``, ``"empty"`` (written, but no tissue tiles),
    ``"skipped"`` (an up-to-date file existed) or ``"failed"``.
    """

    slide: Path
    status: str
    path: Path | None = None
    n_tiles: int | None = None
    error: BaseException | None = None
    seconds: float = 0.0


def find_slides(inputs: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand slide files and folders (their slide/image files, sorted, not recursive) into paths."""
    from ..io.slide import SLIDE_SUFFIXES

    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir() and item.suffix.lower() != ".mrxs":
            out += sorted(
                p
                for p in item.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SLIDE_SUFFIXES
            )
        else:
            out.append(item)
    return out


def _as_extractor(extractor: Any, kwargs: dict | None = None):
    if isinstance(extractor, str):
        from ..models.registry import create_model

        return create_model(extractor, **(kwargs or {}))
    return extractor


def _settings(extractor: Any, o: FeatureOptions, slide_path: Path) -> dict:
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


def _is_up_to_date(path: Path, settings: dict, slide_path: Path | None = None) -> dict | None:
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
    return attrs if attrs is not None and all(attrs.get(k) == wanted.get(k) for k in MATCH_KEYS) else None


def _extract(
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

    extractor = _as_extractor(extractor)
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
        _extract(
            s, extractor, Path(out_path), _settings(extractor, o, Path(s.path)), o, progress=progress, cancel=cancel
        )
    return Path(out_path)


def _run_many(
    inputs: Any, out_dir: PathLike, extractor: Any, o: FeatureOptions, *, overwrite: bool, progress: Any, cancel: Any
) -> list[SlideResult]:
    """Extract the features of every slide of ``inputs`` (``extractor`` built), skipping up-to-date files."""
    from ..io.slide import open_slide

    slides = find_slides(inputs)
    out_dir = Path(out_dir)
    results: list[SlideResult] = []
    for i, (slide_path, out_path) in enumerate(zip(slides, feature_paths(out_dir, slides))):
        check_cancel(cancel, "feature extraction")
        t0 = time.perf_counter()
        tag = f"[{i + 1}/{len(slides)}] "
        step = None if progress is None else (lambda d, t, m="", _tag=tag: progress(d, t, _tag + m))
        try:
            settings = _settings(extractor, o, slide_path)
            done = None if overwrite else _is_up_to_date(out_path, settings, slide_path)
            if done is not None:
                results.append(SlideResult(slide_path, "skipped", out_path, int(done.get("n_tiles", 0))))
                report(step, 1, 1, f"{slide_path.name}: up to date, skipped")
                continue
            with open_slide(slide_path) as slide:
                n = _extract(slide, extractor, out_path, settings, o, progress=step, cancel=cancel)
            status = "written" if n else "empty"
            if not n:
                log.warning("%s: no tissue tiles at min_tissue=%s; wrote an empty bag", slide_path, o.min_tissue)
            results.append(SlideResult(slide_path, status, out_path, n, seconds=time.perf_counter() - t0))
        except (Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            if not isinstance(exc, PathFMError):
                log.exception("%s: feature extraction failed", slide_path)
            log.warning("%s: %s", slide_path, exc)
            results.append(SlideResult(slide_path, "failed", None, None, exc, time.perf_counter() - t0))
    return results


def extract_features_many(
    inputs: PathLike | Iterable[PathLike],
    out_dir: PathLike,
    *,
    extractor: Any = "resnet50_trunc",
    extractor_kwargs: dict | None = None,
    mpp: float | None = 0.5,
    tile_size: int = 256,
    min_tissue: float = 0.25,
    batch_size: int = 32,
    device: str = "auto",
    tissue_mpp: float = 8.0,
    overwrite: bool = False,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    cache: Any = None,
) -> dict[str, Path | BaseException]:
    """Extract features of many slides into ``out_dir``, one ``<stem>.features.zarr`` each.

    Parameters
    ----------
    inputs : path or iterable of paths
        Slide/image files and folders of them (not searched recursively).
    out_dir : path
        Output folder (created when missing).
    extractor : FeatureExtractor or str
        A built extractor or a registry name, built once with ``extractor_kwargs``.
    overwrite : bool
        Recompute slides even when an up-to-date file exists.
    mpp, tile_size, min_tissue, batch_size, device, tissue_mpp, progress, cancel, cache
        As in :func:`extract_features`; ``progress`` messages start with ``[i/n]``.

    Returns
    -------
    dict
        ``{slide path: feature file path, or the exception that made it fail}``, in
        input order. An existing complete file made with the same extractor,
        weights hash, µm/px, tile size, tissue settings and slide size is reused
        as is; anything else is recomputed. Cancelling raises
        :class:`~napari_pathfm.errors.Cancelled` (finished slides stay).
    """
    o = FeatureOptions(
        mpp=mpp,
        tile_size=tile_size,
        min_tissue=min_tissue,
        batch_size=batch_size,
        device=device,
        tissue_mpp=tissue_mpp,
        cache=cache,
    )
    results = _run_many(
        inputs,
        out_dir,
        _as_extractor(extractor, extractor_kwargs),
        o,
        overwrite=overwrite,
        progress=progress,
        cancel=cancel,
    )
    return {str(r.slide): (r.error if r.status == "failed" else r.path) for r in results}


def features_command(
    inputs: PathLike | Iterable[PathLike],
    out_dir: PathLike,
    backbone: str = "resnet50_trunc",
    weights: PathLike | None = None,
    mpp: float | None = 0.5,
    tile: int = 256,
    batch_size: int = 32,
    device: str = "auto",
    min_tissue: float = 0.25,
    overwrite: bool = False,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    cache: Any = None,
    partial_weights: bool = False,
) -> dict:
    """What ``pathfm features SLIDE_OR_FOLDER --out DIR`` runs; returns a JSON-friendly summary.

    Parameters
    ----------
    backbone : str
        A registry name of family ``"features"`` (``"resnet50_trunc"``,
        ``"timm_features"``) or any timm model name (run through ``timm_features``).
    weights : path, optional
        Local weights file for the backbone; without it the network is randomly
        initialised (features are then only good for testing).
    cache : None, False, path or EmbeddingCache
        Tile-embedding cache, as in :func:`extract_features`.
    partial_weights : bool
        Accept ``weights`` that fit the backbone only partly (``--partial-weights``);
        by default such a file is refused with a table of what did not fit.

    Returns
    -------
    dict
        ``{"out_dir", "extractor", "counts": {status: n}, "slides": {slide: {"status",
        "path", "n_tiles", "error", "seconds"}}}`` with status ``written``,
        ``empty``, ``skipped`` or ``failed``.
    """
    from ..models.registry import list_models

    if backbone in list_models(family="features"):
        name, kwargs = backbone, {}
    else:
        name, kwargs = "timm_features", {"backbone": backbone}
    if weights is not None:
        kwargs["weights"] = str(weights)
        kwargs["partial_weights"] = bool(partial_weights)
    extractor = _as_extractor(name, kwargs)
    if weights is None:
        log.warning("no --weights given: %s is randomly initialised", backbone)
    o = FeatureOptions(
        mpp=mpp, tile_size=tile, min_tissue=min_tissue, batch_size=batch_size, device=device, cache=cache
    )
    results = _run_many(inputs, out_dir, extractor, o, overwrite=overwrite, progress=progress, cancel=cancel)
    counts = {k: sum(r.status == k for r in results) for k in ("written", "empty", "skipped", "failed")}
    return {
        "out_dir": str(out_dir),
        "extractor": extractor.describe(),
        "counts": counts,
        "slides": {
            str(r.slide): {
                "status": r.status,
                "path": None if r.path is None else str(r.path),
                "n_tiles": r.n_tiles,
                "error": None if r.error is None else str(r.error),
                "seconds": round(r.seconds, 3),
            }
            for r in results
        },
    }
