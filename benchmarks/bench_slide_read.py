"""Read the same 500 random 256x256 tiles through our dask pyramid and through a raw
``OpenSlide.read_region`` loop, in one run; print the throughput ratio and peak RSS.

Target: ratio (raw time / our time) >= 0.9, i.e. the lazy pyramid costs at most ~10 %.
Also prints the same comparison for 512 and 1024 px windows (100 each) and dask's
fixed cost of one ``compute()`` of a single cached chunk, which bounds the 256 px case.

    .venv/bin/python benchmarks/bench_slide_read.py [SLIDE] [--tiles 500] [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np


def positions(shape, n, size, seed=0):
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, max(1, shape[0] - size), n)
    xs = rng.integers(0, max(1, shape[1] - size), n)
    return list(zip(ys.tolist(), xs.tolist()))


def time_raw(path, pos, size):
    import openslide

    osr = openslide.OpenSlide(str(path))
    t0 = time.perf_counter()
    for y, x in pos:
        np.asarray(osr.read_region((x, y), 0, (size, size)))
    dt = time.perf_counter() - t0
    osr.close()
    return dt


def time_ours(path, pos, size):
    from napari_pathfm.io import open_slide

    slide = open_slide(path)
    level0 = slide.pyramid[0]
    t0 = time.perf_counter()
    for y, x in pos:
        level0[y : y + size, x : x + size].compute()
    dt = time.perf_counter() - t0
    slide.close()
    return dt


def main(argv=None) -> int:
    from napari_pathfm.demo import demo_slide_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", nargs="?", type=Path, default=demo_slide_path())
    ap.add_argument("--tiles", type=int, default=500)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="alternate raw/ours this many times; best of each")
    args = ap.parse_args(argv)
    from napari_pathfm.io import open_slide

    with open_slide(args.slide) as s:
        shape = s.shape
        level0 = s.pyramid[0]
        level0[:100, :100].compute()
        t0 = time.perf_counter()
        for _ in range(200):
            level0[:100, :100].compute()
        overhead_ms = (time.perf_counter() - t0) / 200 * 1000
    print(f"slide: {args.slide}, best of {args.repeats} alternating runs")
    print(f"{'window':>8} {'tiles':>6} {'raw s':>8} {'ours s':>8} {'ratio':>6}")
    for size, n in [(args.size, args.tiles), (512, 100), (1024, 100)]:
        pos = positions(shape, n, size)
        raw, ours = [], []
        for _ in range(args.repeats):
            raw.append(time_raw(args.slide, pos, size))
            ours.append(time_ours(args.slide, pos, size))
        ratio = min(raw) / min(ours)
        print(f"{size:>6}px {n:>6} {min(raw):>8.3f} {min(ours):>8.3f} {ratio:>6.2f}")
        if size == args.size:
            headline = ratio
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"dask fixed cost of one compute() of a cached chunk: {overhead_ms:.2f} ms")
    print(
        f"ratio for {args.tiles} x {args.size}px (raw time / ours): {headline:.2f}  target >= 0.90  "
        f"{'OK' if headline >= 0.9 else 'BELOW TARGET'}"
    )
    print(f"peak RSS: {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
