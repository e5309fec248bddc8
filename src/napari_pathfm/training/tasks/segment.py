"""``segment`` family: semantic segmentation (Path-SAM2) from folders of image/mask pairs.

Data layout
-----------
``data.root`` holds ``images/`` and ``masks/`` with one mask per image of the same
stem (PNG, TIFF or JPEG; ``train_1.png`` ↔ ``train_1.png`` or ``train_1.tif``).
``data.extra_dirs`` adds more folders of the same layout, used for training only
(e.g. the painted-corrections folder written by the napari widget), each optionally
oversampled. A folder may hold a ``dataset.json`` with ``mpp``, ``mask_format``,
``mask_values`` and ``classes``; a painted-corrections folder's ``corrections.json``
manifest is read the same way (class-index masks at its ``mpp``). Recipe keys (and
per-folder mappings in ``extra_dirs``) take precedence over them.

Masks
-----
* ``binary``: 0 = background, 255 (or 1) = foreground → classes 0 and 1.
* ``index``: class indices ``0..K-1``; ``ignore_index`` (255) marks unlabelled pixels.
* ``nonzero``: 0 = background, any other value = class 1 (instance-labelled masks
  such as the original GlaS and CRAG annotations).
* ``auto`` (default): a folder whose masks only ever hold 0 and 255 is binary,
  otherwise index.
* ``data.mask_values`` maps raw values to classes first (``{0: 0, 128: 1, 255: 2}``,
  map to 255 to ignore). Any other value is an error that names the file and the
  values found.

Split and sampling
------------------
Validation holds out whole images by name (``data.val_names`` or a seeded
``data.val_fraction``), so no image contributes tiles to both sides. Training draws
``data.samples_per_image`` random ``tile_size`` crops per image and epoch
(images smaller than a tile are padded: white image, ``ignore_index`` label), with
flips, 90° rotations and mild brightness/contrast/saturation jitter. Validation
runs on every held-out image whole: sliding tiles (last tile aligned to the edge),
logits averaged where tiles overlap, metrics on the stitched map. With ``data.mpp``
(µm/px of the files) and ``data.input_mpp`` (µm/px the model should see) images are
resampled once when read; the model card records ``input_mpp``.

Training
--------
The model's own ``preprocess`` normalises uint8 tiles; the loss is
:func:`napari_pathfm.models.pathsam2.loss.pathsam2_loss` ((1−α)·Dice + α·Focal +
β·MSE(IoU)). Logged: ``train_loss`` (+ its parts), ``val_loss``, ``val_dice`` and
``val_iou`` (means over the foreground classes), ``val_dice_<class>``,
``val_iou_<class>`` and ``val_object_f1`` (GlaS object-level F1, see
:mod:`napari_pathfm.training.seg_metrics`); pixel counts pool over all validation
images (and DDP processes) before the ratios are taken.

``data.init_checkpoint`` starts from an existing checkpoint (its card supplies the
model config, classes and µm/px unless the recipe sets them); that file is only
read, and a run whose output would overwrite it stops before training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ...errors import RecipeError
from ...models.registry import create_model
from ..recipes import IMAGE_EXTENSIONS, Recipe
from ..seg_metrics import dice_iou, f1_from_counts, object_counts
from ..segment_data import (
    IGNORE, MASK_FORMATS, SegItem, _jitter, _pad_to, _Store, _values_text, find_pairs, mask_to_classes, read_mask,
    read_rgb, split_names, tile_starts,
)  # fmt: skip
from .classify import build_optimizer

__all__ = [
    "SegItem", "find_pairs", "read_rgb", "read_mask", "mask_to_classes", "split_names", "tile_starts",
    "SegmentTileDataset", "SegmentImageDataset", "SegmentDataModule", "SegmentTask", "predict_image", "build",
]  # fmt: skip

FOLDER_META = "dataset.json"
CORRECTIONS_META = "corrections.json"  # written by napari_pathfm.pipelines.corrections


class SegmentTileDataset(Dataset):
    """Random ``tile`` x ``tile`` training crops: ``samples_per_image`` x ``repeat`` per item and epoch.

    Returns dicts ``{"image": uint8 (T, T, 3), "mask": int64 (T, T)}``. Randomness
    comes from torch's generator, so ``seed_everything`` (and Lightning's worker
    seeding) make it reproducible.
    """

    def __init__(self, items: list[SegItem], store: _Store, tile: int, samples_per_image: int = 1,
                 augment: bool = True, color_jitter: float = 0.0):  # fmt: skip
        self.store, self.tile, self.augment, self.color_jitter = store, int(tile), bool(augment), float(color_jitter)
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
        img, msk = img[y : y + t, x : x + t], msk[y : y + t, x : x + t]
        if self.augment:
            k = int(rng.integers(0, 4))
            img, msk = np.rot90(img, k), np.rot90(msk, k)
            if rng.random() < 0.5:
                img, msk = img[:, ::-1], msk[:, ::-1]
            img = _jitter(img, self.color_jitter, rng)
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
            raise RecipeError(f, "must hold a JSON object (mpp, mask_format, mask_values, classes).", "Fix or delete it.")
        if name == CORRECTIONS_META:
            meta = {"mask_format": "index", **{k: meta[k] for k in ("mpp", "classes") if meta.get(k) is not None}}
        return {k: v for k, v in meta.items() if k in ("mpp", "mask_format", "mask_values", "classes")}
    return {}


class SegmentDataModule(L.LightningDataModule):
    """Image/mask folders of a ``segment`` recipe, split by image name (read eagerly to validate masks).

    Parameters
    ----------
    data : dict
        The recipe's ``data`` section (keys: :data:`~napari_pathfm.training.recipes.DATA_SCHEMA` ``segment``).
    batch_size, num_workers, seed : int
    num_classes : int, optional
        Known class count (from the model or an initial checkpoint); else read from the masks.
    base : Path, optional
        Folder that relative ``extra_dirs`` resolve against (the recipe's folder).
    defaults : dict, optional
        Fallbacks for ``mpp``/``input_mpp``/``classes`` (an initial checkpoint's card).
    """

    def __init__(self, data: dict, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
                 num_classes: int | None = None, base: Path | None = None, defaults: dict | None = None):  # fmt: skip
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
                self.root, f"data.input_mpp is {self.input_mpp} but the µm/px of the images is unknown.",
                "Set data.mpp to the µm/px of the image files (GlaS: 0.62) or drop data.input_mpp.",
            )  # fmt: skip
        if self.input_mpp is None:
            self.input_mpp = self.mpp
        base_items = self._folder_items(self.root, {**root_meta, **self._recipe_mask_cfg()}, extra=False)
        names = [it.name for it in base_items]
        train_names, val_names = split_names(names, data.get("val_names"), data.get("val_fraction", 0.2), self.seed, self.root)
        by_name = {it.name: it for it in base_items}
        self.train_items = [by_name[n] for n in train_names]
        self.val_items = [by_name[n] for n in val_names]
        self.extra_items: list[SegItem] = []
        for entry in data.get("extra_dirs") or []:
            self.extra_items += self._extra(entry, base or Path.cwd())
        if not self.train_items + self.extra_items:
            raise RecipeError(self.root, "leaves no images for training after the split.", "Lower data.val_fraction or shorten data.val_names.")
        self.store = _Store(None, self.ignore_index, bool(data.get("in_memory", True)))
        names = data.get("classes") or root_meta.get("classes") or defaults.get("classes")
        if num_classes is None and names:
            num_classes = len(names)
        self.store.num_classes = num_classes  # known: each mask is checked against it, naming the file
        self._check_masks()
        self.num_classes = self._num_classes(num_classes)
        self.store.num_classes = self.num_classes
        self.classes = self._class_names(names)
        for folder, meta in {it.source: it.meta for it in self.extra_items}.items():
            if meta.get("classes") and [str(c) for c in meta["classes"]] != self.classes:
                raise RecipeError(
                    folder, f"was labelled with classes {meta['classes']} but this model has {self.classes}.",
                    "Use corrections made with this model, or train on them with a matching data.classes.",
                )  # fmt: skip
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
            binary = all(set(np.unique(read_mask(it.mask)).tolist()) <= {0, 255} for it in items)
            for it in items:
                it.mask_format = "binary" if binary and not it.mask_values else "index"
        return items

    def _extra(self, entry: Any, base: Path) -> list[SegItem]:
        spec = {"path": entry} if isinstance(entry, (str, Path)) else dict(entry or {})
        if "path" not in spec:
            raise RecipeError(self.root, f"data.extra_dirs entry {entry!r} has no 'path'.", "Write a folder path or {path: ..., repeat: 2}.")
        unknown = set(spec) - {"path", "repeat", "mpp", "mask_format", "mask_values"}
        if unknown:
            raise RecipeError(
                self.root, f"data.extra_dirs entry has unknown keys {sorted(unknown)}.",
                "Known: path, repeat, mpp, mask_format, mask_values.",
            )  # fmt: skip
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
                found[values[-1]], f"holds mask value {values[-1]}, but no mask holds the values {_values_text(gaps)}: "
                f"class ids must run 0..K-1 (values found in {self.root}: {_values_text(values)}).",
                "Set data.classes (one name per class) or map the values with data.mask_values.",
            )  # fmt: skip
        return k

    def _class_names(self, names) -> list[str]:
        if names:
            if len(names) != self.num_classes:
                raise RecipeError(
                    self.root, f"has {len(names)} class names {list(names)} for {self.num_classes} classes.",
                    "List one name per class, background first, in data.classes.",
                )  # fmt: skip
            return [str(n) for n in names]
        if self.num_classes == 2:
            return ["background", "foreground"]
        return ["background"] + [f"class_{i}" for i in range(1, self.num_classes)]

    # datasets / loaders

    def train_dataset(self) -> SegmentTileDataset:
        return SegmentTileDataset(
            self.train_items + self.extra_items, self.store, self._tile(), self.cfg.get("samples_per_image", 1),
            self.cfg.get("augment", True), self.cfg.get("color_jitter", 0.0),
        )  # fmt: skip

    def val_dataset(self) -> SegmentImageDataset:
        return SegmentImageDataset(self.val_items, self.store, self._tile())

    def _tile(self) -> int:
        if not self.tile_size:
            raise RuntimeError("SegmentDataModule.tile_size is not set (build() sets it from the model)")
        return int(self.tile_size)

    def train_dataloader(self) -> DataLoader:
        ds = self.train_dataset()
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, drop_last=len(ds) > self.batch_size,
        )  # fmt: skip

    def val_dataloader(self):
        if not self.val_items:
            return []
        return DataLoader(
            self.val_dataset(), batch_size=None, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )  # fmt: skip

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
        mpp = f"{self.mpp} µm/px resampled to {self.input_mpp} µm/px" if self.mpp and self.mpp != self.input_mpp else (
            f"{self.input_mpp} µm/px" if self.input_mpp else "µm/px unknown"
        )
        return f"{text}; classes {self.classes}; {mpp}; tiles {self.tile_size} px"


# --- task ------------------------------------------------------------------------------------


def _metric_name(name: str) -> str:
    return re.sub(r"\W+", "_", str(name)).strip("_") or "class"


@torch.no_grad()
def predict_image(model, image: torch.Tensor, tile: int, stride: int | None = None, batch_size: int = 4,
                  target: torch.Tensor | None = None, loss_fn=None):  # fmt: skip
    """Logits ``(K, H, W)`` of one uint8 ``(H, W, 3)`` image (H, W ≥ tile) by sliding tiles, averaged in overlaps.

    With ``target`` (H, W) and ``loss_fn(out, target_tiles)``, also the mean loss
    over the tiles (targets resized to the model's output size, nearest).
    """
    H, W = image.shape[:2]
    pos = [(y, x) for y in tile_starts(H, tile, stride or tile) for x in tile_starts(W, tile, stride or tile)]
    acc = count = None
    losses = []
    for i in range(0, len(pos), batch_size):
        chunk = pos[i : i + batch_size]
        tiles = torch.stack([image[y : y + tile, x : x + tile] for y, x in chunk])
        out = model(model.preprocess(tiles))
        logits = out["logits"].float()
        if loss_fn is not None and target is not None:
            t = torch.stack([target[y : y + tile, x : x + tile] for y, x in chunk])
            losses.append((float(loss_fn(out, _fit_target(t, logits.shape[-2:]))), len(chunk)))
        if logits.shape[-2:] != (tile, tile):
            logits = F.interpolate(logits, size=(tile, tile), mode="bilinear", align_corners=False)
        if acc is None:
            acc = logits.new_zeros((logits.shape[1], H, W))
            count = logits.new_zeros((1, H, W))
        for (y, x), lg in zip(chunk, logits):
            acc[:, y : y + tile, x : x + tile] += lg
            count[:, y : y + tile, x : x + tile] += 1
    logits = acc / count.clamp_min(1)
    loss = sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses else None
    return logits, loss


def _fit_target(target: torch.Tensor, size) -> torch.Tensor:
    """Nearest-resize a (B, H, W) label tensor to the model's output size (ignore labels stay ignore)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class SegmentTask(L.LightningModule):
    """Trains a segmentation model (``preprocess`` + forward → ``{"logits", "iou"}``) with the Path-SAM2 loss.

    Parameters
    ----------
    model : torch.nn.Module
        A ``segment`` registry model (``pathsam2``).
    classes : list of str
        Class names, background first.
    optim : dict
        The recipe's ``optim`` section (only parameters with ``requires_grad`` train).
    max_epochs : int
    alpha, beta : float
        Focal and IoU-MSE weights of the loss.
    ignore_index : int
    tile_size, val_stride : int
        Validation tiling of whole images.
    val_batch_size : int
        Tiles per forward pass in validation.
    init_checkpoint : Path, optional
        File that must never be overwritten by this run's export.
    """

    def __init__(self, model, classes: list[str], optim: dict, max_epochs: int, alpha: float = 0.125,
                 beta: float = 0.01, ignore_index: int = IGNORE, tile_size: int = 256, val_stride: int | None = None,
                 val_batch_size: int = 4, init_checkpoint: Path | None = None):  # fmt: skip
        super().__init__()
        self.model = model
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.optim_cfg, self.max_epochs = dict(optim), int(max_epochs)
        self.alpha, self.beta, self.ignore_index = float(alpha), float(beta), int(ignore_index)
        self.tile_size, self.val_stride, self.val_batch_size = int(tile_size), val_stride, int(val_batch_size)
        self.init_checkpoint = Path(init_checkpoint) if init_checkpoint else None
        self._reset_val()

    def _reset_val(self) -> None:
        self._cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
        self._obj = torch.zeros(3, dtype=torch.float64)  # TP, FP, FN over the foreground classes
        self._loss = torch.zeros(2, dtype=torch.float64)  # sum, count

    def loss(self, out: dict, target: torch.Tensor):
        """``(loss, parts)`` of :func:`~napari_pathfm.models.pathsam2.loss.pathsam2_loss`."""
        from ...models.pathsam2.loss import pathsam2_loss

        target = _fit_target(target, out["logits"].shape[-2:])
        return pathsam2_loss(out, target, alpha=self.alpha, beta=self.beta, ignore_index=self.ignore_index)

    def forward(self, images_uint8: torch.Tensor) -> dict:
        return self.model(self.model.preprocess(images_uint8))

    def on_fit_start(self) -> None:
        if self.init_checkpoint is None:
            return
        out = (Path(self.trainer.default_root_dir) / "model.safetensors").resolve()
        if out == self.init_checkpoint.resolve():
            raise RecipeError(
                self.init_checkpoint, "is data.init_checkpoint and would be overwritten by this run's export.",
                "Choose another output folder (--out) so the new checkpoint is saved beside the old one.",
            )  # fmt: skip

    def training_step(self, batch, batch_idx):
        out = self(batch["image"])
        loss, parts = self.loss(out, batch["mask"])
        n = len(batch["mask"])
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        for k, v in (parts or {}).items():
            if k != "loss":
                self.log(f"train_loss_{k}", torch.as_tensor(v, dtype=torch.float32).detach().mean(), on_step=False,
                         on_epoch=True, batch_size=n, sync_dist=True)  # fmt: skip
        return loss

    def on_validation_epoch_start(self) -> None:
        self._reset_val()

    def validation_step(self, batch, batch_idx):
        h, w = (int(v) for v in batch["size"])
        logits, loss = predict_image(
            self.model, batch["image"], self.tile_size, self.val_stride, self.val_batch_size, batch["mask"],
            lambda out, t: self.loss(out, t)[0],
        )  # fmt: skip
        pred = logits[:, :h, :w].argmax(0)
        target = batch["mask"][:h, :w]
        keep = target != self.ignore_index
        k = self.num_classes
        cm = torch.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
        self._cm += cm.double().cpu()
        p_np, t_np = pred.cpu().numpy(), target.cpu().numpy()
        for c in range(1, k):
            self._obj += torch.tensor(object_counts(p_np, t_np, c, self.ignore_index), dtype=torch.float64)
        if loss is not None:
            self._loss += torch.tensor([loss * 1.0, 1.0], dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        reduce = self.trainer.strategy.reduce if self.trainer is not None else (lambda t, **_: t)
        cm = reduce(self._cm.to(self.device), reduce_op="sum").cpu().numpy()
        obj = reduce(self._obj.to(self.device), reduce_op="sum").cpu().numpy()
        ls = reduce(self._loss.to(self.device), reduce_op="sum").cpu().numpy()
        if cm.sum() == 0:
            return
        dice, iou = dice_iou(cm)
        fg, fg_iou = (dice[1:], iou[1:]) if self.num_classes > 1 else (dice, iou)
        metrics = {
            "val_loss": float(ls[0] / max(ls[1], 1.0)),
            "val_dice": float(np.nanmean(fg)) if np.isfinite(fg).any() else 0.0,
            "val_iou": float(np.nanmean(fg_iou)) if np.isfinite(fg_iou).any() else 0.0,
            "val_object_f1": f1_from_counts(*(int(v) for v in obj)),
        }
        for i, name in enumerate(self.classes):
            metrics[f"val_dice_{_metric_name(name)}"] = float(np.nan_to_num(dice[i]))
            metrics[f"val_iou_{_metric_name(name)}"] = float(np.nan_to_num(iou[i]))
        for key, value in metrics.items():
            self.log(key, value, on_epoch=True, sync_dist=False, rank_zero_only=False)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return build_optimizer(params, self.optim_cfg, self.max_epochs)


# --- build -----------------------------------------------------------------------------------


def _input_size(model) -> int:
    size = getattr(model, "input_size", None)
    if size is None:
        return int(getattr(model, "pathfm_config", {}).get("image_size") or 256)
    return int(size if isinstance(size, (int, float)) else size[-1])


def _forget_weight_files(model) -> dict:
    """Drop weight-file paths (``*_checkpoint``) from the config the card records, and return them.

    The exported ``.safetensors`` holds those weights already; rebuilding the model
    from the card must not need (or reload) the original files.
    """
    config = getattr(model, "pathfm_config", None)
    if not isinstance(config, dict):
        return {}
    used = {k: str(v) for k, v in config.items() if k.endswith("_checkpoint") and v}
    for k in used:
        config[k] = None
    return used


def _init_card(path: Path, where) -> dict:
    from ...models.checkpoint import read_card

    card = read_card(path)
    if card.get("family") not in (None, "", "segment"):
        raise RecipeError(
            where, f"data.init_checkpoint {path} is a {card.get('family')!r} checkpoint, not a segmentation one.",
            "Pick a checkpoint trained with a segment recipe.",
        )  # fmt: skip
    return card


def build(recipe: Recipe):
    """Task, data and model-card fields for a ``segment`` recipe.

    The number of classes comes from ``model.num_classes``, ``data.classes``, the
    initial checkpoint's card, or the masks (in that order); any disagreement is an
    error. ``data.tile_size`` defaults to the model's input size.
    """
    from ...models.checkpoint import checkpoint_paths, refuse_pickle
    from ...models.weights import load_into, load_state_dict_file

    where = recipe.path or "<recipe>"
    data_cfg = dict(recipe.get("data"))
    cfg = {k: v for k, v in (recipe.get("model") or {}).items() if k != "name"}
    name = recipe.get("model.name")
    init, init_card = None, None
    if data_cfg.get("init_checkpoint"):
        refuse_pickle(data_cfg["init_checkpoint"])  # a .pt/.ckpt: say what it is, not "card not found"
        init, _ = checkpoint_paths(data_cfg["init_checkpoint"])
        init_card = _init_card(init, where)
        if init_card.get("name") != name:
            raise RecipeError(
                where, f"model.name is {name!r} but data.init_checkpoint was trained as {init_card.get('name')!r}.",
                f"Set model.name: {init_card.get('name')}.",
            )  # fmt: skip
        base = dict(init_card.get("config") or {})
        for key in list(base):  # foundation weights are inside the checkpoint already
            if key == "weights" or key.endswith("_checkpoint"):
                base[key] = None
        cfg = {**base, **cfg}
    known = cfg.get("num_classes")
    if known is None and init_card is not None:
        known = init_card.get("num_classes") or (len(init_card["classes"]) if init_card.get("classes") else None)
    if known is None and data_cfg.get("classes"):
        known = len(data_cfg["classes"])
    defaults = {}
    if init_card is not None:
        defaults = {"input_mpp": init_card.get("input_mpp"), "classes": init_card.get("classes")}
    data = SegmentDataModule(
        data_cfg, recipe.get("trainer.batch_size"), recipe.get("trainer.num_workers"), recipe.get("seed"),
        num_classes=known, base=recipe.path.parent if recipe.path else Path.cwd(), defaults=defaults,
    )  # fmt: skip
    if cfg.get("num_classes") is not None and int(cfg["num_classes"]) != data.num_classes:
        raise RecipeError(
            where, f"model.num_classes is {cfg['num_classes']} but the data have {data.num_classes} classes.",
            "Remove model.num_classes (it follows data.classes) or fix data.classes.",
        )  # fmt: skip
    cfg["num_classes"] = data.num_classes
    model = create_model(name, **cfg)
    foundation = _forget_weight_files(model)
    if init is not None:
        load_into(model, load_state_dict_file(init), strict=True, source=init)
    tile = int(data_cfg.get("tile_size") or (init_card or {}).get("tile_size") or _input_size(model))
    data.tile_size = tile
    task = SegmentTask(
        model, data.classes, recipe.get("optim"), recipe.get("trainer.max_epochs"),
        alpha=recipe.get("loss.alpha"), beta=recipe.get("loss.beta"), ignore_index=IGNORE,
        tile_size=tile, val_stride=data_cfg.get("val_stride"), val_batch_size=recipe.get("trainer.batch_size"),
        init_checkpoint=init,
    )  # fmt: skip
    mean = getattr(model, "mean", None)
    std = getattr(model, "std", None)
    card = {
        "classes": data.classes,
        "num_classes": data.num_classes,
        "normalization": {"mean": list(mean), "std": list(std)} if mean is not None and std is not None else None,
        "input_mpp": data.input_mpp,
        "tile_size": tile,
        "ignore_index": IGNORE,
        "training_data": data.describe(),
        "split": {"train": [it.name for it in data.train_items], "val": [it.name for it in data.val_items]},
    }
    if foundation:
        card["foundation_weights"] = foundation
    if init is not None:
        card["init_checkpoint"] = {"path": str(init), "sha256": init_card.get("sha256"), "name": init.stem}
    return task, data, card
