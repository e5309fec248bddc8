"""MIL review queue (issue 18 part 4): `pathfm batch --task mil` → slides listed least certain first →
open one at its top patches → Agree / Disagree saved to a CSV that MIL training reads as labels.

Real run: the bundled S4 MIL demo model (its feature extractor ships beside it) over the CMU-1 slide
and a renamed copy, on a one-worker LocalCluster, with the patch bootstrap the batch runs by default.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def mil_batch(tmp_path_factory, cmu_small):
    from napari_pathfm.demo import demo_mil_checkpoint
    from napari_pathfm.pipelines.batch import run_batch

    if not cmu_small.is_file():
        pytest.skip(f"{cmu_small} not found")
    root = tmp_path_factory.mktemp("mil-review")
    copy = root / "slides" / "case-002.svs"
    copy.parent.mkdir()
    shutil.copy(cmu_small, copy)
    manifest = root / "manifest.csv"
    manifest.write_text(f"slide\n{cmu_small}\n{copy}\n", encoding="utf-8")
    out = root / "batch"
    summary = run_batch(
        manifest, "mil", out, n_workers=1, checkpoint=demo_mil_checkpoint(), options={"device": "cpu", "top_k": 3}
    )
    assert [r["status"] for r in summary.rows] == ["ok", "ok"], summary.rows
    return out


def test_batch_predictions_carry_a_bootstrap_interval(mil_batch):
    from napari_pathfm.pipelines.batch import slide_out_dir

    rows = json.loads((mil_batch / "batch-summary.json").read_text())["slides"]
    for row in rows:
        pred = json.loads((slide_out_dir(mil_batch, Path(row["slide"])) / "prediction.json").read_text())
        boot = pred["uncertainty"]
        assert boot["n"] == 20 and 0.0 <= boot["flip_rate"] <= 1.0
        lo, hi = boot["interval"][pred["predicted"]]
        assert 0.0 <= lo <= hi <= 1.0 and lo < hi, "resampled bags give different probabilities"


def test_queue_least_certain_first_and_verdicts_are_training_labels(mil_batch, tmp_path):
    from napari_pathfm.io.features import write_features
    from napari_pathfm.pipelines.mil_review import ReviewLog, review_queue
    from napari_pathfm.training.mil_data import read_bag_table

    items = review_queue(mil_batch)
    assert sorted(it.name for it in items) == ["CMU-1-Small-Region", "case-002"]
    assert [it.uncertainty_key() for it in items] == sorted(it.uncertainty_key() for it in items)
    first, second = items
    assert first.heatmap is not None and len(first.top_patches) == 3
    log = ReviewLog(mil_batch)
    log.record(first, "agree")
    log.record(second, "disagree")  # the demo model has two classes: the other one
    assert log.record(first, "label", first.predicted)["verdict"] == "agree", "choosing the predicted class agrees"
    with open(mil_batch / "review.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["slide"] for r in rows] == [first.name, second.name], "one row per slide, the latest verdict"
    assert rows[1]["label"] != second.predicted and rows[1]["verdict"] == "disagree"
    assert ReviewLog(mil_batch).label_of(second) == rows[1]["label"], "verdicts survive reopening the folder"
    # MIL training reads the verdicts as its slide,label table (features named by slide stem, as `pathfm features` writes)
    feats = tmp_path / "features"
    for it in items:
        write_features(feats / f"{it.name}.features.zarr", np.zeros((4, 8), np.float32), np.zeros((4, 2), np.int64))
    bags, classes = read_bag_table(mil_batch / "review.csv", feats, classes=first.classes)
    assert [b.slide for b in bags] == [first.name, second.name] and classes == first.classes


def test_a_folder_that_is_not_a_mil_batch_is_refused_plainly(tmp_path):
    from napari_pathfm.errors import PathFMError
    from napari_pathfm.pipelines.mil_review import review_queue

    with pytest.raises(PathFMError, match="batch-summary.json"):
        review_queue(tmp_path)
    (tmp_path / "batch-summary.json").write_text(json.dumps({"task": "segment", "slides": []}))
    with pytest.raises(PathFMError, match="not mil"):
        review_queue(tmp_path)


@pytest.mark.gui
def test_review_in_the_mil_dock(make_napari_viewer, qtbot, mil_batch):
    from qtpy.QtCore import Qt

    from napari_pathfm.widgets.mil_widget import MILWidget

    viewer = make_napari_viewer()
    dock = MILWidget(viewer)
    panel = dock.review
    assert panel.load(mil_batch) is not None
    qtbot.waitUntil(lambda: panel.list.count() == 2 and not dock.runner.running, timeout=60_000)
    qtbot.waitUntil(lambda: any(la.name.endswith("MIL top patches") for la in viewer.layers), timeout=60_000)
    first = panel.items[0]
    names = [la.name for la in viewer.layers]
    assert any(n.endswith("MIL heatmap") for n in names), names
    slide = next(la for la in viewer.layers if la.metadata.get("pathfm_path") == str(first.slide))
    boxes = next(la for la in viewer.layers if la.name.endswith("MIL top patches"))
    assert len(boxes.data) == 3 and tuple(boxes.scale) == pytest.approx(tuple(slide.scale))
    qtbot.mouseClick(panel.agree_btn, Qt.MouseButton.LeftButton)
    assert "saved to review.csv" in dock.status.text()
    assert panel.list.currentRow() == 1, "the queue moves on to the next slide"
    assert "✓" in panel.list.item(0).text()
    qtbot.waitUntil(lambda: not dock.runner.running, timeout=60_000)
    with open(mil_batch / "review.csv", newline="") as fh:
        assert {r["slide"]: r["label"] for r in csv.DictReader(fh)}[first.name] == first.predicted
