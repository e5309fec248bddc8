"""Build MIL bags whose label is set by spatial structure, not by composition (GlaS tiles).

Every bag is a virtual slide: a ``side x side`` grid of real GlaS tiles read in
raster order (row by row), the order S4 MIL convolves along. Bags come in
*pairs* made of the very same tiles (one multiset of tile indices):

- **positive**: the pair's ``n`` gland tiles form one 4-connected region (a
  compact blob grown from a random cell), as a tumour does on a slide;
- **negative**: the same ``n`` gland tiles are scattered, no two sharing an edge.

The non-gland tiles fill the other cells in the same order in both bags. So the
two bags of a pair hold identical features in a different arrangement: any
permutation-invariant pooler (mean, max, attention) gives both the same score,
and only a model that reads the arrangement can separate them.

Tiles are the 64 px GlaS tiles of ``benchmarks/mil_glas/build_bags.py`` (gland
if >= 50 % of the tile is gland in the mask, non-gland if <= 5 %) with the same
features (``resnet50_trunc``, random init with BatchNorm statistics calibrated
on train tiles, cached under ``~/.cache/napari-pathfm/glas-mil``; the cache is
shared with that benchmark). The 85 images are dealt into ``--folds`` seeded
groups; the bags of fold ``f`` draw their tiles (with replacement) only from the
images of group ``f``, so a test fold never sees a training image. Both bags of a
pair are in one fold.

Output (``--out``, default ``~/.cache/napari-pathfm/glas-mil/order-bags``):
``bags/<name>.features.zarr`` (``write_bag``: features, grid coords, patch
labels 1 gland / 0 non-gland), ``bags.csv`` (``slide,label,fold``) and
``build.json`` (settings, image groups, pool sizes, per bag its pair, length,
gland count and largest connected gland region).

    .venv/bin/python benchmarks/mil_order/build_order_bags.py [--pairs 8] [--folds 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np


def load_benchmark(name: str):
    """A module of ``benchmarks/mil_glas`` (the GlaS MIL benchmark), loaded by path under a name of its own."""
    path = Path(__file__).resolve().parents[1] / "mil_glas" / name
    spec = importlib.util.spec_from_file_location(f"mil_glas_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


glas_bags = load_benchmark("build_bags.py")  # tile cutting, extractor and feature cache

OUT = glas_bags.CACHE / "order-bags"
NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def blob(side: int, n: int, rng) -> np.ndarray:
    """``(side, side)`` bool grid with one 4-connected region of ``n`` cells, grown from a random cell.

    Each step adds a frontier cell with probability proportional to the square of
    its number of neighbours already in the region, which keeps the region compact.
    """
    grid = np.zeros((side, side), bool)
    grid[tuple(rng.integers(0, side, 2))] = True
    while grid.sum() < n:
        frontier, weight = [], []
        for r, c in zip(*np.nonzero(~grid)):
            k = sum(grid[r + dr, c + dc] for dr, dc in NEIGHBOURS if 0 <= r + dr < side and 0 <= c + dc < side)
            if k:
                frontier.append((r, c))
                weight.append(k * k)
        p = np.asarray(weight, float)
        grid[frontier[rng.choice(len(frontier), p=p / p.sum())]] = True
    return grid


def scatter(side: int, n: int, rng, tries: int = 100) -> np.ndarray:
    """``(side, side)`` bool grid with ``n`` cells, no two sharing an edge (random sequential placement)."""
    for _ in range(tries):
        grid = np.zeros((side, side), bool)
        for cell in rng.permutation(side * side):
            r, c = divmod(int(cell), side)
            if not any(grid[r + dr, c + dc] for dr, dc in NEIGHBOURS if 0 <= r + dr < side and 0 <= c + dc < side):
                grid[r, c] = True
                if grid.sum() == n:
                    return grid
    raise ValueError(f"could not scatter {n} cells without neighbours on a {side}x{side} grid")


def largest_region(flags: np.ndarray, side: int) -> int:
    """Cells in the largest 4-connected region of the ``True`` cells of a raster-order ``flags`` vector."""
    from scipy import ndimage

    labels, count = ndimage.label(np.asarray(flags, bool).reshape(side, side))
    return int(np.bincount(labels.ravel())[1:].max()) if count else 0


def fill(flags: np.ndarray, gland: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Tile index per cell: ``gland`` tiles at the flagged cells in raster order, ``other`` tiles at the rest."""
    idx = np.empty(flags.size, np.int64)
    idx[flags] = gland
    idx[~flags] = other
    return idx


def make_pair(side: int, n_gland: int, gland_pool, other_pool, rng):
    """``(positive, negative)``: each ``(tile indices, gland flags)`` in raster order, same tiles in both."""
    gland = rng.choice(gland_pool, n_gland)
    other = rng.choice(other_pool, side * side - n_gland)
    pos = blob(side, n_gland, rng).ravel()
    neg = scatter(side, n_gland, rng).ravel()
    return (fill(pos, gland, other), pos), (fill(neg, gland, other), neg)


def compose(pools: list, pairs: int, sides=(10, 14), fraction=(0.12, 0.25), seed: int = 0):
    """Yield ``(name, fold, label, pair, side, tile indices, gland flags)`` for ``pairs`` pairs per fold.

    ``pools[f]`` is ``(gland tile indices, non-gland tile indices)`` of fold ``f``'s
    images; the grid side is drawn from ``sides`` (inclusive) and the gland count
    from ``fraction`` of the cells.
    """
    rng = np.random.default_rng(seed + 1)
    for fold, (gland_pool, other_pool) in enumerate(pools):
        for p in range(pairs):
            side = int(rng.integers(sides[0], sides[1] + 1))
            n = max(2, round(rng.uniform(*fraction) * side * side))
            pair = f"f{fold}_p{p:02d}"
            for label, (idx, flags) in zip(
                ("contiguous", "scattered"), make_pair(side, n, gland_pool, other_pool, rng)
            ):
                yield f"{pair}_{label}", fold, label, pair, side, idx, flags


def image_folds(names: list[str], k: int, seed: int) -> list[list[str]]:
    """Image names dealt into ``k`` seeded groups of (nearly) equal size."""
    order = np.random.default_rng(seed).permutation(len(names))
    return [sorted(names[i] for i in order[f::k]) for f in range(k)]


def glas_tile_features(args) -> dict:
    """Features of every labelled GlaS tile with the GlaS MIL benchmark's extractor (and its cache)."""
    images = glas_bags.load_glas(Path(args.glas), args.images)
    names = [n for n, *_ in images]
    calib = None
    if args.weights is None:  # BatchNorm statistics from mil_glas's train images, so its cached extractor is reused
        train = set(glas_bags.split_images(names, args.seed)["train"])
        calib = np.concatenate([glas_bags.cut_tiles(img, m, args.tile)[0] for n, img, m in images if n in train])
        calib = calib[np.random.default_rng(args.seed).permutation(len(calib))[:2048]]
    cache = Path(args.cache)
    extractor = glas_bags.make_extractor("resnet50_trunc", "resnet50", args.weights, args.seed, cache, calib)
    return glas_bags.tile_features(images, args.tile, extractor, cache, args.device) | {"names": names}


def write(out: Path, tiles: dict, pairs: int, k: int, seed: int, tile: int = 64, sides=(10, 14)) -> list[dict]:
    """Compose the pairs from ``tiles`` (``features``, ``labels``, ``image``, ``names``, ``attrs``) and write them.

    Returns the per-bag records of ``build.json``.
    """
    from napari_pathfm.training.mil_data import write_bag

    groups = image_folds(tiles["names"], k, seed)
    group_of = {n: f for f, ns in enumerate(groups) for n in ns}
    fold = np.array([group_of[tiles["names"][i]] for i in tiles["image"]])
    labels = np.asarray(tiles["labels"])
    pools = [
        (np.flatnonzero((fold == f) & (labels == 1)), np.flatnonzero((fold == f) & (labels == 0))) for f in range(k)
    ]
    for f, (g, o) in enumerate(pools):
        if len(g) == 0 or len(o) == 0:
            raise SystemExit(f"image group {f} has {len(g)} gland and {len(o)} non-gland tiles; use more images")
    attrs = {key: v for key, v in tiles.get("attrs", {}).items() if key != "images"}
    attrs.update(
        level0_tile_size=tile,
        patch_order="raster over a side x side virtual slide; label = gland tiles contiguous vs scattered",
    )
    rows, records = [], []
    for name, f, label, pair, side, idx, flags in compose(pools, pairs, sides, seed=seed):
        coords = np.stack(np.divmod(np.arange(side * side), side), 1) * tile
        bag_attrs = {**attrs, "slide": name, "pair": pair, "fold": f, "n_gland": int(flags.sum())}
        write_bag(out / "bags" / f"{name}.features.zarr", tiles["features"][idx], coords, bag_attrs, flags)
        rows.append((name, label, f))
        records.append(
            {
                "slide": name,
                "pair": pair,
                "fold": f,
                "label": label,
                "side": side,
                "n_gland": int(flags.sum()),
                "largest_region": largest_region(flags, side),
                "tiles": idx.tolist(),
            }
        )
    with open(out / "bags.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("slide", "label", "fold"), *rows])
    pool_sizes = [{"gland": len(g), "non_gland": len(o)} for g, o in pools]
    doc = {"folds": k, "pairs_per_fold": pairs, "sides": sides, "image_groups": groups, "pools": pool_sizes}
    (out / "build.json").write_text(json.dumps({**doc, "extractor": attrs, "bags": records}, indent=1, default=str))
    return records


def build(args) -> Path:
    """Tile features (cached), then the bag pairs; returns the output folder."""
    out = Path(args.out or OUT)
    records = write(out, glas_tile_features(args), args.pairs, args.folds, args.seed, args.tile)
    sides = sorted({r["side"] for r in records})
    print(f"{len(records)} bags ({len(records) // 2} pairs) in {out}; grid sides {sides[0]}-{sides[-1]}")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help=f"output folder (default {OUT})")
    p.add_argument("--pairs", type=int, default=8, help="bag pairs per fold (default 8: 16 bags per fold)")
    p.add_argument("--folds", type=int, default=5, help="image groups = cross-validation folds (default 5)")
    p.add_argument(
        "--cache", default=str(glas_bags.CACHE), help="tile-feature and extractor cache (default %(default)s)"
    )
    p.add_argument("--glas", default=str(glas_bags.GLAS), help="GlaS folder with images/ and masks/")
    p.add_argument("--images", type=int, help="use only the first N images (tests)")
    p.add_argument("--tile", type=int, default=64, help="tile side in px (default 64)")
    p.add_argument("--weights", help="real extractor weights (default: mil_glas's seeded random init)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image groups, the bags and the extractor")
    p.add_argument("--device", default="cpu", help="device for feature extraction")
    return p


if __name__ == "__main__":
    build(parser().parse_args())
