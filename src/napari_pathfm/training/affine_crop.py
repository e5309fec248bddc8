"""Random shift-scale-rotate crops: one affine map, shared by the segment and translate families.

A training crop of ``tile`` x ``tile`` pixels is sampled from the source through an affine
map: its centre lands on a given point of the source (moved by up to ``shift`` crops), it is
rotated by an angle in ±``rotate_deg`` and scaled by a factor in 1 ± ``scale``. Rotations
at any angle and small changes of scale are what flips and 90-degree turns cannot give:
glands and nuclei are seen at every orientation and slightly different sizes. The map is
applied with OpenCV's ``warpAffine`` as an inverse map (output pixel -> source point),
so every output pixel is read once.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ssr_matrix", "warp_crop"]


def ssr_matrix(
    centre: tuple[float, float],
    tile: int,
    rng: np.random.Generator,
    *,
    shift: float = 0.0,
    scale: float = 0.0,
    rotate_deg: float = 0.0,
) -> np.ndarray:
    """The ``(2, 3)`` inverse map of one random shift-scale-rotate crop centred near ``centre``.

    Parameters
    ----------
    centre : (y, x)
        Source point that the crop's centre lands on before the shift.
    tile : int
        Output crop size in pixels.
    rng : numpy Generator
        Draws, in this order: the y and x shift, the scale, the angle.
    shift, scale, rotate_deg : float
        Limits: shift as a fraction of ``tile``, scale as 1 ± ``scale``, angle in ±degrees.

    Returns
    -------
    numpy.ndarray
        ``float64 (2, 3)``: output ``(x, y)`` -> source ``(x, y)``, for ``cv2.WARP_INVERSE_MAP``.
        A scale above 1 magnifies (the crop covers less of the source).
    """
    cy = centre[0] + float(rng.uniform(-shift, shift)) * tile
    cx = centre[1] + float(rng.uniform(-shift, shift)) * tile
    s = 1.0 + float(rng.uniform(-scale, scale))
    a = np.deg2rad(float(rng.uniform(-rotate_deg, rotate_deg)))
    # output pixel (u, v) relative to the crop centre -> source = centre + R(a) @ (u, v) / s
    cos, sin = np.cos(a) / s, np.sin(a) / s
    half = (tile - 1) / 2.0
    return np.array([[cos, -sin, cx - cos * half + sin * half], [sin, cos, cy - sin * half - cos * half]], np.float64)


def warp_crop(
    a: np.ndarray, mat: np.ndarray, tile: int, *, nearest: bool = False, fill: float | None = None
) -> np.ndarray:
    """Sample ``a`` (``(H, W)`` or ``(H, W, C)``, C ≤ 4) through ``mat`` into a ``tile`` x ``tile`` crop.

    ``nearest`` for labels (no new values), bilinear otherwise. Source points outside ``a``
    are mirrored back in (``fill=None``, OpenCV's reflect-101) or get the constant ``fill``
    (a white background, an ignore label).
    """
    import cv2

    interp = (cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
    if fill is None:
        border = {"borderMode": cv2.BORDER_REFLECT_101}
    else:
        channels = a.shape[2] if a.ndim == 3 else 1
        border = {"borderMode": cv2.BORDER_CONSTANT, "borderValue": (float(fill),) * max(channels, 1)}
    return cv2.warpAffine(np.ascontiguousarray(a), mat, (tile, tile), flags=interp, **border)
