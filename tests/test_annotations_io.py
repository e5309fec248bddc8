"""QuPath GeoJSON and ASAP XML annotations: read as a Labels layer on their slide, written back without loss.

The annotation files are written the way QuPath (``File > Export objects as GeoJSON``) and ASAP
write them — classification names and colours (also QuPath's older packed ``colorRGB``), polygons
with holes, MultiPolygons, unclassified objects, a point that is not an area, ASAP exclusion groups —
on the real CMU-1 small-region slide (level-0 pixels). Round trip: every vertex written back lies
within one level-0 pixel of the original outline, and every original vertex within one pixel of
the written one; the rasters are identical and each object keeps its class and colour.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from napari_pathfm._reader import annotation_layer_data, napari_get_reader
from napari_pathfm._writer import write_labels
from napari_pathfm.errors import PathFMError
from napari_pathfm.io.annotations import annotations_to_labels, read_annotations

CMU_MPP = 0.499


def _circle(cx, cy, r, n=48, reverse=False):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    pts = [[float(cx + r * np.cos(a)), float(cy + r * np.sin(a))] for a in t]
    pts = pts[::-1] if reverse else pts
    return [*pts, pts[0]]


def _qupath_geojson() -> dict:
    """Objects as QuPath 0.4+ exports them (and one with the older ``colorRGB``)."""
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "a1",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [_circle(600, 700, 200), _circle(600, 700, 60, 24, True)],
                },
                "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
            },
            {
                "type": "Feature",
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [[_circle(1500, 900, 120)], [_circle(1800, 900, 80)]],
                },
                "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "colorRGB": -16744448}},
            },
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[100.5, 1500.25], [700.5, 1500.25], [700.5, 1900.75], [100.5, 1900.75], [100.5, 1500.25]]
                    ],
                },
                "properties": {"objectType": "annotation"},
            },
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [50, 50]}, "properties": {}},
        ],
    }


def _segment_distances(points: np.ndarray, rings: list[np.ndarray]) -> np.ndarray:
    """Distance of each point to the nearest edge of any ring."""
    a = np.vstack([r[:-1] for r in rings])
    b = np.vstack([r[1:] for r in rings])
    ab = b - a
    ap = points[:, None, :] - a[None]
    t = np.clip((ap * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12)[None], 0, 1)
    nearest = a[None] + t[..., None] * ab[None]
    return np.sqrt(((points[:, None, :] - nearest) ** 2).sum(-1)).min(1)


def _rings_of(found, name):
    return [r for a in found.items if a.name == name and not a.exclude for p in a.polygons for r in p]


@pytest.fixture
def slide_with_annotations(tmp_path, cmu_small) -> Path:
    """The real slide and a QuPath GeoJSON of the same stem in one folder (as QuPath projects keep them)."""
    if not cmu_small.is_file():
        pytest.skip(f"{cmu_small} not found")
    os.symlink(cmu_small, tmp_path / cmu_small.name)
    path = tmp_path / f"{cmu_small.stem}.geojson"
    path.write_text(json.dumps(_qupath_geojson()), encoding="utf-8")
    return path


def test_qupath_geojson_opens_on_its_slide_with_classes_and_colours(slide_with_annotations):
    reader = napari_get_reader(str(slide_with_annotations))
    assert reader is not None
    ((labels, kw, kind),) = reader(str(slide_with_annotations))
    assert kind == "labels"
    meta = kw["metadata"]
    assert meta["classes"] == {1: "Tumor", 2: "Stroma", 3: "Unclassified"}
    assert meta["pathfm_skipped"] == {"Point": 1}
    assert meta["class_colors"] == {"Tumor": (200, 0, 0), "Stroma": (0, 128, 0)}
    assert kw["colormap"][1][:3] == pytest.approx([200 / 255, 0, 0])
    # placed on the slide: the slide's µm/px, the label image starts at the annotations' corner
    assert kw["scale"] == pytest.approx((CMU_MPP, CMU_MPP))
    assert kw["translate"] == pytest.approx((500 * CMU_MPP, 100 * CMU_MPP))
    # level-0 pixel (y=700, x=600) is the Tumor's hole; (y=700, x=450) its body; the box is unclassified
    y0, x0 = 500, 100
    assert labels[700 - y0, 600 - x0] == 0 and labels[700 - y0, 450 - x0] == 1
    assert labels[1700 - y0, 400 - x0] == 3 and labels[900 - y0, 1800 - x0] == 2
    # the box's edges at .25/.5/.75 px: pixel centres decide
    assert labels[1500 - y0, 300 - x0] == 3 and labels[1499 - y0, 300 - x0] == 0
    assert labels[1900 - y0, 300 - x0] == 3 and labels.shape[0] == 1901 - y0, "the box ends at y = 1900.75"


@pytest.mark.parametrize("suffix", [".geojson", ".xml"])
def test_round_trip_keeps_shapes_to_within_a_pixel_and_classes(slide_with_annotations, tmp_path, suffix):
    ((labels, kw, _),) = napari_get_reader(str(slide_with_annotations))(str(slide_with_annotations))
    out = tmp_path / f"back{suffix}"
    write_labels(str(out), labels, kw)
    original, back = read_annotations(slide_with_annotations), read_annotations(out)
    for name in ("Tumor", "Stroma", "Unclassified"):
        before, after = _rings_of(original, name), _rings_of(back, name)
        if suffix == ".xml" and name == "Tumor":  # ASAP has no holes: the Tumor's hole is in the Exclusion group
            after += [r for a in back.items if a.exclude for p in a.polygons for r in p]
        assert after, f"{name} lost"
        assert _segment_distances(np.vstack(after), before).max() <= 1.0
        assert _segment_distances(np.vstack(before), after).max() <= 1.0
    # the same raster from the written file (ASAP has no MultiPolygon: the two Stroma parts become two objects)
    again, classes, _ = annotations_to_labels(back, labels.shape, offset=(500, 100))
    names = np.array(["", *[classes[k] for k in sorted(classes)]])
    assert np.array_equal(names[again], np.array(["", "Tumor", "Stroma", "Unclassified"])[labels])
    if suffix == ".geojson":
        doc = json.loads(out.read_text(encoding="utf-8"))
        kinds = [f["geometry"]["type"] for f in doc["features"]]
        assert kinds == ["Polygon", "MultiPolygon", "Polygon"], "one feature per object"
        assert doc["features"][0]["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
        assert "classification" not in doc["features"][2]["properties"], "unclassified stays unclassified"
        assert len(doc["features"][0]["geometry"]["coordinates"]) == 2, "the hole is kept"


def test_asap_xml_with_camelyon_exclusion_group(tmp_path):
    """An ASAP file as CAMELYON16 ships them: tumour in group _0, a region cut out of it in _2."""

    def ann(i, group, ring, kind="Polygon"):
        pts = "".join(f'<Coordinate Order="{j}" X="{x}" Y="{y}" />' for j, (x, y) in enumerate(ring))
        return f'<Annotation Name="A{i}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58"><Coordinates>{pts}</Coordinates></Annotation>'

    square = [(10, 10), (110, 10), (110, 90), (10, 90)]
    inner = [(40, 30), (70, 30), (70, 60), (40, 60)]
    xml = (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + ann(0, "_0", square)
        + ann(1, "_2", inner)
        + ann(2, "_0", [(5, 5)], kind="Dot")
        + '</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#FF0000"><Attributes /></Group>'
        '<Group Name="_2" PartOfGroup="None" Color="#00FF00"><Attributes /></Group></AnnotationGroups></ASAP_Annotations>'
    )
    path = tmp_path / "tumor_001.xml"
    path.write_text(xml, encoding="utf-8")
    found = read_annotations(path)
    assert [(a.name, a.color, a.exclude) for a in found.items] == [
        ("_0", (255, 0, 0), False),
        ("_2", (0, 255, 0), True),
    ]
    assert found.skipped == {"Dot": 1}
    labels, kw, _ = annotation_layer_data(path, None, None)
    assert kw["units"] == ("pixel", "pixel") or kw["scale"] == (1.0, 1.0)
    assert labels.shape == (80, 100) and int((labels == 1).sum()) == 100 * 80 - 30 * 30


@pytest.mark.parametrize(
    ("name", "text"),
    [("cut.geojson", '{"type": "FeatureCollection", "features": [{"type": '), ("bad.geojson", '{"type": "Polygon"}')],
)
def test_damaged_or_foreign_annotation_files_say_what_is_wrong(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PathFMError, match=name):
        read_annotations(path)


def test_reader_leaves_other_json_and_xml_to_other_plugins(tmp_path):
    (tmp_path / "config.json").write_text('{"model": "resnet"}', encoding="utf-8")
    (tmp_path / "notes.xml").write_text("<notes><note>hi</note></notes>", encoding="utf-8")
    assert napari_get_reader(str(tmp_path / "config.json")) is None
    assert napari_get_reader(str(tmp_path / "notes.xml")) is None


@pytest.mark.gui
def test_annotations_open_over_the_slide_in_the_viewer_and_save_back(make_napari_viewer, cmu_small, tmp_path):
    """A user opens a slide, then drops a QuPath export (kept elsewhere) on the viewer, then saves it as GeoJSON."""
    pytest.importorskip("napari")
    if not cmu_small.is_file():
        pytest.skip(f"{cmu_small} not found")
    viewer = make_napari_viewer()
    (slide,) = viewer.open(str(cmu_small), plugin="napari-pathfm")
    path = tmp_path / "exported" / "annotations.geojson"
    path.parent.mkdir()
    path.write_text(json.dumps(_qupath_geojson()), encoding="utf-8")
    (layer,) = viewer.open(str(path), plugin="napari-pathfm")
    assert layer.__class__.__name__ == "Labels"
    assert tuple(layer.scale) == pytest.approx(tuple(slide.scale)), "at the open slide's µm/px"
    # the world position of level-0 pixel (y=700, x=450) on the slide holds the Tumor object
    world = np.array([700, 450]) * CMU_MPP
    assert layer.get_value(world, world=True) == 1
    assert slide.world_to_data(world) == pytest.approx((700, 450))
    assert list(layer.features["class"]) == ["", "Tumor", "Stroma", "Unclassified"]
    assert np.allclose(layer.colormap.map(np.array([1]))[0][:3], [200 / 255, 0, 0], atol=1e-3)
    out = tmp_path / "back.geojson"
    layer.save(str(out), plugin="napari-pathfm")
    back = read_annotations(out)
    assert [(a.name, a.color) for a in back.items] == [
        ("Tumor", (200, 0, 0)),
        ("Stroma", (0, 128, 0)),
        ("Unclassified", None),
    ]
    tumour = _rings_of(back, "Tumor")
    assert _segment_distances(np.vstack(tumour), _rings_of(read_annotations(path), "Tumor")).max() <= 1.0
