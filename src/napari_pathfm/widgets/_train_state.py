"""The training panel's run state: which of Start, Stop and Resume may be pressed.

A small state object drives the buttons (as CAREamics' napari plugin does):
``idle`` → ``training`` → (``stopping`` →) ``done`` or ``crashed``; from ``done`` and
``crashed`` a new run (Start) or a continued one (Resume) may begin.
"""

from __future__ import annotations

from qtpy.QtWidgets import QPushButton

__all__ = ["RunState"]


class RunState:
    """The panel's run state; :meth:`set` updates which buttons are enabled."""

    STATES = ("idle", "training", "stopping", "done", "crashed")

    def __init__(self, start: QPushButton, stop: QPushButton, resume: QPushButton, can_resume):
        self.value = "idle"
        self._start, self._stop, self._resume, self._can_resume = start, stop, resume, can_resume
        self.set("idle")

    def set(self, value: str) -> None:
        """Enter state ``value`` (one of :attr:`STATES`) and enable the buttons it allows."""
        if value not in self.STATES:
            raise ValueError(f"unknown run state {value!r}; expected one of {self.STATES}")
        self.value = value
        running = value in ("training", "stopping")
        self._start.setEnabled(not running)
        self._stop.setEnabled(running)
        self._stop.setText("Kill" if value == "stopping" else "Stop")
        self._resume.setEnabled(not running and self._can_resume())
