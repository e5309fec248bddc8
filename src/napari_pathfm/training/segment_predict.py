"""Whole-image segmentation logits by sliding tiles: validation of the ``segment`` family and evaluations.

Tiles start on a regular grid with the last one aligned to the image edge
(:func:`~napari_pathfm.training.segment_data.tile_starts`); logits are resized to the
tile and averaged where tiles overlap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .segment_data import tile_starts

__all__ = ["fit_target", "predict_image"]


@torch.no_grad()
def predict_image(
    model,
    image: torch.Tensor,
    tile: int,
    stride: int | None = None,
    batch_size: int = 4,
    target: torch.Tensor | None = None,
    loss_fn=None,
):
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
            losses.append((float(loss_fn(out, fit_target(t, logits.shape[-2:]))), len(chunk)))
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


def fit_target(target: torch.Tensor, size) -> torch.Tensor:
    """Nearest-resize a (B, H, W) label tensor to the model's output size (ignore labels stay ignore)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
