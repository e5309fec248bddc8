"""Tiled z-stack translation vs the bare model on the same tiles, and peak memory on a 4096 x 4096 stack.

Speed (same run, same model, tiles, batch size, device and torch threads):

- ``bare``: the pipeline's tiles (``tile`` px every ``stride`` px over the field, normalised with
  the card's min/max, already in memory as float32) through the model in batches, outputs (and the
  LUPI confidence) brought back to the host: what the model alone costs;
- ``pipeline``: :func:`napari_pathfm.pipelines.translate.translate_stack` end to end on the uint16
  planes: input checks, normalisation, tiling, forward, pyramidal blending, de-normalisation.

After a warm-up of each, ``--repeats`` (pipeline, bare) pairs run interleaved; times are medians and
``bare / pipeline`` is printed (target >= 0.9). The nuclei labelling of a LUPI model (watershed on
the whole field) is timed on its own.

Memory: a ``--memory-size`` square (default 4096) stack of ``--planes`` planes, tiled from the real
ISL planes into a zarr array (chunks 1 x 512 x 512, read lazily through dask), is translated in a
fresh process; its peak RSS above the baseline (model built, stack on disk) and the tracemalloc
peak of the run are printed beside the sizes an all-in-memory run would need.

    .venv/bin/python benchmarks/bench_translate.py [--model small|dense_unet|lupi_unet] [--threads 2]
    .venv/bin/python benchmarks/bench_translate.py --skip-speed --memory-model unet-tiny
    python3 benchmarks/bench_translate.py --device cuda --model lupi_unet --size 4096 --batch-size 16

Models are random-init (speed and memory do not depend on the weights) unless ``--checkpoint``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import sync  # CUDA synchronise (no-op on the CPU)

REPO = Path(__file__).resolve().parents[1]
ISL = REPO.parent / "shared" / "data" / "isl-blue-sample"
MODELS = {
    "dense_unet": ("dense_unet", {}),  # the paper's tiramisu, ~1.2M parameters
    "lupi_unet": ("lupi_unet", {}),  # the paper's nuclei net, ~1.6M parameters
    "small": (
        "lupi_unet",
        {
            "init_filters": 16,
            "down_blocks": (2, 2, 2, 2),
            "up_blocks": (2, 2, 2, 2),
            "bottleneck_layers": 2,
            "growth_rate": 8,
        },
    ),
    "unet-tiny": ("unet", {"base": 4, "depth": 4}),
}


def isl_planes(n: int, size: int) -> np.ndarray:
    """The first ``n`` ISL phase planes (1024 px), tiled (mirrored) to ``size`` x ``size``."""
    from napari_pathfm.io.zstack import open_zstack

    planes = np.asarray(open_zstack(ISL).data[:n])
    reps = -(-size // planes.shape[1])
    big = np.concatenate([planes, planes[:, ::-1]] * reps, axis=1)[:, :size]
    big = np.concatenate([big, big[:, :, ::-1]] * reps, axis=2)[:, :, :size]
    return np.ascontiguousarray(big)


def build(args, planes: np.ndarray):
    """``(model, card)``: a checkpoint, or a random-init registry model with min/max of ``planes``."""
    import torch

    from napari_pathfm.models import create_model, load_checkpoint

    if args.checkpoint:
        return load_checkpoint(args.checkpoint, device=args.device)
    name, cfg = MODELS[args.model]
    torch.manual_seed(0)
    model = create_model(name, in_channels=len(planes), **cfg).to(args.device).eval()
    sample = planes[:, ::8, ::8].astype(np.float64)
    card = {
        "name": name,
        "channels": ["nuclei" if name == "lupi_unet" else "lipids"],
        "input_planes": len(planes),
        "normalization": {
            "input_min": sample.min(axis=(1, 2)).tolist(),
            "input_max": sample.max(axis=(1, 2)).tolist(),
            "target_min": [0.0],
            "target_max": [65535.0],
            "target_dtype": "uint16",
        },
    }
    return model, card


def bare_tiles(planes: np.ndarray, card: dict, tile: int, stride: int) -> np.ndarray:
    """The pipeline's tiles, normalised float32 ``(N, Z, t, t)`` (same positions and padding)."""
    from napari_pathfm.io.normalize import normalize_minmax
    from napari_pathfm.pipelines.translate_tiles import pad_to, tile_positions

    n = card["normalization"]
    norm = normalize_minmax(planes, n["input_min"], n["input_max"])
    ys, th = tile_positions(planes.shape[1], tile, stride)
    xs, tw = tile_positions(planes.shape[2], tile, stride)
    return np.stack([pad_to(norm[:, y : y + th, x : x + tw], th, tw) for y in ys for x in xs])


def bare_run(model, tiles: np.ndarray, batch: int, device: str) -> None:
    import torch

    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            out = model(torch.from_numpy(tiles[i : i + batch]).to(device))
            if hasattr(out, "mask_logits"):
                out = torch.cat([out.image, torch.sigmoid(out.mask_logits)], 1)
            out.float().cpu().numpy()


def speed(args) -> None:
    from napari_pathfm.pipelines.translate import translate_stack

    planes = isl_planes(args.planes, args.size)
    model, card = build(args, planes)
    tiles = bare_tiles(planes, card, args.tile, args.stride)

    def pipe() -> None:
        translate_stack(
            planes,
            (model, card),
            tile=args.tile,
            stride=args.stride,
            batch_size=args.batch_size,
            device=args.device,
            nuclei_mask=False,
        )

    def bare() -> None:
        bare_run(model, tiles, args.batch_size, args.device)

    def timed(fn) -> float:
        sync(args.device)
        t0 = time.perf_counter()
        fn()
        sync(args.device)
        return time.perf_counter() - t0

    timed(bare), timed(pipe)  # warm-up
    in_model = [0.0]  # seconds spent in the model's forward during pipeline runs (hooks below)
    start = [0.0]

    def pre(*_):
        sync(args.device)
        start[0] = time.perf_counter()

    def post(*_):
        sync(args.device)
        in_model[0] += time.perf_counter() - start[0]

    pairs = []
    for _ in range(args.repeats):
        hooks = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
        t_p = timed(pipe)
        for h in hooks:
            h.remove()
        pairs.append((t_p, timed(bare)))
    t_pipe, t_bare = statistics.median(p for p, _ in pairs), statistics.median(b for _, b in pairs)
    n = len(tiles)
    print(
        f"field {planes.shape} {planes.dtype}, model {args.checkpoint or args.model} "
        f"({sum(p.numel() for p in model.parameters()):,} parameters), {n} tiles of {args.tile} px "
        f"(stride {args.stride}), batch {args.batch_size}, device {args.device}, threads {args.threads}"
    )
    print(f"bare      {t_bare:8.2f} s  {n / t_bare:6.2f} tiles/s")
    print(f"pipeline  {t_pipe:8.2f} s  {n / t_pipe:6.2f} tiles/s")
    print(
        f"bare / pipeline = {t_bare / t_pipe:.3f} (median of pairs {statistics.median(b / p for p, b in pairs):.3f}; "
        f"target >= 0.9); load average {os.getloadavg()[0]:.1f}"
    )
    total = sum(p for p, _ in pairs)
    print(
        f"share of the pipeline's time spent in the model forward: {in_model[0] / total:.3f} "
        f"(same runs, so a busy machine slows both; the rest is checks, normalising, tiling, blending)"
    )
    res = translate_stack(
        planes,
        (model, card),
        tile=args.tile,
        stride=args.stride,
        batch_size=args.batch_size,
        device=args.device,
        nuclei_mask=False,
    )
    if res.confidence is not None:
        t0 = time.perf_counter()
        labels = res.nuclei_mask()
        print(f"nuclei labelling of the confidence map: {time.perf_counter() - t0:.2f} s, {labels.max()} nuclei")


def _status_mb(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak RSS of this process image) from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) so that it measures only what follows (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_child(args, queue) -> None:
    """In a fresh process: zarr stack on disk, model built, then translate; report RSS/tracemalloc."""
    import dask.array as da
    import torch
    import zarr

    from napari_pathfm.pipelines.translate import translate_stack

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-translate-") as tmp:
        z = zarr.create_array(
            f"{tmp}/stack.zarr",
            shape=(args.planes, args.memory_size, args.memory_size),
            chunks=(1, 512, 512),
            dtype=np.uint16,
        )
        src = isl_planes(args.planes, 1024)
        for y in range(0, args.memory_size, 1024):
            for x in range(0, args.memory_size, 1024):
                z[:, y : y + 1024, x : x + 1024] = src[:, : args.memory_size - y, : args.memory_size - x]
        stack = da.from_zarr(z)
        margs = argparse.Namespace(**{**vars(args), "model": args.memory_model, "checkpoint": args.checkpoint})
        model, card = build(margs, src)
        del src
        base_mb = _status_mb("VmRSS")
        reset = _reset_peak()  # ru_maxrss would include the parent's peak (kept across fork + exec)
        tracemalloc.start()
        t0 = time.perf_counter()
        res = translate_stack(
            stack,
            (model, card),
            tile=args.tile,
            stride=args.stride,
            batch_size=args.batch_size,
            device=args.device,
            nuclei_mask=False,
        )
        seconds = time.perf_counter() - t0
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak_mb = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kind = type(next(iter(res.channels.values()))).__module__.split(".")[0]
        queue.put(
            {
                "base_mb": base_mb,
                "peak_mb": peak_mb,
                "traced_mb": traced / 2**20,
                "seconds": seconds,
                "tiles": res.n_tiles,
                "output": kind,
            }
        )


def memory(args) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    s, z = args.memory_size, args.planes
    print(
        f"memory: {z} x {s} x {s} uint16 zarr stack ({z * s * s * 2 / 2**20:.0f} MiB on disk), model "
        f"{args.checkpoint or args.memory_model}, {out['tiles']} tiles in {out['seconds']:.0f} s, outputs in {out['output']}"
    )
    print(
        f"peak RSS {out['peak_mb']:.0f} MiB = baseline {out['base_mb']:.0f} + {out['peak_mb'] - out['base_mb']:.0f} MiB "
        f"for the run; tracemalloc peak (numpy) {out['traced_mb']:.0f} MiB"
    )
    print(
        f"in memory it would hold: stack {z * s * s * 2 / 2**20:.0f} MiB + float32 planes {z * s * s * 4 / 2**20:.0f} "
        f"MiB + blend canvas {s * s * 8 / 2**20:.0f} MiB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--memory-model", default="unet-tiny", choices=sorted(MODELS))
    p.add_argument("--checkpoint", default=None, help="a translate checkpoint instead of a random-init model")
    p.add_argument("--planes", type=int, default=7)
    p.add_argument("--size", type=int, default=1024, help="side of the speed field (ISL planes tiled)")
    p.add_argument("--memory-size", type=int, default=4096)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not args.skip_speed:
        speed(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
