"""docs/architecture.md's package diagram is generated from the imports; a change the doc misses fails here."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "architecture_diagram.py"


def test_diagram_matches_the_imports():
    """`architecture_diagram.py --check` redraws the diagram from grimp's graph and compares it with the doc."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + "\nrun: python docs/architecture_diagram.py"


def test_check_fails_on_a_stale_diagram(tmp_path, monkeypatch):
    """A doc whose drawing lacks an arrow is reported stale (exit 1), so the check above can fail."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import architecture_diagram as diagram
    finally:
        sys.path.remove(str(SCRIPT.parent))
    doc = tmp_path / "architecture.md"
    stale = diagram.DOC.read_text(encoding="utf-8").replace("    pipelines --> tiles\n", "", 1)
    doc.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(diagram, "DOC", doc)
    assert diagram.main(["--check"]) == 1
    assert diagram.main([]) == 0
    assert "    pipelines --> tiles\n" in doc.read_text(encoding="utf-8")
    assert diagram.main(["--check"]) == 0
