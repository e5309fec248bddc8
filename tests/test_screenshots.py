"""docs/screenshots.py renders a real picture: the Slide dock (no model) on the bundled slide, under Xvfb."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "screenshots.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("pathfm_docs_screenshots", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slide_dock_screenshot(tmp_path, qapp, monkeypatch):
    from napari_pathfm.demo import display_available
    from napari_pathfm.widgets._gl_safety import keep_triton_out

    if not display_available():
        pytest.skip("needs a (virtual) display: run under xvfb-run")
    keep_triton_out()  # before any viewer (a later torch import next to Mesa's LLVM segfaults otherwise)
    monkeypatch.setenv("PATHFM_DATA_DIR", str(tmp_path / "data"))
    shots = _load_script()
    written = shots.shoot("slide", tmp_path, width=600)
    assert set(written) == {"window", "dock"}
    assert written["window"] == tmp_path / "slide.png" and written["dock"] == tmp_path / "slide-dock.png"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporaries left (atomic writes)"

    from PIL import Image

    window = np.asarray(Image.open(written["window"]).convert("RGB"))
    w, h = shots.WINDOW
    assert window.shape[:2] == (round(h * 600 / w), 600), "the window at its fixed size, downscaled to 600 px"
    gray = window.mean(axis=2)
    assert gray.std() > 20, "not a flat (black or empty) picture"
    # The canvas shows the slide: its white background and pink tissue (a black canvas would have neither).
    assert (gray > 200).mean() > 0.05, "the slide's bright background is visible"
    pink = (window[..., 0] > 150) & (window[..., 1] < 140) & (window[..., 2] > 120)
    assert pink.mean() > 0.01, "H&E tissue is visible on the canvas"

    dock = np.asarray(Image.open(written["dock"]).convert("RGB"))
    assert dock.shape[0] > 200 and dock.shape[1] > 200, "the dock alone, with its content"
    assert dock.std() > 10
    assert written["window"].stat().st_size < 400_000 and written["dock"].stat().st_size < 150_000
