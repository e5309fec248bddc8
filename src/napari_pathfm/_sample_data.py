"""napari sample data: the bundled CMU-1-Small-Region.svs (CC0) as a multiscale RGB layer."""

from __future__ import annotations

from pathlib import Path

SAMPLE_SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


def sample_slide_path() -> Path:
    """Path of the bundled H&E sample slide (Aperio SVS, 2220x2967 px at 0.499 µm/px, CC0)."""
    return SAMPLE_SLIDE


def make_sample_slide():
    """Sample-data contribution: the bundled slide, read through the plugin's own reader."""
    from ._reader import read_slide

    return read_slide(str(SAMPLE_SLIDE))
