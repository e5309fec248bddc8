"""One colour per class, and the colormaps of the continuous overlays, shared by napari and the exports.

A class keeps the same colour in a napari Labels layer, in the QuPath GeoJSON written from it
(``classification.color``) and in OME-Zarr label metadata, because all of them take it from
:func:`class_colors`: the ``k``-th foreground class of a model card (label value ``k``, in the
card's order) gets the ``k``-th colour of a fixed 16-colour qualitative palette (Sasha Trubetskoy's
"distinct colours", readable on H&E); background (value 0, or a class named ``background``) is
transparent. A card may pin colours with ``class_colors: {name: [r, g, b]}``.

The continuous overlays get colormaps of their own, so a class-probability map, a Grad-CAM map and
a MIL attention heatmap are never confused on screen; each is transparent at its low end so the
tissue under "no evidence" stays visible. They are plain RGBA control points here (no napari
import: io/ exports use this module); ``widgets/_colormaps.py`` builds the napari objects from them.

>>> class_colors({0: "background", 1: "tumour", 2: "stroma"})
{1: (230, 25, 75), 2: (60, 180, 75)}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "BACKGROUND_NAMES",
    "CONTINUOUS",
    "PALETTE",
    "class_color",
    "class_colors",
    "normalize_class_names",
    "robust_limits",
]

#: Fixed qualitative palette (RGB 0–255), in order of assignment to foreground classes.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (0, 0, 128),
)

#: Class names drawn transparent (compared case-insensitively).
BACKGROUND_NAMES = frozenset({"background", "bg", "none", "unlabelled", "unlabeled"})

#: RGBA control points (0–1) and positions of the continuous overlays' colormaps, by kind.
CONTINUOUS: dict[str, tuple[list[list[float]], list[float]]] = {
    # class probability: transparent → deep blue → teal → yellow (viridis-like)
    "probability": (
        [[0, 0, 0, 0], [0.27, 0.0, 0.33, 0.55], [0.13, 0.57, 0.55, 0.8], [0.99, 0.91, 0.14, 1.0]],
        [0.0, 0.05, 0.55, 1.0],
    ),
    # Grad-CAM: transparent → purple → orange → yellow (inferno-like heat)
    "gradcam": (
        [[0, 0, 0, 0], [0.05, 0.0, 0.35, 0.75], [0.75, 0.1, 0.45, 0.85], [1.0, 0.55, 0.0, 0.9], [1.0, 1.0, 0.3, 1.0]],
        [0.0, 0.02, 0.4, 0.75, 1.0],
    ),
    # MIL attention / patch score: transparent → green → yellow → red
    "attention": (
        [[0, 0, 0, 0], [0.0, 0.55, 0.35, 0.6], [0.95, 0.85, 0.1, 0.85], [0.85, 0.05, 0.1, 1.0]],
        [0.0, 0.02, 0.5, 1.0],
    ),
}


def normalize_class_names(class_names: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    """``{value: name}`` from a mapping, a list indexed by label value, or None (empty)."""
    if class_names is None:
        return {}
    if isinstance(class_names, Mapping):
        return {int(k): str(v) for k, v in class_names.items()}
    return {i: str(n) for i, n in enumerate(class_names)}


def is_background(value: int, name: str | None) -> bool:
    """True for label value 0 or a class named like background (drawn transparent)."""
    return int(value) == 0 or (name is not None and name.strip().lower() in BACKGROUND_NAMES)


def class_colors(
    class_names: Mapping[int, str] | Sequence[str] | None,
    pinned: Mapping[str, Sequence[int]] | None = None,
) -> dict[int, tuple[int, int, int]]:
    """``{label value: (r, g, b)}`` (0–255) of the foreground classes; background values are left out.

    Parameters
    ----------
    class_names : ``{value: name}`` or a list indexed by value (a card's classes with 0 = background).
    pinned : ``{class name: (r, g, b)}`` from a model card's ``class_colors``; wins over the palette.

    The ``k``-th foreground value in ascending order takes ``PALETTE[k % 16]``, so a model's classes
    keep their colours from run to run and in every export.

    >>> class_colors(["background", "gland"], pinned={"gland": [0, 0, 255]})
    {1: (0, 0, 255)}
    """
    names = normalize_class_names(class_names)
    pinned = {str(k).lower(): v for k, v in (pinned or {}).items()}
    out: dict[int, tuple[int, int, int]] = {}
    k = 0
    for value in sorted(names):
        if is_background(value, names[value]):
            continue
        rgb = pinned.get(names[value].lower())
        out[value] = tuple(int(c) for c in rgb[:3]) if rgb is not None else PALETTE[k % len(PALETTE)]
        k += 1
    return out


def class_color(value: int, class_names: Mapping[int, str] | Sequence[str] | None = None) -> tuple[int, int, int]:
    """RGB colour of one label value: from :func:`class_colors` when named, else the palette by value.

    >>> class_color(3)
    (0, 130, 200)
    """
    colors = class_colors(class_names)
    if int(value) in colors:
        return colors[int(value)]
    return PALETTE[(int(value) - 1) % len(PALETTE)]


def robust_limits(data, low: float = 1.0, high: float = 99.0, max_samples: int = 1_000_000) -> tuple[float, float]:
    """Contrast limits ``(lo, hi)`` at the ``low``/``high`` percentiles of the finite values of ``data``.

    Large arrays are sampled with a regular stride (at most ``max_samples`` values), so this stays
    fast enough for a worker thread on a whole-slide map; a flat or empty input gives a range of
    width 1 (or around its value) so napari never gets equal limits.

    >>> robust_limits(np.arange(101.0))
    (1.0, 99.0)
    """
    shape = tuple(getattr(data, "shape", np.shape(data)))
    size = int(np.prod(shape)) if shape else 1
    if len(shape) >= 2 and size > max_samples:  # stride over Y and X before reading (zarr/dask stay lazy)
        step = int(np.ceil(np.sqrt(size / max_samples)))
        data = data[..., ::step, ::step]
    flat = np.asarray(data).reshape(-1)
    if flat.size > max_samples:
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat
    if flat.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(flat, [low, high]))
    if not hi > lo:
        lo, hi = float(flat.min()), float(flat.max())
    if not hi > lo:
        hi = lo + (abs(lo) * 1e-3 or 1.0)
    return lo, hi
