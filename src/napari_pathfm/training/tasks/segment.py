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
read, and a run whose output would overwrite it stops before training. A checkpoint without the
click/box path loads into a ``model.prompts: true`` model (only that path starts untrained), and
``optim.trainable: prompt`` then trains that path alone, on prompts simulated from the masks
(``loss.prompt_weight``): the encoders and the class-mask decoder stay frozen in eval mode, so the
checkpoint's automatic masks, and the metrics measured for them, do not change.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch

from ...errors import RecipeError
from ...models.registry import create_model
from ...tiles.stain import stain_reference_from_paths
from ..border_weights import batch_border_weights
from ..prompt_training import freeze_all_but_prompts, load_init, prompt_step
from ..recipes import Recipe
from ..seg_metrics import dice_iou, f1_from_counts, object_counts
from ..segment_data import IGNORE
from ..segment_datamodule import SegmentDataModule
from ..segment_predict import fit_target, predict_image
from .classify import build_optimizer

__all__ = ["SegmentTask", "build"]


# --- task ------------------------------------------------------------------------------------


def _metric_name(name: str) -> str:
    return re.sub(r"\W+", "_", str(name)).strip("_") or "class"


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
    prompt_weight : float
        Weight of the simulated click/box loss (models with a prompt path).
    trainable : str
        ``"all"``, or ``"prompt"``: only :meth:`~napari_pathfm.models.pathsam2.PathSAM2.prompt_path`
        trains, on the prompt loss alone; the rest is frozen and kept in eval mode.
    """

    def __init__(
        self,
        model,
        classes: list[str],
        optim: dict,
        max_epochs: int,
        alpha: float = 0.125,
        beta: float = 0.01,
        ignore_index: int = IGNORE,
        tile_size: int = 256,
        val_stride: int | None = None,
        val_batch_size: int = 4,
        init_checkpoint: Path | None = None,
        prompt_weight: float = 0.0,
        trainable: str = "all",
        border_weight: float = 0.0,
        border_sigma_px: float = 8.0,
    ):
        super().__init__()
        self.model = model
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.optim_cfg, self.max_epochs = dict(optim), int(max_epochs)
        self.alpha, self.beta, self.ignore_index = float(alpha), float(beta), int(ignore_index)
        self.tile_size, self.val_stride, self.val_batch_size = int(tile_size), val_stride, int(val_batch_size)
        self.init_checkpoint = Path(init_checkpoint) if init_checkpoint else None
        # > 0 and a model with a prompt path: also train clicks/boxes simulated from the masks (prompt_clicks)
        self.prompt_weight = float(prompt_weight or 0.0)
        self._prompt_rng = np.random.default_rng(0)
        self.prompt_only = trainable == "prompt"
        # > 0: the U-Net paper's border weights on the class-mask loss (training/border_weights.py)
        self.border_weight, self.border_sigma_px = float(border_weight or 0.0), float(border_sigma_px)
        if self.prompt_only:
            freeze_all_but_prompts(model, self.prompt_weight)
        self._reset_val()

    def train(self, mode: bool = True):
        """With ``trainable: prompt`` the frozen model stays in eval mode (no norm statistics change)."""
        super().train(mode)
        if self.prompt_only:
            self.model.eval()
        return self

    def _reset_val(self) -> None:
        self._cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
        self._obj = torch.zeros(3, dtype=torch.float64)  # TP, FP, FN over the foreground classes
        self._loss = torch.zeros(2, dtype=torch.float64)  # sum, count

    def loss(self, out: dict, target: torch.Tensor, weighted: bool = False):
        """``(loss, parts)`` of :func:`~napari_pathfm.models.pathsam2.loss.pathsam2_loss`.

        ``weighted`` (training crops) applies the border weights when ``border_weight`` > 0.
        """
        from ...models.pathsam2.loss import pathsam2_loss

        size = out["logits"].shape[-2:]
        sigma = self.border_sigma_px * size[-1] / target.shape[-1]  # σ in pixels of the loss's map
        target = fit_target(target, size)
        weight = None
        if weighted and self.border_weight > 0:
            w = batch_border_weights(target.cpu().numpy(), self.border_weight, sigma, self.ignore_index)
            weight = torch.from_numpy(w).to(out["logits"].device)
        return pathsam2_loss(
            out, target, alpha=self.alpha, beta=self.beta, ignore_index=self.ignore_index, weight=weight
        )

    def forward(self, images_uint8: torch.Tensor) -> dict:
        return self.model(self.model.preprocess(images_uint8))

    def on_fit_start(self) -> None:
        if self.init_checkpoint is None:
            return
        out = (Path(self.trainer.default_root_dir) / "model.safetensors").resolve()
        if out == self.init_checkpoint.resolve():
            raise RecipeError(
                self.init_checkpoint,
                "is data.init_checkpoint and would be overwritten by this run's export.",
                "Choose another output folder (--out) so the new checkpoint is saved beside the old one.",
            )

    def training_step(self, batch, batch_idx):
        if self.prompt_weight > 0 and getattr(self.model, "prompt_encoder", None) is not None:
            loss, parts = self._with_prompts(batch)
        else:
            loss, parts = self.loss(self(batch["image"]), batch["mask"], weighted=True)
        if loss is None:
            return None
        n = len(batch["mask"])
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        for k, v in (parts or {}).items():
            if k != "loss":
                self.log(
                    f"train_loss_{k}",
                    torch.as_tensor(v, dtype=torch.float32).detach().mean(),
                    on_step=False,
                    on_epoch=True,
                    batch_size=n,
                    sync_dist=True,
                )
        return loss

    def _with_prompts(self, batch):
        """The class-mask loss (none with ``trainable: prompt``) plus ``prompt_weight`` x the prompt loss."""
        return prompt_step(self, batch)

    def on_validation_epoch_start(self) -> None:
        self._reset_val()

    def validation_step(self, batch, batch_idx):
        h, w = (int(v) for v in batch["size"])
        logits, loss = predict_image(
            self.model,
            batch["image"],
            self.tile_size,
            self.val_stride,
            self.val_batch_size,
            batch["mask"],
            lambda out, t: self.loss(out, t)[0],
        )
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
            where,
            f"data.init_checkpoint {path} is a {card.get('family')!r} checkpoint, not a segmentation one.",
            "Pick a checkpoint trained with a segment recipe.",
        )
    return card


def build(recipe: Recipe):
    """Task, data and model-card fields for a ``segment`` recipe.

    The number of classes comes from ``model.num_classes``, ``data.classes``, the
    initial checkpoint's card, or the masks (in that order); any disagreement is an
    error. ``data.tile_size`` defaults to the model's input size.
    """
    from ...models.checkpoint import checkpoint_paths, refuse_pickle

    where = recipe.path or "<recipe>"
    data_cfg = dict(recipe.get("data"))
    cfg = {k: v for k, v in (recipe.get("model") or {}).items() if k != "name"}
    name = recipe.get("model.name")
    init, init_card = None, None
    if recipe.get("optim.trainable") == "prompt" and not data_cfg.get("init_checkpoint"):
        raise RecipeError(
            where,
            "optim.trainable is 'prompt' but data.init_checkpoint is not set: prompting is added to a trained model.",
            "Set data.init_checkpoint to that model (e.g. --set data.init_checkpoint=runs/pathsam2_glas_cpu/model).",
        )
    if data_cfg.get("init_checkpoint"):
        refuse_pickle(data_cfg["init_checkpoint"])  # a .pt/.ckpt: say what it is, not "card not found"
        init, _ = checkpoint_paths(data_cfg["init_checkpoint"])
        init_card = _init_card(init, where)
        if init_card.get("name") != name:
            raise RecipeError(
                where,
                f"model.name is {name!r} but data.init_checkpoint was trained as {init_card.get('name')!r}.",
                f"Set model.name: {init_card.get('name')}.",
            )
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
        data_cfg,
        recipe.get("trainer.batch_size"),
        recipe.get("trainer.num_workers"),
        recipe.get("seed"),
        num_classes=known,
        base=recipe.path.parent if recipe.path else Path.cwd(),
        defaults=defaults,
    )
    if cfg.get("num_classes") is not None and int(cfg["num_classes"]) != data.num_classes:
        raise RecipeError(
            where,
            f"model.num_classes is {cfg['num_classes']} but the data have {data.num_classes} classes.",
            "Remove model.num_classes (it follows data.classes) or fix data.classes.",
        )
    cfg["num_classes"] = data.num_classes
    if recipe.get("loss.border_weight") and data.input_mpp is None:  # σ is in µm: never guess the pixel size
        raise RecipeError(
            where,
            "loss.border_weight is set but the µm/px of the images is unknown (loss.border_sigma_um is in µm).",
            "Set data.mpp to the µm/px of the image files (GlaS: 0.62), or remove loss.border_weight.",
        )
    model = create_model(name, **cfg)
    foundation = _forget_weight_files(model)
    if init is not None:
        load_init(model, init)
    tile = int(data_cfg.get("tile_size") or (init_card or {}).get("tile_size") or _input_size(model))
    data.tile_size = tile
    task = SegmentTask(
        model,
        data.classes,
        recipe.get("optim"),
        recipe.get("trainer.max_epochs"),
        alpha=recipe.get("loss.alpha"),
        beta=recipe.get("loss.beta"),
        prompt_weight=recipe.get("loss.prompt_weight"),
        trainable=recipe.get("optim.trainable"),
        border_weight=recipe.get("loss.border_weight"),
        border_sigma_px=recipe.get("loss.border_sigma_um") / float(data.input_mpp or 1.0),  # 1.0: weights off
        ignore_index=IGNORE,
        tile_size=tile,
        val_stride=data_cfg.get("val_stride"),
        val_batch_size=recipe.get("trainer.batch_size"),
        init_checkpoint=init,
    )
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
    # the object settings `pathfm segment` uses with this model: the recipe's, else (a fine-tune) the parent's
    objects = recipe.get("objects") if recipe.get("objects") is not None else (init_card or {}).get("objects")
    if isinstance(objects, dict) and recipe.get("data.contour_width") and "contour_class" not in objects:
        from ..gland_targets import CONTOUR

        objects = {**objects, "contour_class": CONTOUR}  # a contour model's objects are its interiors
    if objects is not None:
        from ...instances import object_options

        try:
            card["objects"] = asdict(object_options(objects))
        except (TypeError, ValueError) as exc:
            raise RecipeError(where, f"objects: {exc}.", "See napari_pathfm.instances.ObjectOptions.") from None
    flips = recipe.get("flips") if recipe.get("flips") is not None else (init_card or {}).get("flips")
    if flips is not None:  # test-time flips by default (pathfm segment --flips): the recipe's, else the parent's
        card["flips"] = bool(flips)
    # the training images' stain (too few images, e.g. a fine-tune on painted tiles: the parent model's)
    stain = stain_reference_from_paths([it.image for it in data.train_items]) or (init_card or {}).get("stain")
    if stain:
        card["stain"] = stain
    if init is not None:
        card["init_checkpoint"] = {"path": str(init), "sha256": init_card.get("sha256"), "name": init.stem}
    return task, data, card
