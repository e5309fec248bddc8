"""RGB uint8 tiles → the normalised float batch a segmentation network takes (one definition for all)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["normalise_tiles"]


def normalise_tiles(images: Any, mean: torch.Tensor, std: torch.Tensor, size: int, device: Any = None) -> torch.Tensor:
    """``(x / 255 - mean) / std`` of RGB uint8 tiles ``(B, T, T, 3)`` or ``(T, T, 3)``, resized to ``size``.

    Parameters
    ----------
    images : ndarray or Tensor, uint8
    mean, std : Tensor (1, 3, 1, 1)
        Channel statistics; their device is the default ``device``.
    size : int
        Output side; tiles of another side are resized (bilinear, antialiased).
    device : torch.device or str, optional
        Where to compute. The uint8 data is moved first (4x less to copy than floats).

    Raises
    ------
    ValueError
        The input is not RGB uint8.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim == 3:
        x = x[None]
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB uint8 tiles (B, T, T, 3), got {x.dtype} {tuple(x.shape)}")
    device = mean.device if device is None else device
    x = x.to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - mean.to(device)) / std.to(device)
