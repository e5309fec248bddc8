"""The size rule of issue 16: no module in pipelines/, widgets/ or training/ is over 450 lines.

A module that grows past the limit holds more than one concern; split it by concern (as segment.py
became segment_model.py, segment_outputs.py and segment_tiles.py) rather than packing lines. Lines
are counted in the source tree as ``ruff format`` lays them out (``make lint`` checks that layout).
"""

from __future__ import annotations

from pathlib import Path

MAX_LINES = 450
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm"
CHECKED = ("pipelines", "widgets", "training")


def _line_counts() -> dict[str, int]:
    """``{path under the package: number of lines}`` of every module in the checked packages, sub-packages too."""
    return {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for folder in CHECKED
        for path in sorted((PACKAGE / folder).rglob("*.py"))
    }


def test_the_rule_sees_every_checked_package():
    counts = _line_counts()
    for folder in CHECKED:
        assert any(name.startswith(f"{folder}/") for name in counts), f"no modules found under {folder}/"
    assert "training/tasks/segment.py" in counts  # sub-packages are counted too
    assert counts["pipelines/segment.py"] > 100  # real sizes, not empty reads


def test_no_module_is_over_the_limit():
    too_long = {name: n for name, n in _line_counts().items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by concern): {too_long}"
