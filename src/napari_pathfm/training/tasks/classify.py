"""``classify`` family: tile classification with cross-entropy on logits.

Logs ``train_loss`` (epoch mean), ``val_loss``, ``val_acc`` and ``val_auroc``
(one-vs-rest, macro-averaged) through torchmetrics, which ships with Lightning and
synchronises metric state across DDP processes.

Recipe options beyond a plain run:

- ``data.label_fraction``: train on a seeded share of each class's training
  images (:func:`~napari_pathfm.training.datasets.subsample_per_class`);
  validation and test stay whole.
- ``optim.trainable: head``: fine-tune only ``model.get_classifier()``; every other
  parameter is frozen and BatchNorm layers outside the head keep their running
  statistics (eval mode). ``all`` (default) trains everything (deep-tune).
- a ``"test"`` list in ``data.split_file``: after training the engine evaluates
  the best weights on it (``test_loss``, ``test_acc``, ``test_auroc``).
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
from ...tiles.stain import stain_reference_from_paths
from ..datasets import (
    ClassFolderDataset,
    classify_transforms,
    find_class_files,
    read_split_file,
    split_files,
    subsample_per_class,
)
from ..recipes import Recipe

__all__ = ["ClassifyDataModule", "ClassifyTask", "build", "build_optimizer", "freeze_all_but_head"]


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


def freeze_all_but_head(model: torch.nn.Module, where: str | Path = "<recipe>") -> list[torch.nn.Module]:
    """Freeze every parameter of ``model`` except those of ``model.get_classifier()``.

    Returns the BatchNorm modules outside the head, which :class:`ClassifyTask`
    keeps in eval mode so their running statistics stay those of the
    initial weights (a real fine-tune of the head only).

    Raises
    ------
    RecipeError
        The model has no ``get_classifier()`` (timm models and ``slca`` have it)
        or its head has no parameters.
    """
    get_head = getattr(model, "get_classifier", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module) or not any(True for _ in head.parameters()):
        raise RecipeError(
            where,
            f"optim.trainable is 'head' but {type(model).__name__} has no classifier head (get_classifier()).",
            "Use optim.trainable: all, or a model with a head (timm_classifier, slca).",
        )
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    head_modules = {id(m) for m in head.modules()}
    return [
        m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and id(m) not in head_modules
    ]


class ClassifyTask(L.LightningModule):
    """Trains ``model`` (any ``(N, C, H, W) -> (N, num_classes)`` module) with cross-entropy.

    ``trainable="head"`` trains only ``model.get_classifier()`` (see
    :func:`freeze_all_but_head`); ``"all"`` trains every parameter that is not
    already frozen by the model itself (e.g. SLCA's SAM encoder).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_classes: int,
        optim: dict,
        max_epochs: int,
        trainable: str = "all",
        where: str | Path = "<recipe>",
    ):
        super().__init__()
        self.model = model
        self.optim_cfg = dict(optim)
        self.max_epochs = max_epochs
        self._frozen_norms = freeze_all_but_head(model, where) if trainable == "head" else []
        for m in self._frozen_norms:  # Lightning keeps (and restores) the modes it finds; it never calls train()
            m.eval()
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_auroc = MulticlassAUROC(num_classes=num_classes, average="macro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_auroc = MulticlassAUROC(num_classes=num_classes, average="macro")

    def train(self, mode: bool = True):
        """Switch train/eval mode; frozen BatchNorm layers (``trainable: head``) stay in eval."""
        super().train(mode)
        for m in self._frozen_norms:
            m.eval()
        return self

    def on_train_epoch_start(self) -> None:
        for m in self._frozen_norms:
            m.eval()

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

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.test_acc.update(logits, y)
        self.test_auroc.update(logits.float().softmax(-1), y)
        self.log("test_loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log("test_acc", self.test_acc, on_epoch=True)
        self.log("test_auroc", self.test_auroc, on_epoch=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return build_optimizer(params, self.optim_cfg, self.max_epochs)


class ClassifyDataModule(L.LightningDataModule):
    """Class-folder images split into train/val(/test) once, at construction (so classes are known early).

    A ``"test"`` list in ``data.split_file`` becomes :attr:`test_items`
    (``has_test`` tells the engine to evaluate the best weights on it);
    ``data.label_fraction`` < 1 then keeps a seeded share of each class's
    training images (at least one per class).
    """

    def __init__(self, data: dict, batch_size: int = 32, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.cfg = dict(data)
        self.root = Path(data["root"])
        self.batch_size, self.num_workers = batch_size, num_workers
        self.classes, items = find_class_files(self.root, data.get("classes"), data["extensions"])
        self.test_items: list = []
        if data.get("split_file"):
            parts = read_split_file(data["split_file"], items, self.root)
            self.train_items, self.val_items, self.test_items = parts["train"], parts["val"], parts["test"]
        else:
            self.train_items, self.val_items = split_files(items, data["val_fraction"], seed)
        self.label_fraction = float(data.get("label_fraction", 1.0))
        self.n_train_labelled = len(self.train_items)
        try:
            self.train_items = subsample_per_class(self.train_items, self.label_fraction, seed)
        except ValueError as exc:
            raise RecipeError(self.root, f"data.label_fraction: {exc}.", "Use a share in (0, 1], e.g. 0.1.") from exc
        if not self.train_items:
            raise RecipeError(
                self.root, "leaves no images for training after the split.", "Lower data.val_fraction or add images."
            )

    @property
    def has_test(self) -> bool:
        """True when the split file held out test images."""
        return bool(self.test_items)

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

    def test_dataloader(self):
        return self._loader(self.test_items, False)

    def save_split(self, path: str | Path) -> None:
        """Write the split as a JSON split file (reusable as ``data.split_file``).

        ``train`` lists the images that trained, i.e. after ``label_fraction``.
        """
        rel = lambda items: [str(Path(f).relative_to(self.root)) for f, _ in items]
        spec = {"train": rel(self.train_items), "val": rel(self.val_items)}
        if self.test_items:
            spec["test"] = rel(self.test_items)
        Path(path).write_text(json.dumps(spec, indent=1))

    def describe(self) -> str:
        """One line on what the model was trained on, for the model card."""
        n_all = len(self.train_items) + len(self.val_items) + len(self.test_items)
        test = f" / {len(self.test_items)} test" if self.test_items else ""
        frac = ""
        if self.label_fraction < 1.0:
            frac = (
                f"; label_fraction {self.label_fraction:g}: {len(self.train_items)} of "
                f"{self.n_train_labelled} training images kept"
            )
        return (
            f"{n_all} images in {len(self.classes)} classes from {self.root} "
            f"({len(self.train_items)} train / {len(self.val_items)} val{test}, "
            f"image_size {self.cfg['image_size']}{frac})"
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
    trainable = recipe.get("optim.trainable", "all")
    task = ClassifyTask(
        model, n, recipe.get("optim"), recipe.get("trainer.max_epochs"), trainable, where=recipe.path or "<recipe>"
    )
    card = {
        "classes": data.classes,
        "normalization": {"mean": list(data.cfg["mean"]), "std": list(data.cfg["std"])},
        "input_mpp": data.cfg.get("input_mpp"),
        "tile_size": data.cfg["image_size"],
        "training_data": data.describe() + ("; head only (optim.trainable: head)" if trainable == "head" else ""),
    }
    stain = stain_reference_from_paths([path for path, _label in data.train_items])
    if stain:
        card["stain"] = stain
    return task, data, card
