"""The training recipes bundled with the package: find, list and name them.

The build ships the repository's top-level ``training/<folder>/<name>.yaml`` files inside the
package as ``napari_pathfm/recipes/<folder>/<name>.yaml`` (in the source tree
``src/napari_pathfm/recipes`` is a link to ``training/``, as ``napari.yaml`` is to the root
manifest), so one :mod:`importlib.resources` lookup finds them in a wheel, an sdist build and an
editable checkout alike. A bundled recipe is named ``<folder>/<stem>``, e.g. ``pathsam2/glas_cpu``;
``pathfm train`` and :func:`napari_pathfm.training.recipes.load_recipe` take that name wherever
they take a recipe file.

The Train panel lists the recipes of a family when it opens; parsing ~50 recipe files with
PyYAML took ~0.8 s on the GUI thread. A recipe's family is its top-level ``family:`` key, so a
line scan finds it; only a file whose ``family`` line is unusual (quoted, flow style) is parsed.
No torch here: listing recipes stays cheap.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .errors import RecipeError

__all__ = ["BundledRecipe", "bundled_recipes", "list_recipes", "recipe_family", "recipes_dir", "resolve_recipe"]

_FAMILY = re.compile(r"^family:[ \t]*([A-Za-z0-9_\-]+)[ \t]*(?:#.*)?$", re.MULTILINE)
_LIST_HINT = "`pathfm recipes` lists the bundled recipes."


@dataclass(frozen=True)
class BundledRecipe:
    """One bundled recipe: ``name`` (``folder/stem``), ``family``, ``description`` (on one line), ``path``."""

    name: str
    family: str | None
    description: str
    path: Path

    def as_dict(self) -> dict:
        """JSON-ready fields (the path as a string)."""
        return {**asdict(self), "path": str(self.path)}


def recipes_dir() -> Path:
    """The folder of the bundled recipes (``napari_pathfm/recipes``), found through :mod:`importlib.resources`."""
    root = resources.files(__package__) / "recipes"
    # an installed or editable package is a folder; a zipped one has no usable folder and lists nothing
    return root if isinstance(root, Path) else Path(str(root))


def recipe_family(path: Path) -> str | None:
    """The top-level ``family`` of a recipe YAML file, or None (unreadable, not a mapping, no family)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    match = _FAMILY.search(text)
    if match:
        return match.group(1)
    if not re.search(r"^family\s*:", text, re.MULTILINE):
        return None
    raw = _parse(text)
    return str(raw.get("family")) if isinstance(raw, dict) and raw.get("family") else None


def list_recipes(family: str, folder: Path) -> list[Path]:
    """Recipe YAML files ``folder/*/*.yaml`` whose ``family`` is ``family`` (unreadable files are skipped)."""
    folder = Path(folder)
    return [p for p in sorted(folder.glob("*/*.yaml")) if recipe_family(p) == family] if folder.is_dir() else []


def _files() -> list[Path]:
    folder = recipes_dir()
    return sorted(folder.glob("*/*.yaml")) if folder.is_dir() else []


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def _parse(text: str):
    """YAML of one recipe (the C loader when PyYAML has it), or None when it does not parse."""
    import yaml

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None


def _folded(description) -> str:
    """A recipe's ``description`` on one line (whitespace folded; empty when it has none)."""
    return " ".join(str(description or "").split())


def bundled_recipes(family: str | None = None) -> list[BundledRecipe]:
    """Every bundled recipe (of ``family`` when given), sorted by name; unreadable files show an empty description."""
    found = []
    for path in _files():
        fam = recipe_family(path)
        if family is not None and fam != family:
            continue
        try:
            raw = _parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            raw = None
        description = raw.get("description") if isinstance(raw, dict) else ""
        found.append(BundledRecipe(_name(path), fam, _folded(description), path))
    return found


def resolve_recipe(source: str | Path) -> Path:
    """The recipe file ``source`` names: an existing file as given (a path wins), else the bundled recipe of that name.

    ``source`` may be a path, or a bundled name with or without ``.yaml`` (``pathsam2/glas_cpu``).

    Raises
    ------
    RecipeError
        ``source`` is a folder, or neither a file nor a bundled name (the message suggests close names).
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise RecipeError(source, "is a folder, not a recipe file.", f"Give a .yaml file or a name; {_LIST_HINT}")
    name = str(source).replace("\\", "/").strip("/")
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    names = {_name(p): p for p in _files()}
    if name in names:
        return names[name]
    close = [n for n in names if n.rpartition("/")[2] == name.rpartition("/")[2]]
    close += [n for n in difflib.get_close_matches(name, list(names), n=3, cutoff=0.6) if n not in close]
    hint = f"Did you mean {', '.join(repr(n) for n in close[:4])}? " if close else ""
    raise RecipeError(source, "is neither a recipe file nor a bundled recipe name.", hint + _LIST_HINT)
