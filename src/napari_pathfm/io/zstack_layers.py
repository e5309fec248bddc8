"""napari layers of a brightfield z-stack: the stack with a Z slider plus one additive layer per target.

:func:`zstack_layer_data` turns what :func:`~napari_pathfm.io.zstack.open_zstack` opens into napari
LayerData tuples (colour per stain, contrast limits, physical scale and axis units);
:func:`get_zstack_reader` is the napari ``get_reader`` hook that returns it for z-stacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .zstack import ZStack, looks_like_zstack, open_zstack

__all__ = ["TARGET_COLORMAPS", "estimate_contrast_limits", "get_zstack_reader", "zstack_layer_data"]

#: napari colormap per target name (lower case); others cycle through _SPARE_COLORMAPS.
TARGET_COLORMAPS = {
    "nuclei": "blue",
    "dapi": "blue",
    "hoechst": "blue",
    "lipids": "green",
    "bodipy": "green",
    "cytoplasm": "red",
    "map2": "magenta",
    "nfh": "green",
    "tuj1": "yellow",
    "cellmask": "red",
}
_SPARE_COLORMAPS = ("cyan", "yellow", "magenta", "red", "green")


def _stem(zs: ZStack) -> str:
    p = Path(zs.metadata.get("folder", zs.path))
    return p.name[: -len("".join(p.suffixes))] if p.is_file() and p.suffixes else p.name


def estimate_contrast_limits(plane: Any, low: float = 0.5, high: float = 99.5) -> list[float]:
    """Percentile contrast limits from a strided sample of one 2-D plane (one file read)."""
    step = max(1, int(max(plane.shape) // 512))
    sample = np.asarray(plane[::step, ::step])
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    return [lo, hi if hi > lo else lo + 1.0]


def zstack_layer_data(path: str | Path, **kwargs: Any) -> list[tuple]:
    """napari LayerData tuples: the stack ``(Z, Y, X)`` plus one layer per target.

    The stack layer is gray with a Z slider and its plane names in ``metadata``;
    targets blend additively with a colour per stain (nuclei/DAPI blue, lipids green,
    cytoplasm red, MAP2 magenta, NFH green). ``kwargs`` go to :func:`open_zstack`.
    """
    zs = open_zstack(path, **kwargs)
    stem = _stem(zs)
    md = zs.metadata
    xy = md.get("PhysicalSizeX")
    scale = (md.get("PhysicalSizeZ", 1.0), md.get("PhysicalSizeY", xy), xy) if xy else None
    # Axis names and units: napari labels an unnamed axis "-3"; the Z slider reads "z", in µm when
    # the plane spacing is known, else as a plain plane index (napari's "pixel").
    units = ("micrometer" if xy and "PhysicalSizeZ" in md else "pixel",) + (
        ("micrometer",) * 2 if xy else ("pixel",) * 2
    )
    # The shown (middle) plane and every target are decoded here anyway (contrast limits): decode
    # them in parallel (Pillow/tifffile release the GIL). The middle plane stays in the plane cache
    # and the 2-D targets are handed to napari in memory, so napari's own first slice of these
    # layers on the GUI thread neither decodes them again nor pays dask's per-compute overhead.
    from concurrent.futures import ThreadPoolExecutor

    planes = [zs.data[zs.n_planes // 2], *zs.targets.values()]
    with ThreadPoolExecutor(max_workers=min(4, len(planes))) as pool:
        decoded = list(pool.map(np.asarray, planes))
    limits = [estimate_contrast_limits(a) for a in decoded]
    targets = dict(zip(zs.targets, decoded[1:]))
    common = {"path": str(zs.path), "zstack": md, "channel": zs.channel_name}
    stack_kwargs: dict[str, Any] = {
        "name": f"{stem} z-stack",
        "colormap": "gray",
        "contrast_limits": limits[0],
        "axis_labels": ("z", "y", "x"),
        "units": units,
        "metadata": {**common, "plane_names": zs.plane_names, "plane_files": [str(f) for f in zs.plane_files]},
    }
    if scale:
        stack_kwargs["scale"] = scale
    layers = [(zs.data, stack_kwargs, "image")]
    for i, (name, target) in enumerate(targets.items()):
        layers.append(
            (
                target,
                {
                    "name": f"{stem} {name}",
                    "blending": "additive",
                    "colormap": TARGET_COLORMAPS.get(name.lower(), _SPARE_COLORMAPS[i % len(_SPARE_COLORMAPS)]),
                    "contrast_limits": limits[1 + i],
                    "axis_labels": ("y", "x"),
                    "units": units[1:],
                    "metadata": {**common, "target": name, "files": md.get("target_files", {}).get(name, [])},
                    **({"scale": scale[1:]} if scale else {}),
                },
                "image",
            )
        )
    return layers


def get_zstack_reader(path: Any) -> Callable[..., list[tuple]] | None:
    """napari ``get_reader`` hook: :func:`zstack_layer_data` when ``path`` is a z-stack, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return zstack_layer_data if looks_like_zstack(path) else None
