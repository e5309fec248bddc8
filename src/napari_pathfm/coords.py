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


def rescale_slide_layers(layers, path: str, new_mpp: float | None, old_mpp: float | None) -> list:
    """Move every layer of the slide at ``path`` from ``old_mpp`` to ``new_mpp`` world units; returns them.

    For a slide whose file has no µm/px the plugin's layers start in pixels (scale 1 per level-0
    pixel); once the user enters a µm/px, all of that slide's layers (the image and every overlay
    that carries ``metadata["pathfm_of"] == path``) get the same factor on scale and translate and
    the same units, in one go, so napari never sees px in one layer and µm in another (its
    "Inconsistent units" warning is only checked at the next draw).
    """
    factor = (new_mpp or 1.0) / (old_mpp or 1.0)
    changed = []
    for layer in layers:
        meta = getattr(layer, "metadata", {})
        if meta.get("pathfm_path") != path and meta.get("pathfm_of") != path:
            continue
        nd = layer.ndim
        unit = "micrometer" if new_mpp else "pixel"
        # only the two spatial (Y, X) axes are in slide units; leading axes (channels, z) keep theirs
        scale, translate = list(layer.scale), list(layer.translate)
        for ax in (nd - 2, nd - 1):
            scale[ax] *= factor
            translate[ax] *= factor
        units = list(layer.units)
        units[nd - 2 :] = [unit, unit]
        layer.scale, layer.translate, layer.units = scale, translate, units
        if "pathfm_slide" in meta:
            meta["pathfm_slide"]["mpp"] = new_mpp
        changed.append(layer)
    return changed
