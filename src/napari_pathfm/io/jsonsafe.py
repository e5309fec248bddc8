"""JSON that is always valid: undefined (NaN/Inf) numbers become ``null``, with a warning.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no strict JSON
reader accepts (``jq``, JavaScript, most other languages). A metric can be undefined
(AUROC of a one-class split, a diverged run's loss), so every summary or metrics file
of napari-pathfm goes through :func:`dumps` or :func:`write_json`: non-finite floats
are replaced by ``None`` (JSON ``null``), an :class:`UndefinedMetricWarning` names
them, and the text is made with ``allow_nan=False`` so nothing slips through.

Examples
--------
>>> import warnings
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     dumps({"acc": 0.5, "auroc": float("nan")})
'{"acc": 0.5, "auroc": null}'
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["UndefinedMetricWarning", "dumps", "finite_or_none", "write_json"]


class UndefinedMetricWarning(UserWarning):
    """A NaN or Inf value was written as JSON ``null``."""


def _clean(obj: Any, key: str, found: list[str]) -> Any:
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral):  # float, numpy floats
        value = float(obj)  # numpy floats become plain floats (json cannot write np.float32)
        if math.isfinite(value):
            return value
        found.append(key or "<value>")
        return None
    if isinstance(obj, dict):
        return {k: _clean(v, f"{key}.{k}" if key else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, f"{key}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def finite_or_none(obj: Any) -> tuple[Any, list[str]]:
    """Copy of ``obj`` with every non-finite float (recursively in dicts, lists, tuples) replaced by None.

    Returns
    -------
    (object, list of str)
        The cleaned copy and the keys that were replaced, e.g. ``["metrics.auroc"]``.
    """
    found: list[str] = []
    return _clean(obj, "", found), found


def dumps(obj: Any, *, where: str = "JSON output", default: Callable | None = None, **kwargs) -> str:
    """``json.dumps`` that writes undefined numbers as ``null`` and warns, naming them and ``where``.

    ``default`` converts other objects (Paths, arrays) and its results are cleaned too;
    ``kwargs`` go to :func:`json.dumps` (``indent``, ``sort_keys``, ...).
    """
    if default is not None:  # run conversions first so their NaN are caught as well
        obj = json.loads(json.dumps(obj, default=default))
    cleaned, found = finite_or_none(obj)
    if found:
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        warnings.warn(
            f"{where}: {len(found)} undefined value(s) (NaN/Inf) written as null: {shown}",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    return json.dumps(cleaned, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, default: Callable | None = None) -> Path:
    """Write ``obj`` to ``path`` atomically as strict JSON (see :func:`dumps`), ending with a newline."""
    from .atomic import atomic_path

    path = Path(path)
    text = dumps(obj, where=str(path), default=default, indent=indent) + "\n"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
