"""Packaging: the npe2 manifest ships inside the wheel and napari discovers the plugin."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_napari_discovers_the_plugin():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-pathfm")
    assert manifest.display_name == "napari-pathfm"
    assert {w.display_name for w in manifest.contributions.widgets} >= {"Slide"}


def test_wheel_contains_manifest_and_sample_slide(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(REPO),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("napari_pathfm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        manifest = zf.read("napari_pathfm/napari.yaml").decode()
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "napari-pathfm.get_reader" in manifest, "the manifest file itself, not a dangling link"
    assert "napari_pathfm/data/CMU-1-Small-Region.svs" in names
    assert "napari-pathfm = napari_pathfm:napari.yaml" in entry_points
    assert "pathfm = napari_pathfm.cli:main" in entry_points


def test_importing_the_package_is_cheap():
    code = "import sys, napari_pathfm, napari_pathfm.io, napari_pathfm.tiles; print(sorted(m for m in ('torch', 'napari', 'openslide', 'dask') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
