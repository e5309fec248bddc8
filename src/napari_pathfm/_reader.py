"""napari reader contribution: whole slides as multiscale RGB layers, z-stacks with a Z slider,
QuPath GeoJSON / ASAP XML annotations as a Labels layer on their slide.

Following napari's convention, ``napari_get_reader`` returns ``None`` for paths it
cannot read (so another plugin can try) and never raises into napari.

Both run on napari's GUI thread, so they stay cheap (contract 10): no torch or other heavy
import, the slide opened to probe it is handed on to :func:`read_slide` instead of being opened
twice, and the layers are multiscale so napari reads only the tiles it shows.
"""

from __future__ import annotations

import logging
import sys
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
    if _annotation_format(p):
        return read_annotations_layer
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
    from .io.zstack_layers import zstack_layer_data

    if isinstance(path, (list, tuple)):
        path = path[0]
    return zstack_layer_data(Path(path))


def _annotation_format(p: Path) -> str | None:
    from .io.annotations import annotation_format

    return annotation_format(p)


def _slide_for(p: Path) -> tuple[float | None, tuple[int, int] | None]:
    """µm/px and level-0 ``(height, width)`` of the slide an annotation file belongs to.

    The slide open in the current viewer (the one named like the file if there are several), else
    a slide file next to it with the same stem (QuPath writes ``slide.geojson`` or
    ``slide.svs.geojson``); ``(None, None)`` when there is neither.
    """
    stem = p.name.split(".")[0]
    napari = sys.modules.get("napari")  # loaded when napari calls this reader; never imported from here
    try:
        viewer = napari.current_viewer() if napari is not None else None
    except Exception:  # noqa: BLE001 - no viewer (a script, a test): look next to the file
        viewer = None
    slides = [layer for layer in (viewer.layers if viewer else []) if "pathfm_slide" in (layer.metadata or {})]
    slides.sort(key=lambda layer: Path(str(layer.metadata.get("pathfm_path", ""))).name.split(".")[0] != stem)
    if slides:
        layer = slides[0]
        data = layer.data[0] if layer.multiscale else layer.data
        mpp = (layer.metadata["pathfm_slide"] or {}).get("mpp")
        return (float(mpp) if mpp else None), (int(data.shape[0]), int(data.shape[1]))
    from .io.slide import SLIDE_SUFFIXES, open_slide

    for candidate in sorted(p.parent.glob(f"{stem}.*")):
        if candidate.suffix.lower() in SLIDE_SUFFIXES and candidate != p:
            try:
                with open_slide(candidate) as slide:
                    return slide.mpp, tuple(int(s) for s in slide.level_shapes[0][:2])
            except Exception:  # noqa: BLE001 - not a slide after all: annotations stay in pixels
                log.info("napari-pathfm: %s is not a readable slide", candidate)
    return None, None


def annotation_layer_data(path: str | Path, mpp: float | None, slide_shape: tuple[int, int] | None) -> LayerData:
    """LayerData of a QuPath GeoJSON / ASAP XML file: one label per object, placed on the slide.

    Labels cover the annotations' bounding box (level 0 when it fits, else a power-of-two
    downsample, :func:`~napari_pathfm.io.annotations.label_grid`), at the slide's µm scale when
    ``mpp`` is known; the layer's ``classes`` metadata and features name each object's class and its
    colours are the file's, so saving the layer as GeoJSON/XML writes the same classes back.
    """
    import numpy as np

    from .colors import class_colors
    from .io.annotations import annotations_to_labels, label_grid, read_annotations

    p = Path(path)
    found = read_annotations(p)
    bounds = found.bounds() or (0.0, 0.0, 1.0, 1.0)
    ds, (y0, x0), shape = label_grid(bounds, slide_shape)
    labels, classes, colors = annotations_to_labels(found, shape, downsample=ds, offset=(y0, x0))
    names = dict(enumerate(sorted(set(classes.values())), start=1))
    by_name = {names[i]: rgb for i, rgb in class_colors(names).items()}  # classes without a colour in the file
    clear = [0.0, 0.0, 0.0, 0.0]
    colormap = {None: clear, 0: clear}
    colormap.update(
        {k: [c / 255 for c in colors.get(k) or by_name.get(n, (128, 128, 128))] + [1.0] for k, n in classes.items()}
    )
    unit = mpp or 1.0
    keys = sorted(classes)
    kwargs = {
        "name": p.name,
        "scale": (unit * ds, unit * ds),
        "translate": ((y0 + (ds - 1) / 2) * unit, (x0 + (ds - 1) / 2) * unit),
        "units": layer_units(mpp),
        "axis_labels": ("y", "x"),
        "colormap": colormap,
        "features": {"index": [0, *keys], "class": ["", *[classes[k] for k in keys]]},
        "metadata": {
            "classes": classes,
            "class_colors": found.class_colors(),  # the file's class colours, which the writers keep
            "downsample": ds,
            "pathfm_kind": "annotations",
            "pathfm_source": str(p),
            "pathfm_skipped": dict(found.skipped),
        },
    }
    if found.skipped:
        log.info("napari-pathfm: %s: left out %s (not areas)", p.name, found.skipped)
    return (np.asarray(labels), kwargs, "labels")


def read_annotations_layer(path: str | list[str]) -> list[LayerData]:
    """napari reader: a QuPath GeoJSON or ASAP XML file as a Labels layer on its slide."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    p = Path(path)
    mpp, shape = _slide_for(p)
    return [annotation_layer_data(p, mpp, shape)]
