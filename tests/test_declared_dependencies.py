"""Every third-party module the code imports is declared in pyproject.toml, in a group that installs it.

The imports are read with :mod:`ast` (module level and inside functions alike, so lazy
imports count), mapped to the distributions that provide them with
:func:`importlib.metadata.packages_distributions`, and compared with
``[project] dependencies`` and ``[project.optional-dependencies]``:

* ``src/`` may only need the core dependencies and the product extras (``torch``,
  ``napari``, ``distributed``), never the ``test`` extra;
* ``io/`` and the small core modules need the core dependencies alone, so a plain
  ``pip install napari-pathfm`` reads slides and writes files;
* ``tests/`` and ``benchmarks/`` may use any group.

A module that is not installed cannot be mapped: the test then says to install the
extras (``pip install -e '.[all,test]'``) rather than guess.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "napari_pathfm"
PRODUCT_EXTRAS = ("torch", "napari", "distributed")
#: Modules of the package that must run with the core dependencies only (no extra installed).
CORE_ONLY = (
    "io",
    "colors.py",
    "coords.py",
    "errors.py",
    "progress.py",
    "userdata.py",
    "recipe_files.py",
    "_lazy.py",
    "_reader.py",
    "_writer.py",
    "_sample_data.py",
)


def _normalize(name: str) -> str:
    """PEP 503 name: ``PyYAML`` → ``pyyaml``, ``opencv_python`` → ``opencv-python``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    """Distribution name of a requirement string (``"napari[pyqt6]>=0.5"`` → ``napari``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert match, f"cannot read the requirement {req!r} in pyproject.toml"
    return _normalize(match.group(1))


def declared() -> dict[str, set[str]]:
    """Declared distributions by group: ``"core"`` and each optional extra (self-references dropped)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    own = _normalize(project["name"])
    groups = {"core": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    return {g: {_requirement_name(r) for r in reqs} - {own} for g, reqs in groups.items()}


def third_party_imports(paths: list[Path], local: set[str]) -> dict[str, set[Path]]:
    """Top-level names of the non-stdlib modules imported by ``paths`` (absolute imports only) → importing files."""
    found: dict[str, set[Path]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top in ("__future__", "napari_pathfm"):
                    continue
                found.setdefault(top, set()).add(path)
    return found


def _local_modules(*roots: Path) -> set[str]:
    """Names the scripts import from their own folders (``conftest``, ``_cli_helpers``, ``build_bags`` ...)."""
    return {p.stem for root in roots for p in root.rglob("*.py")} | {
        p.name for root in roots for p in root.rglob("*") if p.is_dir()
    }


def undeclared(imports: dict[str, set[Path]], allowed: set[str]) -> list[str]:
    """One line per imported module whose distribution is not in ``allowed`` (or cannot be found)."""
    dists = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(imports.items()):
        where = ", ".join(sorted(str(f.relative_to(REPO)) for f in files)[:3])
        provided_by = {_normalize(d) for d in dists.get(module, [])}
        if not provided_by:
            problems.append(f"{module} (imported by {where}) is not installed: run pip install -e '.[all,test]'")
        elif not provided_by & allowed:
            problems.append(f"{module} (imported by {where}) comes from {sorted(provided_by)}, not declared here")
    return problems


def _files(root: Path, names=None) -> list[Path]:
    if names is None:
        return sorted(root.rglob("*.py"))
    return sorted(p for n in names for p in ((root / n).rglob("*.py") if (root / n).is_dir() else [root / n]))


def test_pyproject_groups_are_read():
    groups = declared()
    assert {"numpy", "pyyaml", "openslide-python"} <= groups["core"]
    assert {"torch", "lightning"} <= groups["torch"] and "napari" in groups["napari"] and "pytest" in groups["test"]


def test_src_imports_are_declared_outside_the_test_extra():
    groups = declared()
    allowed = groups["core"].union(*(groups[e] for e in PRODUCT_EXTRAS))
    imports = third_party_imports(_files(PACKAGE), set())
    assert {"numpy", "torch", "sklearn", "pandas"} <= set(imports)  # the scan sees lazy imports too
    assert not undeclared(imports, allowed), "\n".join(["declare in pyproject.toml:"] + undeclared(imports, allowed))


def test_io_and_the_small_core_need_only_the_core_dependencies():
    imports = third_party_imports(_files(PACKAGE, CORE_ONLY), set())
    assert {"numpy", "zarr", "openslide"} <= set(imports)
    problems = undeclared(imports, declared()["core"])
    assert not problems, "\n".join(["these must be core dependencies (or the import must move up a layer):"] + problems)


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_test_and_benchmark_imports_are_declared(folder: str):
    groups = declared()
    allowed = set().union(*groups.values())
    local = _local_modules(REPO / "tests", REPO / "benchmarks", REPO / "docs")  # docs/architecture_diagram.py too
    imports = third_party_imports(_files(REPO / folder), local)
    assert "numpy" in imports
    assert not undeclared(imports, allowed), "\n".join(["declare in pyproject.toml:"] + undeclared(imports, allowed))
