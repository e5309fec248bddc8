"""Whole-slide tile classification vs the bare batched model on the same tiles, in one run.

Times, on one slide and one tile classifier:

- ``bare``: the pipeline's own tissue tiles, already decoded in memory (uint8), normalised
  (:func:`~napari_pathfm.pipelines.classify.preprocess_tiles`) and run through the model in batches
  of ``--batch-size`` with the softmax brought back to the host: what the model alone costs;
- ``pipeline``: :func:`napari_pathfm.pipelines.classify.classify_slide` end to end: tissue
  detection, tile grid, tile reading (prefetching threads), normalisation, forward, softmax and
  the result's maps; phases are timed from the progress callback.

and prints tiles/s of both and ``bare / pipeline`` (target >= 0.9). Same tiles, batch size,
device, autocast and torch threads for both; after a warm-up of each, ``--repeats`` (pipeline,
bare) pairs run interleaved so that a change of load on a shared machine hits both alike; times are
medians, and the median of the per-pair ratios is printed too.

The model is ``--checkpoint`` or a random-init one (speed does not depend on the weights):
``--model resnet18`` (timm_classifier, 224 px at 0.5 µm/px) or ``--model slca-small`` (slca:
resnet18 + a 4-block SAM ViT of width 192 at 224 px input).

    .venv/bin/python benchmarks/bench_classify.py [SLIDE] [--mosaic 2] [--repeats 3] [--threads 2]
    python3 benchmarks/bench_classify.py --device cuda --mosaic 4 --batch-size 128

``--mosaic N`` tiles the slide N x N into a pyramidal OME-TIFF first (default slide: the bundled
CMU-1 small region), for a slide with enough tiles for steady-state throughput. On a shared
machine CPU timings move with the load; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segment import mosaic_slide  # n x n pyramidal OME-TIFF mosaic of a slide
from timing import sync  # CUDA synchronise (no-op on the CPU)

MODELS = {
    "resnet18": ("timm_classifier", {"backbone": "resnet18", "num_classes": 8}),
    "slca-small": (
        "slca",
        {
            "backbone": "resnet18",
            "num_classes": 8,
            "sam_img_size": 224,
            "sam_kwargs": {"depth": 4, "embed_dim": 192, "num_heads": 3},
        },
    ),
}


def _timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def load_model(args):
    import torch

    from napari_pathfm.models.registry import create_model
    from napari_pathfm.pipelines.classify import load_classifier

    if args.checkpoint is not None:
        model, card, _ = load_classifier(args.checkpoint)
        return model, card, Path(args.checkpoint).name
    torch.manual_seed(0)
    name, cfg = MODELS[args.model]
    model = create_model(name, **cfg)
    card = {"classes": [f"class {i}" for i in range(8)], "input_mpp": 0.5, "tile_size": 224}
    return model, card, f"random-init {args.model}"


def main(argv=None) -> int:
    import numpy as np
    import torch

    from napari_pathfm.demo import demo_slide_path
    from napari_pathfm.device import autocast_dtype, resolve_device
    from napari_pathfm.io import open_slide
    from napari_pathfm.pipelines.classify import (
        card_normalization,
        classify_slide,
        preprocess_tiles,
    )
    from napari_pathfm.tiles import read_tile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slide", nargs="?", type=Path, default=demo_slide_path())
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--mosaic", type=int, default=1, help="tile the slide n x n into a pyramidal OME-TIFF first")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    model, card, what = load_model(args)
    model = model.to(dev).eval()
    amp = autocast_dtype(dev)
    B = args.batch_size

    tmp = tempfile.TemporaryDirectory(prefix="bench-classify-")
    if args.mosaic > 1:
        args.slide = mosaic_slide(args.slide, args.mosaic, Path(tmp.name))
    slide = open_slide(args.slide)
    phases: dict[str, float] = {}

    def progress(done, total, message=""):
        phases.setdefault("tiles" if "classifying" in message else "tissue", time.perf_counter())

    state: dict = {}

    def pipeline():
        phases.clear()
        t0 = time.perf_counter()
        state["res"] = classify_slide(slide, (model, card), batch_size=B, device=dev, progress=progress)
        t1 = time.perf_counter()
        state.setdefault("phases", []).append((phases.get("tiles", t0) - t0, t1 - phases.get("tiles", t0)))

    pipeline()  # warm-up; gives the grid
    res = state["res"]
    grid = res.grid
    tiles = np.stack([read_tile(slide, grid, i) for i in range(len(grid))])
    mean, std = card_normalization(card)
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()

    def bare():
        with torch.inference_mode(), autocast:
            for i in range(0, len(tiles), B):
                torch.softmax(model(preprocess_tiles(tiles[i : i + B], dev, mean, std)).float(), 1).cpu()

    bare()  # warm-up
    # Interleaved (pipeline, bare) pairs, so that a change of load on a shared machine hits both alike.
    pipe_times, bare_times = [], []
    for _ in range(args.repeats):
        pipe_times.append(_timed(pipeline, dev))
        bare_times.append(_timed(bare, dev))
    t_pipe, t_bare = statistics.median(pipe_times), statistics.median(bare_times)
    pair_ratio = statistics.median(b / p for b, p in zip(bare_times, pipe_times))
    ph = [statistics.median(p) for p in zip(*state["phases"][1:])]
    n = len(grid)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "CPU"
    print(
        f"# {args.slide.name} {slide.shape[0]}x{slide.shape[1]} px, {slide.level_count} levels at {slide.mpp} "
        f"µm/px; model {what}, {grid.tile_size} px tiles at {grid.mpp:.3g} µm/px, {n} tissue tiles, batch {B}; "
        f"{name}, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}, "
        f"median of {args.repeats}"
    )
    print(f"bare model          {t_bare:8.3f} s   {n / t_bare:8.2f} tiles/s")
    print(f"pipeline (total)    {t_pipe:8.3f} s   {n / t_pipe:8.2f} tiles/s")
    print(f"  tissue + grid     {ph[0]:8.3f} s")
    print(f"  tiles loop        {ph[1]:8.3f} s   (read, normalise, forward, softmax)")
    print(f"ratio bare / pipeline     {t_bare / t_pipe:.3f}   (target >= 0.9); median of pair ratios {pair_ratio:.3f}")
    print(f"ratio bare / tiles loop   {t_bare / ph[1]:.3f}")
    slide.close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
