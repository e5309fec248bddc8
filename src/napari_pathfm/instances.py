"""A semantic class map → one object per gland: holes filled, crumbs dropped, touching glands split.

A segmenter that labels pixels "gland" merges neighbouring glands wherever its mask bridges the
thin gap between them, and leaves small fragments and holes (lumen) that the GlaS object metrics
count against it. :func:`split_objects` turns each foreground class of a class map into objects:

1. fill holes (a gland's lumen is part of the gland in GlaS's annotations);
2. drop connected regions under ``min_area_um2``;
3. split merged glands by a watershed of the distance to the background, seeded by its local maxima
   at least ``split_um`` apart (two glands joined by a narrow bridge have two distance peaks; the
   bridge is their saddle);
4. drop pieces under ``min_piece_um2`` that the split leaves.

A model trained with a gland-contour class (``data.contour_width``, :mod:`napari_pathfm.training.gland_targets`)
names it in ``contour_class``: then each connected interior (the other foreground classes) is one
object, the contour pixels go to the nearest interior, and no watershed is needed.

The result is an instance image (0 background, 1..N objects) and each object's class;
:func:`separate` cuts a one-pixel background line between touching objects of a class map, so its
connected regions — what a Labels layer shows and what the GeoJSON writer traces — are the objects.
Sizes are in µm so the same settings work at any pixel size. The defaults were chosen on 17 GlaS
training images (every fifth) with the bundled model and are what ``pathfm segment`` uses.
Pure numpy/scipy/scikit-image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ObjectOptions", "grow_interiors", "object_options", "separate", "split_objects"]


@dataclass(frozen=True)
class ObjectOptions:
    """How :func:`split_objects` turns a class's mask into objects (sizes in µm and µm²).

    ``split_um`` None keeps merged regions whole (holes and crumbs are still handled).
    ``contour_class``: the class of a contour model's gland contours; its pixels join the nearest
    interior (interiors under ``min_piece_um2`` are not seeds) and ``split_um`` is not used.
    """

    min_area_um2: float = 575.0
    split_um: float | None = 35.0
    min_piece_um2: float = 190.0
    fill_holes: bool = True
    contour_class: int | None = None


def object_options(value, card: dict | None = None) -> ObjectOptions | None:
    """The object settings of a run: ``None`` → the model card's ``objects`` (absent: no objects),
    ``True`` → the card's or the defaults, ``False`` → no objects, a dict or :class:`ObjectOptions` → those.

    A model's card names the settings it was evaluated with (the bundled GlaS model's recipe sets
    them), so ``pathfm segment`` gives that model's objects by default and other models' class
    maps stay as they are.

    >>> object_options(None, {"objects": {"split_um": 20}}).split_um, object_options(None, {})
    (20, None)
    """
    if isinstance(value, ObjectOptions) or value is False:
        return value or None
    from_card = (card or {}).get("objects")
    if value is None and not isinstance(from_card, dict):
        return None
    chosen = value if isinstance(value, dict) else from_card if isinstance(from_card, dict) else {}
    known = set(ObjectOptions.__dataclass_fields__)
    unknown = sorted(set(chosen) - known)
    if unknown:
        raise ValueError(f"unknown object settings {unknown}; known: {sorted(known)}")
    return ObjectOptions(**chosen)


def _pieces(region: np.ndarray, min_distance_px: int) -> np.ndarray:
    """Watershed of the distance transform inside one region (a crop with a background border),
    seeded by its maxima ``min_distance_px`` apart; at least one piece."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    dist = ndimage.distance_transform_edt(region)
    peaks = peak_local_max(dist, min_distance=max(1, min_distance_px), labels=region.astype(np.int32))
    if len(peaks) < 2:
        return region.astype(np.int32)
    markers = np.zeros(region.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return watershed(-dist, markers, mask=region).astype(np.int32)


def split_objects(
    class_map: np.ndarray,
    mpp: float | None,
    classes: Sequence[int] | None = None,
    options: ObjectOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Objects of every foreground class of a 2-D class map.

    Every step after the first labelling runs on one region's bounding box at a time, so the
    cost follows the foreground, not the image, and no single call holds the interpreter long.

    Parameters
    ----------
    class_map : ndarray (H, W) of int
        0 = background.
    mpp : float or None
        µm per pixel of ``class_map``; None takes 0.5 (a typical 20x scan) for the µm sizes.
    classes : sequence of int, optional
        Which classes become objects (default: every value > 0 present).
    options : ObjectOptions, optional

    Returns
    -------
    instances : ndarray (H, W) int32
        0 background, 1..N the objects (numbered by class, then in raster order of their regions).
    object_class : ndarray (N + 1,) uint8
        Class of each object; ``object_class[0] == 0``.

    Examples
    --------
    >>> m = np.zeros((40, 90), np.uint8); m[5:35, 5:40] = 1; m[5:35, 50:85] = 1; m[18:22, 40:50] = 1
    >>> inst, cls = split_objects(m, 1.0, options=ObjectOptions(min_area_um2=10, split_um=10, min_piece_um2=10))
    >>> int(inst.max()), cls.tolist()
    (2, [0, 1, 1])
    """
    from scipy import ndimage

    o = options or ObjectOptions()
    mpp = float(mpp or 0.5)
    min_area, min_piece = o.min_area_um2 / mpp**2, o.min_piece_um2 / mpp**2
    distance = int(round(o.split_um / mpp)) if o.split_um else 0
    class_map = np.asarray(class_map)
    todo = [int(c) for c in (classes if classes is not None else np.unique(class_map)) if int(c) > 0]
    if o.contour_class is not None:
        todo = [c for c in todo if c != o.contour_class]
        return _contour_objects(class_map, int(o.contour_class), todo, min_area, min_piece, o.fill_holes)
    instances = np.zeros(class_map.shape, np.int32)
    object_class = [0]
    for c in todo:
        lab, _ = ndimage.label(class_map == c)
        for i, sl in enumerate(ndimage.find_objects(lab), start=1):
            if sl is None:
                continue
            sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)  # a background border
            crop = lab[sl]
            region = crop == i
            if o.fill_holes:  # the lumen, not other regions that sit in it
                region |= ndimage.binary_fill_holes(region) & (crop == 0)
            if region.sum() < min_area:
                continue
            pieces = _pieces(region, distance) if distance else region.astype(np.int32)
            sizes = np.bincount(pieces.ravel())
            for p in np.flatnonzero(sizes >= min_piece):
                if p == 0:
                    continue
                instances[sl][(pieces == p) & (instances[sl] == 0)] = len(object_class)
                object_class.append(c)
    return instances, np.asarray(object_class, np.uint8)


def _contour_objects(
    class_map: np.ndarray, contour: int, classes: list[int], min_area: float, min_seed: float, fill_holes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split_objects` for a contour model (sizes in pixels): one object per interior, region by region.

    Each connected foreground region (interiors and contour, 8-connected) is cropped; its interiors
    (4-connected regions of ``classes``, at least ``min_seed`` px) are the seeds and every pixel of the
    region joins the nearest seed, so the contour between two interiors splits along its middle. A
    region without a seed (all contour) is one object of the first class. Objects under ``min_area``
    are dropped; holes are filled per object.
    """
    from scipy import ndimage

    fg = np.isin(class_map, [*classes, contour])
    regions, _ = ndimage.label(fg, np.ones((3, 3), bool))
    instances = np.zeros(class_map.shape, np.int32)
    object_class = [0]
    for i, sl in enumerate(ndimage.find_objects(regions), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)  # a background border
        crop, cm = regions[sl], class_map[sl]
        region = crop == i
        pieces, n = grow_interiors(region & np.isin(cm, classes), region, min_seed)
        if not n:
            pieces, n = region.astype(np.int32), 1
        for p in range(1, n + 1):
            obj = pieces == p
            if fill_holes:
                obj |= ndimage.binary_fill_holes(obj) & (crop == 0)  # the lumen, not other regions in it
            if obj.sum() < min_area:
                continue
            inside = cm[obj & np.isin(cm, classes)]
            c = int(np.bincount(inside).argmax()) if inside.size else (classes[0] if classes else contour)
            instances[sl][obj & (instances[sl] == 0)] = len(object_class)
            object_class.append(c)
    return instances, np.asarray(object_class, np.uint8)


def grow_interiors(interior: np.ndarray, region: np.ndarray, min_seed: float = 0) -> tuple[np.ndarray, int]:
    """Seeds are the 4-connected regions of ``interior`` of at least ``min_seed`` px; every pixel of
    ``region`` joins the nearest seed. Returns the labels (0 outside ``region``) and the number of seeds.

    >>> r = np.zeros((1, 7), bool); r[0, 1:6] = True; i = np.zeros_like(r); i[0, [1, 5]] = True
    >>> grow_interiors(i, r)[0].tolist()
    [[0, 1, 1, 1, 2, 2, 0]]
    """
    from scipy import ndimage

    seeds, n = ndimage.label(interior)
    if n and min_seed > 0:
        keep = np.bincount(seeds.ravel(), minlength=n + 1) >= min_seed
        keep[0] = False
        seeds, n = ndimage.label(keep[seeds])
    if n == 0:
        return np.zeros(region.shape, np.int32), 0
    _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    return np.where(region, seeds[iy, ix], 0).astype(np.int32), n


def separate(instances: np.ndarray, object_class: np.ndarray) -> np.ndarray:
    """Class map of ``instances`` with a one-pixel background line where two objects touch.

    A pixel of object ``a`` next to (8-connected) a pixel of a higher-numbered object becomes
    background, so no two objects touch, even diagonally, and the outer edges stay where they were.

    >>> inst = np.array([[1, 1, 2, 2, 0]]); separate(inst, np.array([0, 1, 1])).tolist()
    [[1, 0, 1, 1, 0]]
    """
    from scipy import ndimage

    instances = np.asarray(instances)
    edge = (ndimage.grey_dilation(instances, size=3) > instances) & (instances > 0)
    out = np.asarray(object_class, np.uint8)[instances]
    out[edge] = 0
    return out
