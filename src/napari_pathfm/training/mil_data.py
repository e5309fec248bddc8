"""Feature bags for multiple-instance learning: one slide = one bag of patch features.

Layout (CAMELYON16 / TCGA style, as CLAM and the S4 MIL code use it): a folder
of feature files written by ``pathfm features`` (one zarr group per slide,
``<features_dir>/<slide>.features.zarr``, or ``<slide>.zarr``) plus a CSV with columns ``slide,label`` and
optionally ``fold`` (cross-validation fold, int) and ``split``
(``train``/``val``/``test``). Labels may be any strings; they map to class
indices in the order of the recipe's ``data.classes`` list, or sorted (numerically
when every label is an integer). A bag may carry per-patch labels
(``patch_labels`` (N,) int8 beside ``features``; -1 = unknown) for multitask
training.

Which bags validate:

1. ``data.val_fold`` set: rows whose fold equals it (the CSV's ``fold`` column,
   or seeded stratified folds over ``data.n_folds``); the other folds train.
2. else a ``split`` column: its ``train`` and ``val`` rows.
3. else a seeded, stratified ``data.val_fraction`` of the rows.

Rows with ``split == test`` never train or validate; they are held out for
:func:`napari_pathfm.training.tasks.mil.evaluate_bags`. The Lightning data
module over these rules is :class:`napari_pathfm.training.tasks.mil.BagDataModule`.

Batches hold one bag (``(1, L, D)`` features): bags differ in length and the
paper trains on whole bags, one at a time.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FeatureError, RecipeError

__all__ = [
    "FEATURE_ATTRS",
    "BagDataset",
    "BagItem",
    "assign_folds",
    "bag_info",
    "read_bag_table",
    "read_patch_labels",
    "split_items",
    "write_bag",
]

# Feature-file attributes copied onto the model card (with those of io.features.extractor_card, which
# inference reads to re-extract matching features); these extra ones say where the patches came from.
FEATURE_ATTRS = (
    "extractor",
    "backbone",
    "feature_dim",
    "input_size",
    "mean",
    "std",
    "weights",
    "weights_sha256",
    "mpp",
    "target_mpp",
    "tile_size",
    "level0_tile_size",
    "read_size",
    "min_tissue",
    "tissue_mpp",
    "patch_order",
)
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "": None}


@dataclass(frozen=True)
class BagItem:
    """One CSV row: slide name, feature file, class index and optional fold / split."""

    slide: str
    path: Path
    label: int
    fold: int | None = None
    split: str | None = None


def _class_order(labels: Sequence[str]) -> list[str]:
    unique = sorted(set(labels))
    try:
        return sorted(unique, key=int)
    except ValueError:
        return unique


def _bag_path(features_dir: Path, slide: str) -> Path:
    """``<slide>.features.zarr`` (what ``pathfm features`` writes), else ``<slide>.zarr``, else ``slide`` itself."""
    p = Path(slide)
    if p.suffix == ".zarr":
        return p if p.is_absolute() else features_dir / p
    for suffix in (".features.zarr", ".zarr"):
        if (features_dir / f"{slide}{suffix}").exists():
            return features_dir / f"{slide}{suffix}"
    return features_dir / f"{slide}.features.zarr"


def read_bag_table(
    csv_path: str | Path, features_dir: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[BagItem], list[str]]:
    """Read a ``slide,label[,fold][,split]`` CSV and find each slide's feature file.

    Parameters
    ----------
    csv_path : str or Path
        The label table.
    features_dir : str or Path
        Folder with ``<slide>.zarr`` feature files.
    classes : sequence of str, optional
        Class names in label-index order; default: the CSV's labels, sorted.

    Returns
    -------
    (list of BagItem, list of str)
        Rows in CSV order and the class names.

    Raises
    ------
    RecipeError
        Unreadable CSV, missing columns, duplicate slides, bad fold or split
        values, or a label not in ``classes``.
    FeatureError
        A slide in the CSV has no feature file.
    """
    csv_path, features_dir = Path(csv_path), Path(features_dir)
    if not csv_path.is_file():
        raise RecipeError(csv_path, "label CSV not found.", "Set data.csv to a file with columns slide,label.")
    if not features_dir.is_dir():
        raise FeatureError(features_dir, "feature folder not found.", "Run `pathfm features` or fix data.features_dir.")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows or not {"slide", "label"} <= set(rows[0]):
        raise RecipeError(
            csv_path,
            "needs a header with columns 'slide' and 'label' and at least one row.",
            "Write e.g. 'slide,label' then 'tumor_001,tumor'; optional columns: fold, split.",
        )
    classes = [str(c) for c in classes] if classes else _class_order([r["label"] for r in rows])
    index = {c: i for i, c in enumerate(classes)}
    items, seen = [], set()
    for line, r in enumerate(rows, start=2):
        slide, label = r["slide"], r["label"]
        if slide in seen:
            raise RecipeError(csv_path, f"line {line}: slide {slide!r} is listed twice.", "Keep one row per slide.")
        seen.add(slide)
        if label not in index:
            raise RecipeError(
                csv_path,
                f"line {line}: label {label!r} of slide {slide!r} is not one of the classes {classes}.",
                "Fix the label or the recipe's data.classes list.",
            )
        split = r.get("split", "").lower()
        if split not in _SPLITS:
            raise RecipeError(
                csv_path, f"line {line}: split {r['split']!r} is not train, val or test.", "Fix the split column."
            )
        fold = r.get("fold", "")
        try:
            fold = int(fold) if fold != "" else None
        except ValueError:
            raise RecipeError(
                csv_path, f"line {line}: fold {fold!r} is not an integer.", "Use 0, 1, ... in the fold column."
            ) from None
        path = _bag_path(features_dir, slide)
        if not path.exists():
            raise FeatureError(
                path,
                f"has no features for slide {slide!r} (line {line} of {csv_path.name}).",
                "Extract its features with `pathfm features`, or remove the row.",
            )
        items.append(BagItem(slide, path, index[label], fold, _SPLITS[split]))
    return items, classes


def assign_folds(labels: Sequence[int], k: int, seed: int = 0) -> np.ndarray:
    """Seeded stratified fold index per item: each class is shuffled and dealt round-robin into ``k`` folds."""
    labels = np.asarray(labels)
    folds = np.zeros(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return folds


def bag_info(path: str | Path) -> dict:
    """Length, feature dimension and attributes of a feature file, without reading the features."""
    import zarr

    try:
        g = zarr.open_group(str(path), mode="r")
        shape = g["features"].shape
        attrs = dict(g.attrs)
        has_labels = "patch_labels" in g
    except Exception as exc:
        raise FeatureError(
            path,
            f"is not a readable feature file ({type(exc).__name__}: {exc}).",
            "Re-extract it with `pathfm features`.",
        ) from exc
    if len(shape) != 2:
        raise FeatureError(
            path, f"features have shape {shape}, expected (patches, dim).", "Re-extract it with `pathfm features`."
        )
    return {"n": int(shape[0]), "dim": int(shape[1]), "attrs": attrs, "patch_labels": has_labels}


def read_patch_labels(path: str | Path, n: int) -> np.ndarray:
    """Per-patch labels of a bag as int64 ``(n,)``; all -1 (unknown) when the file has none."""
    import zarr

    g = zarr.open_group(str(path), mode="r")
    if "patch_labels" not in g:
        return np.full(n, -1, dtype=np.int64)
    labels = np.asarray(g["patch_labels"][:]).astype(np.int64).reshape(-1)
    if len(labels) != n:
        raise FeatureError(path, f"has {len(labels)} patch labels for {n} patches.", "Rewrite its patch_labels array.")
    return labels


def write_bag(path: str | Path, features, coords, attrs: dict, patch_labels=None) -> Path:
    """Write a feature file with :func:`~napari_pathfm.io.features.write_features`, plus patch labels.

    The whole folder appears at ``path`` only when features and labels are both written.
    """
    import zarr

    from ..io.atomic import atomic_path
    from ..io.features import write_features

    with atomic_path(path, directory=True) as tmp:
        write_features(tmp, features, coords, attrs)
        if patch_labels is not None:
            labels = np.asarray(patch_labels, dtype=np.int8).reshape(-1)
            if len(labels) != len(features):
                raise FeatureError(
                    path, f"{len(labels)} patch labels for {len(features)} patches.", "Pass one label per patch."
                )
            g = zarr.open_group(str(tmp), mode="r+")
            g.create_array("patch_labels", data=labels, chunks=(max(1, min(len(labels), 1 << 16)),))
    return Path(path)


class BagDataset:
    """Map-style dataset of feature bags; item = dict ``features (L, D)``, ``label``, ``patch_labels (L,)``.

    Parameters
    ----------
    items : sequence of BagItem
    dim : int
        Expected feature dimension; a bag with another one raises FeatureError.
    max_patches : int, optional
        Train on a random subset of this many patches (kept in slide order) per
        bag and epoch; None uses whole bags.
    in_memory : bool
        Keep bags in memory after the first read (small data sets).
    seed : int
        Seed of the patch subsets.
    """

    def __init__(
        self,
        items: Sequence[BagItem],
        dim: int,
        *,
        max_patches: int | None = None,
        in_memory: bool = False,
        seed: int = 0,
    ):
        self.items, self.dim = list(items), int(dim)
        self.max_patches, self.in_memory = max_patches, in_memory
        self._cache: dict[int, tuple] = {}
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features (L, D) float32, coords (L, 2) and patch labels (L,) of bag ``i``, checked."""
        if i in self._cache:
            return self._cache[i]
        from ..io.features import read_features

        item = self.items[i]
        bag = read_features(item.path)
        feats = np.asarray(bag.features, dtype=np.float32)
        if feats.ndim != 2 or len(feats) == 0:
            raise FeatureError(
                item.path,
                f"bag of slide {item.slide!r} is empty.",
                "Check the slide's tissue detection or drop it from the CSV.",
            )
        if feats.shape[1] != self.dim:
            raise FeatureError(
                item.path,
                f"has {feats.shape[1]}-d features but this run uses {self.dim}-d ones.",
                "Use features from one extractor for all slides (and the model's in_dim).",
            )
        out = (feats, np.asarray(bag.coords), read_patch_labels(item.path, len(feats)))
        if self.in_memory:
            self._cache[i] = out
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        feats, _, patch_labels = self.load(i)
        if self.max_patches and len(feats) > self.max_patches:
            keep = np.sort(self._rng.choice(len(feats), self.max_patches, replace=False))
            feats, patch_labels = feats[keep], patch_labels[keep]
        return {
            "features": torch.from_numpy(np.ascontiguousarray(feats)),
            "label": torch.tensor(self.items[i].label, dtype=torch.long),
            "patch_labels": torch.from_numpy(np.ascontiguousarray(patch_labels)),
            "index": i,
        }


def split_items(items: list[BagItem], data: dict, seed: int) -> dict[str, list[BagItem]]:
    """Train / val / test lists of ``items`` by the rules of the module docstring (``data``: the recipe section)."""
    pool = [it for it in items if it.split != "test"]
    test = [it for it in items if it.split == "test"]
    val_fold = data.get("val_fold")
    if val_fold is not None:
        given = [it.fold is not None for it in pool]
        if any(given) and not all(given):
            missing = next(it.slide for it, g in zip(pool, given) if not g)
            raise RecipeError(
                data["csv"], f"fold column is empty for slide {missing!r}.", "Give every train/val row a fold."
            )
        if all(given):
            folds = np.array([it.fold for it in pool])
        else:
            folds = assign_folds([it.label for it in pool], int(data.get("n_folds") or 5), seed)
        val = [it for it, f in zip(pool, folds) if f == val_fold]
        train = [it for it, f in zip(pool, folds) if f != val_fold]
    elif any(it.split for it in pool):
        train, val = [it for it in pool if it.split == "train"], [it for it in pool if it.split == "val"]
    else:
        rng = np.random.default_rng(seed)
        labels = np.array([it.label for it in pool])
        fraction = float(data.get("val_fraction", 0.2))
        is_val = np.zeros(len(pool), dtype=bool)
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if fraction > 0 else 0
            is_val[idx[:n_val]] = True
        train = [it for it, v in zip(pool, is_val) if not v]
        val = [it for it, v in zip(pool, is_val) if v]
    return {"train": train, "val": val, "test": test}
