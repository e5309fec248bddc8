"""Build MIL feature bags from real GlaS gland tiles (the S4 MIL benchmark's data).

1. Every GlaS training image (85, 522x775 H&E, ``../shared/data/glas``) is cut into
   non-overlapping ``--tile`` px tiles at full resolution. A tile is *gland* when
   >= 50 % of its pixels are gland in the mask, *non-gland* when <= 5 %; tiles in
   between are dropped.
2. Each tile's features are extracted once (``resnet50_trunc`` by default) and
   cached in a zarr under ``--cache`` (outside the repo).
3. Images are split by name into train / val / test (seeded 60/20/20); each
   split has its own tile pools, so no image contributes to two splits.
4. Bags are composed per split: negative bags of non-gland tiles only, positive
   bags with a fraction of gland tiles drawn from U[1 %, 20 %]; lengths
   log-uniform in [``--min-len``, ``--max-len``]. Tiles are drawn *with
   replacement* (a test pool has a few hundred tiles, bags up to tens of
   thousands); features cannot be augmented, so repeated tiles are exact repeats.
5. Patch order (``--order raster``, default): a bag is a virtual slide, a grid of
   ceil(sqrt(L)) columns read row by row, on which the gland tiles form 1-3
   rectangular regions, as a tumour appears in a CLAM-ordered slide (runs of
   neighbouring patches, one run per grid row). ``--order shuffled`` permutes
   the patches instead. Coordinates are the virtual grid's, in pixels.
6. Each bag is written with ``write_features`` plus ``patch_labels`` (1 gland,
   0 non-gland) into ``<out>/bags/``, listed in ``<out>/bags.csv``
   (``slide,label,split``); ``<out>/build.json`` records the settings, the image
   split, pool sizes and a linear-probe tile AUROC (how separable the tile
   features are, an upper reference for patch heatmaps).

No pretrained weights exist offline: by default the extractor is randomly
initialised with ``--seed``, its BatchNorm statistics are estimated on 2048
train-split tiles (no labels; otherwise the random network's features are ~10x
smaller than real ones, see :func:`calibrate_batchnorm`), and the result is saved
to ``<cache>/<extractor>-<backbone>-seed<seed>-bncal*.safetensors`` so its sha256 is
recorded in every bag like a real weights file. ``--weights FILE`` uses real
(e.g. ImageNet) weights as they are.

    .venv/bin/python benchmarks/mil_glas/build_bags.py [--quick] [--out DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GLAS = Path(os.environ.get("PATHFM_SHARED_DATA", REPO.parent / "shared" / "data")) / "glas" / "train"
CACHE = Path(os.environ.get("PATHFM_CACHE", Path.home() / ".cache" / "napari-pathfm")) / "glas-mil"
GLAS_MPP = 0.62  # GlaS: Zeiss MIRAX MIDI scans at 20x, 0.62 um/px
GLAND_MIN, NON_GLAND_MAX = 0.5, 0.05

# name: (bags train, val, test), min length, max length
SETTINGS = {"quick": ((24, 8, 24), 32, 512), "full": ((48, 16, 40), 200, 20000)}


def load_glas(glas: Path, limit: int | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, RGB uint8, gland mask bool)`` of the GlaS images, sorted by name."""
    from PIL import Image

    names = sorted(p.stem for p in (glas / "images").glob("*.png"))
    if not names:
        raise SystemExit(f"no GlaS images in {glas / 'images'}; set PATHFM_SHARED_DATA")
    names = names[:limit] if limit else names
    out = []
    for n in names:
        image = np.asarray(Image.open(glas / "images" / f"{n}.png").convert("RGB"))
        out.append((n, image, np.asarray(Image.open(glas / "masks" / f"{n}.png")) > 0))
    return out


def cut_tiles(image: np.ndarray, mask: np.ndarray, tile: int):
    """Non-overlapping tiles with a clear label.

    Returns ``(tiles (n, t, t, 3) uint8, labels (n,) int8, yx (n, 2), gland fraction (n,))``.
    """
    tiles, labels, yx, frac = [], [], [], []
    for y in range(0, image.shape[0] - tile + 1, tile):
        for x in range(0, image.shape[1] - tile + 1, tile):
            f = float(mask[y : y + tile, x : x + tile].mean())
            if NON_GLAND_MAX < f < GLAND_MIN:
                continue
            tiles.append(image[y : y + tile, x : x + tile])
            labels.append(int(f >= GLAND_MIN))
            yx.append((y, x))
            frac.append(f)
    return np.stack(tiles), np.array(labels, np.int8), np.array(yx, np.int64), np.array(frac, np.float32)


def calibrate_batchnorm(extractor, tiles: np.ndarray, batch: int = 128) -> None:
    """Set every BatchNorm's running mean/var to the statistics of ``tiles`` (no labels, no gradients).

    A randomly initialised network keeps BatchNorm's default statistics (mean 0, var 1),
    so its activations shrink layer by layer: resnet50_trunc's features come out ~0.05,
    10x smaller than ImageNet features. Poolers without a normalisation layer (meanpool,
    ABMIL) then barely move their logits at lr 2e-4. Estimating the statistics on
    the tiles puts the features on a realistic scale (~0.4) without using any label.
    """
    import torch

    norms = [m for m in extractor.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    extractor.train()
    with torch.no_grad():
        for s in range(0, len(tiles), batch):
            extractor(extractor.preprocess(tiles[s : s + batch]))
    extractor.eval()


def make_extractor(name: str, backbone: str, weights: str | None, seed: int, cache: Path, calib_tiles=None):
    """The feature extractor; random-init weights are saved once to a local file so their hash is recorded.

    With ``calib_tiles`` the random network's BatchNorm statistics are estimated on
    them (:func:`calibrate_batchnorm`) before saving.
    """
    import torch
    from safetensors.torch import save_file

    from napari_pathfm.models.registry import create_model

    if weights is None:
        tag = "" if calib_tiles is None else f"-bncal{len(calib_tiles)}x{calib_tiles.shape[1]}"
        weights = cache / f"{name}-{backbone}-seed{seed}{tag}.safetensors"
        if not weights.is_file():
            torch.manual_seed(seed)
            fresh = create_model(name, backbone=backbone, input_size=0)
            if calib_tiles is not None:
                calibrate_batchnorm(fresh, calib_tiles)
            cache.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in fresh.trunk.state_dict().items()}, str(weights))
    return create_model(name, backbone=backbone, weights=str(weights), input_size=0).eval()


def tile_features(images, tile: int, extractor, cache: Path, device: str = "cpu", batch: int = 64) -> dict:
    """Features of every labelled tile of ``images``, computed once and cached in a zarr."""
    import torch
    import zarr

    what = json.dumps([extractor.describe(), tile, [n for n, *_ in images]], sort_keys=True)
    key = hashlib.sha256(what.encode()).hexdigest()[:16]
    path = cache / f"tiles-{key}.zarr"
    if path.exists() and zarr.open_group(str(path), mode="r").attrs.get("complete"):
        g = zarr.open_group(str(path), mode="r")
        arrays = {k: np.asarray(g[k][:]) for k in ("features", "labels", "image", "yx", "gland_fraction")}
        return arrays | {"attrs": dict(g.attrs), "path": path}
    feats, labels, image_idx, yx, frac = [], [], [], [], []
    extractor = extractor.to(device)
    t0 = time.perf_counter()
    for i, (name, img, mask) in enumerate(images):
        tiles, lab, pos, fr = cut_tiles(img, mask, tile)
        with torch.no_grad():
            for s in range(0, len(tiles), batch):
                feats.append(extractor(extractor.preprocess(tiles[s : s + batch], device)).float().cpu().numpy())
        labels.append(lab), image_idx.append(np.full(len(lab), i, np.int16)), yx.append(pos), frac.append(fr)
        print(f"\rfeatures: image {i + 1}/{len(images)} ({time.perf_counter() - t0:.0f} s)", end="", flush=True)
    print()
    arrays = {
        "features": np.concatenate(feats).astype(np.float32),
        "labels": np.concatenate(labels),
        "image": np.concatenate(image_idx),
        "yx": np.concatenate(yx),
        "gland_fraction": np.concatenate(frac),
    }
    attrs = {**extractor.describe(), "tile_size": tile, "mpp": GLAS_MPP, "images": [n for n, *_ in images]}
    tmp = cache / f".tiles-{key}.tmp"
    g = zarr.open_group(str(tmp), mode="w")
    for k, v in arrays.items():
        g.create_array(k, data=v)
    g.attrs.update({**attrs, "complete": True})
    os.replace(tmp, path)
    return arrays | {"attrs": attrs, "path": path}


def split_images(names: list[str], seed: int, fractions=(0.6, 0.2, 0.2)) -> dict[str, list[str]]:
    """Seeded split of image names into train / val / test (60/20/20 by default)."""
    order = np.random.default_rng(seed).permutation(len(names))
    n_train, n_val = round(fractions[0] * len(names)), round(fractions[1] * len(names))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {k: sorted(names[i] for i in v) for k, v in parts.items()}


def layout(length: int, n_gland: int, rng, order: str) -> np.ndarray:
    """Boolean gland flag per patch position: 1-3 rectangles on a raster virtual slide, or shuffled."""
    flags = np.zeros(length, bool)
    if n_gland == 0:
        return flags
    if order == "shuffled":
        flags[rng.choice(length, n_gland, replace=False)] = True
        return flags
    width = math.ceil(math.sqrt(length))
    rows = math.ceil(length / width)
    n_regions = int(rng.integers(1, 4)) if n_gland >= 3 else 1
    for part in np.array_split(np.arange(n_gland), n_regions):
        w = min(width, math.ceil(math.sqrt(len(part))))
        h = math.ceil(len(part) / w)
        r0, c0 = int(rng.integers(0, max(1, rows - h + 1))), int(rng.integers(0, width - w + 1))
        cells = [(r0 + i // w) * width + c0 + i % w for i in range(len(part))]
        flags[[c for c in cells if c < length]] = True
    if not flags.any():
        flags[int(rng.integers(length))] = True
    return flags


def compose_bags(pools: dict, counts, min_len: int, max_len: int, seed: int, order: str = "raster"):
    """Yield ``(name, split, label, tile indices, gland flags)`` for every bag; half of each split positive."""
    rng = np.random.default_rng(seed + 1)
    for split, n in zip(("train", "val", "test"), counts):
        gland, other = pools[split]
        for b in range(n):
            positive = b % 2 == 1
            length = int(round(math.exp(rng.uniform(math.log(min_len), math.log(max_len)))))
            n_gland = max(1, round(rng.uniform(0.01, 0.20) * length)) if positive else 0
            flags = layout(length, n_gland, rng, order)
            idx = np.where(flags, rng.choice(gland, length), rng.choice(other, length))
            yield f"{split}_{b:03d}", split, "positive" if positive else "negative", idx, flags


def probe_auroc(feats, labels, train_mask, test_mask) -> float:
    """AUROC on test tiles of a logistic regression fitted on train tiles (standardised features, L2 1e-3)."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    x = torch.from_numpy(feats)
    mu, sd = x[train_mask].mean(0), x[train_mask].std(0) + 1e-6
    x = (x - mu) / sd
    y = torch.from_numpy(labels.astype(np.float32))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        logits = x[train_mask] @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[train_mask]) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(binary_auroc(x[test_mask] @ w + b, y[test_mask].long()))


def build(args) -> Path:
    """Run steps 1-6; return the output folder."""
    from napari_pathfm.training.mil_data import write_bag

    counts, min_len, max_len = SETTINGS["quick" if args.quick else "full"]
    counts = tuple(int(c) for c in args.bags.split(",")) if args.bags else counts
    min_len, max_len = args.min_len or min_len, args.max_len or max_len
    out = Path(args.out or CACHE / ("bags-quick" if args.quick else "bags-full"))
    cache = Path(args.cache)
    images = load_glas(Path(args.glas), args.images)
    names = [n for n, *_ in images]
    split = split_images(names, args.seed)
    calib = None
    if args.weights is None and args.bn_calibration:
        train = [cut_tiles(img, mask, args.tile)[0] for n, img, mask in images if n in split["train"]]
        calib = np.concatenate(train)
        calib = calib[np.random.default_rng(args.seed).permutation(len(calib))[:2048]]
    extractor = make_extractor(args.extractor, args.backbone, args.weights, args.seed, cache, calib)
    tiles = tile_features(images, args.tile, extractor, cache, args.device)
    which = {n: s for s, ns in split.items() for n in ns}
    tile_split = np.array([which[names[i]] for i in tiles["image"]])
    labels = tiles["labels"]
    pools = {
        s: (np.flatnonzero((tile_split == s) & (labels == 1)), np.flatnonzero((tile_split == s) & (labels == 0)))
        for s in split
    }
    for s, (g, o) in pools.items():
        if len(g) == 0 or len(o) == 0:
            raise SystemExit(f"the {s} split has {len(g)} gland and {len(o)} non-gland tiles; use more images")
    attrs = {k: v for k, v in tiles["attrs"].items() if k != "images"}
    attrs.update(level0_tile_size=args.tile, target_mpp=GLAS_MPP)
    attrs["patch_order"] = (
        "raster over a virtual slide (ceil(sqrt(L)) columns, row by row); gland tiles form 1-3 rectangles"
        if args.order == "raster"
        else "shuffled"
    )
    rows, stats = [], []
    names = dict(zip(("negative", "positive"), args.labels.split(",")))
    for name, part, label, idx, flags in compose_bags(pools, counts, min_len, max_len, args.seed, args.order):
        label = names[label]
        width = math.ceil(math.sqrt(len(idx)))
        coords = np.stack([np.arange(len(idx)) // width, np.arange(len(idx)) % width], 1) * args.tile
        bag_attrs = {
            **attrs,
            "slide": name,
            "split": part,
            "n_gland": int(flags.sum()),
            "gland_fraction": float(flags.mean()),
        }
        path = out / "bags" / f"{name}.features.zarr"
        write_bag(path, tiles["features"][idx], coords, bag_attrs, flags.astype(np.int8))
        rows.append((name, label, part))
        stats.append({"slide": name, "split": part, "label": label, "length": len(idx), "n_gland": int(flags.sum())})
        print(f"\rbags: {len(rows)}/{sum(counts)}", end="", flush=True)
    print()
    with open(out / "bags.csv", "w", newline="") as f:
        csv.writer(f).writerows([("slide", "label", "split"), *rows])
    probe = probe_auroc(tiles["features"], labels, tile_split == "train", tile_split == "test")
    doc = {
        "settings": {k: v for k, v in vars(args).items()} | {"counts": counts, "min_len": min_len, "max_len": max_len},
        "extractor": attrs,
        "tile_cache": str(tiles["path"]),
        "images": split,
        "pools": {s: {"gland": len(g), "non_gland": len(o)} for s, (g, o) in pools.items()},
        "tile_probe_auroc": probe,
        "bags": stats,
    }
    (out / "build.json").write_text(json.dumps(doc, indent=1, default=str))
    lengths = [s["length"] for s in stats]
    print(f"{len(rows)} bags in {out} (lengths {min(lengths)}-{max(lengths)}), tile probe AUROC {probe:.3f}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"small bags for a few-minute run: {SETTINGS['quick']}")
    p.add_argument("--out", help="output folder (default <cache>/bags-quick or bags-full)")
    p.add_argument("--cache", default=str(CACHE), help="tile-feature and extractor-weights cache (default %(default)s)")
    p.add_argument("--glas", default=str(GLAS), help="GlaS folder with images/ and masks/")
    p.add_argument("--images", type=int, help="use only the first N images (tests)")
    p.add_argument("--tile", type=int, default=64, help="tile side in px at full resolution (default 64)")
    p.add_argument("--extractor", default="resnet50_trunc", help="resnet50_trunc or timm_features")
    p.add_argument("--backbone", default="resnet50", help="timm backbone of the extractor")
    p.add_argument("--weights", help="real extractor weights file (default: seeded random init, saved in the cache)")
    p.add_argument(
        "--no-bn-calibration",
        dest="bn_calibration",
        action="store_false",
        help="keep BatchNorm's default statistics in the random extractor (features ~10x smaller)",
    )
    p.add_argument("--labels", default="negative,positive", help="CSV labels of gland-free,gland bags")
    p.add_argument("--bags", help="bags per split 'train,val,test' (default from the setting)")
    p.add_argument("--min-len", type=int, help="shortest bag")
    p.add_argument("--max-len", type=int, help="longest bag")
    p.add_argument("--order", choices=("raster", "shuffled"), default="raster", help="patch order in a bag")
    p.add_argument("--seed", type=int, default=0, help="seed of the image split, the bags and the random extractor")
    p.add_argument("--device", default="cpu", help="device for feature extraction")
    return p


if __name__ == "__main__":
    build(parser().parse_args())
