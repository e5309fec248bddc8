"""``classify`` family: tile classification with cross-entropy on logits.

Logs ``train_loss`` (epoch mean), ``val_loss``, ``val_acc`` and ``val_auroc``
(one-vs-rest, macro-averaged) through torchmetrics, which ships with Lightning and
synchronises metric state across DDP processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

from ...errors import RecipeError
from ...models.registry import create_model
from ..datasets import ClassFolderDataset, classify_transforms, find_class_files, split_files
from ..recipes import Recipe

__all__ = ["ClassifyTask", "ClassifyDataModule", "build_optimizer", "build"]


def build_optimizer(params, optim: dict, max_epochs: int):
    """Optimizer (AdamW/Adam/SGD) and optional cosine schedule from a recipe's ``optim`` section."""
    name, lr, wd = optim.get("name", "adamw"), float(optim.get("lr", 1e-3)), float(optim.get("weight_decay", 0.0))
    if name == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    elif name == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    elif name == "sgd":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(optim.get("momentum", 0.9)))
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    if optim.get("scheduler", "none") == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    return opt


class ClassifyTask(L.LightningModule):
    """Trains ``model`` (any ``(N, C, H, W) -> (N, num_classes)`` module) with cross-entropy."""

    def __init__(self, model: torch.nn.Module, num_classes: int, optim: dict, max_epochs: int):
        super().__init__()
        self.model = model
        self.optim_cfg = dict(optim)
        self.max_epochs = max_epochs
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_auroc = MulticlassAUROC(num_classes=num_classes, average="macro")

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.val_acc.update(logits, y)
        self.val_auroc.update(logits.float().softmax(-1), y)
        self.log("val_loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True)
        self.log("val_auroc", self.val_auroc, on_epoch=True)

    def configure_optimizers(self):
        return build_optimizer(self.parameters(), self.optim_cfg, self.max_epochs)


class ClassifyDataModule(L.LightningDataModule):
    """Class-folder images split into train/val once, at construction (so classes are known early)."""

    def __init__(self, data: dict, batch_size: int = 32, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.cfg = dict(data)
        self.root = Path(data["root"])
        self.batch_size, self.num_workers = batch_size, num_workers
        self.classes, items = find_class_files(self.root, data.get("classes"), data["extensions"])
        self.train_items, self.val_items = split_files(
            items, data["val_fraction"], seed, data.get("split_file"), self.root
        )
        if not self.train_items:
            raise RecipeError(
                self.root, "leaves no images for training after the split.", "Lower data.val_fraction or add images."
            )

    def _dataset(self, items, train: bool) -> ClassFolderDataset:
        tf = classify_transforms(self.cfg["image_size"], train, self.cfg["mean"], self.cfg["std"], self.cfg["augment"])
        return ClassFolderDataset(self.root, self.classes, tf, self.cfg["extensions"], items=items)

    def _loader(self, items, train: bool) -> DataLoader:
        return DataLoader(
            self._dataset(items, train),
            batch_size=self.batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=train and len(items) > self.batch_size and len(items) % self.batch_size == 1,
        )

    def train_dataloader(self):
        return self._loader(self.train_items, True)

    def val_dataloader(self):
        return self._loader(self.val_items, False) if self.val_items else []

    def save_split(self, path: str | Path) -> None:
        """Write the split as a JSON split file (reusable as ``data.split_file``)."""
        rel = lambda items: [str(Path(f).relative_to(self.root)) for f, _ in items]  # noqa: E731
        Path(path).write_text(json.dumps({"train": rel(self.train_items), "val": rel(self.val_items)}, indent=1))

    def describe(self) -> str:
        """One line on what the model was trained on, for the model card."""
        return (
            f"{len(self.train_items) + len(self.val_items)} images in {len(self.classes)} classes from {self.root} "
            f"({len(self.train_items)} train / {len(self.val_items)} val, image_size {self.cfg['image_size']})"
        )


def build(recipe: Recipe):
    """Task, data and model-card fields for a ``classify`` recipe.

    ``model.num_classes`` defaults to the number of class folders; a different
    explicit value is an error.
    """
    data = ClassifyDataModule(
        recipe.get("data"), recipe.get("trainer.batch_size"), recipe.get("trainer.num_workers"), recipe.get("seed")
    )
    cfg = {k: v for k, v in recipe.get("model").items() if k != "name"}
    n = len(data.classes)
    if cfg.setdefault("num_classes", n) != n:
        raise RecipeError(
            recipe.path or "<recipe>",
            f"model.num_classes is {cfg['num_classes']} but data.root has {n} classes.",
            "Remove model.num_classes or fix data.classes.",
        )
    model = create_model(recipe.get("model.name"), **cfg)
    task = ClassifyTask(model, n, recipe.get("optim"), recipe.get("trainer.max_epochs"))
    card = {
        "classes": data.classes,
        "normalization": {"mean": list(data.cfg["mean"]), "std": list(data.cfg["std"])},
        "input_mpp": data.cfg.get("input_mpp"),
        "tile_size": data.cfg["image_size"],
        "training_data": data.describe(),
    }
    return task, data, card
