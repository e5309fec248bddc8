"""Speed-up of the shared tile-embedding cache: the same slide run again skips the encoder.

For each pipeline (segment, classify, features) and one slide, times in the same run:

- ``off``: the pipeline with ``cache=False`` (the reference);
- ``cold``: with an empty cache (every tile encoded and stored: the cost of storing);
- ``warm``: the same call again (every tile read from the cache);

and prints ``off / warm`` (the speed-up of a second run) and ``cold / off`` (the overhead of the
first), the cache size, whether the cold run stored the outputs (it does not when storing them costs
more than encoding them, see ``CachedEncoder``) and the largest difference between the warm result
and the reference (class map labels, probabilities or features; 0 = bit for bit). After one warm-up, ``--repeats`` (off, cold, warm) triples run interleaved; times are
medians.

Models (random weights: speed does not depend on them):

- ``--size demo`` (CPU default): the bundled Path-SAM2 demo (Hiera micro, 256 px at 1.24 µm/px),
  the bundled SLCA demo and its card, a ResNet-50 trunk to layer 3 (``resnet50_trunc``) at 0.5 µm/px;
- ``--size paper`` (GPU): Path-SAM2 with SAM2 Hiera-B+ and UNI (ViT-L/16) at 1024 px, 0.5 µm/px;
  SLCA ResNet-50 + SAM ViT-B at 1024; UNI-size ViT-L/16 features at 224 px.

    .venv/bin/python benchmarks/bench_embedding_cache.py [SLIDE] [--mosaic 2] [--repeats 3]
    python benchmarks/bench_embedding_cache.py --device cuda --size paper --mosaic 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_segment import mosaic_slide  # n x n pyramidal OME-TIFF mosaic of a slide
from timing import sync  # CUDA synchronise (no-op on the CPU)


def _segmenter(size: str):
    from napari_pathfm.models import create_model
    from napari_pathfm.pipelines.segment import load_segmentation_model

    if size == "demo":
        model, card, _ = load_segmentation_model(None)
        return model, card
    model = create_model("pathsam2", num_classes=2, encoder="sam2_hiera_base_plus", uni="uni", image_size=1024)
    return model, {"classes": ["background", "gland"], "tile_size": 1024, "input_mpp": 0.5}


def _classifier(size: str):
    from napari_pathfm.demo import demo_classify_checkpoint
    from napari_pathfm.models import create_model

    if size == "demo":
        return demo_classify_checkpoint()
    model = create_model("slca", backbone="resnet50", sam="samvit_base_patch16", num_classes=2, sam_img_size=1024)
    return model, {"classes": ["a", "b"], "tile_size": 224, "input_mpp": 0.5}


def _extractor(size: str):
    from napari_pathfm.models import create_model

    if size == "demo":
        return create_model("resnet50_trunc")
    return create_model("timm_features", backbone="vit_large_patch16_224", input_size=224)


def _runs(slide: Path, size: str, device: str):
    """``{pipeline: (run(cache) -> result array)}`` with models built once."""
    import numpy as np

    from napari_pathfm.pipelines.classify import classify_slide
    from napari_pathfm.pipelines.features import extract_features, read_features
    from napari_pathfm.pipelines.segment import segment_slide

    seg, clf, fx = _segmenter(size), _classifier(size), _extractor(size)
    out = Path(tempfile.mkdtemp(prefix="bench-cache-out-"))

    def segment(cache):
        r = segment_slide(slide, seg, device=device, cache=cache, batch_size=8)
        return np.asarray(r.labels), r.n_tiles

    def classify(cache):
        r = classify_slide(slide, clf, device=device, cache=cache, batch_size=32)
        return r.probabilities, r.n_tiles

    def features(cache):
        p = extract_features(slide, fx, out / "f.features.zarr", cache=cache, device=device, batch_size=32)
        bag = read_features(p)
        return np.asarray(bag.features), len(bag.features)

    return {"segment": segment, "classify": classify, "features": features}


def _timed(fn, cache, device):
    sync(device)
    t = time.perf_counter()
    result = fn(cache)
    sync(device)
    return time.perf_counter() - t, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slide", nargs="?", type=Path, default=None)
    ap.add_argument("--mosaic", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=("demo", "paper"), default="demo")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None, help="segment classify features")
    args = ap.parse_args()

    import numpy as np
    import torch

    from napari_pathfm.tiles.embedding_cache import EmbeddingCache

    if args.threads:
        torch.set_num_threads(args.threads)
    src = args.slide or Path(__file__).resolve().parents[1] / "src/napari_pathfm/data/CMU-1-Small-Region.svs"
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    slide = mosaic_slide(src, args.mosaic, work) if args.mosaic > 1 else src
    runs = _runs(slide, args.size, args.device)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"slide {slide.name} (mosaic {args.mosaic}), models '{args.size}', {dev}, load {os.getloadavg()[0]:.1f}")
    print(
        f"{'pipeline':<9} {'tiles':>5} {'off s':>7} {'cold s':>7} {'warm s':>7} {'off/warm':>8} {'cold/off':>8} "
        f"{'cache MB':>8}  stored  max|warm-off|"
    )
    for name, fn in runs.items():
        if args.only and name not in args.only:
            continue
        _timed(fn, False, args.device)  # warm-up: imports, first allocations, OS file cache
        off, cold, warm, diff = [], [], [], 0.0
        size = 0
        for _ in range(args.repeats):
            root = work / "cache"
            shutil.rmtree(root, ignore_errors=True)
            cache = EmbeddingCache(root)
            t_off, (ref, n) = _timed(fn, False, args.device)
            t_cold, _ = _timed(fn, cache, args.device)
            stored = any(e.tiles for e in cache.entries())
            t_warm, (res, _) = _timed(fn, cache, args.device)
            off.append(t_off), cold.append(t_cold), warm.append(t_warm)
            diff = max(diff, float(np.abs(res.astype(np.float64) - ref).max()) if ref.size else 0.0)
            size = sum(e.bytes for e in cache.entries())
        m_off, m_cold, m_warm = (statistics.median(v) for v in (off, cold, warm))
        print(
            f"{name:<9} {n:>5} {m_off:>7.2f} {m_cold:>7.2f} {m_warm:>7.2f} {m_off / m_warm:>8.2f} "
            f"{m_cold / m_off:>8.2f} {size / 2**20:>8.1f}  {stored!s:<6}  {diff:.2g}"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
