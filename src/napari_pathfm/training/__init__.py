"""Training: recipes, datasets, one Lightning engine for every family.

Importing this package does not import torch or Lightning (contract 6); the
names below resolve on first access.

>>> from napari_pathfm.training import load_recipe
>>> load_recipe("training/classify/crc_tiny.yaml").get("family")  # doctest: +SKIP
'classify'
"""

from __future__ import annotations

import importlib

_LAZY = {
    "run_recipe": "engine",
    "TrainResult": "engine",
    "TrainEvent": "callbacks",
    "load_recipe": "recipes",
    "parse_override": "recipes",
    "schema": "recipes",
    "Recipe": "recipes",
    "FAMILIES": "recipes",
    "ClassFolderDataset": "datasets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
