"""Long names do not widen the docks: a checkpoint (or slide) with a long name stays readable in a tooltip
while the dock keeps the width of its controls (a 90-character fine-tune name widened docks to ~650 px)."""

from __future__ import annotations

import shutil

import pytest

from napari_pathfm.checkpoints import BUNDLED_MODELS

LONG = "pathsam2-glas-small-finetuned-on-my-own-corrections-of-slide-TCGA-A1-A0SB-01Z-00-DX1-run-0007"
#: width (px) a dock may ask for: its controls, not its longest item
MAX_DOCK_WIDTH = 460


@pytest.fixture
def long_named_models(tmp_path, monkeypatch):
    """A copy of the bundled segmentation model under a 90-character name in the user's model folder."""
    folder = tmp_path / "models"
    folder.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(BUNDLED_MODELS / f"pathsam2-glas-small{suffix}", folder / f"{LONG}{suffix}")
    monkeypatch.setenv("PATHFM_MODELS", str(folder))
    return folder


@pytest.fixture
def viewer(make_napari_viewer):
    from napari_pathfm.widgets._gl_safety import keep_triton_out

    keep_triton_out()
    return make_napari_viewer()


def test_segment_dock_stays_narrow_with_a_long_checkpoint_name(viewer, long_named_models, qtbot):
    import numpy as np

    from napari_pathfm.widgets.segment_widget import SegmentWidget

    viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, name=LONG, metadata={"pathfm_path": "x.svs"})
    dock = SegmentWidget(viewer)
    qtbot.addWidget(dock)
    combo = dock.checkpoint.combo
    texts = [combo.itemText(i) for i in range(combo.count())]
    i = next(i for i, t in enumerate(texts) if LONG in t)
    combo.setCurrentIndex(i)
    assert dock.sizeHint().width() <= MAX_DOCK_WIDTH, dock.sizeHint().width()
    assert dock.minimumSizeHint().width() <= MAX_DOCK_WIDTH
    assert LONG in combo.toolTip(), "the whole name is one hover away"
    assert LONG in combo.itemData(i, 3), "each item's tooltip (Qt.ToolTipRole = 3) holds its whole text"
    assert combo.view().minimumWidth() > combo.sizeHint().width(), "the drop-down list shows whole names"
    assert dock.layer_combo.sizeHint().width() <= MAX_DOCK_WIDTH // 2 + 60
