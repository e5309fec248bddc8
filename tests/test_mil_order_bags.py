"""The order benchmark's bag builder (benchmarks/mil_order) on real GlaS tiles.

Its claim: the two classes have identical composition and differ only in spatial
structure. Checked on bags written from the real tiles of 10 GlaS images (labels
from the real masks; as features each tile's mean and std of R, G, B, so no
network is needed and the test stays fast):

- the two bags of a pair hold the same multiset of feature rows and gland flags;
- the contiguous bag's gland tiles form one 4-connected region, the scattered
  bag's touch nowhere (every region one tile);
- so a permutation-invariant pooler scores both bags of a pair alike;
- every fold draws its tiles from its own image group only.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def order_bags():
    path = REPO / "benchmarks" / "mil_order" / "build_order_bags.py"
    spec = importlib.util.spec_from_file_location("mil_order_build_order_bags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(order_bags, shared_data, tmp_path_factory):
    """Bags of 3 pairs per fold over 2 folds from the tiles of the first 10 GlaS images; ``(out, tiles)``."""
    images = order_bags.glas_bags.load_glas(shared_data / "glas" / "train", 10)
    feats, labels, image = [], [], []
    for i, (_, img, mask) in enumerate(images):
        tiles, lab, _, _ = order_bags.glas_bags.cut_tiles(img, mask, 64)
        px = tiles.reshape(len(tiles), -1, 3).astype(np.float32) / 255
        feats.append(np.concatenate([px.mean(1), px.std(1)], 1))
        labels.append(lab)
        image.append(np.full(len(lab), i))
    tiles = {
        "features": np.concatenate(feats),
        "labels": np.concatenate(labels),
        "image": np.concatenate(image),
        "names": [n for n, *_ in images],
        "attrs": {"extractor": "rgb mean+std (test)"},
    }
    out = tmp_path_factory.mktemp("order-bags")
    order_bags.write(out, tiles, pairs=3, k=2, seed=0)
    return out, tiles


def _bags(out: Path) -> dict:
    from napari_pathfm.io.features import read_features
    from napari_pathfm.training.mil_data import read_patch_labels

    with open(out / "bags.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    bags = {}
    for r in rows:
        path = out / "bags" / f"{r['slide']}.features.zarr"
        bag = read_features(path)
        bags[r["slide"]] = (r, bag.features, read_patch_labels(path, len(bag.features)))
    return bags


def test_pairs_have_identical_composition_and_different_structure(written, order_bags):
    from scipy import ndimage

    out, _ = written
    bags = _bags(out)
    pairs = sorted({s.rsplit("_", 1)[0] for s in bags})
    assert len(pairs) == 6 and len(bags) == 12
    for pair in pairs:
        (rc, fc, lc), (rs, fs, ls) = bags[f"{pair}_contiguous"], bags[f"{pair}_scattered"]
        assert (rc["label"], rs["label"]) == ("contiguous", "scattered") and rc["fold"] == rs["fold"]
        # identical composition: the same feature rows with the same gland flags, in another order
        rows_c = np.concatenate([fc, lc[:, None]], 1)
        rows_s = np.concatenate([fs, ls[:, None]], 1)
        assert rows_c.shape == rows_s.shape
        np.testing.assert_array_equal(rows_c[np.lexsort(rows_c.T)], rows_s[np.lexsort(rows_s.T)])
        assert not np.array_equal(fc, fs)  # but not the same arrangement
        # different structure on the side x side raster grid
        side = int(round(np.sqrt(len(lc))))
        assert side * side == len(lc)
        n = int(lc.sum())
        assert n >= 2 and n == int(ls.sum())
        comp_c = np.bincount(ndimage.label(lc.reshape(side, side))[0].ravel())[1:]
        comp_s = np.bincount(ndimage.label(ls.reshape(side, side))[0].ravel())[1:]
        assert comp_c.tolist() == [n]  # one contiguous region
        assert comp_s.tolist() == [1] * n  # n isolated tiles
        assert order_bags.largest_region(lc, side) == n and order_bags.largest_region(ls, side) == 1


def test_permutation_invariant_pooling_cannot_tell_the_pair_apart(written):
    import torch

    from napari_pathfm.models import create_model

    out, _ = written
    bags = _bags(out)
    torch.manual_seed(0)
    model = create_model("maxpool", in_dim=6).eval()
    with torch.no_grad():
        for pair in sorted({s.rsplit("_", 1)[0] for s in bags}):
            a, b = (torch.from_numpy(bags[f"{pair}_{k}"][1])[None] for k in ("contiguous", "scattered"))
            assert torch.equal(model(a)["logits"], model(b)["logits"])


def test_folds_draw_tiles_from_their_own_images(written):
    out, tiles = written
    build = json.loads((out / "build.json").read_text())
    groups = build["image_groups"]
    assert len(groups) == 2 and not set(groups[0]) & set(groups[1])
    names = tiles["names"]
    for rec in build["bags"]:
        used = {names[i] for i in tiles["image"][np.asarray(rec["tiles"])]}
        assert used <= set(groups[rec["fold"]]), rec["slide"]
    labels = [(r["fold"], r["label"]) for r in build["bags"]]
    for f in range(2):
        assert labels.count((f, "contiguous")) == labels.count((f, "scattered")) == 3


def test_blob_is_connected_and_scatter_isolated(order_bags):
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for side, n in ((10, 8), (12, 29), (14, 39)):
        grid = order_bags.blob(side, n, rng)
        assert grid.sum() == n and ndimage.label(grid)[1] == 1
        grid = order_bags.scatter(side, n, rng)
        assert grid.sum() == n and ndimage.label(grid)[1] == n
