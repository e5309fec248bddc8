"""Training recipes: YAML files that say what to train, on what, and how.

A recipe has the top-level keys ``family``, ``description``, ``seed``, ``output``,
``model`` (registry ``name`` plus its config keys), ``data`` (family specific),
``optim`` and ``trainer``. :mod:`~napari_pathfm.training.recipe_fields` lists every known
key with its type, default and help text (the family's keys come from its
:class:`~napari_pathfm.families.FamilySpec`), so the CLI can validate and a GUI can render a form.

Strings may use ``${VAR}`` or ``${VAR:-default}`` (a default may itself hold one ``${VAR}``, as in
``${PATHFM_GLAS_TILES:-${PATHFM_DATA_DIR}/glas_tiles}``); ``${PATHFM_SHARED_DATA}``
defaults to ``<per-user data folder>/shared-data`` (:func:`default_shared_data`) and ``${PATHFM_DATA_DIR}``
to the per-user data folder itself (:func:`napari_pathfm.userdata.data_dir`), so a bundled recipe's data
defaults never point inside the installed package. A recipe is a
file or the name of a bundled one (``pathsam2/glas_cpu``, :mod:`napari_pathfm.recipe_files`).
Relative paths written in a recipe file
resolve against the recipe's folder; relative paths given as overrides resolve
against the current directory (where the command was typed).

Examples
--------
>>> r = load_recipe("training/classify/crc_tiny.yaml", ["optim.lr=0.01"])  # doctest: +SKIP
>>> r.get("optim.lr")  # doctest: +SKIP
0.01
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from ..families import list_families
from ..io.text import read_utf8
from .recipe_fields import SCHEMA, Field, family_fields

__all__ = ["Recipe", "default_shared_data", "load_recipe", "parse_override", "read_recipe_mapping", "schema"]


_SECTIONS = {"model", "data", "optim", "loss", "trainer", "trainer.early_stopping"}
_MISSING = object()


def default_shared_data() -> Path:
    """The folder ``${PATHFM_SHARED_DATA}`` stands for: that variable, else ``shared-data`` in the per-user
    data folder (:func:`napari_pathfm.userdata.data_dir`); never a folder found relative to the package."""
    env = os.environ.get("PATHFM_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    from ..userdata import data_dir

    return data_dir() / "shared-data"


def _shared_data(where: str) -> Path:
    """:func:`default_shared_data` for a recipe that uses ``${PATHFM_SHARED_DATA}``; a missing folder is named."""
    folder = default_shared_data()
    if not folder.is_dir():
        raise RecipeError(
            where,
            f"uses ${{PATHFM_SHARED_DATA}}, but its data folder {folder} does not exist.",
            "Set PATHFM_SHARED_DATA to the folder holding the data sets (glas/, crc-tiles/, isl-blue-sample/, ...).",
        )
    return folder


def schema(family: str | None = None) -> dict[str, dict]:
    """Known keys as plain dicts (``type``, ``default``, ``help``, ``choices``, ``required``, ``path``) for forms."""
    fields = dict(SCHEMA)
    for fam in list_families("training"):
        if family in (None, fam):
            fields.update(family_fields(fam))
    out = {
        key: {
            "type": [t.__name__ for t in f.types],
            "default": copy.deepcopy(f.default),
            "help": f.help,
            "choices": list(f.choices) if f.choices else None,
            "required": f.required,
            "path": f.path,
        }
        for key, f in fields.items()
    }
    out["family"]["choices"] = list_families("training")  # plugin families too
    return out


@dataclass
class Recipe:
    """A validated recipe: ``config`` with every default filled in, and the file it came from."""

    config: dict
    path: Path | None = None

    @property
    def name(self) -> str:
        """Recipe file stem, used for the default output folder."""
        return self.path.stem if self.path else "recipe"

    def get(self, key: str, default: Any = None) -> Any:
        """Value at dotted ``key`` (``"trainer.max_epochs"``), or ``default``."""
        return _get(self.config, key, default)

    def to_yaml(self) -> str:
        """The full recipe (defaults included) as YAML, for reproducibility."""
        return yaml.safe_dump(self.config, sort_keys=False)


# ${VAR} or ${VAR:-default}; the default may hold one nested ${VAR} (expanded only when the default is used).
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-((?:[^$}]|\$(?!\{)|\$\{[^}]*\})*))?\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        var, fallback = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if var == "PATHFM_SHARED_DATA":
            return str(_shared_data(where))
        if var == "PATHFM_DATA_DIR":  # the per-user data folder, as userdata resolves it
            from ..userdata import data_dir

            return str(data_dir())
        if fallback is not None:
            return _VAR.sub(sub, fallback)
        raise RecipeError(
            where,
            f"uses ${{{var}}} but the environment variable {var} is not set.",
            f"Set {var} or write ${{{var}:-default}}.",
        )

    return _VAR.sub(sub, value)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"optim.lr=0.01"`` into ``("optim.lr", 0.01)``; the value is parsed as a YAML scalar."""
    key, sep, raw = str(text).partition("=")
    key = key.strip().removeprefix("--set").strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set(config: dict, key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _check(value: Any, key: str, f: Field, where: str) -> Any:
    if isinstance(value, str) and float in f.types:
        try:
            value = float(value)  # PyYAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    ok = isinstance(value, f.types) and not (isinstance(value, bool) and bool not in f.types)
    if not ok:
        want = " or ".join("null" if t is type(None) else t.__name__ for t in f.types)
        raise RecipeError(where, f"key '{key}' must be {want}, not {value!r}.", f"Help: {f.help}")
    if f.choices and value not in f.choices:
        raise RecipeError(where, f"key '{key}' is {value!r}; choose one of {list(f.choices)}.", f"Help: {f.help}")
    return value


def _unknown(key: str, known: Iterable[str], where: str) -> RecipeError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"Did you mean '{close[0]}'? " if close else ""
    section = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == section]
    return RecipeError(where, f"unknown key '{key}'.", f"{hint}Known keys here: {', '.join(siblings or known)}.")


def _validate(config: dict, where: str, base: Path | None) -> dict:
    config = copy.deepcopy(config)
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and "early_stopping" in trainer and trainer["early_stopping"] in (None, False, True):
        trainer["early_stopping"] = {"enabled": bool(trainer["early_stopping"])}
    family = config.get("family")
    families = list_families("training")
    if family not in families:
        raise RecipeError(
            where,
            f"key 'family' is {family!r}; choose one of {families}.",
            "Every recipe starts with family: <name>.",
        )
    fields = {**SCHEMA, **family_fields(family)}
    model_name = (config.get("model") or {}).get("name") if isinstance(config.get("model"), dict) else None
    from ..models.registry import _BUILD_ONLY_KEYS, list_models, model_info

    if model_name is None:
        raise RecipeError(where, "required key 'model.name' is missing.", f"Known models: {', '.join(list_models())}.")
    if model_name not in list_models():
        raise RecipeError(
            where,
            f"key 'model.name' is {model_name!r}, which is not a known model.",
            f"Known models: {', '.join(list_models())}.",
        )
    model_keys = {f"model.{k}" for k in model_info(model_name)["default_cfg"]}
    for key in model_keys:
        # files loaded at build time (weights, sam_checkpoint, backbone_weights, ...) are relative to the recipe
        is_file = key[len("model.") :] in _BUILD_ONLY_KEYS and not key.endswith("partial_weights")
        fields[key] = Field((object,), None, "Model config (see the model's docstring).", path=is_file)

    def walk(node: dict, prefix: str) -> None:
        if not isinstance(node, dict):
            raise RecipeError(
                where, f"key '{prefix}' must be a mapping of keys, not {node!r}.", "Check the indentation."
            )
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in _SECTIONS:
                if v is not None:
                    walk(v, key)
            elif key not in fields:
                raise _unknown(key, fields, where)

    walk(config, "")
    for key, f in fields.items():
        value = _get(config, key, _MISSING)
        if value is _MISSING:
            if key in model_keys:
                continue
            if f.required:
                raise RecipeError(where, f"required key '{key}' is missing.", f"Help: {f.help}")
            _set(config, key, copy.deepcopy(f.default))
            continue
        if f.types != (object,):
            value = _check(value, key, f, where)
        if f.path and value == "":  # e.g. ${OPTIONAL_WEIGHTS:-} left unset: no file, not the recipe's folder
            value = None
        if f.path and isinstance(value, str) and base is not None and not Path(value).is_absolute():
            value = str((base / value).resolve())
        _set(config, key, value)
    return config


def _get(config: dict, key: str, default: Any) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def read_recipe_mapping(path: str | Path) -> dict:
    """The top-level mapping of a recipe file as written (no overrides, expansion or validation).

    One reader for the CLI, the engine and the training panel: undecodable bytes, YAML syntax errors
    (line, column and the line's text) and a file that is not a mapping are :class:`RecipeError`.
    """
    path = Path(path)
    text = read_utf8(path, RecipeError, "Save it as UTF-8.")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = ""
        if mark is not None:
            lines = text.splitlines()
            text = lines[mark.line].strip() if mark.line < len(lines) else ""
            where = f" at line {mark.line + 1}, column {mark.column + 1}" + (f" ({text!r})" if text else "")
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(
            path,
            f"is not valid YAML{where} ({problem}).",
            "Fix the syntax there (indentation, a missing ':', bracket or quote).",
        ) from exc
    if not isinstance(raw, dict):
        raise RecipeError(
            path, "must be a mapping of keys (family, model, data, ...).", "See training/classify/crc_tiny.yaml."
        )
    return raw


def load_recipe(source: str | Path | dict | Recipe, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override, expand and validate a recipe.

    Parameters
    ----------
    source : str, Path, dict or Recipe
        A YAML file, or an already-loaded mapping (paths then resolve against
        the current folder).
    overrides : iterable of str
        ``"key.sub=value"`` items (the CLI's ``--set``); values parse as YAML scalars.

    Returns
    -------
    Recipe

    Raises
    ------
    RecipeError
        Unreadable YAML, unknown key, wrong type, bad choice or missing required
        key; the message names the recipe file and the key.
    """
    path: Path | None = None
    if isinstance(source, Recipe):
        raw, path = copy.deepcopy(source.config), source.path
        where = str(path) if path else "<recipe dict>"
    elif isinstance(source, dict):
        raw, where = copy.deepcopy(source), "<recipe dict>"
    else:
        from ..recipe_files import resolve_recipe

        path = resolve_recipe(source).resolve()  # a file, or the bundled recipe of that name
        where = str(path)
        raw = read_recipe_mapping(path)
    config = _validate(_expand(raw, where), where, path.parent if path else Path.cwd())
    if overrides:
        for item in overrides:
            try:
                key, value = parse_override(item)
            except ValueError as exc:
                raise RecipeError(where, str(exc), "Write overrides as --set section.key=value.") from exc
            _set(config, key, _expand(value, where))
        config = _validate(config, where, Path.cwd())
    return Recipe(config=config, path=path)
