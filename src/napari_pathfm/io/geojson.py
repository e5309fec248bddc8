"""Label images to QuPath-style GeoJSON polygons and back, exactly.

Polygons are traced along pixel edges (not through pixel centres, as marching squares does),
so every vertex lies on the pixel-corner grid and rasterising the polygons back at pixel
centres reproduces the mask exactly. Each 4-connected region of each class becomes one
Feature (``connectivity=2`` groups diagonally touching regions into a MultiPolygon).

Orientation follows RFC 7946 in the numbers as written: exteriors have positive shoelace area
(counter-clockwise with y up; they look clockwise on screen, where y points down) and holes
negative. Where two pixels of a region touch only at a corner the rings are split there, so
rings are simple and a pinched-off background pocket becomes a hole touching its exterior at
one point, which is valid OGC geometry (QuPath/JTS accept it).

Coordinates are level-0 pixels: a label pixel ``(r, c)`` covers
``[offset_x + c*downsample, offset_x + (c+1)*downsample)`` and likewise in y. Properties follow
QuPath: ``{"objectType": "annotation", "classification": {"name", "color"}, "label": int}``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..colors import PALETTE, class_colors, normalize_class_names
from ..errors import PathFMError
from .atomic import atomic_path

__all__ = ["class_color", "geojson_to_labels", "labels_to_geojson", "normalize_class_names", "write_geojson"]


def class_color(value: int, colors: dict[int, Sequence[int]] | Sequence | None = None) -> list[int]:
    """RGB colour of a label value: from ``colors`` if given, else :data:`~napari_pathfm.colors.PALETTE` by value.

    :func:`labels_to_geojson` passes :func:`napari_pathfm.colors.class_colors` of the class names by
    default, so a class has the colour its napari Labels layer shows.
    """
    if colors is not None:
        try:
            return [int(c) for c in colors[value]][:3]
        except (KeyError, IndexError):
            pass
    return list(PALETTE[(int(value) - 1) % len(PALETTE)])


def _boundary_edges(mask: np.ndarray):
    """Directed pixel edges of a padded mask, foreground on the left (x right, y down).

    Returns start vertex ids, end vertex ids and the foreground pixel id of each edge;
    vertex ``(y, x)`` of the padded grid has id ``y * (W + 1) + x``.
    """
    m = np.pad(mask.astype(bool), 1)
    _h, w = m.shape
    v = w + 1
    starts, ends, pixels = [], [], []
    top = np.nonzero(m[1:] & ~m[:-1])
    bot = np.nonzero(m[:-1] & ~m[1:])
    left = np.nonzero(m[:, 1:] & ~m[:, :-1])
    right = np.nonzero(m[:, :-1] & ~m[:, 1:])
    for (r, c), sy, sx, ey, ex, py, px in (
        (top, 1, 0, 1, 1, 1, 0),
        (bot, 1, 1, 1, 0, 0, 0),
        (left, 1, 1, 0, 1, 0, 1),
        (right, 0, 1, 1, 1, 0, 0),
    ):
        starts.append((r + sy) * v + c + sx)
        ends.append((r + ey) * v + c + ex)
        pixels.append((r + py) * w + c + px)
    return np.concatenate(starts), np.concatenate(ends), np.concatenate(pixels), v, w


def _split_at_repeats(ring: list[int], start: list[int]) -> list[list[int]]:
    """Split a closed edge walk into simple loops wherever it revisits a vertex."""
    out, stack, pos = [], [], {}
    for e in ring:
        s = start[e]
        if s in pos:
            i = pos[s]
            out.append(stack[i:])
            for f in stack[i + 1 :]:
                pos.pop(start[f], None)
            del stack[i:]
        pos[s] = len(stack)
        stack.append(e)
    if stack:
        out.append(stack)
    return out


def _walk(nxt: list[int]) -> list[list[int]]:
    """Decompose the successor permutation ``nxt`` into its cycles (lists of edge ids)."""
    seen = bytearray(len(nxt))
    rings = []
    for e0 in range(len(nxt)):
        if seen[e0]:
            continue
        ring = []
        e = e0
        while not seen[e]:
            seen[e] = 1
            ring.append(e)
            e = nxt[e]
        rings.append(ring)
    return rings


def _flatten(rings: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lens = np.fromiter((len(r) for r in rings), np.int64, len(rings))
    flat = np.fromiter(itertools.chain.from_iterable(rings), np.int64, int(lens.sum()))
    return flat, lens, np.cumsum(lens) - lens


def _neighbours(lens: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Previous and next position of every vertex within its own cyclic ring, and its ring."""
    idx = np.arange(int(lens.sum()))
    prev, nxt = idx - 1, idx + 1
    prev[first] = first + lens - 1
    nxt[first + lens - 1] = first
    return prev, nxt, np.repeat(np.arange(len(lens)), lens)


def _trace(mask: np.ndarray) -> list[tuple[np.ndarray, float, int]]:
    """Simple closed rings along pixel edges: ``(vertices (n, 2) as (y, x), area, pixel id)``.

    At corner-only contacts the walk turns around the same pixel (foreground 4-connected),
    then rings that still pass a vertex twice are split there. Vertices are in unpadded
    pixel-corner coordinates with collinear points removed; ``area`` is the signed shoelace
    area in (x, y) (positive for exteriors); ``pixel id`` is a padded foreground pixel beside
    the ring's first edge.
    """
    start, end, pix, v, _ = _boundary_edges(mask)
    if start.size == 0:
        return []
    order = np.argsort(start, kind="stable")
    sorted_start = start[order]
    lo = np.searchsorted(sorted_start, end, "left")
    saddle = np.searchsorted(sorted_start, end, "right") - lo == 2
    nxt = order[lo]
    if saddle.any():
        alt = order[np.minimum(lo + 1, len(order) - 1)]
        nxt = np.where(saddle & (pix[nxt] != pix), alt, nxt)
    rings = _walk(nxt.tolist())
    if saddle.any():
        flat, lens, _ = _flatten(rings)
        at_saddle = np.isin(start[flat], end[saddle])
        pinched = set(np.repeat(np.arange(len(rings)), lens)[at_saddle].tolist())
        start_l = start.tolist()
        rings = [
            piece
            for i, ring in enumerate(rings)
            for piece in (_split_at_repeats(ring, start_l) if i in pinched else [ring])
        ]
    flat, lens, first = _flatten(rings)
    ring_pix = pix[flat[first]]
    ids = start[flat]
    yx = np.stack([ids // v - 1, ids % v - 1], axis=1)
    prev, nxt_pos, ring_of = _neighbours(lens, first)
    corner = np.any(yx - yx[prev] != yx[nxt_pos] - yx, axis=1)
    yx = yx[corner]
    lens = np.bincount(ring_of[corner], minlength=len(lens))
    first = np.cumsum(lens) - lens
    _, nxt_pos, _ = _neighbours(lens, first)
    y, x = yx[:, 0].astype(np.float64), yx[:, 1].astype(np.float64)
    areas = 0.5 * np.add.reduceat(x * y[nxt_pos] - x[nxt_pos] * y, first)
    pieces = np.split(yx, first[1:])
    return list(zip(pieces, areas.tolist(), ring_pix.tolist()))


def _contains(yx: np.ndarray, py: float, px: float) -> bool:
    y, x = yx[:, 0], yx[:, 1]
    y2, x2 = np.roll(y, -1), np.roll(x, -1)
    cross = (y > py) != (y2 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x + (py - y) * (x2 - x) / (y2 - y)
    return bool(np.count_nonzero(cross & (px < xs)) % 2)


def _simplify(yx: np.ndarray, tol: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring (breaks exactness; may self-intersect at large tol)."""
    n = len(yx)
    if tol <= 0 or n <= 4:
        return yx
    far = int(np.argmax(np.hypot(*(yx - yx[0]).T)))
    keep = np.zeros(n + 1, bool)
    keep[[0, far, n]] = True
    pts = np.vstack([yx, yx[:1]]).astype(np.float64)
    stack = [(0, far), (far, n)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = pts[b] - pts[a]
        rel = pts[a + 1 : b] - pts[a]
        norm = np.hypot(*seg)
        dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / norm if norm else np.hypot(*rel.T)
        i = int(np.argmax(dist))
        if dist[i] > tol:
            keep[a + 1 + i] = True
            stack += [(a, a + 1 + i), (a + 1 + i, b)]
    out = yx[keep[:n]]
    return out if len(out) >= 3 else yx


def _coords(yx: np.ndarray, downsample: float, offset: Sequence[float]) -> list:
    xy = np.asarray(offset[::-1], np.float64) + yx[:, ::-1] * downsample
    xy = np.vstack([xy, xy[:1]])
    return xy.astype(np.int64).tolist() if np.all(xy == np.round(xy)) else xy.tolist()


def labels_to_geojson(
    labels: np.ndarray,
    class_names: dict[int, str] | Sequence[str] | None = None,
    *,
    downsample: float = 1.0,
    offset: Sequence[float] = (0, 0),
    colors: dict[int, Sequence[int]] | Sequence | None = None,
    min_area_px: int = 0,
    simplify_tolerance: float = 0.0,
    connectivity: int = 1,
    background: int = 0,
    per_value: bool = False,
    unclassified: str | None = None,
) -> dict:
    """Trace every region of every class of a 2-D label image into a GeoJSON FeatureCollection.

    Parameters
    ----------
    labels : 2-D integer (or bool) label image; ``background`` is skipped.
    class_names : ``{value: name}`` or a list indexed by value; else ``"class <value>"``.
    downsample, offset : level-0 pixels per label pixel; level-0 ``(y0, x0)`` of label (0, 0).
    colors : ``{value: (r, g, b)}``; default :func:`napari_pathfm.colors.class_colors` of the class
        names (the colours napari-pathfm's Labels layers show), else the palette by value.
    min_area_px : drop regions with fewer label pixels than this.
    simplify_tolerance : Douglas-Peucker tolerance in label pixels; 0 keeps polygons exact.
    connectivity : 1: one Polygon per 4-connected region; 2: regions touching diagonally
        form one MultiPolygon feature.
    per_value : every region of a value in one (Multi)Polygon feature: for object images, where a
        value is one object (an annotation read from QuPath as a MultiPolygon stays one).
    unclassified : features of the class with this name get no ``classification`` (QuPath's
        unclassified objects).

    Examples
    --------
    >>> fc = labels_to_geojson(np.array([[0, 1], [1, 1]]), ["bg", "gland"])
    >>> fc["features"][0]["geometry"]["coordinates"]
    [[[1, 0], [2, 0], [2, 2], [0, 2], [0, 1], [1, 1], [1, 0]]]
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    names = normalize_class_names(class_names)
    if colors is None:
        colors = class_colors(names)
    w = labels.shape[1]
    features = []
    for value in np.unique(labels):
        if value == background:
            continue
        value = int(value)
        mask = labels == value
        comp4, _ = ndimage.label(mask)
        if per_value:
            groups = mask.astype(np.int32)
        else:
            groups = comp4 if connectivity == 1 else ndimage.label(mask, np.ones((3, 3), int))[0]
        areas = np.bincount(groups.ravel())
        shells: dict[int, list] = {}
        holes: dict[int, list] = {}
        for yx, area, pid in _trace(mask):
            r, c = pid // (w + 2) - 1, pid % (w + 2) - 1
            cid = int(comp4[r, c])
            (shells if area > 0 else holes).setdefault(cid, []).append((yx, area, (r, c)))
        polys_by_group: dict[int, list] = {}
        for cid, comp_shells in shells.items():
            polys = [[s[0]] for s in comp_shells]
            for hyx, _, (r, c) in holes.get(cid, []):
                best = 0
                if len(comp_shells) > 1:
                    inside = [i for i, s in enumerate(comp_shells) if _contains(s[0], r + 0.5, c + 0.5)]
                    best = min(inside or [0], key=lambda i: comp_shells[i][1])
                polys[best].append(hyx)
            gid = int(groups[comp_shells[0][2]])
            if areas[gid] < min_area_px:
                continue
            polys_by_group.setdefault(gid, []).extend(polys)
        for gid in sorted(polys_by_group):
            polys = [
                [_coords(_simplify(r, simplify_tolerance), downsample, offset) for r in poly]
                for poly in polys_by_group[gid]
            ]
            geometry = (
                {"type": "Polygon", "coordinates": polys[0]}
                if len(polys) == 1
                else {"type": "MultiPolygon", "coordinates": polys}
            )
            classification = {"name": names.get(value, f"class {value}"), "color": class_color(value, colors)}
            properties = {"objectType": "annotation", "classification": classification, "label": value}
            if unclassified is not None and classification["name"] == unclassified:
                del properties["classification"]
            features.append({"type": "Feature", "geometry": geometry, "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    path: str | os.PathLike,
    labels: np.ndarray,
    class_names: dict[int, str] | Sequence[str] | None = None,
    **kwargs: Any,
) -> Path:
    """Write :func:`labels_to_geojson` output to ``path`` atomically; returns the path."""
    collection = labels_to_geojson(labels, class_names, **kwargs)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(collection, fh, separators=(",", ":"))
    return path


def _features(obj: Any) -> list[dict]:
    if isinstance(obj, (str, os.PathLike)):
        with open(obj, encoding="utf-8") as fh:
            obj = json.load(fh)
    if isinstance(obj, list):
        return obj
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return list(obj.get("features", []))
    if kind == "Feature":
        return [obj]
    return [{"type": "Feature", "geometry": obj, "properties": {}}]


def _fill(rings: list[np.ndarray], shape: tuple[int, int]):
    """Even-odd scanline fill at pixel centres; returns (row slice, col slice, bool mask)."""
    pts = np.vstack(rings)
    r0 = max(0, int(np.floor(pts[:, 1].min())))
    r1 = min(shape[0], int(np.ceil(pts[:, 1].max())))
    c0 = max(0, int(np.floor(pts[:, 0].min())))
    c1 = min(shape[1], int(np.ceil(pts[:, 0].max())))
    if r1 <= r0 or c1 <= c0:
        return None
    open_rings = [r[:-1] if np.array_equal(r[0], r[-1]) else r for r in rings]
    a = np.vstack(open_rings)
    b = np.vstack([np.roll(r, -1, axis=0) for r in open_rings])
    keep = a[:, 1] != b[:, 1]
    (xa, ya), (xb, yb) = a[keep].T, b[keep].T
    lo = np.clip(np.ceil(np.minimum(ya, yb) - 0.5).astype(np.int64), r0, r1)
    hi = np.clip(np.ceil(np.maximum(ya, yb) - 0.5).astype(np.int64), r0, r1)
    n = hi - lo
    idx = np.repeat(np.arange(len(n)), n)
    rows = lo[idx] + (np.arange(idx.size) - np.repeat(np.cumsum(n) - n, n))
    yc = rows + 0.5
    xs = xa[idx] + (yc - ya[idx]) * (xb[idx] - xa[idx]) / (yb[idx] - ya[idx])
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    cols = np.clip(np.ceil(xs - 0.5).astype(np.int64), c0, c1) - c0
    diff = np.zeros((r1 - r0, c1 - c0 + 1), np.int32)
    np.add.at(diff, (rows[0::2] - r0, cols[0::2]), 1)
    np.add.at(diff, (rows[1::2] - r0, cols[1::2]), -1)
    mask = np.cumsum(diff, axis=1)[:, :-1] > 0
    return slice(r0, r1), slice(c0, c1), mask


def geojson_to_labels(
    geojson: dict | list | str | os.PathLike,
    shape: tuple[int, int],
    class_names: dict[int, str] | Sequence[str] | None = None,
    *,
    downsample: float = 1.0,
    offset: Sequence[float] = (0, 0),
    dtype: Any = None,
) -> np.ndarray:
    """Rasterise Polygon/MultiPolygon features into a label image of ``shape`` (label pixels).

    A feature's value is its ``"label"`` property, else its classification name looked up in
    ``class_names``, else 1 when no class names are given. A pixel belongs to a polygon when
    its centre is inside (even-odd rule, so holes stay empty); later features overwrite
    earlier ones. Other geometry types are ignored. Inverse of :func:`labels_to_geojson`.
    """
    features = _features(geojson)
    by_name = {v: k for k, v in normalize_class_names(class_names).items()}
    items = []
    for feat in features:
        geom = feat.get("geometry") or {}
        if geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        props = feat.get("properties") or {}
        value = props.get("label")
        if not isinstance(value, (int, np.integer)):
            name = (props.get("classification") or {}).get("name")
            if name in by_name:
                value = by_name[name]
            elif not by_name:
                value = 1
            else:
                raise PathFMError(
                    f"GeoJSON feature has class {name!r}, which is not among "
                    f"{sorted(by_name)}; pass class_names that include it"
                )
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        items.append((int(value), polys))
    if dtype is None:
        top = max([v for v, _ in items], default=0)
        dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.uint32
    out = np.zeros(tuple(shape), dtype)
    for value, polys in items:
        for poly in polys:
            rings = [
                (np.asarray(r, np.float64)[:, :2] - [offset[1], offset[0]]) / downsample for r in poly if len(r) >= 3
            ]
            filled = _fill(rings, out.shape) if rings else None
            if filled is not None:
                rs, cs, mask = filled
                out[rs, cs][mask] = value
    return out
