"""``pathfm recipes``: list the training recipes bundled with the package.

The recipes themselves are :mod:`napari_pathfm.recipe_files`; ``pathfm train NAME`` runs one by
the name listed here (``pathsam2/glas_cpu``); ``--json`` gives each file's path, to copy and edit.
"""

from __future__ import annotations

import json
import re

import typer

from .errors import UsageError


def _summary(description: str, limit: int = 100) -> str:
    """The first sentence of a description, cut to ``limit`` characters, for one table row."""
    head = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", description, maxsplit=1)[0]
    return head if len(head) <= limit else head[: limit - 1].rstrip() + "…"


def recipes_cmd(
    family: str | None = typer.Option(None, help="Only recipes of this family (classify, segment, mil, translate)"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (name, family, description, path), not a table"),
) -> None:
    """List the bundled training recipes: name (for `pathfm train NAME`), family and what each trains."""
    from .recipe_files import bundled_recipes, recipes_dir

    found = bundled_recipes(family)
    if family is not None and not found:
        known = sorted({r.family for r in bundled_recipes() if r.family})
        raise UsageError(f"no bundled recipe of family {family!r}.", f"Families with recipes: {', '.join(known)}.")
    if as_json:
        listing = {"folder": str(recipes_dir()), "recipes": [r.as_dict() for r in found]}
        typer.echo(json.dumps(listing, indent=2, ensure_ascii=False))
        return
    width = max((len(r.name) for r in found), default=0)
    for r in found:
        typer.echo(f"{r.name:<{width}}  {r.family or '?':<9}  {_summary(r.description)}")
    typer.echo(
        f"{len(found)} recipes in {recipes_dir()}; run one with `pathfm train NAME [--set key=value ...]`.", err=True
    )
