"""`pathfm annotation-tiles`: the tiles under QuPath annotations filed by class, then a classifier trained on them.

On the real CMU-1 slide: two classes outlined (a region of epithelium as "Tumor", one of stroma as
"Stroma", an unclassified box left out by --min-cover), tiles cut at 0.5 µm/px, then `pathfm train
classify/crc_tiny` on the folder.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
from PIL import Image
from typer.testing import CliRunner

from napari_pathfm.cli import app


def _box(x0, y0, x1, y1):
    return [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]


@pytest.fixture
def annotated_slide(tmp_path, cmu_small):
    if not cmu_small.is_file():
        pytest.skip(f"{cmu_small} not found")
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": _box(700, 1000, 1600, 1900)},
            "properties": {"classification": {"name": "Tumor", "color": [200, 0, 0]}},
        },
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": _box(900, 2200, 1800, 2900)},
            "properties": {"classification": {"name": "Stroma", "color": [0, 150, 0]}},
        },
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _box(100, 100, 160, 160)}, "properties": {}},
    ]
    path = tmp_path / "CMU-1-Small-Region.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    return cmu_small, path


def test_tiles_under_annotations_become_a_classification_data_set(annotated_slide, tmp_path):
    slide, annotations = annotated_slide
    out = tmp_path / "dataset"
    result = CliRunner().invoke(
        app, ["annotation-tiles", str(slide), str(annotations), "--out", str(out), "--size", "112"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{") :])
    assert set(info["counts"]) == {"Tumor", "Stroma"}, "the 60 px unclassified box covers under half a tile"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["Stroma", "Tumor"]
    with open(out / "CMU-1-Small-Region.tiles.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == info["tiles"] == sum(info["counts"].values())
    for row in rows:  # every tile lies (mostly) inside its class's box, in level-0 pixels
        x, y = int(row["x"]), int(row["y"])
        box = (700, 1000, 1600, 1900) if row["class"] == "Tumor" else (900, 2200, 1800, 2900)
        assert box[0] - 112 < x < box[2] and box[1] - 112 < y < box[3]
        assert float(row["cover"]) >= 0.5
        tile = Image.open(out / row["class"] / row["file"])
        assert tile.size == (112, 112) and tile.mode == "RGB"

    # a classifier trains on the folder as it is (ImageFolder layout of the classify recipes)
    recipe = os.path.join(
        os.path.dirname(__file__), "..", "src", "napari_pathfm", "recipes", "classify", "crc_tiny.yaml"
    )
    run = tmp_path / "run"
    sets = [f"data.root={out}", "trainer.max_epochs=1", "data.input_mpp=0.5", "data.image_size=64"]
    result = CliRunner().invoke(app, ["train", recipe, "--out", str(run), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    card = json.loads((run / "model.json").read_text())
    assert sorted(card["classes"]) == ["Stroma", "Tumor"]


def test_unreadable_annotations_exit_2_with_one_message(tmp_path, cmu_small):
    if not cmu_small.is_file():
        pytest.skip(f"{cmu_small} not found")
    bad = tmp_path / "cut.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [', encoding="utf-8")
    result = CliRunner().invoke(app, ["annotation-tiles", str(cmu_small), str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "cut.geojson" in result.output and "Traceback" not in result.output
