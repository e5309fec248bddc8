"""Path-SAM2's loss: per class (1 − α)·Dice + α·Focal on the mask logits, plus β·MSE of the IoU head.

Each class mask is an independent sigmoid (SAM's convention) against the one-hot
target of that class; pixels labelled ``ignore_index`` count nowhere. The IoU
head learns to predict the IoU between the thresholded mask (logit > 0) and the
class's ground truth (1 when both are empty, as nothing was there to miss).
α = 0.125 and β = 0.01 are the paper's defaults; the focal term uses SAM's
γ = 2 and class balance 0.25.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pathsam2_loss", "prompt_loss"]


def pathsam2_loss(
    out: dict,
    target: torch.Tensor,
    *,
    alpha: float = 0.125,
    beta: float = 0.01,
    ignore_index: int = 255,
    gamma: float = 2.0,
    focal_alpha: float = 0.25,
    weight: torch.Tensor | None = None,
):
    """Loss of a batch.

    Parameters
    ----------
    out : dict
        Model output: ``logits (B, K, H, W)``, ``iou (B, K)`` (None: no IoU term).
    target : LongTensor (B, H, W)
        Class indices, ``ignore_index`` where unknown. Logits of another size are
        resized (bilinear) to the target's.
    weight : Tensor (B, H, W), optional
        Per-pixel weights of the Dice and focal terms (the U-Net's border weights,
        :func:`napari_pathfm.training.border_weights.border_weights`); 1 everywhere if None.

    Returns
    -------
    (loss, parts)
        ``parts`` holds the detached mean ``dice``, ``focal`` and ``iou_mse``.
    """
    logits = out["logits"].float()
    _B, K = logits.shape[:2]
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    valid = (target != ignore_index).unsqueeze(1).float()
    onehot = F.one_hot(torch.where(target == ignore_index, 0, target).clamp(0, K - 1), K).permute(0, 3, 1, 2).float()
    onehot = onehot * valid
    prob = logits.sigmoid()
    w = valid if weight is None else valid * weight.unsqueeze(1).float()

    inter = (prob * onehot * w).sum((2, 3))
    denom = (prob * w).sum((2, 3)) + (onehot * w).sum((2, 3))
    dice = 1 - (2 * inter + 1) / (denom + 1)

    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    a_t = focal_alpha * onehot + (1 - focal_alpha) * (1 - onehot)
    # normalised by the labelled pixels, not the weights: a border weight adds emphasis, it takes none away
    focal = (a_t * ce * (1 - p_t) ** gamma * w).sum((2, 3)) / valid.sum((2, 3)).clamp(min=1)

    with torch.no_grad():
        pred = (logits > 0).float() * valid
        i = (pred * onehot).sum((2, 3))
        u = ((pred + onehot) > 0).float().sum((2, 3))
        true_iou = torch.where(u > 0, i / u.clamp(min=1), torch.ones_like(u))
    # models without an IoU head (a plain U-Net: ``iou`` None) leave the term out
    iou_mse = (out["iou"].float() - true_iou) ** 2 if out.get("iou") is not None else torch.zeros_like(true_iou)

    per_class = (1 - alpha) * dice + alpha * focal + beta * iou_mse
    parts = {"dice": dice.mean().detach(), "focal": focal.mean().detach(), "iou_mse": iou_mse.mean().detach()}
    return per_class.mean(), parts


def prompt_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.125, ignore_index: int = 255):
    """(1 − α)·Dice + α·Focal of prompted-object logits ``(B, 1, H, W)`` against a 0/1 ``target (B, H, W)``.

    The loss :func:`pathsam2_loss` gives a class mask, for the one mask a click or box asks for
    (SAM trains its prompted masks with the same focal/Dice mix).
    """
    logits = logits.float()
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    valid = (target != ignore_index).unsqueeze(1).float()
    truth = (target == 1).unsqueeze(1).float()
    prob = logits.sigmoid()
    inter = (prob * truth * valid).sum((2, 3))
    dice = 1 - (2 * inter + 1) / ((prob * valid).sum((2, 3)) + (truth * valid).sum((2, 3)) + 1)
    ce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    p_t = prob * truth + (1 - prob) * (1 - truth)
    a_t = 0.25 * truth + 0.75 * (1 - truth)
    focal = (a_t * ce * (1 - p_t) ** 2 * valid).sum((2, 3)) / valid.sum((2, 3)).clamp(min=1)
    return ((1 - alpha) * dice + alpha * focal).mean()
