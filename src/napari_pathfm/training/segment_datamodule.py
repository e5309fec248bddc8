"""Lightning data side of the ``segment`` family: training crops, whole validation images, the data module.

Built on the numpy readers of :mod:`napari_pathfm.training.segment_data`; the folder
layout, mask formats, split and sampling are described in
:mod:`napari_pathfm.training.tasks.segment`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import RecipeError
from .affine_crop import ssr_matrix, warp_crop
from .recipe_fields import IMAGE_EXTENSIONS
from .segment_data import (
    IGNORE,
    MASK_FORMATS,
    SegItem,
    _jitter,
    _pad_to,
    _Store,
    _values_text,
    find_pairs,
    is_annotation,
    read_mask,
    split_names,
)
from .stain_augment import hed_jitter

__all__ = ["CORRECTIONS_META", "FOLDER_META", "SegmentDataModule", "SegmentImageDataset", "SegmentTileDataset"]

FOLDER_META = "dataset.json"
CORRECTIONS_META = "corrections.json"  # written by napari_pathfm.pipelines.corrections


class SegmentTileDataset(Dataset):
    """Random ``tile`` x ``tile`` training crops: ``samples_per_image`` x ``repeat`` per item and epoch.

    Returns dicts ``{"image": uint8 (T, T, 3), "mask": int64 (T, T)}``. Randomness
    comes from torch's generator, so ``seed_everything`` (and Lightning's worker
    seeding) make it reproducible.
    """

    def __init__(
        self,
        items: list[SegItem],
        store: _Store,
        tile: int,
        samples_per_image: int = 1,
        augment: bool = True,
        color_jitter: float = 0.0,
        stain_jitter: float = 0.0,
        ssr: tuple[float, float] | None = None,
    ):
        self.store, self.tile, self.augment, self.color_jitter = store, int(tile), bool(augment), float(color_jitter)
        self.stain_jitter = float(stain_jitter)  # HED stain augmentation (training/stain_augment.py)
        self.ssr = ssr  # (scale, rotate_deg): crops rotated at any angle and rescaled (training/affine_crop.py)
        self.index = [it for it in items for _ in range(max(1, int(samples_per_image)) * max(1, int(it.repeat)))]
        self.items = items

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        item = self.index[i]
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        img, msk = self.store.image(item), self.store.mask(item)
        h, w = msk.shape
        t = self.tile
        off = (int(rng.integers(0, max(t - h, 0) + 1)), int(rng.integers(0, max(t - w, 0) + 1)))
        img, msk = _pad_to(img, msk, t, off)
        y = int(rng.integers(0, msk.shape[0] - t + 1))
        x = int(rng.integers(0, msk.shape[1] - t + 1))
        if self.augment and self.ssr is not None:
            # the same window's centre, the crop turned and rescaled around it; source pixels
            # outside the (padded) image are white and ignored by the loss, as padding is
            mat = ssr_matrix((y + (t - 1) / 2, x + (t - 1) / 2), t, rng, scale=self.ssr[0], rotate_deg=self.ssr[1])
            img = warp_crop(img, mat, t, fill=255)
            msk = warp_crop(msk.astype(np.uint8, copy=False), mat, t, nearest=True, fill=IGNORE)
        else:
            img, msk = img[y : y + t, x : x + t], msk[y : y + t, x : x + t]
        if self.augment:
            k = int(rng.integers(0, 4))
            img, msk = np.rot90(img, k), np.rot90(msk, k)
            if rng.random() < 0.5:
                img, msk = img[:, ::-1], msk[:, ::-1]
            img = _jitter(hed_jitter(np.ascontiguousarray(img), self.stain_jitter, rng), self.color_jitter, rng)
        return {
            "image": torch.from_numpy(np.array(img)),  # a copy: never a view of the cached image
            "mask": torch.from_numpy(msk.astype(np.int64)),
        }


class SegmentImageDataset(Dataset):
    """Whole validation images, padded to at least one tile: ``{"image", "mask", "name", "size"}``."""

    def __init__(self, items: list[SegItem], store: _Store, tile: int):
        self.items, self.store, self.tile = items, store, int(tile)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        img, msk = self.store.image(item), self.store.mask(item)
        size = msk.shape
        img, msk = _pad_to(img, msk, self.tile)
        return {
            "image": torch.from_numpy(np.array(img)),
            "mask": torch.from_numpy(msk.astype(np.int64)),
            "name": item.name,
            "size": torch.tensor(size),
        }


# --- data module -----------------------------------------------------------------------------


def _folder_meta(folder: Path) -> dict:
    """Folder-level settings: ``dataset.json`` (mpp, mask_format, mask_values, classes), or the
    ``corrections.json`` manifest of a painted-corrections folder (class-index masks at its ``mpp``)."""
    for name in (FOLDER_META, CORRECTIONS_META):
        f = folder / name
        if not f.is_file():
            continue
        try:
            meta = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RecipeError(f, f"cannot be read as JSON ({exc}).", "Fix or delete it.") from exc
        if not isinstance(meta, dict):
            raise RecipeError(
                f, "must hold a JSON object (mpp, mask_format, mask_values, classes).", "Fix or delete it."
            )
        if name == CORRECTIONS_META:
            meta = {"mask_format": "index", **{k: meta[k] for k in ("mpp", "classes") if meta.get(k) is not None}}
        return {k: v for k, v in meta.items() if k in ("mpp", "mask_format", "mask_values", "classes")}
    return {}


class SegmentDataModule(L.LightningDataModule):
    """Image/mask folders of a ``segment`` recipe, split by image name (read eagerly to validate masks).

    Parameters
    ----------
    data : dict
        The recipe's ``data`` section (keys: :data:`~napari_pathfm.training.recipe_fields.SEGMENT`).
    batch_size, num_workers, seed : int
    num_classes : int, optional
        Known class count (from the model or an initial checkpoint); else read from the masks.
    base : Path, optional
        Folder that relative ``extra_dirs`` resolve against (the recipe's folder).
    defaults : dict, optional
        Fallbacks for ``mpp``/``input_mpp``/``classes`` (an initial checkpoint's card).
    """

    def __init__(
        self,
        data: dict,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        num_classes: int | None = None,
        base: Path | None = None,
        defaults: dict | None = None,
    ):
        super().__init__()
        self.cfg, self.seed = dict(data), int(seed)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.root = Path(data["root"])
        self.ignore_index = int(data.get("ignore_index", IGNORE))
        defaults = defaults or {}
        root_meta = _folder_meta(self.root) if self.root.is_dir() else {}
        self.mpp = data.get("mpp") if data.get("mpp") is not None else root_meta.get("mpp", defaults.get("mpp"))
        self.input_mpp = data.get("input_mpp") if data.get("input_mpp") is not None else defaults.get("input_mpp")
        if data.get("input_mpp") is None and self.mpp is None:  # fine-tuning data without µm/px: at the model's
            self.mpp = self.input_mpp
        if self.input_mpp is not None and self.mpp is None:
            raise RecipeError(
                self.root,
                f"data.input_mpp is {self.input_mpp} but the µm/px of the images is unknown.",
                "Set data.mpp to the µm/px of the image files (GlaS: 0.62) or drop data.input_mpp.",
            )
        if self.input_mpp is None:
            self.input_mpp = self.mpp
        base_items = self._folder_items(self.root, {**root_meta, **self._recipe_mask_cfg()}, extra=False)
        names = [it.name for it in base_items]
        train_names, val_names = split_names(
            names, data.get("val_names"), data.get("val_fraction", 0.2), self.seed, self.root
        )
        by_name = {it.name: it for it in base_items}
        self.train_items = [by_name[n] for n in train_names]
        self.val_items = [by_name[n] for n in val_names]
        self.extra_items: list[SegItem] = []
        for entry in data.get("extra_dirs") or []:
            self.extra_items += self._extra(entry, base or Path.cwd())
        if not self.train_items + self.extra_items:
            raise RecipeError(
                self.root,
                "leaves no images for training after the split.",
                "Lower data.val_fraction or shorten data.val_names.",
            )
        self.store = _Store(None, self.ignore_index, bool(data.get("in_memory", True)), data.get("contour_width") or 0)
        names = data.get("classes") or root_meta.get("classes") or defaults.get("classes")
        if num_classes is None and names:
            num_classes = len(names)
        self.store.num_classes = num_classes  # known: each mask is checked against it, naming the file
        self.store.class_names = [str(n) for n in names] if names else None
        self._check_masks()
        self.num_classes = self._num_classes(num_classes)
        self.store.num_classes = self.num_classes
        self.classes = self._class_names(names)
        for folder, meta in {it.source: it.meta for it in self.extra_items}.items():
            if meta.get("classes") and [str(c) for c in meta["classes"]] != self.classes:
                raise RecipeError(
                    folder,
                    f"was labelled with classes {meta['classes']} but this model has {self.classes}.",
                    "Use corrections made with this model, or train on them with a matching data.classes.",
                )
        self.tile_size: int | None = data.get("tile_size")

    def _recipe_mask_cfg(self) -> dict:
        cfg = {}
        if self.cfg.get("mask_format", "auto") != "auto":
            cfg["mask_format"] = self.cfg["mask_format"]
        if self.cfg.get("mask_values"):
            cfg["mask_values"] = self.cfg["mask_values"]
        return cfg

    def _folder_items(self, folder: Path, meta: dict, extra: bool, repeat: int = 1) -> list[SegItem]:
        fmt = meta.get("mask_format", "auto")
        if fmt not in MASK_FORMATS:
            raise RecipeError(folder, f"mask_format is {fmt!r}; choose one of {list(MASK_FORMATS)}.", "")
        mpp = meta.get("mpp", self.mpp)
        scale = 1.0
        if mpp is not None and self.input_mpp is not None:
            scale = float(mpp) / float(self.input_mpp)
        pairs = find_pairs(folder, self.cfg.get("extensions", IMAGE_EXTENSIONS))
        items = [
            SegItem(n, i, m, folder, scale, repeat, fmt, meta.get("mask_values"), extra, meta) for n, i, m in pairs
        ]
        if fmt == "auto":  # one decision per folder: 0/255 everywhere = binary, else class indices
            raster = [it for it in items if not is_annotation(it.mask)]  # annotation files name their classes
            binary = all(set(np.unique(read_mask(it.mask)).tolist()) <= {0, 255} for it in raster)
            for it in raster:
                it.mask_format = "binary" if binary and not it.mask_values else "index"
        return items

    def _extra(self, entry: Any, base: Path) -> list[SegItem]:
        spec = {"path": entry} if isinstance(entry, (str, Path)) else dict(entry or {})
        if "path" not in spec:
            raise RecipeError(
                self.root,
                f"data.extra_dirs entry {entry!r} has no 'path'.",
                "Write a folder path or {path: ..., repeat: 2}.",
            )
        unknown = set(spec) - {"path", "repeat", "mpp", "mask_format", "mask_values"}
        if unknown:
            raise RecipeError(
                self.root,
                f"data.extra_dirs entry has unknown keys {sorted(unknown)}.",
                "Known: path, repeat, mpp, mask_format, mask_values.",
            )
        folder = Path(spec["path"])
        folder = folder if folder.is_absolute() else (base / folder).resolve()
        meta = {**_folder_meta(folder), **{k: v for k, v in spec.items() if k not in ("path", "repeat")}}
        return self._folder_items(folder, meta, extra=True, repeat=int(spec.get("repeat", 1)))

    def _check_masks(self) -> None:
        """Read every mask once: bad values fail now, naming the file, not in the middle of an epoch."""
        for it in self.train_items + self.val_items + self.extra_items:
            self.store.mask(it)

    def _num_classes(self, known: int | None) -> int:
        """``known``, or read from the masks: class ids must then run 0..K-1 without gaps."""
        if known is not None:
            return int(known)
        found: dict[int, Path] = {}
        for it in self.train_items + self.val_items + self.extra_items:
            for v in np.unique(self.store.masks[it.mask]).tolist():
                found.setdefault(int(v), it.mask)
        values = sorted(v for v in found if v != IGNORE)
        k = max(values[-1] + 1 if values else 0, 2)
        gaps = sorted(set(range(1, k)) - set(values))
        if gaps:
            raise RecipeError(
                found[values[-1]],
                f"holds mask value {values[-1]}, but no mask holds the values {_values_text(gaps)}: "
                f"class ids must run 0..K-1 (values found in {self.root}: {_values_text(values)}).",
                "Set data.classes (one name per class) or map the values with data.mask_values.",
            )
        return k

    def _class_names(self, names) -> list[str]:
        if names:
            if len(names) != self.num_classes:
                raise RecipeError(
                    self.root,
                    f"has {len(names)} class names {list(names)} for {self.num_classes} classes.",
                    "List one name per class, background first, in data.classes.",
                )
            return [str(n) for n in names]
        if self.num_classes == 2:
            return ["background", "foreground"]
        return ["background"] + [f"class_{i}" for i in range(1, self.num_classes)]

    # datasets / loaders

    def train_dataset(self) -> SegmentTileDataset:
        return SegmentTileDataset(
            self.train_items + self.extra_items,
            self.store,
            self._tile(),
            self.cfg.get("samples_per_image", 1),
            self.cfg.get("augment", True),
            self.cfg.get("color_jitter", 0.0),
            self.cfg.get("stain_jitter", 0.0),
            self._ssr(),
        )

    def _ssr(self) -> tuple[float, float] | None:
        if not self.cfg.get("shift_scale_rotate"):
            return None
        return float(self.cfg.get("ssr_scale", 0.1)), float(self.cfg.get("ssr_rotate", 180.0))

    def val_dataset(self) -> SegmentImageDataset:
        return SegmentImageDataset(self.val_items, self.store, self._tile())

    def _tile(self) -> int:
        if not self.tile_size:
            raise RuntimeError("SegmentDataModule.tile_size is not set (build() sets it from the model)")
        return int(self.tile_size)

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=len(ds) > self.batch_size,
        )

    def val_dataloader(self):
        if not self.val_items:
            return []
        return DataLoader(
            self.val_dataset(),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def save_split(self, path: str | Path) -> None:
        """Write the image names of each part (and the extra folders) as JSON."""
        doc = {
            "root": str(self.root),
            "train": [it.name for it in self.train_items],
            "val": [it.name for it in self.val_items],
            "extra": [str(it.image) for it in self.extra_items],
        }
        Path(path).write_text(json.dumps(doc, indent=1), encoding="utf-8")

    def describe(self) -> str:
        """One line on the training data, for the model card."""
        text = (
            f"{len(self.train_items) + len(self.val_items)} image/mask pairs from {self.root} "
            f"({len(self.train_items)} train / {len(self.val_items)} val, held out by image name)"
        )
        if self.extra_items:
            folders = sorted({str(it.source) for it in self.extra_items})
            text += f" + {len(self.extra_items)} training pairs from {', '.join(folders)}"
        mpp = (
            f"{self.mpp} µm/px resampled to {self.input_mpp} µm/px"
            if self.mpp and self.mpp != self.input_mpp
            else (f"{self.input_mpp} µm/px" if self.input_mpp else "µm/px unknown")
        )
        return f"{text}; classes {self.classes}; {mpp}; tiles {self.tile_size} px"
