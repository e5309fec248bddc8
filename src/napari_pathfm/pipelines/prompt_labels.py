"""Prompted objects drawn as labels: into a writable level-0 array, or as a lazy slide-sized image.

Both keep what is already there: an object is drawn only where the labels are still 0, so earlier
objects (and a user's own painting) win where objects overlap. Used by ``pathfm prompt``
(:func:`napari_pathfm.pipelines.prompt.prompt_slide` writes :func:`objects_image`) and the prompt
benchmark; each object is a :class:`napari_pathfm.pipelines.prompt.PromptedObject` (``mask``, its
level-0 offset ``y0``/``x0`` and ``area``; typed ``Any`` here so that this module does not import
that one, which imports it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["objects_image", "paint_objects"]


def paint_objects(labels: Any, objects: list[Any], first_id: int) -> list[int]:
    """Draw ``objects`` into ``labels`` (level 0, writable) as ``first_id``, ``first_id + 1``, …, only where
    it is 0: nothing already there is overwritten. Returns the ids drawn (0 for an empty object)."""
    ids = []
    for k, obj in enumerate(objects):
        if not obj.area:
            ids.append(0)
            continue
        h, w = obj.mask.shape
        window = (slice(obj.y0, obj.y0 + h), slice(obj.x0, obj.x0 + w))
        region = np.asarray(labels[window])
        region = np.where(obj.mask & (region == 0), first_id + k, region).astype(region.dtype)
        labels[window] = region
        ids.append(first_id + k)
    return ids


def objects_image(objects: list[Any], shape: tuple[int, int], dtype: Any = np.uint32) -> Any:
    """A lazy (dask) level-0 labels image of ``objects``, object ``k`` as ``k + 1``, earlier ones first
    where they overlap; computed band by band, so a slide-sized image never sits in memory."""
    import dask.array as da

    def band(block: np.ndarray, block_info: Any = None) -> np.ndarray:
        (y0, y1), (x0, x1) = block_info[0]["array-location"]
        out = np.zeros(block.shape, dtype)
        for k, obj in enumerate(objects):
            h, w = obj.mask.shape
            oy0, ox0, oy1, ox1 = max(y0, obj.y0), max(x0, obj.x0), min(y1, obj.y0 + h), min(x1, obj.x0 + w)
            if oy0 >= oy1 or ox0 >= ox1:
                continue
            m = obj.mask[oy0 - obj.y0 : oy1 - obj.y0, ox0 - obj.x0 : ox1 - obj.x0]
            view = out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0]
            view[m & (view == 0)] = k + 1
        return out

    rows = max(1, min(shape[0], (64 << 20) // max(1, shape[1] * np.dtype(dtype).itemsize)))
    return da.zeros(shape, dtype=dtype, chunks=(rows, shape[1])).map_blocks(band, dtype=dtype)
