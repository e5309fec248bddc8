"""Run a pipeline function off the GUI thread with progress and a cancel flag.

Widgets never compute: they hand a plain function that accepts ``progress`` and
``cancel`` (the same protocol the CLI uses) to :class:`TaskRunner`, which runs it
in a napari worker thread, feeds ``on_progress(done, total, message)`` through a Qt signal
(queued onto the GUI thread) and calls ``on_done``/``on_error`` on the GUI thread.
The progress is shown by the dock's own bar (:class:`~napari_pathfm.widgets._dock.TaskDock`):
no napari activity-dock progress bar is made, whose creation stalled the GUI thread ~0.1 s per run.

Failures take the one error path shared with the CLI (:func:`napari_pathfm.error_boundary.describe`):
the task's exception is caught inside the worker and handed back as a value, so napari's own
worker error relay (a second toast with a traceback) never fires; the dock shows one message.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal

from ..error_boundary import describe
from ..errors import Cancelled

log = logging.getLogger(__name__)


class _Failed:
    """What a task that raised returns from the worker thread (see the module docstring)."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class _Bridge(QObject):
    progressed = Signal(int, int, str)


class TaskRunner(QObject):
    """One background task at a time, with progress and cancel, for a dock widget.

    Parameters
    ----------
    on_state : callable, optional
        Called with ``"running"``, ``"done"``, ``"cancelled"`` or ``"error"`` so the
        widget can enable/disable its buttons.
    on_progress : callable, optional
        Called on the GUI thread with ``(done, total, message)`` as the task reports progress.
    """

    def __init__(
        self,
        on_state: Callable[[str], None] | None = None,
        parent=None,
        on_progress: Callable[[int, int, str], None] | None = None,
    ):
        super().__init__(parent)
        self._bridge = _Bridge()
        self._bridge.progressed.connect(self._on_progress)
        self._on_state = on_state or (lambda state: None)
        self._cancel = threading.Event()
        self._on_progress_cb = on_progress or (lambda done, total, message: None)
        self.worker = None
        self.last_error: BaseException | None = None
        self.last_message: str = ""

    @property
    def running(self) -> bool:
        return self.worker is not None

    def cancel(self) -> None:
        """Ask the running task to stop at its next tile/batch boundary."""
        self._cancel.set()

    def start(
        self,
        fn: Callable[..., Any],
        *,
        description: str,
        on_done: Callable[[Any], None],
        on_error: Callable[[BaseException], None] | None = None,
    ):
        """Run ``fn(progress=..., cancel=...)`` in a worker thread; returns the worker."""
        from napari.qt.threading import create_worker

        from ._gl_safety import keep_triton_out

        keep_triton_out()  # before the task imports torch; see _gl_safety

        if self.worker is not None:
            raise RuntimeError("a task is already running; cancel it first")
        self._cancel = threading.Event()
        cancel = self._cancel
        bridge = self._bridge

        def emit(done: int, total: int, message: str = "") -> None:
            bridge.progressed.emit(int(done), int(total), str(message))

        def guarded() -> Any:
            try:
                return fn(progress=emit, cancel=cancel)
            except BaseException as exc:  # noqa: BLE001 - handed to the one error path on the GUI thread
                return _Failed(exc)

        worker = create_worker(guarded, _start_thread=False)

        def finished(result: Any) -> None:
            if isinstance(result, _Failed):
                failed(result.exc)
                return
            self._finish("done")
            on_done(result)

        def failed(exc: BaseException) -> None:
            message = describe(exc)
            self.last_error, self.last_message = exc, message.text
            state = "cancelled" if message.kind == "cancelled" or isinstance(exc, Cancelled) else "error"
            if message.unexpected:
                log.error("%s failed", description, exc_info=exc)
            else:
                log.debug("%s failed", description, exc_info=exc)
            self._finish(state)
            if on_error is not None:
                on_error(exc)
            elif state == "error":
                from napari.utils.notifications import show_error

                show_error(f"{description} failed: {message.text}")

        worker.returned.connect(finished)
        worker.errored.connect(failed)  # only if the guard itself broke
        self.worker = worker
        self.last_error, self.last_message = None, ""
        self._on_state("running")
        worker.start()
        return worker

    def _on_progress(self, done: int, total: int, message: str) -> None:
        if self.worker is not None:  # a late report of a finished task is dropped
            self._on_progress_cb(done, total, message)

    def _finish(self, state: str) -> None:
        self.worker = None
        self._on_state(state)
