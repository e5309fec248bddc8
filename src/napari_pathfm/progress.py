"""The progress/cancel protocol shared by every long-running function.

Long functions accept ``progress(done, total, message)`` and ``cancel``. ``cancel``
may be ``None``, a ``threading.Event`` (or anything with ``is_set()``) or a
zero-argument callable returning ``True`` when the user asked to stop. They call
:func:`check_cancel` between tiles or batches; it raises :class:`Cancelled`.

The CLI adapts the callback to a terminal progress bar and widgets adapt it to
``napari.utils.progress``, so both run the same code path (as micro-sam does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .errors import Cancelled

__all__ = ["CancelLike", "Cancelled", "ProgressFn", "check_cancel", "is_cancelled", "report"]


class ProgressFn(Protocol):
    def __call__(self, done: int, total: int, message: str = "") -> Any: ...


CancelLike = Any | None


def is_cancelled(cancel: CancelLike) -> bool:
    """Return True when ``cancel`` (None, Event-like or callable) says stop."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    if callable(cancel):
        return bool(cancel())
    return bool(cancel)


def check_cancel(cancel: CancelLike, what: str = "operation") -> None:
    """Raise :class:`Cancelled` if the user asked to stop."""
    if is_cancelled(cancel):
        raise Cancelled(f"{what} cancelled by the user")


def report(progress: Callable[..., Any] | None, done: int, total: int, message: str = "") -> None:
    """Call ``progress`` if one was given; a missing callback is not an error."""
    if progress is not None:
        progress(done, total, message)
