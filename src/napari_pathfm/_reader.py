"""napari reader contribution: whole slides as multiscale RGB layers, z-stacks with a Z slider.

Following napari's convention, ``napari_get_reader`` returns ``None`` for paths it
cannot read (so another plugin can try) and never raises into napari.

Both run on napari's GUI thread, so they stay cheap (contract 10): no torch or other heavy
import, the slide opened to probe it is handed on to :func:`read_slide` instead of being opened
twice, and the layers are multiscale so napari reads only the tiles it shows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .coords import layer_units

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """Return a reader function for ``path`` or None if napari-pathfm cannot read it."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if _is_zstack(p):
        return read_zstack
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        return None
    try:
        from .io.slide import open_slide

        slide = open_slide(p)
    except Exception as exc:  # noqa: BLE001 - a reader must never crash napari
        log.info("napari-pathfm cannot read %s: %s", p, exc)
        return None
    _keep_probed(p, slide)
    return read_slide


#: The slide napari_get_reader just opened, handed on to read_slide (napari calls them back to back).
_probed: dict[str, Any] = {}


def _keep_probed(path: Path, slide) -> None:
    for old in _probed.values():
        old.close()
    _probed.clear()
    _probed[str(path)] = slide


def _take_probed(path) -> Any:
    """The slide opened by the last napari_get_reader for ``path``, or a freshly opened one."""
    slide = _probed.pop(str(Path(path)), None)
    if slide is not None:
        return slide
    from .io.slide import open_slide

    return open_slide(path)


def _is_zstack(p: Path) -> bool:
    try:
        from .io.zstack import looks_like_zstack
    except ImportError:
        return False
    try:
        return bool(looks_like_zstack(p))
    except Exception:  # noqa: BLE001 - a reader's probe must never crash napari: not a z-stack
        return False


def slide_layer_data(slide, name: str | None = None) -> LayerData:
    """LayerData for a :class:`~napari_pathfm.io.slide.Slide`: multiscale RGB, µm scale when known.

    Without a µm/px in the file the layer is in pixels (scale 1, units px) and
    ``metadata["pathfm_mpp_source"]`` is ``"unknown"``; the Slide dock then asks for the value and
    moves this layer and its overlays to µm together (:func:`~napari_pathfm.coords.rescale_slide_layers`).
    """
    scale = (slide.mpp, slide.mpp) if slide.mpp else (1.0, 1.0)
    kwargs = {
        "name": name or slide.path.name,
        "rgb": True,
        "multiscale": True,
        "scale": scale,
        "units": layer_units(slide.mpp),
        "axis_labels": ("y", "x"),
        "contrast_limits": (0, 255),
        "metadata": {
            "pathfm_slide": slide.metadata(),
            "pathfm_path": str(slide.path),
            "pathfm_mpp_source": "file" if slide.mpp else "unknown",
        },
    }
    return (slide.pyramid, kwargs, "image")


def read_slide(path: str | list[str]) -> list[LayerData]:
    """napari reader: one multiscale RGB layer for the slide at ``path``."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    return [slide_layer_data(_take_probed(path))]


def read_zstack(path: str | list[str]) -> list[LayerData]:
    from .io.zstack import zstack_layer_data

    if isinstance(path, (list, tuple)):
        path = path[0]
    return zstack_layer_data(Path(path))
