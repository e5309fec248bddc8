"""Losses of the HASTE translation models (pure torch; images in [0, 1], shape (N, C, H, W)).

Definitions follow the HASTE team's code for the Adipocyte Cell Challenge (Wieslander et
al. 2021); where we changed something it says why.

- :func:`log_squared_loss`: ``mean(log((t + ε) / (p + ε))²)``, the squared log-ratio
  (HASTE's ``LogSquaredLoss``, ε = 1e-8). Relative, so dim and bright structures weigh
  alike; used to pre-train the lipid/cytoplasm generators. It is steep where the target
  is near 0 and the prediction is not; a larger ``eps`` softens that.
- :func:`median_mae_loss`: ``mean(|p − t|) / median(t)`` (the challenge's metric, HASTE's
  ``MedianMAELoss``). Guarded: sparse targets (nuclei on a dark background) have median 0,
  where HASTE's division gives inf; then the mean of the target is used, and 1 for an
  all-zero target.
- :func:`gradient_loss`: L1 between the image gradients of prediction and target. As in
  HASTE, the gradients are forward differences, absolute values (``absolute=True``),
  zero in the last column/row; the mean runs over both directions.
- :func:`ralsgan_d_loss`, :func:`ralsgan_g_loss`: relativistic average least squares
  (Jolicoeur-Martineau 2018): each real/fake logit is compared with the *average*
  logit of the other kind. The averages may come from a history (``real_ref``,
  ``fake_ref``), e.g. the discriminator outputs kept in an :class:`ImagePool` of 50.
- :class:`ImagePool`: pix2pix's history of generated images (50 items, each query
  returns the new item or, with probability ½ once full, a stored one that it replaces).
- :func:`mask_bce_loss`: BCE with logits of the segmentation decoder against the
  privileged mask.
- :func:`lwm_weight_map`, :func:`lwm_loss`: the loss-weight modules of the LUPI nuclei
  net: pixels where the thresholded segmentation disagrees with the privileged mask get
  weight 2 (``pixel_weight``), others 1; the map weights the mask BCE, the full-size
  regression error and the regression error of every side output at its scale.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F

from .layers import tanh_scaled

__all__ = [
    "ImagePool",
    "gradient_loss",
    "image_gradients",
    "log_squared_loss",
    "lwm_loss",
    "lwm_weight_map",
    "mask_bce_loss",
    "median_mae_loss",
    "median_normalizer",
    "ralsgan_d_loss",
    "ralsgan_g_loss",
]


def _weighted_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return err.mean() if weight is None else (err * weight.float()).mean()


def _f32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as float32: under fp16 autocast ``eps = 1e-8`` would round to 0 and ratios overflow."""
    return tuple(t.float() for t in tensors)


def log_squared_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """Mean squared log-ratio ``mean(w · log((target + eps) / (pred + eps))²)``.

    Zero when ``pred == target``; symmetric in the ratio (predicting half or twice the
    target costs the same). ``weight`` broadcasts against the error map.
    """
    pred, target = _f32(pred, target)
    ratio = torch.log((target + eps) / (pred + eps))
    return _weighted_mean(ratio * ratio, weight)


def median_normalizer(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Denominator of the median-normalised MAE: ``median(target)`` over the batch, guarded.

    When the median is ≤ ``eps`` (mostly dark targets) the mean is used instead, and 1
    when the target is all ≈ 0. Detached: the target carries no gradient anyway.
    """
    t = target.detach().float()
    med, mean = t.median(), t.mean()
    return torch.where(med > eps, med, torch.where(mean > eps, mean, torch.ones_like(mean)))


def median_mae_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """``mean(w · |pred − target|) / median(target)`` (see :func:`median_normalizer` for median 0)."""
    pred, target = _f32(pred, target)
    return _weighted_mean((pred - target).abs(), weight) / median_normalizer(target, eps)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences ``(dx, dy)`` of ``x`` (N, C, H, W), same shape, 0 in the last column / row."""
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, absolute: bool = True) -> torch.Tensor:
    """L1 distance between the image gradients of ``pred`` and ``target``.

    ``absolute=True`` (HASTE) compares gradient magnitudes per direction, so an edge of
    the right strength counts as right even if its sign flipped; ``False`` compares the
    signed differences. The mean runs over both directions and all pixels.
    """
    pred, target = _f32(pred, target)
    gp, gt = image_gradients(pred), image_gradients(target)
    if absolute:
        gp, gt = [g.abs() for g in gp], [g.abs() for g in gt]
    return ((gp[0] - gt[0]).abs().mean() + (gp[1] - gt[1]).abs().mean()) / 2


def _refs(
    real: torch.Tensor, fake: torch.Tensor, real_ref: torch.Tensor | None, fake_ref: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    r = real if real_ref is None else real_ref
    f = fake if fake_ref is None else fake_ref
    return r.float().mean(), f.float().mean()


def ralsgan_d_loss(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    real_ref: torch.Tensor | None = None,
    fake_ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Discriminator loss of the relativistic average LS GAN.

    ``½ [ mean((D(real) − E[D(fake)] − 1)²) + mean((D(fake) − E[D(real)] + 1)²) ]``:
    reals should score 1 above the average fake, fakes 1 below the average real.
    ``real_ref`` / ``fake_ref`` replace the current batch in the averages (a history
    of discriminator outputs, as HASTE kept the last 50); pass ``fake_logits``
    computed from detached generator outputs.
    """
    real_logits, fake_logits = _f32(real_logits, fake_logits)
    r_avg, f_avg = _refs(real_logits, fake_logits, real_ref, fake_ref)
    return (((real_logits - f_avg - 1) ** 2).mean() + ((fake_logits - r_avg + 1) ** 2).mean()) / 2


def ralsgan_g_loss(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    real_ref: torch.Tensor | None = None,
    fake_ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generator loss of the relativistic average LS GAN: the discriminator loss with the targets swapped.

    ``½ [ mean((D(real) − E[D(fake)] + 1)²) + mean((D(fake) − E[D(real)] − 1)²) ]``.
    Unlike the standard GAN, the generator also gets gradient through the real term
    (via ``E[D(fake)]``) when the averages come from the current batch.
    """
    real_logits, fake_logits = _f32(real_logits, fake_logits)
    r_avg, f_avg = _refs(real_logits, fake_logits, real_ref, fake_ref)
    return (((real_logits - f_avg + 1) ** 2).mean() + ((fake_logits - r_avg - 1) ** 2).mean()) / 2


class ImagePool:
    """History of up to ``size`` past items (pix2pix / CycleGAN image buffer).

    :meth:`query` takes a batch; for each item, while the pool is not full it is stored
    and returned; once full, with probability ``swap_prob`` a random stored item is
    returned and the new one takes its place, otherwise the new item is returned.
    Training the discriminator on this mix keeps it from forgetting older generator
    modes. Items are stored detached. :meth:`stacked` gives all stored items, e.g. for
    the history averages of :func:`ralsgan_d_loss`.

    Parameters
    ----------
    size : int
        Capacity (50 in pix2pix and HASTE). 0 disables the pool (``query`` returns its input).
    swap_prob : float
        Chance of returning a stored item once the pool is full.
    seed : int, optional
        Seed of the pool's own random generator (independent of torch's).
    """

    def __init__(self, size: int = 50, swap_prob: float = 0.5, seed: int | None = None):
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size, self.swap_prob = size, swap_prob
        self.items: list[torch.Tensor] = []
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of the same shape as ``batch``: new items mixed with stored ones."""
        if self.size == 0:
            return batch
        out = []
        for item in batch.detach():
            item = item.clone()
            if len(self.items) < self.size:
                self.items.append(item)
                out.append(item)
            elif self._rng.random() < self.swap_prob:
                i = self._rng.randrange(self.size)
                out.append(self.items[i])
                self.items[i] = item
            else:
                out.append(item)
        return torch.stack(out)

    def stacked(self) -> torch.Tensor:
        """All stored items as one tensor ``(len(pool), ...)``; raises if the pool is empty."""
        if not self.items:
            raise ValueError("the image pool is empty; query() it with a batch first")
        return torch.stack(self.items)

    def state_dict(self) -> dict[str, Any]:
        """Stored items and generator state, to resume a run with the same history."""
        return {"items": [t.clone() for t in self.items], "rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = [t.clone() for t in state["items"]][: self.size]
        self._rng.setstate(state["rng"])


def _resize_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.shape[-2:] != like.shape[-2:]:
        mask = F.interpolate(mask, size=like.shape[-2:], mode="nearest")
    return mask


def mask_bce_loss(
    mask_logits: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None, pos_weight: float | None = None
) -> torch.Tensor:
    """BCE with logits of the segmentation decoder against the privileged mask.

    ``mask``: (N, 1, H, W) or (N, H, W), nonzero = nucleus; resized (nearest) to the
    logits. ``weight`` weights pixels (e.g. :func:`lwm_weight_map`); ``pos_weight``
    scales the nucleus term for sparse masks.
    """
    target = (_resize_mask(mask, mask_logits) > 0).float()
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=mask_logits.device)
    bce = F.binary_cross_entropy_with_logits(mask_logits.float(), target, reduction="none", pos_weight=pw)
    return _weighted_mean(bce, weight)


@torch.no_grad()
def lwm_weight_map(
    mask_logits: torch.Tensor, mask: torch.Tensor, pixel_weight: float = 2.0, threshold: float = 0.5
) -> torch.Tensor:
    """Per-pixel loss weights (N, 1, H, W): ``pixel_weight`` where the segmentation is wrong, 1 elsewhere.

    "Wrong" = ``sigmoid(mask_logits) > threshold`` differs from ``mask > 0``. Detached:
    the weights steer the losses, they are not trained.
    """
    pred = mask_logits.sigmoid() > threshold
    truth = _resize_mask(mask, mask_logits) > 0
    wrong = (pred != truth).to(mask_logits.dtype)
    return 1 + (pixel_weight - 1) * wrong


_BASE_LOSSES = {
    "median_mae": median_mae_loss,
    "log_squared": log_squared_loss,
    "l1": lambda p, t, weight=None: _weighted_mean((p.float() - t.float()).abs(), weight),
}


def lwm_loss(
    out: Any,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    base: str = "median_mae",
    pixel_weight: float = 2.0,
    threshold: float = 0.5,
    image_weight: float = 0.5,
    mask_weight: float = 1.0,
    side_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the LUPI nuclei net with loss-weight modules (HASTE's ``LWMIntLayersMedianMAELoss``).

    ``W = lwm_weight_map(out.mask_logits, mask)``;
    ``total = image_weight · base(image, target; W) + mask_weight · BCE(mask_logits, mask; W)
    + side_weight · Σ_s base(tanh_scaled(side_s), target_s; W_s)``,
    where ``target_s`` and ``W_s`` are the target and weight map area-averaged to the
    side output's scale (a coarse pixel whose footprint is half mis-segmented gets
    weight 1.5; HASTE used nearest sampling, which keeps one pixel of four).

    Parameters
    ----------
    out : LUPIOutput
        Anything with ``image``, ``mask_logits`` and ``side_outputs``.
    target : Tensor (N, C, H, W)
        Real fluorescence in [0, 1].
    mask : Tensor (N, 1, H, W) or (N, H, W)
        Privileged nuclei mask (nonzero = nucleus).
    base : {"median_mae", "log_squared", "l1"}
        Regression error; HASTE's nuclei model used the median-normalised MAE.

    Returns
    -------
    (total, parts)
        ``parts``: detached floats ``image``, ``mask``, ``side`` and ``wrong_fraction``
        (share of mis-segmented pixels).
    """
    if base not in _BASE_LOSSES:
        raise ValueError(f"unknown base loss {base!r}; choose one of {sorted(_BASE_LOSSES)}")
    fn = _BASE_LOSSES[base]
    weight = lwm_weight_map(out.mask_logits, mask, pixel_weight, threshold)
    image_term = fn(out.image, target, weight=weight)
    mask_term = mask_bce_loss(out.mask_logits, mask, weight=weight)
    side_term = image_term.new_zeros(())
    for side in out.side_outputs:
        size = side.shape[-2:]
        t_s = F.interpolate(target, size=size, mode="area")
        w_s = F.interpolate(weight, size=size, mode="area")
        side_term = side_term + fn(tanh_scaled(side), t_s, weight=w_s)
    total = image_weight * image_term + mask_weight * mask_term + side_weight * side_term
    parts = {
        "image": float(image_term.detach()),
        "mask": float(mask_term.detach()),
        "side": float(side_term.detach()),
        "wrong_fraction": float(((weight - 1) > 0).float().mean()),
    }
    return total, parts
