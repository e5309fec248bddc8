"""Models: registry, checkpoints and weight loading (pure torch, imported lazily).

Importing this package does not import torch (contract 6): the names below are
resolved on first access through a module ``__getattr__``.

>>> from napari_pathfm.models import list_models
>>> "timm_classifier" in list_models()
True
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "create_model": "registry",
    "list_models": "registry",
    "model_info": "registry",
    "register_model": "registry",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_card": "checkpoint",
    "list_checkpoints": "checkpoint",
    "load_state_dict_file": "weights",
    "load_into": "weights",
    "LoadReport": "weights",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
