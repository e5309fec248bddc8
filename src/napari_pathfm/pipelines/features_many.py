"""Patch features of many slides: one ``<stem>.features.zarr`` each, resumable, failures reported per slide.

:func:`extract_features_many` runs a list or a folder of slides (:func:`find_slides`) through one
extractor: finished slides with the same settings are skipped
(:func:`~napari_pathfm.pipelines.features.up_to_date_attrs`), a slide that fails is reported and the
others go on. :func:`features_command` is what ``pathfm features`` and ``pathfm batch --task features``
call; it returns a JSON-friendly summary. One slide is :mod:`.features`. Importing this module does
not import torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import Cancelled, PathFMError
from ..io.features import feature_paths
from ..progress import check_cancel, report
from .features import FeatureOptions, as_extractor, extract_open_slide, feature_settings, up_to_date_attrs

__all__ = ["SlideResult", "extract_features_many", "features_command", "find_slides"]

log = logging.getLogger(__name__)

PathLike = str | Path


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
            settings = feature_settings(extractor, o, slide_path)
            done = None if overwrite else up_to_date_attrs(out_path, settings, slide_path)
            if done is not None:
                results.append(SlideResult(slide_path, "skipped", out_path, int(done.get("n_tiles", 0))))
                report(step, 1, 1, f"{slide_path.name}: up to date, skipped")
                continue
            with open_slide(slide_path) as slide:
                n = extract_open_slide(slide, extractor, out_path, settings, o, progress=step, cancel=cancel)
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
        as_extractor(extractor, extractor_kwargs),
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
        ``"timm_features"``), any timm model name, or a foundation model found offline
        (``"hf-hub:ORG/NAME"`` in the local Hugging Face cache, or a model folder), all run
        through ``timm_features``.
    weights : path, optional
        Local weights file for the backbone; without it a timm network is randomly
        initialised (features are then only good for testing), a foundation model uses its own.
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
    extractor = as_extractor(name, kwargs)
    if weights is None and extractor.weights is None:
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
