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


def test_slide_dock_screenshot(tmp_path):
    """Runs the script as the docs say (its own process: a napari app of its own, like the demo's canvases)."""
    import os
    import subprocess
    import sys

    from napari_pathfm.demo import display_available

    if not display_available():
        pytest.skip("needs a (virtual) display: run under xvfb-run")
    env = {**os.environ, "PATHFM_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "slide", "--out", str(tmp_path / "shots"), "--width", "600"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shots = _load_script()
    out = tmp_path / "shots"
    written = {"window": out / "slide.png", "dock": out / "slide-dock.png"}
    assert sorted(p.name for p in out.iterdir()) == ["slide-dock.png", "slide.png"], "no temporaries left"

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
