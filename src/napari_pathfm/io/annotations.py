"""Annotation files from QuPath (GeoJSON) and ASAP (XML): objects with classes, to labels and back.

QuPath exports annotations as GeoJSON (a ``FeatureCollection`` or a bare list of features) in
level-0 pixel coordinates, each feature's class in ``properties.classification`` (``name`` and
``color`` ``[r, g, b]``, or the older ``colorRGB`` packed integer). ASAP (and the CAMELYON data
sets) write ``<ASAP_Annotations>`` XML: one ``<Annotation Type="Polygon" PartOfGroup=class>`` per
shape, colours on the ``<Group>``; ASAP has no holes, so areas cut out of an annotation are drawn
in an exclusion group (CAMELYON16's ``_2``, or one named ``Exclusion``).

:func:`read_annotations` reads either into :class:`Annotation` objects (class, colour, polygons
with holes); :func:`annotations_to_labels` rasterises them as one label per object (later objects
over earlier ones, exclusions cut out), with each object's class and colour, which is how the
napari reader shows them; :mod:`.geojson` traces labels back to QuPath GeoJSON and
:func:`write_asap_xml` to ASAP XML. Points and lines are not areas: they are counted in
``AnnotationSet.skipped`` and left out. Pure numpy + the standard library.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .atomic import atomic_path
from .geojson import _fill, labels_to_geojson

__all__ = [
    "ANNOTATION_SUFFIXES",
    "EXCLUSION_GROUPS",
    "UNCLASSIFIED",
    "Annotation",
    "AnnotationSet",
    "annotation_class_map",
    "annotation_format",
    "annotations_to_labels",
    "class_index",
    "label_grid",
    "labels_to_annotations",
    "read_annotations",
    "write_asap_xml",
]

#: ASAP groups whose shapes are cut out of the others (compared case-insensitively).
EXCLUSION_GROUPS = frozenset({"_2", "exclusion", "exclude"})
#: The class given to a QuPath annotation without a classification.
UNCLASSIFIED = "Unclassified"
_AREA_TYPES = {"Polygon", "MultiPolygon"}
_ASAP_AREAS = {"polygon", "rectangle", "spline"}


@dataclass
class Annotation:
    """One annotated object: its class, colour and polygons.

    ``polygons`` is a list of polygons, each a list of rings (``(N, 2)`` float arrays of level-0
    ``x, y``, closed: the last point repeats the first); the first ring of a polygon is its outline,
    the others are holes.
    """

    name: str
    color: tuple[int, int, int] | None
    polygons: list[list[np.ndarray]]
    exclude: bool = False


@dataclass
class AnnotationSet:
    """What :func:`read_annotations` found in one file."""

    items: list[Annotation]
    source: Path
    kind: str  # "geojson" or "asap"
    skipped: dict[str, int] = field(default_factory=dict)

    def bounds(self) -> tuple[float, float, float, float] | None:
        """Level-0 ``(x0, y0, x1, y1)`` around every shape, or None when there is none."""
        rings = [r for a in self.items for p in a.polygons for r in p if len(r)]
        if not rings:
            return None
        pts = np.vstack(rings)
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())

    def class_colors(self) -> dict[str, tuple[int, int, int]]:
        """The first colour the file gives each class (objects without a colour leave it out)."""
        out: dict[str, tuple[int, int, int]] = {}
        for a in self.items:
            if a.color is not None and not a.exclude:
                out.setdefault(a.name, a.color)
        return out


def annotation_format(path: str | os.PathLike) -> str | None:
    """``"geojson"`` or ``"asap"`` when ``path`` looks like such a file (reads its first 4 kB), else None."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in {".geojson", ".json", ".xml"} or not p.is_file():
        return None
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return None
    if suffix == ".xml":
        return "asap" if "<ASAP_Annotations" in head else None
    if suffix == ".geojson":
        return "geojson"
    return "geojson" if '"type"' in head and ("Feature" in head or "Polygon" in head) else None


def _rgb(value: Any) -> tuple[int, int, int] | None:
    """A colour from ``[r, g, b]``, a QuPath packed (A)RGB integer or ``#rrggbb``."""
    if isinstance(value, (list, tuple)) and len(value) >= 3:
        return tuple(int(c) & 255 for c in value[:3])
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        v = int(value) & 0xFFFFFF
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    if isinstance(value, str) and value.startswith("#") and len(value) >= 7:
        try:
            return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))
        except ValueError:
            return None
    return None


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02X}{:02X}{:02X}".format(*[int(c) for c in rgb[:3]])


def _rings(poly: list) -> list[np.ndarray]:
    return [np.asarray(r, np.float64)[:, :2] for r in poly if len(r) >= 3]


def _geojson_items(obj: Any, source: Path) -> tuple[list[Annotation], dict[str, int]]:
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features") or []
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, list):
        features = obj
    else:
        raise InputError(
            source,
            "is not a GeoJSON FeatureCollection, Feature or list of features.",
            "Export annotations from QuPath with File > Export objects as GeoJSON.",
        )
    items: list[Annotation] = []
    skipped: dict[str, int] = {}
    for feat in features:
        geom = (feat or {}).get("geometry") or {}
        geoms = geom.get("geometries", []) if geom.get("type") == "GeometryCollection" else [geom]
        props = (feat or {}).get("properties") or {}
        cls = props.get("classification") or {}
        name = str(cls.get("name") or UNCLASSIFIED) if isinstance(cls, dict) else UNCLASSIFIED
        color = _rgb(cls.get("color", cls.get("colorRGB"))) if isinstance(cls, dict) else None
        color = color or _rgb(props.get("color"))
        polygons = []
        for g in geoms:
            kind = g.get("type")
            if kind not in _AREA_TYPES:
                skipped[str(kind)] = skipped.get(str(kind), 0) + 1
                continue
            polys = [g["coordinates"]] if kind == "Polygon" else g["coordinates"]
            polygons += [rings for rings in (_rings(p) for p in polys) if rings]
        if polygons:
            items.append(Annotation(name, color, polygons))
    return items, skipped


def _asap_items(root: ET.Element, source: Path) -> tuple[list[Annotation], dict[str, int]]:
    if root.tag != "ASAP_Annotations":
        raise InputError(source, f"is not an ASAP annotation file (its root is <{root.tag}>, not <ASAP_Annotations>).")
    groups = {g.get("Name"): _rgb(g.get("Color") or "") for g in root.iter("Group")}
    items: list[Annotation] = []
    skipped: dict[str, int] = {}
    for a in root.iter("Annotation"):
        kind = str(a.get("Type") or "")
        if kind.lower() not in _ASAP_AREAS:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        coords = sorted(a.iter("Coordinate"), key=lambda c: float(c.get("Order") or 0))
        try:
            ring = np.array([[float(c.get("X")), float(c.get("Y"))] for c in coords], np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(source, f"annotation {a.get('Name')!r} has a coordinate that is not a number.") from exc
        if len(ring) < 3:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        if not np.array_equal(ring[0], ring[-1]):
            ring = np.vstack([ring, ring[:1]])  # closed, as GeoJSON's rings are
        group = str(a.get("PartOfGroup") or "None")
        name = UNCLASSIFIED if group == "None" else group
        color = groups.get(group) or _rgb(a.get("Color") or "")
        items.append(Annotation(name, color, [[ring]], exclude=group.lower() in EXCLUSION_GROUPS))
    return items, skipped


def read_annotations(path: str | os.PathLike) -> AnnotationSet:
    """Read a QuPath GeoJSON or ASAP XML annotation file.

    Raises
    ------
    InputError
        The file cannot be read or is neither format (the message names the file and what to do).
    """
    p = Path(path)
    kind = annotation_format(p)
    if kind is None:
        raise InputError(
            p,
            "is not a QuPath GeoJSON (.geojson/.json) or ASAP (.xml) annotation file.",
            "Export annotations from QuPath as GeoJSON or from ASAP as XML.",
        )
    try:
        if kind == "asap":
            items, skipped = _asap_items(ET.parse(p).getroot(), p)
        else:
            with open(p, encoding="utf-8") as fh:
                items, skipped = _geojson_items(json.load(fh), p)
    except (ET.ParseError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(p, f"the annotation file is damaged or cut short ({exc}).", "Export it again.") from exc
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise InputError(p, f"a shape in the annotation file is malformed ({exc!r}).", "Export it again.") from exc
    return AnnotationSet(items, p, kind, skipped)


def annotations_to_labels(
    annotations: AnnotationSet,
    shape: tuple[int, int],
    *,
    downsample: float = 1.0,
    offset: Sequence[float] = (0, 0),
) -> tuple[np.ndarray, dict[int, str], dict[int, tuple[int, int, int]]]:
    """One label per object: ``(labels, {id: class}, {id: (r, g, b)})``.

    Objects are numbered 1..N in file order; a pixel whose centre is inside an object belongs to
    it (holes stay empty), later objects over earlier ones; exclusions (ASAP's ``_2`` /
    ``Exclusion`` groups) are cut out of every object. ``downsample`` is level-0 pixels per label
    pixel and ``offset`` the level-0 ``(y0, x0)`` of label pixel (0, 0). Objects without a colour
    get their class's first colour in the file, else none (the caller's palette decides).
    """
    keep = [a for a in annotations.items if not a.exclude]
    dtype = np.uint16 if len(keep) < 65535 else np.uint32
    out = np.zeros(tuple(int(s) for s in shape), dtype)
    shift = np.asarray([offset[1], offset[0]], np.float64)

    def paint(a: Annotation, value: int) -> None:
        for poly in a.polygons:
            filled = _fill([(r - shift) / downsample for r in poly], out.shape)
            if filled is not None:
                rs, cs, mask = filled
                out[rs, cs][mask] = value

    by_class = annotations.class_colors()
    classes, colors, value = {}, {}, 0
    for a in annotations.items:
        if a.exclude:
            continue
        value += 1
        paint(a, value)
        classes[value] = a.name
        if (a.color or by_class.get(a.name)) is not None:
            colors[value] = a.color or by_class[a.name]
    for a in annotations.items:
        if a.exclude:
            paint(a, 0)
    return out, classes, colors


def write_asap_xml(
    path: str | os.PathLike,
    labels: np.ndarray,
    class_names: dict[int, str],
    *,
    downsample: float = 1.0,
    offset: Sequence[float] = (0, 0),
    colors: dict[int, Sequence[int]] | None = None,
) -> Path:
    """Write the objects of a label image as ASAP XML (atomically); returns the path.

    Each region of each label value becomes a ``Polygon`` annotation in the group of its class
    (traced along pixel edges, level-0 coordinates, as :func:`.geojson.labels_to_geojson`); each
    hole becomes a polygon in the ``Exclusion`` group, which ASAP-based tools and
    :func:`read_annotations` cut out of the others.
    """
    fc = labels_to_geojson(labels, class_names, downsample=downsample, offset=offset, colors=colors, per_value=True)
    root = ET.Element("ASAP_Annotations")
    shapes = ET.SubElement(root, "Annotations")
    group_colors: dict[str, str] = {}
    n = 0

    def add(ring: list, group: str, color: str) -> None:
        nonlocal n
        a = ET.SubElement(shapes, "Annotation", Name=f"Annotation {n}", Type="Polygon", PartOfGroup=group, Color=color)
        coords = ET.SubElement(a, "Coordinates")
        for i, (x, y) in enumerate(ring[:-1] if ring[0] == ring[-1] else ring):
            ET.SubElement(coords, "Coordinate", Order=str(i), X=repr(float(x)), Y=repr(float(y)))
        n += 1

    for feat in fc["features"]:
        cls = feat["properties"]["classification"]
        color = _hex(cls["color"])
        group = "None" if cls["name"] == UNCLASSIFIED else cls["name"]  # ASAP's "no group"
        if group != "None":
            group_colors.setdefault(group, color)
        geom = feat["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for poly in polys:
            add(poly[0], group, color)
            for hole in poly[1:]:
                group_colors.setdefault("Exclusion", "#000000")
                add(hole, "Exclusion", "#000000")
    groups = ET.SubElement(root, "AnnotationGroups")
    for name, color in group_colors.items():
        g = ET.SubElement(groups, "Group", Name=name, PartOfGroup="None", Color=color)
        ET.SubElement(g, "Attributes")
    ET.indent(root)
    path = Path(path)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    return path


def label_grid(
    bounds: tuple[float, float, float, float],
    slide_shape: tuple[int, int] | None = None,
    max_pixels: int = 1 << 26,
) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """Where to rasterise annotations: ``(downsample, level-0 (y0, x0), label shape)``.

    The label image covers the annotations' bounding box (clipped to the slide when its level-0
    shape is known), at level 0 when that is at most ``max_pixels`` pixels, else at the smallest
    power-of-two downsample that fits, so a slide-wide annotation never needs a slide-sized array.

    >>> label_grid((10.2, 5.0, 110.0, 55.9))
    (1.0, (5, 10), (51, 100))
    >>> label_grid((0, 0, 100_000, 80_000), max_pixels=1 << 26)[0]
    16.0
    """
    x0, y0, x1, y1 = (float(b) for b in bounds)
    top, left = max(int(np.floor(y0)), 0), max(int(np.floor(x0)), 0)
    bottom, right = int(np.ceil(y1)), int(np.ceil(x1))
    if slide_shape is not None:
        bottom, right = min(bottom, int(slide_shape[0])), min(right, int(slide_shape[1]))
    h, w = max(bottom - top, 1), max(right - left, 1)
    ds = 1
    while np.ceil(h / ds) * np.ceil(w / ds) > max_pixels:
        ds *= 2
    return float(ds), (top, left), (int(np.ceil(h / ds)), int(np.ceil(w / ds)))


#: Mask files that are annotation files (a segmentation data folder's masks/ may hold these).
ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")


def annotation_class_map(path: str | os.PathLike, shape: tuple[int, int], class_names: Sequence[str]) -> np.ndarray:
    """A class-index mask (uint8) of the annotation file ``path`` drawn on an image of ``shape`` pixels.

    Annotation coordinates are the image's pixels (what QuPath writes for an image it opened);
    each object's class is looked up by name in ``class_names`` (case-insensitively; index 0 is
    the background, which is also what no annotation covers). QuPath's unclassified objects are
    class 1 when there is a single foreground class.

    Raises
    ------
    InputError
        An object's class is not among ``class_names`` (the message names the file and the class).
    """
    found = read_annotations(path)
    labels, classes, _ = annotations_to_labels(found, shape)
    lut = np.zeros(len(classes) + 1, np.uint8)
    for value, name in classes.items():
        lut[value] = class_index(name, class_names, path, "data.classes")
    return lut[labels]


def class_index(name: str, class_names: Sequence[str], path: str | os.PathLike = "", where: str = "the classes") -> int:
    """Index of an annotation's class among a model's ``class_names`` (case-insensitive).

    QuPath's unclassified objects are class 1 when there is a single foreground class.

    >>> class_index("gland", ["background", "Gland"]), class_index(UNCLASSIFIED, ["bg", "tumour"])
    (1, 1)
    """
    lookup = {str(n).lower(): i for i, n in enumerate(class_names)}
    index = lookup.get(str(name).lower())
    if index is None and name == UNCLASSIFIED and len(class_names) == 2:
        index = 1
    if index is None:
        raise InputError(
            path,
            f"an object has class {name!r}, which is not one of the classes {list(class_names)}.",
            f"Rename the class where the annotations were made or add it to {where}.",
        )
    return index


def labels_to_annotations(
    labels: np.ndarray,
    classes: dict[int, str],
    *,
    downsample: float = 1.0,
    offset: Sequence[float] = (0, 0),
    source: str | os.PathLike = "layer",
) -> AnnotationSet:
    """The objects of a label image (``{label: class}``) as an :class:`AnnotationSet` in level-0 pixels.

    What an annotations layer holds after the user edited it, in the form :func:`read_annotations`
    gives: one object per label value, traced along pixel edges.
    """
    fc = labels_to_geojson(labels, classes, downsample=downsample, offset=offset, per_value=True)
    items, skipped = _geojson_items(fc, Path(source))
    return AnnotationSet(items, Path(source), "geojson", skipped)
