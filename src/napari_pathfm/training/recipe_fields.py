"""The keys a training recipe may have: type, default, help text and choices of each.

:data:`SCHEMA` holds the keys every recipe shares; each family adds its own (mostly ``data.*``)
in one mapping here (:data:`CLASSIFY`, :data:`MIL`, :data:`SEGMENT`, :data:`TRANSLATE`), which its
:class:`~napari_pathfm.families.FamilySpec` names as ``recipe_fields``. A family from outside the
package keeps its mapping in its own module. :mod:`napari_pathfm.training.recipes` validates
recipes against them and :func:`~napari_pathfm.training.recipes.schema` gives them to forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLASSIFY",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MIL",
    "SCHEMA",
    "SEGMENT",
    "TRANSLATE",
    "Field",
    "family_fields",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_EXTENSIONS = [".tif", ".tiff", ".png", ".jpg", ".jpeg"]


@dataclass(frozen=True)
class Field:
    """One recipe key: accepted types, default, help text, and optional choices."""

    types: tuple
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    required: bool = False
    path: bool = False


_NUM = (int, float)
_OPT_NUM = (int, float, type(None))

SCHEMA: dict[str, Field] = {
    "family": Field((str,), None, "Task family: which trainer to use (napari_pathfm.families).", required=True),
    "description": Field((str,), "", "What this recipe is for, in words."),
    "seed": Field((int,), 0, "Seed for weights init, data split and augmentation."),
    "output": Field(
        (str, type(None)), None, "Output folder (default runs/<recipe name>); relative to the current folder."
    ),
    "model.name": Field((str,), None, "Registry name of the model (see `pathfm models`).", required=True),
    "optim.name": Field((str,), "adamw", "Optimizer.", ("adamw", "adam", "sgd")),
    "optim.lr": Field(_NUM, 1e-3, "Learning rate."),
    "optim.weight_decay": Field(_NUM, 0.0, "Weight decay."),
    "optim.momentum": Field(_NUM, 0.9, "Momentum (SGD only)."),
    "optim.scheduler": Field((str,), "none", "Learning-rate schedule over max_epochs.", ("none", "cosine")),
    "optim.warmup_fraction": Field(
        _NUM, 0.0, "With a CPU or step budget and cosine: share of the budget with a linear LR warm-up."
    ),
    "trainer.max_epochs": Field((int,), 10, "Epochs to train in total (a resumed run continues up to this)."),
    "trainer.batch_size": Field((int,), 32, "Images per batch (per device)."),
    "trainer.num_workers": Field((int,), 0, "Data-loading worker processes."),
    "trainer.devices": Field((int, str, list), "auto", "Lightning devices: 'auto', a count or a list of ids."),
    "trainer.accelerator": Field((str,), "auto", "Lightning accelerator; 'auto' follows the device argument."),
    "trainer.precision": Field(
        (str, int, type(None)), None, "Lightning precision; default bf16/16-mixed on CUDA, 32 elsewhere."
    ),
    "trainer.strategy": Field((str,), "auto", "Lightning strategy, e.g. 'ddp' (passed through unchanged)."),
    "trainer.num_nodes": Field((int,), 1, "Machines for multi-node DDP."),
    "trainer.cpu_budget_minutes": Field(
        _OPT_NUM,
        None,
        "Stop after this much CPU time of the training process (all threads; other jobs do not count); "
        "with optim.scheduler cosine the schedule runs over the budget. max_epochs still caps the run.",
    ),
    "trainer.step_budget": Field(
        (int, type(None)),
        None,
        "Stop after this many optimizer steps, the cosine schedule over them (wins over cpu_budget_minutes): "
        "reproduces a CPU-budget run on any machine from the steps its card records. max_epochs still caps the run.",
    ),
    "trainer.limit_train_batches": Field(_NUM, 1.0, "Fraction (float) or number (int) of train batches per epoch."),
    "trainer.limit_val_batches": Field(_NUM, 1.0, "Fraction (float) or number (int) of validation batches."),
    "trainer.log_every_n_steps": Field((int,), 10, "Log training metrics every n steps."),
    "trainer.gradient_clip_val": Field(_OPT_NUM, None, "Clip gradient norm to this value."),
    "trainer.accumulate_grad_batches": Field((int,), 1, "Accumulate gradients over n batches."),
    "trainer.early_stopping.enabled": Field((bool,), True, "Stop when the monitored metric stops improving."),
    "trainer.early_stopping.monitor": Field(
        (str,), "val_loss", "Metric for early stopping and for the best checkpoint."
    ),
    "trainer.early_stopping.mode": Field((str,), "min", "Whether the metric should go down or up.", ("min", "max")),
    "trainer.early_stopping.patience": Field((int,), 10, "Validation rounds without improvement before stopping."),
    "trainer.early_stopping.min_delta": Field(_NUM, 0.0, "Smallest change that counts as an improvement."),
}

CLASSIFY: dict[str, Field] = {
    "data.root": Field((str,), None, "Folder with one sub-folder of images per class.", required=True, path=True),
    "data.classes": Field((list, type(None)), None, "Class folder names in label order (default: all, sorted)."),
    "data.image_size": Field((int,), 224, "Images are resized to this many pixels square."),
    "data.val_fraction": Field(_NUM, 0.2, "Share of each class held out for validation (seeded, stratified)."),
    "data.split_file": Field(
        (str, type(None)),
        None,
        "JSON {'train': [...], 'val': [...], 'test': [...]} of paths relative to root; "
        "the best weights are evaluated on 'test' after training.",
        path=True,
    ),
    "data.label_fraction": Field(
        _NUM, 1.0, "Share of each class's training images used (seeded, at least 1 per class); val/test whole."
    ),
    "data.extensions": Field((list,), IMAGE_EXTENSIONS, "Image file suffixes to use."),
    "data.mean": Field((list,), IMAGENET_MEAN, "Normalisation mean (RGB, 0-1 scale)."),
    "data.std": Field((list,), IMAGENET_STD, "Normalisation std (RGB, 0-1 scale)."),
    "data.augment": Field((bool,), True, "Random flips and 90-degree rotations while training."),
    "data.input_mpp": Field(
        _OPT_NUM, None, "µm per pixel as the model sees the images (after resizing); goes on the model card."
    ),
    "optim.trainable": Field(
        (str,), "all", "all: train every layer (deep-tune); head: only the classifier (fine-tune).", ("all", "head")
    ),
}


MIL: dict[str, Field] = {
    "data.features_dir": Field(
        (str,), None, "Folder of per-slide feature files (<slide>.features.zarr).", required=True, path=True
    ),
    "data.csv": Field(
        (str,),
        None,
        "CSV with columns slide,label and optional fold, split (train/val/test).",
        required=True,
        path=True,
    ),
    "data.classes": Field((list, type(None)), None, "Labels in class-index order (default: CSV labels, sorted)."),
    "data.val_fraction": Field(_NUM, 0.2, "Share of bags held out for validation when the CSV has no split/fold."),
    "data.val_fold": Field((int, type(None)), None, "Validate on this fold (cross-validation); the others train."),
    "data.n_folds": Field((int,), 5, "Folds to deal when val_fold is set and the CSV has no fold column."),
    "data.max_patches": Field(
        (int, type(None)), None, "Train on a random subset of this many patches per bag (None: whole bags)."
    ),
    "data.in_memory": Field((bool,), False, "Keep bags in memory after the first epoch (small data sets)."),
    "trainer.batch_size": Field((int,), 1, "Bags per batch; MIL trains on one bag at a time.", (1,)),
    "optim.name": Field(
        (str,), "adam", "Inner optimizer (wrapped in Lookahead when lookahead_k > 0).", ("adamw", "adam", "sgd")
    ),
    "optim.lr": Field(_NUM, 2e-4, "Learning rate."),
    "optim.weight_decay": Field(_NUM, 1e-4, "Weight decay."),
    "optim.lookahead_k": Field((int,), 5, "Lookahead: fast steps per slow update (0 turns Lookahead off)."),
    "optim.lookahead_alpha": Field(_NUM, 0.5, "Lookahead: slow-weights step size."),
    "loss.patch_weight": Field(
        _NUM, 5.0, "Weight λ of the patch cross-entropy (multitask models, labelled patches only)."
    ),
}


SEGMENT: dict[str, Field] = {
    "data.root": Field(
        (str,), None, "Folder with images/ and masks/ (one mask per image, same file name).", required=True, path=True
    ),
    "data.classes": Field(
        (list, type(None)), None, "Class names, background first (default: background, foreground / class_i)."
    ),
    "data.mask_format": Field(
        (str,),
        "auto",
        "binary (0/255), index (class ids, ignore_index = unlabelled), nonzero (instance ids -> 1) or auto.",
        ("auto", "binary", "index", "nonzero"),
    ),
    "data.mask_values": Field(
        (dict, type(None)), None, "Map raw mask values to classes first, e.g. {0: 0, 128: 1, 255: 2}."
    ),
    "data.ignore_index": Field(
        (int,), 255, "Mask value of unlabelled pixels in the files (no loss, no metrics; 255 in the card)."
    ),
    "data.val_names": Field(
        (list, type(None)), None, "Image names (no suffix) held out for validation; overrides val_fraction."
    ),
    "data.val_fraction": Field(_NUM, 0.2, "Share of the images held out for validation (seeded, by image)."),
    "data.extra_dirs": Field(
        (list,),
        [],
        "More images/ + masks/ folders for training only (e.g. corrections): a path or "
        "{path, repeat, mpp, mask_format, mask_values}.",
    ),
    "data.init_checkpoint": Field(
        (str, type(None)),
        None,
        "Start from this checkpoint's weights (fine-tuning); it is never overwritten.",
        path=True,
    ),
    "data.tile_size": Field(
        (int, type(None)), None, "Training crop / validation tile size (default: model input size)."
    ),
    "data.samples_per_image": Field((int,), 4, "Random training crops per image and epoch."),
    "data.contour_width": Field(
        (int, type(None)),
        None,
        "Gland contours as class 2: the band of this many model pixels along each gland's edge (keeps touching "
        "glands apart; data.classes then names three classes). None: masks as they are.",
    ),
    "data.val_stride": Field(
        (int, type(None)), None, "Validation tile stride (default: tile_size; last tile at the edge)."
    ),
    "objects": Field(
        (dict, type(None)),
        None,
        "How `pathfm segment` turns this model's class map into objects by default, written to the card "
        "(napari_pathfm.instances.ObjectOptions: min_area_um2, split_um, min_piece_um2, fill_holes, contour_class; "
        "with data.contour_width, contour_class is 2). None: none.",
    ),
    "flips": Field(
        (bool, type(None)),
        None,
        "Whether `pathfm segment` runs this model with test-time flips by default (each tile also mirrored "
        "three ways, the logits averaged; 4x the compute), written to the card as 'flips'. None: off.",
    ),
    "data.mpp": Field(_OPT_NUM, None, "µm per pixel of the image files (GlaS: 0.62)."),
    "data.input_mpp": Field(
        _OPT_NUM, None, "µm per pixel the model sees; images are resampled from data.mpp (default: no resampling)."
    ),
    "data.augment": Field((bool,), True, "Random flips and 90-degree rotations of training crops."),
    "data.color_jitter": Field(_NUM, 0.1, "Brightness/contrast/saturation jitter strength (0 turns it off)."),
    "data.stain_jitter": Field(
        _NUM, 0.0, "HED stain augmentation: each stain's amount scaled/shifted by up to this share (0 turns it off)."
    ),
    "data.shift_scale_rotate": Field(
        (bool,), False, "Training crops also turned at any angle and rescaled (the window's centre stays)."
    ),
    "data.ssr_scale": Field(_NUM, 0.1, "Scale limit of those crops (1 ± this)."),
    "data.ssr_rotate": Field(_NUM, 180.0, "Rotation limit of those crops in degrees."),
    "data.in_memory": Field((bool,), True, "Keep decoded images in memory after first use."),
    "data.extensions": Field((list,), IMAGE_EXTENSIONS, "Image and mask file suffixes to use."),
    "trainer.batch_size": Field((int,), 4, "Training crops per batch; also tiles per forward pass in validation."),
    "optim.lr": Field(_NUM, 1e-4, "Learning rate."),
    "optim.weight_decay": Field(_NUM, 1e-2, "Weight decay."),
    "loss.alpha": Field(_NUM, 0.125, "α: loss = (1-α)·Dice + α·Focal + β·MSE(IoU)."),
    "loss.beta": Field(_NUM, 0.01, "β: weight of the IoU-prediction MSE."),
    "loss.border_weight": Field(
        _NUM, 0.0, "w0 of the U-Net paper's border weights: background between two glands counts up to 1+w0 (0: off)."
    ),
    "loss.border_sigma_um": Field(_NUM, 5.0, "σ of the border weights in µm (how narrow a gap gets the weight)."),
    "loss.prompt_weight": Field(
        _NUM, 0.0, "With model.prompts: weight of the loss of clicks/boxes simulated from the masks (0: off)."
    ),
    "optim.trainable": Field(
        (str,),
        "all",
        "all: train every layer; prompt: only the click/box path of a model.prompts model started from "
        "data.init_checkpoint (its class masks stay exactly as they were).",
        ("all", "prompt"),
    ),
    "trainer.early_stopping.monitor": Field(
        (str,), "val_dice", "Metric for early stopping and for the best checkpoint."
    ),
    "trainer.early_stopping.mode": Field((str,), "max", "Whether the metric should go down or up.", ("min", "max")),
}


TRANSLATE: dict[str, Field] = {
    "data.stacks": Field(
        (list, str),
        None,
        "Training z-stacks: folders/plane files/TIFFs, or {path, well, field, channel}.",
        required=True,
        path=True,
    ),
    "data.val_stacks": Field((list, str, type(None)), None, "Validation z-stacks (whole fields of view).", path=True),
    "data.val_wells": Field((list, type(None)), None, "Wells whose sites validate (HASTE folders of many sites)."),
    "data.val_rows": Field(
        (list, type(None)),
        None,
        "[start, stop] rows of every training stack held out for validation (ISL convention: [768, 1024]).",
    ),
    "data.channels": Field(
        (list,), None, "Target channel names in output order, e.g. [DAPI] or [lipids].", required=True
    ),
    "data.planes": Field((list, type(None)), None, "0-based input planes to use (default: all of them)."),
    "data.stats": Field(
        (str, type(None)),
        None,
        "Stats table CSV (`pathfm zstats`); default: computed on the training part.",
        path=True,
    ),
    "data.magnification": Field((str, type(None)), None, "Rows of the stats table to use (20x, 40x, 60x)."),
    "data.stats_columns": Field((list,), ["min", "max"], "Stats columns mapped to 0 and 1, e.g. [p1, p99.8]."),
    "data.percentiles": Field((list,), [1.0, 99.8], "Percentiles computed when there is no data.stats table."),
    "data.crop_size": Field((int,), 512, "Training crop size (multiple of 16)."),
    "data.val_tile": Field((int, type(None)), None, "Validation tile size (default: crop_size)."),
    "data.samples_per_epoch": Field((int,), 64, "Random training crops per epoch."),
    "data.augment": Field((bool,), True, "Random flips and 90-degree rotations of training crops."),
    "data.shift_scale_rotate": Field((bool,), False, "Affine shift-scale-rotate of training crops."),
    "data.ssr_shift": Field(_NUM, 0.2, "Shift limit as a fraction of the crop size."),
    "data.ssr_scale": Field(_NUM, 0.1, "Scale limit (1 ± this)."),
    "data.ssr_rotate": Field(_NUM, 180.0, "Rotation limit in degrees."),
    "data.nuclei_centred": Field(_NUM, 0.0, "Share of crops centred on a pixel of the nuclei (Otsu) mask."),
    "data.mask": Field((bool,), False, "Compute the Otsu nuclei mask of the first target (always for lupi)."),
    "data.input_dtype": Field((str, type(None)), None, "Required bit depth of the planes (uint16, uint8)."),
    "data.target_dtype": Field((str, type(None)), None, "Required bit depth of the targets (uint16, uint8)."),
    "loss.mode": Field(
        (str,),
        "regression",
        "regression, gan (HASTE lipids/cytoplasm) or lupi (HASTE nuclei).",
        ("regression", "gan", "lupi"),
    ),
    "loss.kind": Field((str,), "log_squared", "Regression loss.", ("log_squared", "l1", "mse", "median_mae")),
    "loss.pretrain_epochs": Field((int,), 0, "GAN: epochs of log-squared pretraining before the GAN."),
    "loss.adv_weight": Field(_NUM, 0.01, "GAN: weight of the relativistic average LS adversarial loss."),
    "loss.grad_weight": Field(_NUM, 10.0, "GAN: weight of the gradient loss (10 lipids, 100 cytoplasm)."),
    "loss.median_mae_weight": Field(_NUM, 1.0, "Weight of MAE/median (GAN 1; LUPI: the full-size image term, 0.5)."),
    "loss.disc_lr": Field(_NUM, 1e-6, "GAN: discriminator learning rate (Adam)."),
    "loss.pool_size": Field((int,), 50, "GAN: history pool of discriminator outputs."),
    "loss.grad_clip": Field(_OPT_NUM, 1.0, "GAN: gradient-norm clip of both nets."),
    "loss.discriminator": Field((dict, type(None)), None, "GAN: patchgan config (e.g. {ndf: 32, n_layers: 4})."),
    "loss.side_weight": Field(_NUM, 1.0, "LUPI: weight of the side-output (deep supervision) regression terms."),
    "loss.bce_weight": Field(_NUM, 1.0, "LUPI: weight of the mask BCE."),
    "loss.lwm_pixel_weight": Field(_NUM, 2.0, "LUPI: loss weight where the predicted mask is wrong (1 elsewhere)."),
    "loss.lupi_base": Field((str,), "median_mae", "LUPI: regression error.", ("median_mae", "log_squared", "l1")),
    "loss.lupi_grad_weight": Field(
        _NUM, 0.0, "LUPI: weight of the image-gradient L1 term (the GAN's; sharper texture). 0: off."
    ),
    "optim.lr": Field(_NUM, 1e-3, "Learning rate (generator lr in GAN mode)."),
    "optim.scheduler": Field(
        (str,),
        "none",
        "none, cosine, or cosine_warm_restarts (per batch; HASTE nuclei).",
        ("none", "cosine", "cosine_warm_restarts"),
    ),
    "optim.t0": Field((int,), 2, "Warm restarts: epochs of the first cycle."),
    "optim.t_mult": Field((int,), 2, "Warm restarts: cycle length factor."),
    "optim.low_lr_epoch": Field(_OPT_NUM, None, "From this epoch on, a constant optim.low_lr (low-lr phase)."),
    "optim.low_lr": Field(_NUM, 1e-5, "Learning rate of the low-lr phase."),
}


def family_fields(family: str) -> dict[str, Field]:
    """The recipe keys of ``family`` (its spec's ``recipe_fields``); ``{}`` for a family without any."""
    from ..families import get_family

    spec = get_family(family)
    return dict(spec.part("recipe_fields")) if spec.recipe_fields else {}
