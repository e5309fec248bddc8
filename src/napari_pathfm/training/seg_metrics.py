"""Segmentation metrics over class maps: Dice and IoU per class, gland object-level F1.

Numpy in, numpy (or plain floats) out; no torch. Every function takes a predicted
class map and a ground-truth class map of the same shape (integers, class 0 =
background) and skips the pixels where the ground truth equals ``ignore_index``.

Pixel metrics come from a confusion matrix, so they can be pooled over many
images by adding the matrices (what the trainer does): Dice of class ``c`` is
``2 TP / (2 TP + FP + FN)`` and IoU is ``TP / (TP + FP + FN)``, NaN when the class
is in neither map.

Object Dice and object Hausdorff (:func:`object_dice_hausdorff`) are the challenge's other two
metrics: each ground-truth object is paired with the predicted object it overlaps most and each
predicted object with the ground-truth object it overlaps most (the nearest one, by Hausdorff
distance, when it overlaps none), and Dice / Hausdorff of the pairs are averaged with weights
proportional to object area, half over each side.

Object F1 follows the GlaS challenge (Sirinukunwattana et al. 2017): objects are
the connected components of each foreground class (8-connectivity by default);
a predicted object is a true positive when it covers more than 50% of the
ground-truth object it overlaps most, and each ground-truth object is matched
at most once. Unmatched predicted objects are false positives, unmatched
ground-truth objects false negatives. Counts pool over images before F1 is
taken. Note that the GlaS masks shipped as binary images have no instance ids, so
touching glands form one ground-truth object.

Examples
--------
>>> import numpy as np
>>> gt = np.array([[0, 1, 1], [0, 1, 1], [0, 0, 0]])
>>> pred = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0]])
>>> dice_per_class(pred, gt, 2).round(3).tolist()
[0.909, 0.857]
>>> object_f1(pred, gt)
1.0
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = [
    "confusion_matrix",
    "dice_iou",
    "dice_per_class",
    "f1_from_counts",
    "iou_per_class",
    "object_counts",
    "object_dice_hausdorff",
    "object_f1",
    "segmentation_metrics",
]


def _check(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {target.shape}")
    return pred, target


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = 255
) -> np.ndarray:
    """Pixel counts ``cm[true, predicted]`` (int64, ``(K, K)``) over the pixels not ignored.

    Values outside ``0..K-1`` (other than ``ignore_index`` in the ground truth)
    raise ``ValueError``.

    >>> confusion_matrix(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 255]), 2).tolist()
    [[1, 1], [0, 1]]
    """
    pred, target = _check(pred, target)
    keep = np.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    t = target[keep].astype(np.int64).ravel()
    p = pred[keep].astype(np.int64).ravel()
    for what, v in (("ground truth", t), ("prediction", p)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            bad = sorted(set(np.unique(v).tolist()) - set(range(num_classes)))
            raise ValueError(f"{what} has values {bad} outside the {num_classes} classes (ignore={ignore_index})")
    cm = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).astype(np.int64)


def dice_iou(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class Dice and IoU (float64, NaN for a class absent from both maps) from a confusion matrix.

    >>> d, i = dice_iou(np.array([[1, 1], [0, 1]]))
    >>> d.round(3).tolist(), i.round(3).tolist()
    ([0.667, 0.667], [0.5, 0.5])
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    return dice, iou


def dice_per_class(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = 255
) -> np.ndarray:
    """Dice of every class ``0..K-1`` (NaN where the class is in neither map)."""
    return dice_iou(confusion_matrix(pred, target, num_classes, ignore_index))[0]


def iou_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """IoU (Jaccard) of every class ``0..K-1`` (NaN where the class is in neither map)."""
    return dice_iou(confusion_matrix(pred, target, num_classes, ignore_index))[1]


def _structure(connectivity: int) -> np.ndarray:
    if connectivity == 8:
        return np.ones((3, 3), bool)
    if connectivity == 4:
        return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    raise ValueError(f"connectivity must be 4 or 8, not {connectivity}")


def object_counts(
    pred: np.ndarray,
    target: np.ndarray,
    cls: int = 1,
    ignore_index: int | None = 255,
    connectivity: int = 8,
    min_size: int = 0,
) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` object counts of class ``cls`` under the GlaS matching rule.

    Parameters
    ----------
    pred, target : ndarray (H, W)
        Class maps. Pixels where ``target == ignore_index`` are removed from the
        prediction before its objects are found.
    cls : int
        The foreground class whose connected components are the objects.
    connectivity : 4 or 8
        Pixel neighbourhood of a connected component.
    min_size : int
        Predicted objects with fewer pixels are dropped first (0 keeps all).

    >>> gt = np.zeros((5, 5), int); gt[0:2, 0:2] = 1; gt[3:5, 3:5] = 1
    >>> pred = np.zeros((5, 5), int); pred[0:2, 0:2] = 1; pred[4, 0] = 1
    >>> object_counts(pred, gt)
    (1, 1, 1)
    """
    from scipy import ndimage

    pred, target = _check(pred, target)
    if pred.ndim != 2:
        raise ValueError(f"object_counts needs 2-D class maps, not shape {pred.shape}")
    structure = _structure(connectivity)
    p_mask = pred == cls
    if ignore_index is not None:
        p_mask &= target != ignore_index
    g_lab, n_g = ndimage.label(target == cls, structure=structure)
    p_lab, n_p = ndimage.label(p_mask, structure=structure)
    if min_size > 0 and n_p:
        sizes = np.bincount(p_lab.ravel(), minlength=n_p + 1)
        small = sizes < min_size
        small[0] = False
        p_lab[small[p_lab]] = 0
        p_lab, n_p = ndimage.label(p_lab > 0, structure=structure)
    if n_p == 0 or n_g == 0:
        return 0, int(n_p), int(n_g)
    g_size = np.bincount(g_lab.ravel(), minlength=n_g + 1)
    # overlap[i, j]: pixels of predicted object i in ground-truth object j (index 0 = none)
    overlap = np.bincount(p_lab.ravel() * (n_g + 1) + g_lab.ravel(), minlength=(n_p + 1) * (n_g + 1))
    overlap = overlap.reshape(n_p + 1, n_g + 1)[1:, 1:]
    best = overlap.argmax(1)  # the ground-truth object each predicted object overlaps most
    hit = overlap[np.arange(n_p), best] > 0.5 * g_size[1:][best]
    matched = np.zeros(n_g, bool)
    tp = 0
    for i in np.flatnonzero(hit):  # more than half of a GT object: at most one predicted object can do that
        if not matched[best[i]]:
            matched[best[i]] = True
            tp += 1
    return tp, int(n_p - tp), int(n_g - tp)


def _labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=_structure(connectivity))
    return lab, int(n)


def _hausdorff(a: np.ndarray, b: np.ndarray, dist_to: dict, key_a, key_b) -> float:
    """Symmetric Hausdorff distance (pixels) of two boolean masks, with cached distance transforms.

    ``max over a of dist(a, B)`` is the largest value of B's outside distance transform on A (exact:
    points of A inside B are at 0), and the same the other way round.
    """
    from scipy import ndimage

    for key, m in ((key_a, a), (key_b, b)):
        if key not in dist_to:
            dist_to[key] = ndimage.distance_transform_edt(~m)
    return float(max(dist_to[key_b][a].max(), dist_to[key_a][b].max()))


def _one_side(src_lab, n_src, dst_lab, n_dst, sizes_src, overlap, dist_to, src_key, dst_key):
    """Area-weighted Dice and Hausdorff of each ``src`` object with its best ``dst`` partner."""
    total = sizes_src[1:].sum()
    dice = haus = 0.0
    for i in range(1, n_src + 1):
        a = src_lab == i
        row = overlap[i, 1:]
        if row.max() > 0:
            j = int(row.argmax()) + 1
            b = dst_lab == j
            d = 2.0 * row[j - 1] / (sizes_src[i] + b.sum())
            h = _hausdorff(a, b, dist_to, (src_key, i), (dst_key, j))
        else:  # no overlap: Dice 0, Hausdorff to the nearest partner
            d = 0.0
            h = min(_hausdorff(a, dst_lab == j, dist_to, (src_key, i), (dst_key, j)) for j in range(1, n_dst + 1))
        w = sizes_src[i] / total
        dice += w * d
        haus += w * h
    return dice, haus


def object_dice_hausdorff(
    pred: np.ndarray,
    target: np.ndarray,
    cls: int = 1,
    ignore_index: int | None = 255,
    connectivity: int = 8,
) -> tuple[float, float]:
    """The GlaS challenge's object Dice and object Hausdorff (pixels) of class ``cls`` on one image.

    ``D = ½ [Σ_i γ_i Dice(G_i, S*(G_i)) + Σ_j σ_j Dice(G*(S_j), S_j)]`` with ``γ_i``, ``σ_j`` the
    area shares of ground-truth object ``G_i`` and predicted object ``S_j`` and ``*`` the partner
    that overlaps most (Dice 0 without overlap); the Hausdorff distance likewise, the partner of an
    object that overlaps none being the nearest one. Without objects on one side: Dice 0 and
    Hausdorff NaN (no partner at all); without objects on both, Dice 1 and Hausdorff 0.

    >>> gt = np.zeros((8, 8), int); gt[1:4, 1:4] = 1; gt[5:7, 5:7] = 1
    >>> pred = np.zeros((8, 8), int); pred[1:4, 1:4] = 1
    >>> d, h = object_dice_hausdorff(pred, gt)
    >>> round(d, 3), round(h, 3)
    (0.846, 0.87)
    """
    pred, target = _check(pred, target)
    p_mask = pred == cls
    if ignore_index is not None:
        p_mask &= target != ignore_index
    g_lab, n_g = _labels(target == cls, connectivity)
    p_lab, n_p = _labels(p_mask, connectivity)
    if n_g == 0 and n_p == 0:
        return 1.0, 0.0
    if n_g == 0 or n_p == 0:
        return 0.0, float("nan")
    g_size = np.bincount(g_lab.ravel(), minlength=n_g + 1)
    p_size = np.bincount(p_lab.ravel(), minlength=n_p + 1)
    overlap = np.bincount(g_lab.ravel() * (n_p + 1) + p_lab.ravel(), minlength=(n_g + 1) * (n_p + 1))
    overlap = overlap.reshape(n_g + 1, n_p + 1)
    dist_to: dict = {}
    d_g, h_g = _one_side(g_lab, n_g, p_lab, n_p, g_size, overlap, dist_to, "g", "p")
    d_p, h_p = _one_side(p_lab, n_p, g_lab, n_g, p_size, overlap.T, dist_to, "p", "g")
    return float(0.5 * (d_g + d_p)), float(0.5 * (h_g + h_p))


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """``2 TP / (2 TP + FP + FN)``; 1.0 when there are no objects at all, in either map."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else float(2 * tp / denom)


def object_f1(
    pred: np.ndarray,
    target: np.ndarray,
    classes: Iterable[int] | None = None,
    ignore_index: int | None = 255,
    connectivity: int = 8,
    min_size: int = 0,
) -> float:
    """Object-level F1 pooled over the foreground ``classes`` (default: every class > 0 in either map).

    ``pred`` and ``target`` may be one ``(H, W)`` map or a stack ``(N, H, W)`` of
    maps; counts pool over the stack before F1 is taken.
    """
    pred, target = _check(pred, target)
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if classes is None:
        values = set(np.unique(pred).tolist()) | set(np.unique(target).tolist())
        classes = sorted(v for v in values if v > 0 and v != ignore_index)
    tp = fp = fn = 0
    for c in classes:
        for p, t in zip(pred, target):
            a, b, d = object_counts(p, t, int(c), ignore_index, connectivity, min_size)
            tp, fp, fn = tp + a, fp + b, fn + d
    return f1_from_counts(tp, fp, fn)


def segmentation_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    class_names: list[str] | None = None,
    ignore_index: int | None = 255,
    connectivity: int = 8,
) -> dict[str, float]:
    """Dice, IoU (per class and mean over the foreground classes) and the GlaS object metrics of one map or a stack.

    Returns
    -------
    dict
        ``dice``, ``iou`` (means over classes 1..K-1 that are present),
        ``dice_<name>``, ``iou_<name>`` for every class, ``object_f1`` (pooled), and ``object_dice`` and
        ``object_hausdorff`` (pixels) averaged over images and foreground classes (images where one side
        has no object have no Hausdorff distance and are left out of that mean).
    """
    pred, target = _check(pred, target)
    dice, iou = dice_iou(confusion_matrix(pred, target, num_classes, ignore_index))
    names = class_names or [f"class_{i}" for i in range(num_classes)]
    fg = slice(1, None) if num_classes > 1 else slice(0, None)
    with np.errstate(invalid="ignore"):
        out = {
            "dice": float(np.nanmean(dice[fg])) if np.isfinite(dice[fg]).any() else float("nan"),
            "iou": float(np.nanmean(iou[fg])) if np.isfinite(iou[fg]).any() else float("nan"),
        }
    for i, name in enumerate(names):
        out[f"dice_{name}"], out[f"iou_{name}"] = float(dice[i]), float(iou[i])
    out["object_f1"] = object_f1(pred, target, range(1, num_classes), ignore_index, connectivity)
    pairs = [
        object_dice_hausdorff(p, t, c, ignore_index, connectivity)
        for c in range(1, num_classes)
        for p, t in zip(*(m[None] if m.ndim == 2 else m for m in (pred, target)))
    ]
    hausdorff = [h for _d, h in pairs if np.isfinite(h)]
    out["object_dice"] = float(np.mean([d for d, _h in pairs])) if pairs else float("nan")
    out["object_hausdorff"] = float(np.mean(hausdorff)) if hausdorff else float("nan")
    return out
