"""Read the same 500 random 256x256 tiles through our dask pyramid and through a raw
``OpenSlide.read_region`` loop, in one run; print the throughput ratio and peak RSS.

Target: ratio (raw time / our time) >= 0.9, i.e. the lazy pyramid costs at most ~10 %.

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
    from napari_pathfm._sample_data import sample_slide_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", nargs="?", type=Path, default=sample_slide_path())
    ap.add_argument("--tiles", type=int, default=500)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="alternate raw/ours this many times; best of each")
    args = ap.parse_args(argv)
    from napari_pathfm.io import open_slide

    with open_slide(args.slide) as s:
        pos = positions(s.shape, args.tiles, args.size)
    raw, ours = [], []
    for _ in range(args.repeats):
        raw.append(time_raw(args.slide, pos, args.size))
        ours.append(time_ours(args.slide, pos, args.size))
    best_raw, best_ours = min(raw), min(ours)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"slide: {args.slide} ({args.tiles} tiles of {args.size}px, best of {args.repeats})")
    print(f"raw OpenSlide.read_region: {best_raw:.3f} s  ({args.tiles / best_raw:.0f} tiles/s)")
    print(f"napari-pathfm dask pyramid: {best_ours:.3f} s  ({args.tiles / best_ours:.0f} tiles/s)")
    ratio = best_raw / best_ours
    print(f"ratio (raw time / ours): {ratio:.2f}  target >= 0.90  {'OK' if ratio >= 0.9 else 'BELOW TARGET'}")
    print(f"peak RSS: {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
