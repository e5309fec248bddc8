"""``translate`` family: brightfield/phase z-stack → fluorescence channels (HASTE).

Data: :mod:`napari_pathfm.training.translate_datamodule` (fields of view opened with
``open_zstack``, min–max normalised from a stats table, split by FOV or by rows,
random crops with flips/90° rotations and optional shift-scale-rotate around nuclei).

Modes (``loss.mode``):

* ``regression`` — one generator (``dense_unet``, ``unet``) trained with
  ``loss.kind`` (``log_squared`` as HASTE pretrains, or ``l1``/``mse``/``median_mae``).
* ``gan`` — HASTE lipids/cytoplasm: ``loss.pretrain_epochs`` epochs with the
  log-squared loss, then a conditional PatchGAN (``loss.discriminator``) with the
  relativistic average least-squares loss over ``loss.pool_size`` pooled
  discriminator outputs; the generator minimises
  ``adv_weight·GAN + grad_weight·gradient + median_mae_weight·MAE/median``
  (α_adv 0.01, α_grad 10 lipids / 100 cytoplasm, α_medMAE 1); generator lr
  ``optim.lr`` (1e-4), discriminator ``loss.disc_lr`` (1e-6); both clipped to
  ``loss.grad_clip``. Lightning manual optimisation.
* ``lupi`` — HASTE nuclei: ``lupi_unet`` learns the image and, as privileged
  information, the Otsu mask of the target; loss (``models.haste.losses.lwm_loss``) =
  ``median_mae_weight``·MAE/median(image) + ``bce_weight``·BCE(mask) +
  ``side_weight``·Σ side-output errors, every term weighted per pixel by the
  loss-weight modules (``lwm_pixel_weight`` 2 where the predicted mask is wrong), plus
  ``lupi_grad_weight``·gradient (the GAN's edge term; 0, off, by default); AdamW with
  cosine annealing with warm restarts (``optim.t0`` 2, ``optim.t_mult`` 2, stepped
  per batch) and, from ``optim.low_lr_epoch`` on, a constant ``optim.low_lr``.

Validation (whole validation rows/FOVs, tiled): ``val_loss`` (the generator's
non-adversarial loss), ``val_mae_median`` (pixel MAE / median of the target),
``val_psnr`` and ``val_ssim`` (data range 1), and ``val_mask_iou`` for LUPI.
The model card follows the translate contract (``channels``, ``channel_roles``,
``input_planes``, ``normalization``, ``tile_size``, ``has_mask``).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from ...errors import RecipeError
from ...models.registry import create_model, model_info
from ..recipes import Recipe
from ..translate_datamodule import TranslateDataModule
from .classify import build_optimizer

__all__ = ["MODES", "TranslateTask", "build", "channel_role"]

MODES = ("regression", "gan", "lupi")
_ROLES = {
    "nuclei": "nuclei",
    "dapi": "nuclei",
    "hoechst": "nuclei",
    "c01": "nuclei",
    "lipids": "lipids",
    "bodipy": "lipids",
    "c02": "lipids",
    "cytoplasm": "cytoplasm",
    "cellmask": "cytoplasm",
    "c03": "cytoplasm",
}


def channel_role(name: str) -> str:
    """Colour role of a target name: ``nuclei`` (DAPI), ``lipids``, ``cytoplasm`` or the name in lower case."""
    return _ROLES.get(str(name).lower(), str(name).lower())


# --- task ----------------------------------------------------------------------------------------


def _losses():
    from ...models.haste import losses

    return losses


def _ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")


class TranslateTask(L.LightningModule):
    """Trains a z-stack → fluorescence generator in one of :data:`MODES`.

    Parameters
    ----------
    model : torch.nn.Module
        Generator (``dense_unet``/``unet``) or ``lupi_unet``; exported as the checkpoint.
    mode : str
    optim, loss : dict
        The recipe's ``optim`` and ``loss`` sections.
    max_epochs : int
    discriminator : torch.nn.Module, optional
        ``patchgan`` for ``mode="gan"`` (kept in training checkpoints, not exported).
    """

    def __init__(self, model, mode: str, optim: dict, loss: dict, max_epochs: int, discriminator=None):
        super().__init__()
        self.model, self.mode, self.discriminator = model, mode, discriminator
        self.optim_cfg, self.loss_cfg, self.max_epochs = dict(optim), dict(loss), int(max_epochs)
        self.automatic_optimization = mode != "gan"
        self._pools = None
        self._reset_val()

    # losses

    def _pixel_loss(self, pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
        losses = _losses()
        if kind == "log_squared":
            return losses.log_squared_loss(pred, target)
        if kind == "median_mae":
            return losses.median_mae_loss(pred, target)
        if kind == "l1":
            return F.l1_loss(pred, target)
        if kind == "mse":
            return F.mse_loss(pred, target)
        raise ValueError(f"unknown loss.kind {kind!r}")

    def generator_loss(self, out, batch, validation: bool = False) -> tuple[torch.Tensor, dict]:
        """Non-adversarial loss of one batch and its parts.

        In GAN mode validation always uses the GAN phase's reconstruction loss
        (``grad_weight``·gradient + ``median_mae_weight``·MAE/median), so ``val_loss`` of
        pretraining and GAN epochs compare (HASTE picked its GAN models by this loss).
        """
        losses, c = _losses(), self.loss_cfg
        target = batch["target"]
        if self.mode == "lupi":
            total, parts = losses.lwm_loss(
                out,
                target,
                batch["mask"],
                base=c.get("lupi_base", "median_mae"),
                pixel_weight=float(c.get("lwm_pixel_weight", 2.0)),
                image_weight=float(c.get("median_mae_weight", 0.5)),
                mask_weight=float(c.get("bce_weight", 1.0)),
                side_weight=float(c.get("side_weight", 1.0)),
            )
            if float(c.get("lupi_grad_weight", 0.0)):  # sharper edges and texture (HASTE's GAN term)
                grad = losses.gradient_loss(out.image, target)
                total = total + float(c["lupi_grad_weight"]) * grad
                parts["gradient"] = float(grad.detach())
            return total, {k: torch.tensor(v) for k, v in parts.items()}
        if self.mode == "gan" and (validation or self.current_epoch >= int(c.get("pretrain_epochs", 0))):
            grad = losses.gradient_loss(out, target)
            med = losses.median_mae_loss(out, target)
            total = float(c.get("grad_weight", 10.0)) * grad + float(c.get("median_mae_weight", 1.0)) * med
            return total, {"gradient": grad.detach(), "median_mae": med.detach()}
        kind = "log_squared" if self.mode == "gan" else c.get("kind", "log_squared")
        value = self._pixel_loss(out, target, kind)
        return value, {kind: value.detach()}

    # training

    def forward(self, x: torch.Tensor):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        n = len(batch["input"])
        if self.mode == "gan":
            return self._gan_step(batch, n)
        self._step_schedule(batch_idx)
        loss, parts = self.generator_loss(self.model(batch["input"]), batch)
        self._log_train(loss, parts, n)
        return loss

    def _log_train(self, loss, parts: dict, n: int) -> None:
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=n)
        for k, v in parts.items():
            self.log(f"train_{k}", v, on_step=False, on_epoch=True, batch_size=n)

    def _gan_step(self, batch, n: int):
        losses, c = _losses(), self.loss_cfg
        opt_g, opt_d = self.optimizers()
        x, y = batch["input"], batch["target"]
        clip = c.get("grad_clip", 1.0)
        if self.current_epoch < int(c.get("pretrain_epochs", 0)):
            out = self.model(x)
            loss, parts = self.generator_loss(out, batch)
            opt_g.zero_grad()
            self.manual_backward(loss)
            if clip:
                self.clip_gradients(opt_g, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
            opt_g.step()
            self._log_train(loss, parts, n)
            return loss.detach()
        if self._pools is None:
            size = int(c.get("pool_size", 50))
            self._pools = (losses.ImagePool(size, seed=0), losses.ImagePool(size, seed=1))
        pool_real, pool_fake = self._pools
        d = self.discriminator
        # discriminator
        with torch.no_grad():
            fake = self.model(x)
        pred_fake = d(torch.cat([x, fake], 1))
        pred_real = d(torch.cat([x, y], 1))
        pool_fake.query(pred_fake.detach())
        pool_real.query(pred_real.detach())
        loss_d = losses.ralsgan_d_loss(pred_real, pred_fake, pool_real.stacked(), pool_fake.stacked())
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        if clip:
            self.clip_gradients(opt_d, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
        opt_d.step()
        # generator
        out = self.model(x)
        pred_fake = d(torch.cat([x, out], 1))
        pred_real = d(torch.cat([x, y], 1))
        adv = losses.ralsgan_g_loss(pred_real, pred_fake, pool_real.stacked(), pool_fake.stacked())
        rec, parts = self.generator_loss(out, batch)
        loss_g = float(c.get("adv_weight", 0.01)) * adv + rec
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        if clip:
            self.clip_gradients(opt_g, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
        opt_g.step()
        self._log_train(loss_g, {**parts, "adv": adv.detach(), "disc": loss_d.detach()}, n)
        return loss_g.detach()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._pools is not None:  # the GAN's history of discriminator outputs, for an exact resume
            checkpoint["pathfm_gan_pools"] = [p.state_dict() for p in self._pools]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("pathfm_gan_pools")
        if states and self.mode == "gan":
            from ...models.haste.losses import ImagePool

            size = int(self.loss_cfg.get("pool_size", 50))
            self._pools = (ImagePool(size), ImagePool(size))
            for pool, state in zip(self._pools, states):
                pool.load_state_dict(state)

    def _step_schedule(self, batch_idx: int) -> None:
        """Per-batch warm-restart cosine schedule (HASTE steps it with fractional epochs), then a low-lr phase."""
        sched = getattr(self, "_warm_restarts", None)
        if sched is None or self.trainer is None:
            return
        n = max(1, int(self.trainer.num_training_batches))
        epoch = self.current_epoch + batch_idx / n
        low_at = self.optim_cfg.get("low_lr_epoch")
        if low_at is not None and epoch >= float(low_at):
            for group in sched.optimizer.param_groups:
                group["lr"] = float(self.optim_cfg.get("low_lr", 1e-5))
        else:
            sched.step(epoch)

    def configure_optimizers(self):
        o = self.optim_cfg
        if self.mode == "gan":
            opt_g = torch.optim.Adam(
                self.model.parameters(), lr=float(o.get("lr", 1e-4)), weight_decay=float(o.get("weight_decay", 0.0))
            )
            opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=float(self.loss_cfg.get("disc_lr", 1e-6)))
            return [opt_g, opt_d]
        if o.get("scheduler") == "cosine_warm_restarts":
            opt = build_optimizer(self.model.parameters(), {**o, "scheduler": "none"}, self.max_epochs)
            self._warm_restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                opt, T_0=int(o.get("t0", 2)), T_mult=int(o.get("t_mult", 2))
            )
            return opt
        return build_optimizer(self.model.parameters(), o, self.max_epochs)

    # validation

    def _reset_val(self) -> None:
        self._val = {
            "loss": 0.0,
            "abs": 0.0,
            "sq": 0.0,
            "pixels": 0,
            "tiles": 0,
            "ssim": 0.0,
            "inter": 0.0,
            "union": 0.0,
        }
        self._val_targets: list = []

    def on_validation_epoch_start(self) -> None:
        self._reset_val()

    def validation_step(self, batch, batch_idx):
        out = self.model(batch["input"])
        loss, _ = self.generator_loss(out, batch, validation=True)
        pred = (out.image if self.mode == "lupi" else out).clamp(0, 1).float()
        target = batch["target"].float()
        v, n = self._val, len(pred)
        v["loss"] += float(loss) * n
        v["tiles"] += n
        v["abs"] += float((pred - target).abs().sum())
        v["sq"] += float(((pred - target) ** 2).sum())
        v["pixels"] += int(target.numel())
        v["ssim"] += float(_ssim(pred, target).sum())
        self._val_targets.append(target[:, :, ::4, ::4].reshape(-1).cpu())
        if self.mode == "lupi":
            pm, tm = out.mask_logits > 0, batch["mask"] > 0.5
            v["inter"] += float((pm & tm).sum())
            v["union"] += float((pm | tm).sum())

    def on_validation_epoch_end(self) -> None:
        v = self._val
        if not v["tiles"]:
            return
        mae, mse = v["abs"] / v["pixels"], v["sq"] / v["pixels"]
        med = float(torch.cat(self._val_targets).median()) if self._val_targets else 0.0
        metrics = {
            "val_loss": v["loss"] / v["tiles"],
            "val_mae": mae,
            "val_mae_median": mae / med if med > 0 else float("nan"),
            "val_psnr": float(10 * np.log10(1.0 / max(mse, 1e-12))),
            "val_ssim": v["ssim"] / v["tiles"],
        }
        if self.mode == "lupi":
            metrics["val_mask_iou"] = v["inter"] / v["union"] if v["union"] else 1.0
        for k, val in metrics.items():
            self.log(k, val, on_epoch=True)


# --- build ---------------------------------------------------------------------------------------


def _mode(recipe: Recipe, name: str, where) -> str:
    mode = recipe.get("loss.mode")
    if mode == "lupi" and name != "lupi_unet":
        raise RecipeError(where, f"loss.mode is 'lupi' but model.name is {name!r}.", "Use model.name: lupi_unet.")
    if mode != "lupi" and name == "lupi_unet":
        raise RecipeError(where, f"model.name is lupi_unet but loss.mode is {mode!r}.", "Set loss.mode: lupi.")
    return mode


def build(recipe: Recipe):
    """Task, data and model-card fields for a ``translate`` recipe."""
    where = recipe.path or "<recipe>"
    name = recipe.get("model.name")
    if model_info(name)["family"] != "translate":
        raise RecipeError(
            where,
            f"model.name {name!r} is not a translate model.",
            "Use dense_unet, lupi_unet or unet (see `pathfm models --family translate`).",
        )
    mode = _mode(recipe, name, where)
    cfg = {k: v for k, v in (recipe.get("model") or {}).items() if k != "name"}
    data_cfg = dict(recipe.get("data"))
    in_channels = int(cfg.get("in_channels") or model_info(name)["default_cfg"].get("in_channels") or 7)
    # the nuclei mask is the LUPI target and also where nuclei-centred crops are centred (any mode)
    with_mask = mode == "lupi" or bool(data_cfg.get("mask")) or float(data_cfg.get("nuclei_centred") or 0) > 0
    data = TranslateDataModule(
        data_cfg,
        in_channels,
        with_mask=with_mask,
        batch_size=recipe.get("trainer.batch_size"),
        num_workers=recipe.get("trainer.num_workers"),
        where=where,
        base=recipe.path.parent if recipe.path else None,
    )
    n_out = len(data.channels)
    if cfg.get("out_channels") not in (None, n_out):
        raise RecipeError(
            where,
            f"model.out_channels is {cfg['out_channels']} but data.channels lists {n_out} target(s) {data.channels}.",
            "Drop model.out_channels (it follows data.channels).",
        )
    cfg.update(in_channels=in_channels, out_channels=n_out)
    multiple = 16
    if data.crop % multiple or data.val_tile % multiple:
        raise RecipeError(
            where,
            f"data.crop_size {data.crop} / data.val_tile {data.val_tile} must be multiples of {multiple} (4 poolings).",
            "Use 64, 128, 256 or 512.",
        )
    model = create_model(name, **cfg)
    disc = None
    if mode == "gan":
        dcfg = dict(recipe.get("loss.discriminator") or {})
        disc = create_model("patchgan", **{"in_channels": in_channels + n_out, **dcfg})
        if recipe.get("trainer.gradient_clip_val") is not None or recipe.get("trainer.accumulate_grad_batches") != 1:
            raise RecipeError(
                where,
                "loss.mode gan optimises by hand: trainer.gradient_clip_val and "
                "trainer.accumulate_grad_batches do not apply.",
                "Remove them; the GAN clips gradients to loss.grad_clip.",
            )
    task = TranslateTask(
        model, mode, recipe.get("optim"), recipe.get("loss"), recipe.get("trainer.max_epochs"), discriminator=disc
    )
    card = {
        "channels": data.channels,
        "channel_roles": [channel_role(c) for c in data.channels],
        "input_planes": len(data.planes),
        "plane_indices": data.planes,
        "plane_names": data.plane_names,
        "input_channel": data.channel_name,
        "normalization": data.normalization(),
        "tile_size": data.val_tile,
        "crop_size": data.crop,
        "has_mask": mode == "lupi",
        "input_dtype": data.input_dtype,
        "magnification": data.magnification or None,
        "mode": mode,
        "training_data": data.describe(),
    }
    return task, data, card
