"""Graceful stop of a training run on SIGINT / SIGTERM.

Cluster schedulers (SLURM, Kubernetes, systemd) send SIGTERM some time before they kill a job,
and the training panel's *Stop* sends SIGINT. :class:`GracefulStop` turns the first of these
signals into the engine's cancel: the run finishes its batch, saves ``last.ckpt`` (so ``--resume``
continues from it) and exports the best weights with their card. A second signal stops the
process at once (the default action of that signal: killed by it).

Lightning installs its own SIGTERM handler when ``Trainer.fit``/``test`` start
(``lightning.pytorch.trainer.connectors.signal_connector._SignalConnector``, after the
``on_fit_start`` hooks): it sets ``trainer.received_sigterm``, and the loops then raise
``SIGTERMException`` -- a ``SystemExit`` with no code, so the process ends with status 0 and
nothing exported. Lightning has no setting that leaves SIGTERM alone, so this callback installs
our handler again in the hooks that run after Lightning's registration (sanity check, train,
validation and test start); Lightning's teardown restores what was there before ``fit``, i.e.
ours. Only the main thread can install signal handlers; elsewhere (a training thread inside
napari) this does nothing and the cancel event is the way to stop.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from typing import Any, Self

import lightning as L

__all__ = ["GracefulStop"]


class GracefulStop(L.Callback):
    """First SIGINT/SIGTERM: set ``cancel`` (graceful stop) and say so on stderr; second: die of that signal.

    Parameters
    ----------
    cancel : threading.Event
        The event the engine checks after every batch (``run_recipe(cancel=...)``).
    signals : sequence of int
        Signals that stop the run (default SIGINT and SIGTERM).

    Attributes
    ----------
    received : int or None
        The first stop signal received, None while none arrived.

    Examples
    --------
    >>> cancel = threading.Event()
    >>> stop = GracefulStop(cancel)
    >>> with stop:  # doctest: +SKIP
    ...     result = run_recipe("recipe.yaml", cancel=cancel, callbacks=[stop])
    >>> stop.exit_code()  # 143 after a SIGTERM, 130 after a SIGINT, 0 without
    0
    """

    def __init__(self, cancel: threading.Event, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
        self.cancel = cancel
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._trainer: Any = None

    def handle(self, signum: int, frame: Any = None) -> None:
        """Signal handler: the first signal asks for a graceful stop, a second one kills the process."""
        if self.received is None:
            self.received = signum
            self.cancel.set()
            name = signal.Signals(signum).name
            # os.write, not print: a handler may run while the main thread is inside a print to stderr
            os.write(
                2,
                f"{name}: stopping after this batch (saving last.ckpt, exporting the model); "
                f"send {name} again to stop at once\n".encode(),
            )
            return
        launcher = getattr(getattr(self._trainer, "strategy", None), "launcher", None)
        if launcher is not None and hasattr(launcher, "kill"):  # DDP ranks started by this process go too
            launcher.kill(signal.SIGKILL)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def install(self) -> None:
        """Make :meth:`handle` the handler of the stop signals (main thread only; first call keeps the old ones).

        A signal the process was started with ignored (``SIG_IGN``, e.g. SIGINT of a background job
        of a shell script) stays ignored.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            if signum not in self._previous:
                self._previous[signum] = signal.getsignal(signum)
            if self._previous[signum] is not signal.SIG_IGN:
                signal.signal(signum, self.handle)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def exit_code(self) -> int:
        """``128 + signal number`` of the stop signal (SIGTERM 143, SIGINT 130), 0 when none arrived."""
        return 0 if self.received is None else 128 + int(self.received)

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    # Lightning registered its SIGTERM handler just before each of these hooks: ours wins again.
    def _reinstall(self, trainer: Any, *_: Any) -> None:
        self._trainer = trainer
        if self._previous and threading.current_thread() is threading.main_thread():  # installed (``with stop:``)
            for signum, before in self._previous.items():
                if before is not signal.SIG_IGN:
                    signal.signal(signum, self.handle)

    on_sanity_check_start = _reinstall
    on_train_start = _reinstall
    on_validation_start = _reinstall
    on_test_start = _reinstall
