"""Whole-slide segmentation vs the bare batched model forward on the same tiles, in one run.

Times, on one slide and one model:

- ``bare``: the model's ``preprocess`` + forward over the pipeline's own tissue tiles, already
  decoded in memory, in batches of ``--batch-size`` (what the model alone costs);
- ``pipeline``: :func:`napari_pathfm.pipelines.segment.segment_slide` end to end with an OME-TIFF
  output: tissue detection, tile reading (prefetching threads), forward, logit blending,
  resampling to level 0 and the pyramidal OME-TIFF write; its phases are timed from the
  progress callback (tissue / tiles loop incl. blending and resampling / writing).

and prints ``bare / pipeline`` (target >= 0.9: reading, blending and writing cost at most ~10 %
on top of the model) and tiles/s. Each time is the median of ``--repeats`` runs after a warm-up.

The model is ``--checkpoint`` (default: the bundled ``pathsam2-glas-*`` model when present),
else a random-init Path-SAM2 of the bundled model's configuration (``--config small``: Hiera
micro, no UNI, 256 px at 1.24 µm/px) or the paper's (``--config paper``: Hiera-B+ + UNI ViT-L,
1024 px; GPU only in practice); speed does not depend on the weights.

    .venv/bin/python benchmarks/bench_segment.py [SLIDE] [--mpp 0.5] [--repeats 3] [--threads 2]
    python3 benchmarks/bench_segment.py --device cuda --mosaic 4 [--config paper]

``--mosaic N`` tiles the slide N x N into a pyramidal OME-TIFF first (default slide: the bundled
CMU-1 small region, 2967 x 2220 px and one level, where tissue detection has to decode all of
level 0): a slide large enough for steady-state throughput, closer to a real whole slide.

On a machine shared with other jobs, CPU timings move with the load; the load average is
printed with the table.
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
from timing import median_time  # median of repeats after a warm-up, CUDA-synchronised

CONFIGS = {
    "small": dict(
        encoder="hiera_micro", uni=None, image_size=256, decoder_dim=128, decoder_heads=4, decoder_mlp_dim=512
    ),
    "paper": dict(encoder="sam2_hiera_base_plus", uni="uni", image_size=1024),
}
CARD_MPP = {"small": 1.24, "paper": 0.62}


def load_model(args):
    import torch

    from napari_pathfm.errors import CheckpointError
    from napari_pathfm.models.registry import create_model
    from napari_pathfm.pipelines.segment import default_segment_checkpoint, load_segmentation_model

    if args.checkpoint is None and args.config == "small":
        try:
            args.checkpoint = default_segment_checkpoint()
        except CheckpointError:
            pass
    if args.checkpoint is not None:
        model, card, _ = load_segmentation_model(args.checkpoint)
        return model, card, Path(args.checkpoint).name
    torch.manual_seed(0)
    model = create_model("pathsam2", num_classes=2, **CONFIGS[args.config])
    card = {"classes": ["background", "gland"], "input_mpp": CARD_MPP[args.config], "tile_size": model.input_size}
    return model, card, f"random-init pathsam2 ({args.config})"


def mosaic_slide(src: Path, n: int, folder: Path) -> Path:
    """An n x n mosaic of ``src`` as a pyramidal OME-TIFF (same µm/px): a larger slide whose
    tissue mask is read from a low-resolution level, as on real whole-slide images."""
    import numpy as np

    from napari_pathfm.io import open_slide
    from napari_pathfm.io.ome_tiff import write_ome_tiff

    with open_slide(src) as s:
        rgb, mpp = s.read(0, 0, 0, *s.shape), s.mpp
    path = folder / f"{src.name.split('.')[0]}-mosaic{n}x{n}.ome.tif"
    write_ome_tiff(path, np.tile(rgb, (n, n, 1)), mpp=mpp, axes="YXS", tile=512, min_size=2048)
    return path


def main(argv=None) -> int:
    import numpy as np
    import torch

    from napari_pathfm.demo import demo_slide_path
    from napari_pathfm.device import autocast_dtype, resolve_device
    from napari_pathfm.io import open_slide
    from napari_pathfm.pipelines.segment import segment_slide
    from napari_pathfm.tiles import read_tile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slide", nargs="?", type=Path, default=demo_slide_path())
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--mpp", type=float, default=None, help="model µm/px (default: the card's)")
    ap.add_argument("--batch-size", type=int, default=8)
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

    out_dir = tempfile.TemporaryDirectory(prefix="bench-segment-")
    if args.mosaic > 1:
        args.slide = mosaic_slide(args.slide, args.mosaic, Path(out_dir.name))
    slide = open_slide(args.slide)
    phases: dict[str, float] = {}

    def progress(done, total, message=""):
        now = time.perf_counter()
        key = "write" if message.startswith(("writing", "wrote")) else "tiles" if "segmenting" in message else "tissue"
        phases.setdefault(key, now)

    out = Path(out_dir.name) / "mask.ome.tif"
    state = {}

    def pipeline():
        phases.clear()
        t0 = time.perf_counter()
        state["res"] = segment_slide(
            slide, (model, card), mpp=args.mpp, batch_size=B, device=dev, out=out, progress=progress
        )
        t1 = time.perf_counter()
        tiles_at = phases.get("tiles", t0)
        write_at = phases.get("write", t1)
        state.setdefault("phases", []).append((tiles_at - t0, write_at - tiles_at, t1 - write_at))

    t_pipe = median_time(pipeline, args.repeats, device=dev)
    res = state["res"]
    grid = res.grid
    tiles = np.stack([read_tile(slide, grid, i) for i in range(len(grid))])
    autocast = torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext()

    def bare():
        with torch.inference_mode(), autocast:
            for i in range(0, len(tiles), B):
                x = model.preprocess(torch.from_numpy(tiles[i : i + B]).to(dev))
                model(x)

    t_bare = median_time(bare, args.repeats, device=dev)
    ph = [statistics.median(p) for p in zip(*state["phases"][1:] or state["phases"])]
    n = len(grid)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "CPU"
    print(
        f"# {args.slide.name} {slide.shape[0]}x{slide.shape[1]} px, {slide.level_count} levels at {slide.mpp} µm/px; model {what}, "
        f"{grid.tile_size} px tiles at {grid.mpp:.3g} µm/px, overlap {grid.overlap} px, {n} tissue tiles, "
        f"batch {B}; {name}, {torch.get_num_threads()} torch threads, load average "
        f"{os.getloadavg()[0]:.2f}, median of {args.repeats}"
    )
    print(f"bare forward        {t_bare:8.3f} s   {n / t_bare:8.2f} tiles/s")
    print(f"pipeline (total)    {t_pipe:8.3f} s   {n / t_pipe:8.2f} tiles/s")
    print(f"  tissue + grid     {ph[0]:8.3f} s")
    print(f"  tiles loop        {ph[1]:8.3f} s   (read, forward, blend, resample to level 0)")
    print(f"  OME-TIFF write    {ph[2]:8.3f} s")
    print(f"ratio bare / pipeline     {t_bare / t_pipe:.3f}   (target >= 0.9)")
    print(f"ratio bare / tiles loop   {t_bare / ph[1]:.3f}")
    slide.close()
    out_dir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
