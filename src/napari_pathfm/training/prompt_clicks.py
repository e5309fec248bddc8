"""Simulated clicks and boxes from ground-truth masks, to train Path-SAM2's prompt path (SAM's recipe).

SAM learns interactive segmentation by being prompted, during training, the way a user would: a click
on an object, sometimes a box around it, sometimes a click on what is not the object, and learning
to return that object's mask. :func:`simulate_prompts` does this for a batch of training crops whose
masks hold classes (glands separated by background gaps, as GlaS draws them): each crop's objects are
the connected regions of its foreground classes; one is drawn at random (at least ``min_area`` px),
a positive click falls on one of its pixels well inside it (at least half its largest distance to the
edge), with probability ``p_negative`` a negative click falls on background within its box grown by a
quarter, and with probability ``p_box`` (one draw per batch, so the batch stacks) the prompt carries
its bounding box with each side moved by up to 10 % of the box (SAM's box noise), and then, for half
the crops, the box alone (its clicks become padding: how a drawn box arrives). The target is that
object alone. Numpy and SciPy; the crops' pixels are the model input's (``scale`` maps them).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["simulate_prompts"]


def _one(mask: np.ndarray, rng: np.random.Generator, min_area: int, p_negative: float, ignore: int):
    fg = (mask > 0) & (mask != ignore)
    objects, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = np.bincount(objects.ravel())[1:]
    big = np.flatnonzero(sizes >= min_area) + 1
    if big.size == 0:
        return None
    obj = objects == int(rng.choice(big))
    dist = ndimage.distance_transform_edt(obj)
    ys, xs = np.nonzero(dist >= 0.5 * dist.max())
    k = int(rng.integers(len(ys)))
    points, labels = [[float(xs[k]), float(ys[k])]], [1]
    oy, ox = np.nonzero(obj)
    y0, y1, x0, x1 = oy.min(), oy.max() + 1, ox.min(), ox.max() + 1
    if rng.random() < p_negative:
        gy, gx = (y1 - y0) // 4, (x1 - x0) // 4
        window = (slice(max(0, y0 - gy), y1 + gy), slice(max(0, x0 - gx), x1 + gx))
        by, bx = np.nonzero(~fg[window] & (mask[window] != ignore))
        if len(by):
            j = int(rng.integers(len(by)))
            points.append([float(bx[j] + window[1].start), float(by[j] + window[0].start)])
            labels.append(0)
    h, w = y1 - y0, x1 - x0
    box = np.array([x0, y0, x1, y1], np.float32) + rng.uniform(-0.1, 0.1, 4).astype(np.float32) * [w, h, w, h]
    target = np.where(mask == ignore, ignore, obj).astype(np.uint8)
    return points, labels, box, target


def simulate_prompts(
    masks: np.ndarray,
    rng: np.random.Generator,
    *,
    min_area: int = 64,
    p_negative: float = 0.3,
    p_box: float = 0.5,
    p_box_only: float = 0.5,
    ignore: int = 255,
    scale: float = 1.0,
) -> dict | None:
    """Prompts for a batch of class masks ``(B, H, W)``; None when no crop has an object.

    Returns ``{"index", "points" (b, 2, 2) x, y, "labels" (b, 2) with -1 padding, "boxes" (b, 4) or
    None, "targets" (b, H, W)}`` for the ``b`` crops that have an object (``index`` into the batch);
    coordinates are multiplied by ``scale`` (model input pixels per mask pixel). With boxes, each
    crop's clicks are all padding with probability ``p_box_only``: the box alone, as the Segment dock
    and ``pathfm prompt --box`` send it.

    >>> m = np.zeros((1, 32, 32), np.uint8); m[0, 8:24, 8:24] = 1
    >>> p = simulate_prompts(m, np.random.default_rng(0), min_area=10, p_negative=0.0)
    >>> p["index"].tolist(), p["labels"].tolist(), int(p["targets"].sum())
    ([0], [[1, -1]], 256)
    """
    found = [(i, _one(np.asarray(m), rng, min_area, p_negative, ignore)) for i, m in enumerate(masks)]
    found = [(i, f) for i, f in found if f is not None]
    if not found:
        return None
    points = np.zeros((len(found), 2, 2), np.float32)
    labels = np.full((len(found), 2), -1, np.int64)
    for row, (_, (pts, lbl, _, _)) in enumerate(found):
        points[row, : len(pts)] = pts
        labels[row, : len(lbl)] = lbl
    boxes = np.stack([f[2] for _, f in found]) * scale if rng.random() < p_box else None
    if boxes is not None:  # a box alone, as a user draws one: its crops' clicks become padding
        labels[rng.random(len(found)) < p_box_only] = -1
    return {
        "index": np.array([i for i, _ in found]),
        "points": points * scale,
        "labels": labels,
        "boxes": boxes,
        "targets": np.stack([f[3] for _, f in found]),
    }
