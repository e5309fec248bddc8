"""HED stain augmentation: perturb the haematoxylin, eosin and DAB amounts of an H&E tile.

Slides from different labs and scanners differ mostly in how much of each stain they show. Tellez et
al. (2018, "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to
train distilled stain-invariant convolutional networks") train on tiles whose colour is moved in
the stain space instead of RGB: the tile is unmixed into H, E and D optical densities
(Ruifrok & Johnston's colour deconvolution, :func:`skimage.color.rgb2hed`), each channel ``c``
becomes ``c * a + b`` with ``a ~ U(1 - sigma, 1 + sigma)`` and ``b ~ U(-sigma, sigma)`` scaled to
the channel's range, and the result is mixed back to RGB. This gives realistic stain variation
(paler or darker nuclei, pinker or greyer stroma) that brightness/contrast jitter does not.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hed_jitter"]

#: Spread of optical densities of a typical H&E tile per channel (H, E, D), to scale the shift ``b``.
_OD_SCALE = np.array([0.1, 0.06, 0.03], np.float32)


def hed_jitter(tile: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``tile`` (H, W, 3) uint8 RGB with its stain amounts scaled and shifted at random.

    ``sigma`` 0 returns the tile unchanged; Tellez et al. used about 0.05 (light) to 0.2 (strong).

    >>> t = np.full((2, 2, 3), 200, np.uint8)
    >>> hed_jitter(t, 0.0, np.random.default_rng(0)) is t
    True
    >>> hed_jitter(t, 0.1, np.random.default_rng(0)).dtype
    dtype('uint8')
    """
    if sigma <= 0:
        return tile
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(tile).astype(np.float32)
    a = rng.uniform(1 - sigma, 1 + sigma, 3).astype(np.float32)
    b = (rng.uniform(-sigma, sigma, 3) * _OD_SCALE).astype(np.float32)
    rgb = hed2rgb(hed * a + b)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
