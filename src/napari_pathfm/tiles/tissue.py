"""Tissue detection at low resolution.

A whole slide is mostly glass. Tiling only the tissue saves most of the compute of
every slide-scale pipeline, so the first step is a coarse binary mask (a few µm
per pixel) that says where the stained tissue is.

The detector looks at colour, not texture: H&E-stained tissue is pink/purple
(saturated) and darker than the bright, grey-white glass; ink from pen marks and
black scanner borders are dark and unsaturated. Morphology then closes small
gaps, removes specks of dust and fills holes such as gland lumens and fat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, morphology

from ..progress import check_cancel, report

__all__ = ["TissueMask", "rgb_tissue_mask", "tissue_mask", "tissue_stain"]

DEFAULT_DOWNSAMPLE = 32.0
#: grey level (0-255) at and above which a tissue-mask pixel is lumen/glass, not stained tissue
WHITE = 220.0
#: brightest channel (0-255) below which a pixel is ink or dirt, not stain
DARK = 40.0
_STRIP_PIXELS = 16_000_000


@dataclass
class TissueMask:
    """A binary tissue mask and where it sits on level 0 of its slide.

    Attributes
    ----------
    mask : ndarray of bool, shape (h, w)
        True where there is tissue. Mask pixel (r, c) covers the level-0 box
        ``[r*downsample, (r+1)*downsample) x [c*downsample, (c+1)*downsample)``.
    downsample : float
        Level-0 pixels per mask pixel (the same along Y and X).
    level0_shape : (int, int)
        (height, width) of level 0 of the slide; the last mask row/column may reach
        past it (that part was read as background).
    mpp : float or None
        µm per pixel of the mask, when the slide's pixel size is known.
    stain : dict or None
        Mean and standard deviation of the stained tissue's colour in the overview the mask was
        made from (:func:`tissue_stain`), compared with a model card's
        training stain by the run's notes.
    """

    mask: np.ndarray
    downsample: float
    level0_shape: tuple[int, int]
    mpp: float | None = None
    stain: dict | None = None

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        self.downsample = float(self.downsample)
        self.level0_shape = (int(self.level0_shape[0]), int(self.level0_shape[1]))
        self._integral: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape  # type: ignore[return-value]

    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 pixels per mask pixel as (Y, X), e.g. for a napari layer ``scale``."""
        return (self.downsample, self.downsample)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide area (level 0) covered by tissue."""
        h0, w0 = self.level0_shape
        return self.fraction(0, 0, h0, w0)

    def _sat(self) -> np.ndarray:
        if self._integral is None:
            s = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.float64)
            s[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1)
            self._integral = s
        return self._integral

    def fractions(self, ys: Any, xs: Any, h0: float, w0: float) -> np.ndarray:
        """Tissue fraction of many level-0 boxes of one size at once.

        Partial mask pixels count with the area they share with the box, and the
        part of a box outside the mask counts as background, so border tiles that
        hang over the slide edge get a proportionally smaller fraction.

        Parameters
        ----------
        ys, xs : array-like of float
            Level-0 top-left corners.
        h0, w0 : float
            Level-0 box height and width.
        """
        ys = np.asarray(ys, np.float64) / self.downsample
        xs = np.asarray(xs, np.float64) / self.downsample
        hh, ww = h0 / self.downsample, w0 / self.downsample
        s = self._sat()
        total = (
            _bilinear(s, ys + hh, xs + ww)
            - _bilinear(s, ys, xs + ww)
            - _bilinear(s, ys + hh, xs)
            + _bilinear(s, ys, xs)
        )
        return np.clip(total / max(hh * ww, 1e-12), 0.0, 1.0)

    def fraction(self, y0: float, x0: float, h0: float, w0: float) -> float:
        """Tissue fraction (0..1) of the level-0 box at (y0, x0) of size (h0, w0)."""
        return float(self.fractions([y0], [x0], h0, w0)[0])

    def to_level0_slices(self, row: int, col: int) -> tuple[slice, slice]:
        """Level-0 (Y, X) slices covered by mask pixel (row, col), clipped to the slide."""
        ds = self.downsample
        h0, w0 = self.level0_shape
        return (
            slice(min(round(row * ds), h0), min(round((row + 1) * ds), h0)),
            slice(min(round(col * ds), w0), min(round((col + 1) * ds), w0)),
        )

    def to_mask_slices(self, y0: float, x0: float, h0: float, w0: float) -> tuple[slice, slice]:
        """Mask (Y, X) slices of every mask pixel touching a level-0 box."""
        ds = self.downsample
        h, w = self.mask.shape
        r0, c0 = max(0, math.floor(y0 / ds)), max(0, math.floor(x0 / ds))
        r1 = min(h, math.ceil((y0 + h0) / ds))
        c1 = min(w, math.ceil((x0 + w0) / ds))
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _bilinear(s: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    # The integral image of a piecewise-constant mask is exactly bilinear inside
    # each cell, so interpolating it gives exact sums over fractional boxes.
    y = np.clip(y, 0.0, s.shape[0] - 1.0)
    x = np.clip(x, 0.0, s.shape[1] - 1.0)
    y0 = np.minimum(np.floor(y).astype(np.int64), s.shape[0] - 2)
    x0 = np.minimum(np.floor(x).astype(np.int64), s.shape[1] - 2)
    ty, tx = y - y0, x - x0
    return (
        s[y0, x0] * (1 - ty) * (1 - tx)
        + s[y0 + 1, x0] * ty * (1 - tx)
        + s[y0, x0 + 1] * (1 - ty) * tx
        + s[y0 + 1, x0 + 1] * ty * tx
    )


def rgb_tissue_mask(
    rgb: np.ndarray,
    *,
    method: str = "otsu",
    saturation_threshold: float | None = None,
    exclude_white: float | None = 220.0,
    exclude_dark: float | None = 40.0,
    closing_radius: int = 2,
    opening_radius: int = 1,
    min_object_area_px: int = 16,
    fill_holes: bool = True,
) -> np.ndarray:
    """Binary tissue mask of a small RGB image (no resizing); see :func:`tissue_mask`."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.float32)
    if rgb.size and rgb.max() <= 1.0:
        rgb = rgb * 255.0
    cmax, cmin = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0)
    grey = rgb @ np.array([0.2125, 0.7154, 0.0721], np.float32)

    if method == "otsu":
        thr = _otsu(grey, default=255.0)
        tissue = grey < thr
        if saturation_threshold is not None:
            tissue &= saturation > saturation_threshold
    elif method == "saturation":
        thr = saturation_threshold if saturation_threshold is not None else _otsu(saturation, default=1.0)
        tissue = saturation > thr
    else:
        raise ValueError(f"method must be 'otsu' or 'saturation', not {method!r}")
    if exclude_white is not None:
        tissue &= grey < exclude_white
    if exclude_dark is not None:
        tissue &= cmax >= exclude_dark

    if closing_radius > 0:
        tissue = _pad_op(ndi.binary_closing, tissue, closing_radius)
    if opening_radius > 0:
        tissue = _pad_op(ndi.binary_opening, tissue, opening_radius)
    if fill_holes:
        tissue = ndi.binary_fill_holes(tissue)
    if min_object_area_px > 0 and tissue.any():
        labels, n = ndi.label(tissue)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_object_area_px
        keep[0] = False
        tissue = keep[labels]
    return tissue.astype(bool)


def tissue_stain(rgb: np.ndarray, mask: np.ndarray | None = None) -> dict | None:
    """Mean and standard deviation (RGB, 0-1) of the stained tissue pixels of ``rgb``.

    Parameters
    ----------
    rgb : ndarray (h, w, 3)
        uint8 (0-255) or float (0-1) image.
    mask : ndarray of bool (h, w), optional
        Tissue; None = every pixel. White (lumen, glass) and near-black pixels are left out.

    Returns
    -------
    dict or None
        ``{"mean": [r, g, b], "std": [r, g, b], "pixels": n}``; None without stained pixels.

    Examples
    --------
    >>> img = np.full((4, 4, 3), 255, np.uint8); img[:2] = (200, 100, 180)
    >>> tissue_stain(img)["mean"]
    [0.784, 0.392, 0.706]
    """
    rgb = np.asarray(rgb)[..., :3].astype(np.float32)
    if rgb.size and rgb.max() <= 1.0:
        rgb = rgb * 255.0
    grey = rgb @ np.array([0.2125, 0.7154, 0.0721], np.float32)
    keep = (grey < WHITE) & (rgb.max(axis=-1) >= DARK) & np.isfinite(grey)
    if mask is not None:
        keep &= np.asarray(mask, bool)
    pixels = rgb[keep] / 255.0
    if len(pixels) == 0:
        return None
    return {
        "mean": [round(float(v), 3) for v in pixels.mean(axis=0)],
        "std": [round(float(v), 3) for v in pixels.std(axis=0)],
        "pixels": len(pixels),
    }


def _otsu(values: np.ndarray, default: float) -> float:
    v = values[np.isfinite(values)]
    if v.size == 0 or float(v.min()) == float(v.max()):
        return default
    return float(filters.threshold_otsu(v))


def _pad_op(op: Callable, mask: np.ndarray, radius: int) -> np.ndarray:
    # Without edge padding, closing/opening would erode tissue touching the border.
    padded = np.pad(mask, 2 * radius, mode="edge")
    out = op(padded, structure=morphology.disk(radius))
    return out[2 * radius : -2 * radius, 2 * radius : -2 * radius]


def tissue_mask(
    slide_or_rgb: Any,
    *,
    mpp: float = 8.0,
    downsample: float | None = None,
    image_mpp: float | None = None,
    method: str = "otsu",
    saturation_threshold: float | None = None,
    exclude_white: float | None = 220.0,
    exclude_dark: float | None = 40.0,
    closing_radius: int = 2,
    opening_radius: int = 1,
    min_object_area_um2: float = 10_000.0,
    min_object_area_px: int | None = None,
    fill_holes: bool = True,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> TissueMask:
    """Find the tissue on a slide (or on an RGB image) at low resolution.

    Parameters
    ----------
    slide_or_rgb : Slide or ndarray (h, w, 3)
        A slide from :func:`napari_pathfm.io.open_slide`, or an RGB image that is
        treated as level 0 (e.g. a thumbnail you already have).
    mpp : float
        Target µm per mask pixel. 8 µm/px (about one cell per pixel) is fine enough
        to tile at 256 px x 0.5 µm/px and small enough to compute in a second.
    downsample : float, optional
        Level-0 pixels per mask pixel; overrides ``mpp``. When neither can be used
        (pixel size unknown) it falls back to 32 for a slide and 1 for an array.
        The factor is rounded to a whole number of pixels of the pyramid level
        read, so mask pixels map exactly onto level-0 boxes.
    image_mpp : float, optional
        µm per pixel of an array input (slides know their own).
    method : {"otsu", "saturation"}
        ``"otsu"``: tissue is darker than the glass; the cut between the two is
        found by Otsu's method on the grey level. ``"saturation"``: tissue is
        coloured (stained), glass and grey/black debris are not; more robust on
        slides with uneven, greyish background, worse on faint stains.
    saturation_threshold : float, optional
        Colour saturation (0 grey .. 1 pure colour) a pixel needs to be tissue.
        For ``"saturation"`` it is found by Otsu's method when None; for
        ``"otsu"`` it is an extra requirement when given (e.g. 0.05).
    exclude_white : float or None
        Grey level (0-255) above which a pixel is always background: the bright
        glass and white areas. Lower it when background is not very white.
    exclude_dark : float or None
        Pixels whose brightest channel is below this (0-255) are never tissue:
        black pen marks, ink, scanner borders, dirt. None keeps them.
    closing_radius : int
        Radius in mask pixels of a morphological closing that joins fragments of
        loosely textured tissue (fat, stroma). 0 disables it.
    opening_radius : int
        Radius in mask pixels of an opening that removes thin threads and dust.
    min_object_area_um2 : float
        Tissue pieces smaller than this area in µm² are dropped (default 0.01 mm²).
    min_object_area_px : int, optional
        The same in mask pixels; wins over ``min_object_area_um2``. Used (16 by
        default) when the pixel size is unknown.
    fill_holes : bool
        Fill holes fully enclosed by tissue (gland lumens, vessels, fat), which
        are part of the tissue a pathologist looks at.
    progress, cancel
        Progress callback and cancel flag; see :mod:`napari_pathfm.progress`.

    Returns
    -------
    TissueMask

    Raises
    ------
    SlideError
        A slide whose overview is only NaN/Inf or one flat colour: that is a broken
        file, not a slide without tissue (:func:`napari_pathfm.io.slide.check_has_content`).

    Examples
    --------
    >>> rgb = np.full((64, 64, 3), 240, np.uint8)
    >>> rgb[16:48, 16:48] = (180, 90, 160)
    >>> tm = tissue_mask(rgb, downsample=2, min_object_area_px=0)
    >>> tm.mask.shape, round(tm.tissue_fraction, 2)
    ((32, 32), 0.25)
    """
    if isinstance(slide_or_rgb, np.ndarray):
        rgb, ds, src_mpp = _prepare_array(slide_or_rgb, mpp, downsample, image_mpp)
        shape0 = slide_or_rgb.shape[:2]
    else:
        rgb, ds, src_mpp = _read_slide(slide_or_rgb, mpp, downsample, progress, cancel)
        shape0 = tuple(slide_or_rgb.level_shapes[0])
    mask_mpp = src_mpp * ds if src_mpp else None
    if min_object_area_px is None:
        min_object_area_px = int(round(min_object_area_um2 / mask_mpp**2)) if mask_mpp else 16
    mask = rgb_tissue_mask(
        rgb,
        method=method,
        saturation_threshold=saturation_threshold,
        exclude_white=exclude_white,
        exclude_dark=exclude_dark,
        closing_radius=closing_radius,
        opening_radius=opening_radius,
        min_object_area_px=min_object_area_px,
        fill_holes=fill_holes,
    )
    return TissueMask(mask, ds, shape0, mask_mpp, stain=tissue_stain(rgb, mask))


def _prepare_array(rgb, mpp, downsample, image_mpp):
    if downsample is None:
        downsample = mpp / image_mpp if image_mpp else 1.0
    k = max(1, int(round(downsample)))
    return _block_mean(np.asarray(rgb)[..., :3], k, fill=255), float(k), image_mpp


def _read_slide(slide, mpp, downsample, progress, cancel):
    from ..io.slide import check_has_content

    if downsample is None:
        downsample = mpp / slide.mpp if slide.mpp else DEFAULT_DOWNSAMPLE
    downsample = max(1.0, float(downsample))
    level = slide.best_level_for_downsample(downsample)
    level_ds = float(slide.level_downsamples[level])
    k = max(1, int(round(downsample / level_ds)))
    lh, lw = slide.level_shapes[level]
    out_h, out_w = math.ceil(lh / k), math.ceil(lw / k)
    rows_per_strip = max(1, _STRIP_PIXELS // max(1, out_w * k * k))
    bg = tuple(getattr(slide, "background", (255, 255, 255)))
    out = np.empty((out_h, out_w, 3), np.float32)
    for r0 in range(0, out_h, rows_per_strip):
        check_cancel(cancel, "tissue detection")
        r1 = min(out_h, r0 + rows_per_strip)
        region = slide.read(level, r0 * k, 0, (r1 - r0) * k, out_w * k)
        out[r0:r1] = _block_mean(region, k, fill=bg)
        report(progress, r1, out_h, "detecting tissue")
    check_has_content(slide, out[: max(1, lh // k), : max(1, lw // k)])  # whole blocks: no edge padding
    return out, k * level_ds, slide.mpp


def _block_mean(rgb: np.ndarray, k: int, fill) -> np.ndarray:
    """Average k x k blocks (area interpolation), padding the edge with ``fill``."""
    h, w = rgb.shape[:2]
    oh, ow = math.ceil(h / k), math.ceil(w / k)
    if k == 1:
        return rgb.astype(np.float32)
    padded = np.empty((oh * k, ow * k, rgb.shape[2]), np.float32)
    padded[...] = np.asarray(fill, np.float32)
    padded[:h, :w] = rgb
    return padded.reshape(oh, k, ow, k, -1).mean(axis=(1, 3))
