"""Gland contours as their own class, so that a segmentation model learns to keep neighbouring glands apart.

GlaS-style masks draw each gland as a region with a gap of background between touching glands, but a
model trained on gland vs background tends to bridge the gap and merge neighbours into one object. The
winners of the GlaS challenge (DCAN, Chen et al. 2016) also predict the glands' contours; here the
contour is a third class: the band of gland pixels within ``width`` pixels of the gland's edge
(:func:`contour_target`). At prediction the gland interiors are the objects; each is grown back over
the band it sits in (:func:`glands_from_contour`).

Numpy and SciPy only.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["CONTOUR", "GLAND", "contour_target", "glands_from_contour"]

#: class values of the three-class target
GLAND, CONTOUR = 1, 2


def contour_target(classes: np.ndarray, width: int, ignore_index: int = 255) -> np.ndarray:
    """A gland (1) / background (0) class map with its contour band as class 2.

    Parameters
    ----------
    classes : ndarray (H, W) of uint8
        0 background, 1 gland, ``ignore_index`` unlabelled (kept as it is).
    width : int
        Band width in pixels of the map (inside the gland, along its edge with background).

    Examples
    --------
    >>> m = np.zeros((7, 7), np.uint8); m[1:6, 1:6] = 1
    >>> contour_target(m, 1)[1:6, 1:6].tolist()[2]
    [2, 1, 1, 1, 2]
    """
    out = np.array(classes, np.uint8, copy=True)
    gland = out == GLAND
    if width > 0 and gland.any():
        # border_value=1: a gland cut by the image edge keeps its interior there (the edge is not a contour)
        inner = ndimage.binary_erosion(gland, np.ones((3, 3), bool), iterations=int(width), border_value=1)
        out[gland & ~inner] = CONTOUR
    return out


def glands_from_contour(class_map: np.ndarray, min_interior: int = 0) -> np.ndarray:
    """Gland instances (0 background, 1..n glands) from a three-class map of :func:`contour_target`'s classes.

    Each connected interior (class 1, 4-connected) of at least ``min_interior`` pixels is one gland;
    the gland pixels (classes 1 and 2) are given to the nearest interior, so the band between two
    interiors splits along its middle and the glands come back at their full size.

    >>> m = np.zeros((5, 9), np.uint8); m[1:4, 1:8] = 2; m[2, 2] = 1; m[2, 6] = 1
    >>> glands_from_contour(m)[2].tolist()
    [0, 1, 1, 1, 1, 2, 2, 2, 0]
    """
    from ..instances import grow_interiors

    class_map = np.asarray(class_map)
    gland = (class_map == GLAND) | (class_map == CONTOUR)
    return grow_interiors(class_map == GLAND, gland, min_interior)[0]
