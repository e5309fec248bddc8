"""Training: recipes, datasets, one Lightning engine for every family.

Importing this package does not import torch or Lightning (contract 6); the
names below resolve on first access.

>>> from napari_pathfm.training import load_recipe
>>> load_recipe("training/classify/crc_tiny.yaml").get("family")  # doctest: +SKIP
'classify'
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "run_recipe": "engine",
    "TrainResult": "engine",
    "TrainEvent": "callbacks",
    "load_recipe": "recipes",
    "parse_override": "recipes",
    "schema": "recipes",
    "Recipe": "recipes",
    "ClassFolderDataset": "datasets",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
