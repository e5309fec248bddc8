"""``mil`` family: slide classification from bags of patch features (S4 MIL and baselines).

Loss is cross-entropy on the slide logits (never on softmax outputs; the model's
``logits`` are unnormalised). Multitask models (``model.multitask: true``) also
return ``patch_logits``; their cross-entropy over the patches with a known label
(``patch_labels >= 0``) is added with weight ``loss.patch_weight`` (λ = 5 in the
paper). The optimizer is the recipe's (Adam in the paper) wrapped in
:class:`~napari_pathfm.training.lookahead.Lookahead`.

Logged: ``train_loss``, ``val_loss`` (same objective as training), ``val_slide_loss``,
``val_acc``, ``val_auroc`` (binary AUROC on the positive class for two classes,
one-vs-rest macro AUROC for more) and, for multitask models, ``val_patch_auroc``.
Batches hold one bag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassAUROC

from ...errors import FeatureError, RecipeError
from ...io.features import extractor_card
from ...models.registry import create_model
from ...progress import check_cancel, report
from ..lookahead import Lookahead
from ..mil_data import FEATURE_ATTRS, BagDataset, BagItem, bag_info, read_bag_table, split_items
from ..recipes import Recipe
from .classify import build_optimizer

__all__ = [
    "BagDataModule",
    "MILTask",
    "build",
    "build_mil_optimizer",
    "evaluate_bags",
    "mil_loss",
    "patch_auroc",
    "slide_metrics",
]


def build_mil_optimizer(params, optim: dict, max_epochs: int):
    """The recipe's optimizer wrapped in Lookahead (``optim.lookahead_k`` > 0), plus an optional cosine schedule.

    ``params`` may be parameter groups (:func:`napari_pathfm.models.layers.s4d.optim_groups`):
    S4D's state-space parameters then train without weight decay, as in the S4 code.
    """
    inner = build_optimizer(params, {**optim, "scheduler": "none"}, max_epochs)
    k = int(optim.get("lookahead_k", 5) or 0)
    opt = Lookahead(inner, k=k, alpha=float(optim.get("lookahead_alpha", 0.5))) if k > 0 else inner
    if optim.get("scheduler", "none") == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    return opt


def mil_loss(out: dict, label: torch.Tensor, patch_labels: torch.Tensor | None = None, patch_weight: float = 5.0):
    """Slide cross-entropy on logits, plus ``patch_weight`` x patch cross-entropy over labelled patches.

    Parameters
    ----------
    out : dict
        Model output with ``logits`` (B, C) and, for multitask models, ``patch_logits`` (B, L, C).
    label : Tensor (B,)
        Slide class indices.
    patch_labels : Tensor (B, L), optional
        Patch class indices, -1 where unknown.
    patch_weight : float
        λ of the patch term.

    Returns
    -------
    (loss, slide_loss, patch_loss)
        ``patch_loss`` is None when the model has no patch head or no patch is labelled.
    """
    slide_loss = F.cross_entropy(out["logits"].float(), label)
    patch_logits = out.get("patch_logits")
    if patch_logits is None or patch_labels is None:
        return slide_loss, slide_loss, None
    known = patch_labels >= 0
    if not bool(known.any()):
        return slide_loss, slide_loss, None
    patch_loss = F.cross_entropy(patch_logits.float()[known], patch_labels[known])
    return slide_loss + patch_weight * patch_loss, slide_loss, patch_loss


def _scores(out: dict, cls: int) -> torch.Tensor:
    from ...models.mil import heatmap_scores

    return heatmap_scores(out, cls)


class MILTask(L.LightningModule):
    """Trains a MIL model (``(1, L, D)`` features → ``{"logits", "patch_scores"[, "patch_logits"]}``).

    Parameters
    ----------
    model : torch.nn.Module
        A ``mil`` registry model.
    n_classes : int
    optim : dict
        The recipe's ``optim`` section.
    max_epochs : int
    patch_weight : float
        λ of the patch loss (multitask models only).
    multitask : bool
        The model has a patch head; log ``val_patch_auroc``.
    """

    def __init__(
        self, model, n_classes: int, optim: dict, max_epochs: int, patch_weight: float = 5.0, multitask: bool = False
    ):
        super().__init__()
        self.model = model
        self.n_classes, self.optim_cfg, self.max_epochs = int(n_classes), dict(optim), max_epochs
        self.patch_weight, self.multitask = float(patch_weight), bool(multitask)
        self.val_acc = MulticlassAccuracy(num_classes=self.n_classes, average="micro")
        self.val_auroc = self._auroc()
        if self.multitask:
            self.val_patch_auroc = self._auroc()

    def _auroc(self):
        """Binary AUROC on the positive class for two classes, one-vs-rest macro AUROC for more."""
        return BinaryAUROC() if self.n_classes == 2 else MulticlassAUROC(self.n_classes, average="macro")

    def forward(self, x: torch.Tensor) -> dict:
        return self.model(x)

    def compute_loss(self, batch: dict, out: dict | None = None):
        """``(out, loss, slide_loss, patch_loss)`` of one batch (see :func:`mil_loss`)."""
        out = self(batch["features"]) if out is None else out
        loss, slide_loss, patch_loss = mil_loss(out, batch["label"], batch.get("patch_labels"), self.patch_weight)
        return out, loss, slide_loss, patch_loss

    def training_step(self, batch, batch_idx):
        _, loss, _slide_loss, patch_loss = self.compute_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        if patch_loss is not None:
            self.log("train_patch_loss", patch_loss, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        out, loss, slide_loss, _ = self.compute_loss(batch)
        y, probs = batch["label"], out["logits"].float().softmax(-1)
        self.val_acc.update(probs, y)
        self.val_auroc.update(probs[:, 1] if self.n_classes == 2 else probs, y)
        self.log("val_loss", loss, on_epoch=True, batch_size=1, sync_dist=True)
        self.log("val_slide_loss", slide_loss, on_epoch=True, batch_size=1, sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True, batch_size=1)
        self.log("val_auroc", self.val_auroc, on_epoch=True, batch_size=1)
        if self.multitask:
            known = batch["patch_labels"] >= 0
            if bool(known.any()):
                if self.n_classes == 2:
                    scores = _scores(out, 1).float()[known]
                else:
                    scores = out["patch_logits"].float().softmax(-1)[known]
                self.val_patch_auroc.update(scores, batch["patch_labels"][known])
                self.log("val_patch_auroc", self.val_patch_auroc, on_epoch=True, batch_size=1)

    def configure_optimizers(self):
        from ...models.layers.s4d import optim_groups

        lr, wd = float(self.optim_cfg.get("lr", 2e-4)), float(self.optim_cfg.get("weight_decay", 0.0))
        return build_mil_optimizer(optim_groups(self.model, lr, wd), self.optim_cfg, self.max_epochs)


def slide_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and AUROC (binary on class 1, or one-vs-rest macro) of slide probabilities ``(n, C)``."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

    p, y = torch.as_tensor(np.asarray(probs, dtype=np.float32)), torch.as_tensor(np.asarray(labels, dtype=np.int64))
    acc = float((p.argmax(-1) == y).float().mean()) if len(y) else float("nan")
    if len(torch.unique(y)) < 2:
        auroc = float("nan")
    elif p.shape[1] == 2:
        auroc = float(binary_auroc(p[:, 1], y))
    else:
        auroc = float(multiclass_auroc(p, y, num_classes=p.shape[1], average="macro"))
    return {"acc": acc, "auroc": auroc}


def patch_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Binary AUROC of patch scores against patch labels (1 = positive, 0 = negative, -1 ignored)."""
    from torchmetrics.functional.classification import binary_auroc

    scores, labels = np.asarray(scores, dtype=np.float32).ravel(), np.asarray(labels).ravel()
    keep = labels >= 0
    if len(np.unique(labels[keep])) < 2:
        return float("nan")
    return float(binary_auroc(torch.from_numpy(scores[keep]), torch.from_numpy((labels[keep] > 0).astype(np.int64))))


@torch.no_grad()
def evaluate_bags(
    model, dataset: BagDataset, *, device: str = "cpu", positive: int = 1, progress=None, cancel=None
) -> dict[str, Any]:
    """Run ``model`` over every bag of ``dataset`` and collect what the metrics need.

    Parameters
    ----------
    model : torch.nn.Module
        A ``mil`` model (put in eval mode here).
    dataset : BagDataset
    device : str
    positive : int
        Class whose heatmap scores are collected as ``patch_scores``.
    progress, cancel
        Contract 1: ``progress(done, total, message)`` per bag; cancel raises ``Cancelled``.

    Returns
    -------
    dict
        ``probs`` (n, C), ``labels`` (n,), ``patch_scores`` and ``patch_labels``
        (lists of (L,) arrays, one per bag), ``slides`` (names) and ``metrics``
        (:func:`slide_metrics` plus ``patch_auroc`` pooled over all bags).
    """
    model = model.to(device).eval()
    probs, scores, patch_labels = [], [], []
    for i in range(len(dataset)):
        check_cancel(cancel, "MIL evaluation")
        item = dataset[i]
        out = model(item["features"][None].to(device))
        probs.append(out["logits"].float().softmax(-1)[0].cpu().numpy())
        scores.append(_scores(out, positive)[0].float().cpu().numpy())
        patch_labels.append(item["patch_labels"].numpy())
        report(progress, i + 1, len(dataset), f"bag {i + 1}/{len(dataset)}")
    labels = np.array([it.label for it in dataset.items], dtype=np.int64)
    probs_arr = np.stack(probs) if probs else np.zeros((0, 0), np.float32)
    metrics = slide_metrics(probs_arr, labels) if probs else {"acc": float("nan"), "auroc": float("nan")}
    if scores:
        pl = np.concatenate(patch_labels)
        metrics["patch_auroc"] = patch_auroc(np.concatenate(scores), np.where(pl < 0, -1, pl == positive))
    return {
        "probs": probs_arr,
        "labels": labels,
        "patch_scores": scores,
        "patch_labels": patch_labels,
        "slides": [it.slide for it in dataset.items],
        "metrics": metrics,
    }


class BagDataModule(L.LightningDataModule):
    """Train/val/test bags of a ``mil`` recipe's ``data`` section (split rules: :mod:`..mil_data`).

    Built eagerly so the classes, feature dimension and feature-extractor
    attributes are known before the model is created.
    """

    def __init__(self, data: dict, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.cfg, self.seed, self.num_workers = dict(data), int(seed), int(num_workers)
        self.features_dir, self.csv = Path(data["features_dir"]), Path(data["csv"])
        items, self.classes = read_bag_table(self.csv, self.features_dir, data.get("classes"))
        parts = split_items(items, data, self.seed)
        self.train_items, self.val_items, self.test_items = parts["train"], parts["val"], parts["test"]
        if not self.train_items:
            raise RecipeError(
                self.csv,
                "leaves no bags for training after the split.",
                "Check the split/fold columns or data.val_fold.",
            )
        self.infos = {it.slide: bag_info(it.path) for it in items}
        self.dim, self.feature_attrs = self._check_consistent(items)
        self.has_patch_labels = any(i["patch_labels"] for i in self.infos.values())
        self._datasets = {"train": self.dataset("train", True), "val": self.dataset("val")}

    def _check_consistent(self, items: list[BagItem]) -> tuple[int, dict]:
        first = items[0]
        ref = self.infos[first.slide]
        for it in items[1:]:
            info = self.infos[it.slide]
            if info["dim"] != ref["dim"]:
                raise FeatureError(
                    it.path,
                    f"has {info['dim']}-d features but {first.path.name} has {ref['dim']}-d ones.",
                    "Extract all slides with the same backbone.",
                )
            for key in ("backbone", "weights_sha256", "tile_size"):
                if info["attrs"].get(key) != ref["attrs"].get(key):
                    raise FeatureError(
                        it.path,
                        f"was made with {key}={info['attrs'].get(key)!r} "
                        f"but {first.path.name} with {ref['attrs'].get(key)!r}.",
                        "Features of one run must come from one extractor; re-extract the odd ones.",
                    )
        attrs = {**{k: ref["attrs"][k] for k in FEATURE_ATTRS if k in ref["attrs"]}, **extractor_card(ref["attrs"])}
        return ref["dim"], attrs

    def dataset(self, part: str, train: bool = False) -> BagDataset:
        """Bags of ``part`` (``"train"``, ``"val"`` or ``"test"``); patch subsets only when ``train``."""
        items = {"train": self.train_items, "val": self.val_items, "test": self.test_items}[part]
        return BagDataset(
            items,
            self.dim,
            max_patches=self.cfg.get("max_patches") if train else None,
            in_memory=bool(self.cfg.get("in_memory")),
            seed=self.seed,
        )

    def _loader(self, part: str, train: bool) -> DataLoader:
        return DataLoader(
            self._datasets[part],
            batch_size=1,
            shuffle=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False) if self.val_items else []

    def save_split(self, path: str | Path) -> None:
        """Write which slides train, validate and test, as JSON."""
        parts = {"train": self.train_items, "val": self.val_items, "test": self.test_items}
        doc = {"classes": self.classes, **{k: [it.slide for it in v] for k, v in parts.items()}}
        Path(path).write_text(json.dumps(doc, indent=1), encoding="utf-8")

    def describe(self) -> str:
        """One line on the training bags, for the model card."""
        n = {p: len(v) for p, v in (("train", self.train_items), ("val", self.val_items), ("test", self.test_items))}
        return (
            f"{sum(n.values())} feature bags ({self.dim}-d) in {len(self.classes)} classes from {self.csv} "
            f"({n['train']} train / {n['val']} val / {n['test']} test held out)"
        )


def build(recipe: Recipe):
    """Task, data and model-card fields for a ``mil`` recipe.

    ``model.in_dim`` and ``model.n_classes`` default to the features' dimension and
    the number of classes; different explicit values are errors, as is a
    multitask model without patch labels in the feature files.
    """
    where = recipe.path or "<recipe>"
    data = BagDataModule(recipe.get("data"), recipe.get("seed"), recipe.get("trainer.num_workers"))
    cfg = {k: v for k, v in recipe.get("model").items() if k != "name"}
    dims = (("in_dim", data.dim, "feature dimension"), ("n_classes", len(data.classes), "number of classes"))
    for key, value, what in dims:
        if cfg.get(key) is None:
            cfg[key] = value
        elif int(cfg[key]) != value:
            raise RecipeError(
                where,
                f"model.{key} is {cfg[key]} but the feature bags give a {what} of {value}.",
                f"Remove model.{key} (it follows the data) or use matching features.",
            )
    multitask = bool(cfg.get("multitask", False))
    if multitask and not data.has_patch_labels:
        raise RecipeError(
            where,
            "model.multitask is true but no feature file has a patch_labels array.",
            "Add per-patch labels (int8, -1 = unknown) to the feature files, or set model.multitask: false.",
        )
    model = create_model(recipe.get("model.name"), **cfg)
    task = MILTask(
        model,
        len(data.classes),
        recipe.get("optim"),
        recipe.get("trainer.max_epochs"),
        recipe.get("loss.patch_weight"),
        multitask,
    )
    fx = data.feature_attrs
    card = {
        "classes": data.classes,
        "in_dim": data.dim,
        "feature_extractor": fx,
        "input_mpp": fx.get("mpp") if fx.get("mpp") is not None else fx.get("target_mpp"),
        "tile_size": fx.get("tile_size"),
        "patch_order": fx.get("patch_order"),
        "training_data": data.describe(),
    }
    return task, data, card
