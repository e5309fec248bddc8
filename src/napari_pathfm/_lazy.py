"""Lazy package exports (contract 6: importing a subpackage must not import torch).

A package lists ``{public name: submodule}`` and gets a module ``__getattr__`` that
imports the submodule on first access, plus a matching ``__dir__``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """Return ``(__getattr__, __dir__)`` for ``package`` resolving ``exports`` on first use."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
