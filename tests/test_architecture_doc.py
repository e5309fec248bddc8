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


def test_named_modules_exist():
    """Every module the doc names exists: `dir/module.py` and `dir/module.name` under the package (or the
    repository), a bare `module.py` (in a list under its folder) somewhere in the package."""
    import re

    repo = SCRIPT.parents[1]
    package = repo / "src" / "napari_pathfm"
    text = (repo / "docs" / "architecture.md").read_text(encoding="utf-8")
    in_package = {p.name for p in package.rglob("*.py")}
    missing = []
    for ref in sorted(set(re.findall(r"`((?:[a-z_0-9]+/)*[a-z_0-9]+\.py)", text))):
        found = any((base / ref).is_file() for base in (package, repo)) if "/" in ref else ref in in_package
        if not found:
            missing.append(ref)
    for folder, module in sorted(set(re.findall(r"`((?:[a-z_0-9]+/)+)([a-z_0-9]+)\.[A-Za-z_]+`", text))):
        if not folder.startswith("src/") and not any((b / folder / f"{module}.py").is_file() for b in (package, repo)):
            missing.append(f"{folder}{module}")
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
