"""The original U-Net's border weights: background between two nearby glands counts more in the loss.

Ronneberger et al. (2015, eq. 2) weight each pixel by ``1 + w0 · exp(−(d1 + d2)² / (2σ²))``, where
``d1`` and ``d2`` are its distances to the nearest and the second-nearest object. The weight is large
only in narrow gaps between two objects, which is where a segmentation model bridges neighbouring
glands into one; GlaS's masks keep those gaps, so the weights come from the masks alone. Here the
weight is given to background pixels only (a gland pixel's own distance is 0), and objects are the
connected components of the foreground classes.

Numpy and SciPy only; one map per training crop (:func:`border_weights`), a batch at a time
(:func:`batch_border_weights`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["batch_border_weights", "border_weights"]


def border_weights(target: np.ndarray, w0: float, sigma: float, ignore_index: int = 255) -> np.ndarray:
    """Per-pixel loss weights of one class map.

    Parameters
    ----------
    target : ndarray (H, W) of int
        0 background, other values foreground classes, ``ignore_index`` unlabelled (weight 0).
    w0 : float
        Extra weight in a gap of zero width (the paper's 10).
    sigma : float
        Width of the weighting in pixels of ``target`` (the paper's 5).

    Returns
    -------
    ndarray (H, W) of float32
        1 on ordinary pixels, up to ``1 + w0`` in the narrowest gaps, 0 where ignored.

    Examples
    --------
    >>> t = np.zeros((5, 9), np.uint8); t[:, :4] = 1; t[:, 5:] = 1
    >>> w = border_weights(t, 10.0, 1.0)
    >>> round(float(w[2, 4]), 2), float(w[2, 0])
    (2.35, 1.0)
    """
    target = np.asarray(target)
    valid = target != ignore_index
    fg = (target != 0) & valid
    out = valid.astype(np.float32)
    labels, n = ndimage.label(fg)
    if n < 2 or w0 <= 0 or sigma <= 0:
        return out
    reach = int(math.ceil(3 * sigma))  # (d1 + d2) beyond 3σ leaves a weight under 1 % of w0
    d1 = np.full(target.shape, np.inf, np.float32)
    d2 = np.full(target.shape, np.inf, np.float32)
    h, w = target.shape
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        ys = slice(max(box[0].start - reach, 0), min(box[0].stop + reach, h))
        xs = slice(max(box[1].start - reach, 0), min(box[1].stop + reach, w))
        d = ndimage.distance_transform_edt(labels[ys, xs] != i).astype(np.float32)
        a, b = d1[ys, xs], d2[ys, xs]
        b[...] = np.minimum(b, np.maximum(a, d))
        a[...] = np.minimum(a, d)
    gap = valid & ~fg & np.isfinite(d2)
    s = d1[gap] + d2[gap]
    out[gap] += float(w0) * np.exp(-(s * s) / (2.0 * float(sigma) ** 2))
    return out


def batch_border_weights(targets: np.ndarray, w0: float, sigma: float, ignore_index: int = 255) -> np.ndarray:
    """:func:`border_weights` of each ``(H, W)`` map of a ``(B, H, W)`` batch, stacked (float32)."""
    return np.stack([border_weights(t, w0, sigma, ignore_index) for t in np.asarray(targets)])
