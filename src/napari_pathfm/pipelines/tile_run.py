"""The tile-run frame shared by segment, classify and features: slide → tiles → batched model → task.

Every slide-scale pipeline does the same things around its model, and they live here once:

- :func:`opened_slide`: open a path (or take an open slide), override its µm/px for the run
  (``image_mpp``) and put everything back afterwards;
- :func:`run_mpp`: the µm/px the model runs at (argument, else the model card's), or an error
  naming the slide when it has no pixel size to reach it;
- :func:`plan_tiles`: the tissue mask and tile grid, with the level the tiles come from held in
  memory (or its native tiles cached) when it is read more than once;
- :func:`tile_encoder`: the tile-embedding cache of the model's frozen encoder;
- :func:`flip_average`: test-time flips of a batch (segment's and translate's ``flips``);
- :func:`run_tiles`: prefetched batches (or, when the cache holds every tile, batches without
  pixels) through a :class:`TileTask` — its ``infer`` (model on one batch) and ``collect``
  (blend or store the output) — under inference mode, with progress after every batch and a
  cancel check before each one and before ``finish``.

A task supplies only what differs: how a batch becomes model output, where the output goes, and
how its files are written (each pipeline writes atomically through :mod:`napari_pathfm.io.atomic`).
Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SlideError
from ..progress import check_cancel, report

__all__ = [
    "FLIPS",
    "TileTask",
    "autocast",
    "flip_average",
    "opened_slide",
    "plan_tiles",
    "run_mpp",
    "run_tiles",
    "shared_level",
    "tile_encoder",
    "uses_flips",
]


def _nothing() -> None:
    return None


@dataclass
class TileTask:
    """What one pipeline does with the batches of a tile run.

    Attributes
    ----------
    what : str
        The work, as :class:`~napari_pathfm.errors.Cancelled` names it (``"segmentation"``).
    label : str
        Progress label after the slide name (``"segmenting"``).
    infer : callable
        ``infer(batch) -> output``: the model on one :class:`~napari_pathfm.tiles.TileBatch`
        (``batch.images`` is None in a run served by the embedding cache alone).
    collect : callable
        ``collect(batch, output)``: blend, store or write the output of a batch.
    finish : callable
        Called once after the last batch (still in inference mode), unless the run was cancelled.
    close : callable
        Called once at the end of the run, also after an error or a cancel.
    """

    what: str
    label: str
    infer: Callable[[Any], Any]
    collect: Callable[[Any, Any], None]
    finish: Callable[[], None] = _nothing
    close: Callable[[], None] = _nothing


@contextmanager
def opened_slide(slide_or_path: Any, image_mpp: float | None = None) -> Iterator[Any]:
    """The open slide of ``slide_or_path`` (a path is opened here and closed on exit).

    ``image_mpp`` replaces the slide's µm/px for the run, for images whose file does not record
    it or records it wrongly; the slide's own value is restored on exit.
    """
    from ..io.slide import open_slide

    if image_mpp is not None and not image_mpp > 0:
        raise ValueError(f"image_mpp must be positive, got {image_mpp}")
    own = not hasattr(slide_or_path, "read")
    slide = open_slide(slide_or_path) if own else slide_or_path
    saved_mpp = slide.mpp
    try:
        if image_mpp is not None:
            slide.mpp = float(image_mpp)
        yield slide
    finally:
        slide.mpp = saved_mpp
        if own:
            slide.close()


def run_mpp(slide: Any, mpp: float | None, card: dict, done: str, do: str) -> float | None:
    """µm/px the model runs at: ``mpp``, else the card's ``input_mpp``, else None (the slide's level 0).

    A slide without a pixel size runs at its own level 0 when the µm/px comes from the card (the
    run's notes say so); an explicit ``mpp`` cannot be reached and is a
    :class:`~napari_pathfm.errors.SlideError` (``done``/``do``: "segmented"/"segment").
    """
    target = mpp if mpp is not None else card.get("input_mpp")
    if target is None:
        return None
    if slide.mpp is None:
        if mpp is not None:
            raise SlideError(
                slide.path,
                f"has no pixel size (µm/px) in its metadata, so it cannot be {done} at {mpp} µm/px.",
                f"Give the image's µm/px (image_mpp / --image-mpp), or leave out mpp to {do} it at its own resolution.",
            )
        # the card's µm/px is not reached: model_notes says so ("has no pixel size (µm/px unknown) ...")
        return None
    return float(target)


def shared_level(slide: Any, target: float | None, tissue_only: bool, workers: int, cancel: Any) -> Any:
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


def plan_tiles(
    slide: Any,
    target: float | None,
    tile: int,
    *,
    what: str,
    tissue_only: bool = True,
    min_tissue: float = 0.0,
    overlap: int = 0,
    workers: int = 2,
    share: bool = True,
    mask_mpp: float = 8.0,
    progress: Any = None,
    cancel: Any = None,
) -> tuple[Any, Any, Any]:
    """``(reader, grid, tissue)``: where tiles are read from, the tiles to run, the tissue mask (or None).

    With ``tissue_only`` the grid keeps tiles with more than ``min_tissue`` tissue (mask at
    ``mask_mpp``), else it holds every tile. With ``share`` a level read twice is decoded once
    (:func:`shared_level`) and a tiled file's native tiles are decoded once
    (:func:`~napari_pathfm.tiles.loader.native_tile_cache`); same pixels either way.
    """
    from ..tiles import tile_grid
    from ..tiles.loader import native_tile_cache
    from .tissue_tiles import compute_tissue_tiles

    reader = shared_level(slide, target, tissue_only, workers, cancel) if share else slide
    tissue = None
    if tissue_only:
        tt = compute_tissue_tiles(
            reader,
            tile_size=tile,
            mpp=target,
            overlap=overlap,
            min_tissue=min_tissue,
            mask_mpp=mask_mpp,
            progress=progress,
            cancel=cancel,
        )
        grid, tissue = tt.grid, tt.tissue
    else:
        grid = tile_grid(reader, tile, mpp=target, overlap=overlap)
    check_cancel(cancel, what)
    if share and reader is slide:
        reader = native_tile_cache(slide, grid)
    return reader, grid, tissue


def tile_encoder(model: Any, slide: Any, grid: Any, dev: str, *, cache: Any, preprocess: dict) -> Any:
    """The :class:`~napari_pathfm.tiles.cached_encoder.CachedEncoder` of ``model`` on the run's tiles.

    Its key holds ``preprocess`` and the autocast precision of ``dev``, so outputs made another way
    are never reused. Use it as a context manager (it releases the cache entry on exit).
    """
    from ..device import autocast_dtype
    from ..tiles.cached_encoder import CachedEncoder

    amp = autocast_dtype(dev)
    return CachedEncoder(model, slide, grid, cache=cache, preprocess=preprocess, precision=str(amp) if amp else None)


#: The test-time flips of :func:`flip_average`: none, left-right, up-down, both (dims of an (N, C, H, W) tensor).
FLIPS = ((), (-1,), (-2,), (-2, -1))


def uses_flips(option: bool | None, card: dict) -> bool:
    """Whether a run averages over :data:`FLIPS`: the ``flips`` option when given, else the model card's
    ``flips`` (off when absent), so a model runs as it was evaluated unless the user says otherwise."""
    return bool(card.get("flips", False)) if option is None else bool(option)


def flip_average(fn: Callable[[Any], Any], x: Any) -> Any:
    """Mean of ``fn`` over the four :data:`FLIPS` of the batch ``x``, each output flipped back.

    Test-time augmentation: 4x the compute for a prediction that depends less on which way the
    tissue lies. ``fn`` maps an ``(N, C, H, W)`` tensor to an ``(N, C', h, w)`` one on the same
    spatial grid (any stride), so flipping its output back lines it up with the unflipped one.
    """
    total = None
    for dims in FLIPS:
        out = fn(x.flip(dims) if dims else x)
        out = out.flip(dims) if dims else out
        total = out if total is None else total + out  # not in place: ``out`` may share storage
    return total / len(FLIPS)


def autocast(dev: str) -> Any:
    """The mixed-precision context of ``dev`` (bf16/fp16 on CUDA; a no-op elsewhere), reusable per batch."""
    from contextlib import nullcontext

    import torch

    from ..device import autocast_dtype

    amp = autocast_dtype(dev)
    return torch.autocast("cuda", dtype=amp) if amp is not None else nullcontext()


def run_tiles(
    reader: Any,
    grid: Any,
    task: TileTask,
    *,
    batch_size: int,
    workers: int = 2,
    prefetch: int | None = None,
    encoder: Any = None,
    progress: Any = None,
    cancel: Any = None,
) -> None:
    """Run ``task`` over every tile of ``grid``, in grid order, read from ``reader``.

    Reader threads (``workers``) decode up to ``prefetch`` tiles ahead (default
    ``max(2 * batch_size, 4 * workers)``) while this thread runs ``task.infer``. When ``encoder``
    holds every tile in the embedding cache no pixel is read (batches without images); a task that
    needs the pixels anyway (classify: the classifier's own branch sees them) passes no encoder. Progress
    is ``"<slide>: <task.label>"`` after each batch; cancel is checked before each batch and
    before ``task.finish``, and raises :class:`~napari_pathfm.errors.Cancelled`.
    """
    import torch

    from ..tiles import iter_tile_batches
    from ..tiles.cached_encoder import stored_batches

    n, done = len(grid), 0
    name = Path(reader.path).name
    report(progress, 0, n, f"{name}: {task.label}")
    if encoder is not None and encoder.all_stored:  # a second run: no pixels to read, no encoder to run
        batches = stored_batches(grid, batch_size)
    else:
        ahead = max(2 * batch_size, 4 * workers) if prefetch is None else prefetch
        batches = iter_tile_batches(reader, grid, batch_size, prefetch=ahead, workers=workers, cancel=cancel)
    try:
        with torch.inference_mode():
            for batch in batches:
                check_cancel(cancel, task.what)
                task.collect(batch, task.infer(batch))
                done += len(batch.indices)
                report(progress, done, n, f"{name}: {task.label}")
            check_cancel(cancel, task.what)
            task.finish()
    finally:
        batches.close()
        task.close()
