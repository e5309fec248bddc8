"""Labels and units of recipe keys for people: what the training panel's form shows.

The help text of each key stays in :mod:`napari_pathfm.training.recipe_fields`; this module only
names keys in words (``optim.lr`` -> "Learning rate") with their unit.
"""

from __future__ import annotations

__all__ = ["FIELD_LABELS", "field_label"]

# Human labels and units of recipe keys, for forms (the training panel): key -> (label, unit).
# Keys not listed get a label derived from the key (:func:`field_label`); the help text stays in SCHEMA.
FIELD_LABELS: dict[str, tuple[str, str]] = {
    "seed": ("Random seed", ""),
    "optim.name": ("Optimizer", ""),
    "optim.lr": ("Learning rate", ""),
    "optim.weight_decay": ("Weight decay", ""),
    "optim.momentum": ("Momentum", ""),
    "optim.scheduler": ("Learning-rate schedule", ""),
    "optim.warmup_fraction": ("Warm-up share of the CPU budget", ""),
    "optim.trainable": ("Layers trained", ""),
    "optim.lookahead_k": ("Lookahead steps", "batches"),
    "optim.lookahead_alpha": ("Lookahead step size", ""),
    "optim.low_lr_epoch": ("Low learning rate from", "epoch"),
    "optim.low_lr": ("Low learning rate", ""),
    "optim.t0": ("First restart after", "epochs"),
    "optim.t_mult": ("Restart period factor", "×"),
    "trainer.max_epochs": ("Epochs", ""),
    "trainer.batch_size": ("Batch size", "tiles"),
    "trainer.num_workers": ("Data-loading workers", "processes"),
    "trainer.devices": ("Devices", ""),
    "trainer.accelerator": ("Accelerator", ""),
    "trainer.precision": ("Precision", ""),
    "trainer.strategy": ("Parallel strategy", ""),
    "trainer.num_nodes": ("Machines", ""),
    "trainer.limit_train_batches": ("Training batches per epoch", "share or count"),
    "trainer.limit_val_batches": ("Validation batches", "share or count"),
    "trainer.log_every_n_steps": ("Log every", "batches"),
    "trainer.gradient_clip_val": ("Gradient clipping", "norm"),
    "trainer.accumulate_grad_batches": ("Accumulate gradients over", "batches"),
    "trainer.early_stopping.enabled": ("Early stopping", ""),
    "trainer.early_stopping.monitor": ("Metric to watch", ""),
    "trainer.early_stopping.mode": ("Better when the metric goes", ""),
    "trainer.early_stopping.patience": ("Early stopping patience", "epochs"),
    "trainer.early_stopping.min_delta": ("Smallest improvement", ""),
    "data.root": ("Data folder", ""),
    "data.classes": ("Classes", ""),
    "data.image_size": ("Image size", "px"),
    "data.tile_size": ("Tile size", "px"),
    "data.crop_size": ("Crop size", "px"),
    "data.val_tile": ("Validation tile size", "px"),
    "data.val_stride": ("Validation tile stride", "px"),
    "data.val_fraction": ("Held out for validation", "share"),
    "data.label_fraction": ("Training images used", "share"),
    "data.split_file": ("Split file", ""),
    "data.augment": ("Flips and rotations", ""),
    "data.color_jitter": ("Colour jitter", "strength"),
    "data.stain_jitter": ("Stain (HED) jitter", "strength"),
    "data.mpp": ("Resolution of the images", "µm/px"),
    "data.input_mpp": ("Resolution", "µm/px"),
    "data.mean": ("Normalisation mean", "RGB, 0–1"),
    "data.std": ("Normalisation std", "RGB, 0–1"),
    "data.extensions": ("File types", ""),
    "data.extra_dirs": ("Extra training folders", ""),
    "data.init_checkpoint": ("Start from checkpoint", ""),
    "data.samples_per_image": ("Crops per image", "per epoch"),
    "data.contour_width": ("Gland contour class", "model px"),
    "data.samples_per_epoch": ("Crops per epoch", ""),
    "data.in_memory": ("Keep data in memory", ""),
    "data.ignore_index": ("Unlabelled mask value", ""),
    "data.features_dir": ("Features folder", ""),
    "data.csv": ("Slide labels (CSV)", ""),
    "data.max_patches": ("Patches per bag", ""),
    "data.stacks": ("Training z-stacks", ""),
    "data.val_stacks": ("Validation z-stacks", ""),
    "data.channels": ("Target channels", ""),
    "data.planes": ("Input planes", ""),
    "data.shift_scale_rotate": ("Turn and rescale crops", ""),
    "data.ssr_scale": ("Scale limit", "±"),
    "data.ssr_rotate": ("Rotation limit", "°"),
    "loss.patch_weight": ("Patch loss weight", "λ"),
    "loss.alpha": ("Focal loss weight", "α"),
    "loss.beta": ("IoU loss weight", "β"),
    "loss.prompt_weight": ("Click/box prompt loss weight", ""),
    "loss.pretrain_epochs": ("Pretraining", "epochs"),
    "loss.disc_lr": ("Discriminator learning rate", ""),
    "model.backbone": ("Backbone", ""),
    "model.drop_rate": ("Dropout", "share"),
}


def field_label(key: str, family: str | None = None) -> tuple[str, str]:
    """``(label, unit)`` of a recipe key for forms: from :data:`FIELD_LABELS`, else derived from the key.

    ``trainer.batch_size`` counts in the family's unit (``FamilySpec.batch_unit``: tiles, crops, slides).

    >>> field_label("trainer.batch_size")
    ('Batch size', 'tiles')
    >>> field_label("model.hidden_dim")
    ('Hidden dim', '')
    """
    if key == "trainer.batch_size" and family:
        from ..families import get_family

        try:
            return "Batch size", get_family(family).batch_unit
        except KeyError:
            pass
    if key in FIELD_LABELS:
        return FIELD_LABELS[key]
    leaf = key.rsplit(".", 1)[-1].replace("_", " ").strip() or key
    return leaf[:1].upper() + leaf[1:], ""
