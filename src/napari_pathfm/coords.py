"""Coordinate contract (4): place any slide-level output exactly over the slide in napari.

A slide layer has scale ``(mpp, mpp)`` (µm) and translate 0, so level-0 pixel ``j``
is centred at ``j * mpp``. An output whose pixel ``i`` covers level-0 pixels
``[offset + i*ds, offset + (i+1)*ds)`` is centred at ``offset + i*ds + (ds-1)/2`` in
level-0 pixels; :func:`layer_transform` turns that into napari scale/translate.
"""

from __future__ import annotations


def layer_transform(
    slide_mpp: float | None, downsample: float | tuple[float, float] = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Return ``(scale, translate)`` for a (Y, X) output of a slide.

    Parameters
    ----------
    slide_mpp : float or None
        µm/px at level 0; None means the slide layer is in pixels (scale 1).
    downsample : float or (dy, dx)
        Level-0 pixels per output pixel.
    offset : (y, x)
        Level-0 pixel where the output's first pixel starts.

    >>> layer_transform(0.5, 4.0)
    ((2.0, 2.0), (0.75, 0.75))
    """
    unit = slide_mpp or 1.0
    dy, dx = (downsample, downsample) if isinstance(downsample, (int, float)) else downsample
    scale = (dy * unit, dx * unit)
    translate = ((offset[0] + (dy - 1) / 2) * unit, (offset[1] + (dx - 1) / 2) * unit)
    return scale, translate


def layer_units(slide_mpp: float | None) -> tuple[str, str]:
    """napari ``units`` matching :func:`layer_transform`: micrometres when µm/px is known."""
    return ("micrometer", "micrometer") if slide_mpp else ("pixel", "pixel")
