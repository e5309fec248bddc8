"""Find training recipe files by family without parsing every YAML file.

The Train panel lists the recipes of a family when it opens; parsing ~50 recipe files with
PyYAML took ~0.8 s on the GUI thread. A recipe's family is its top-level ``family:`` key, so a
line scan finds it; only a file whose ``family`` line is unusual (quoted, flow style) is parsed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

__all__ = ["list_recipes", "recipe_family"]

_FAMILY = re.compile(r"^family:[ \t]*([A-Za-z0-9_\-]+)[ \t]*(?:#.*)?$", re.MULTILINE)


def recipe_family(path: Path) -> Optional[str]:
    """The top-level ``family`` of a recipe YAML file, or None (unreadable, not a mapping, no family)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return None
    match = _FAMILY.search(text)
    if match:
        return match.group(1)
    if not re.search(r"^family\s*:", text, re.MULTILINE):
        return None
    import yaml  # an unusual family line: parse this one file

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return str(raw.get("family")) if isinstance(raw, dict) and raw.get("family") else None


def list_recipes(family: str, folder: Path) -> list[Path]:
    """Recipe YAML files ``folder/*/*.yaml`` whose ``family`` is ``family`` (unreadable files are skipped)."""
    folder = Path(folder)
    return [p for p in sorted(folder.glob("*/*.yaml")) if recipe_family(p) == family] if folder.is_dir() else []
