"""User-facing error types.

Every error raised towards a user names the file involved, says what is wrong
and what to do about it (contract 5 in ``docs/architecture.md``).
"""

from __future__ import annotations

from pathlib import Path


class PathFMError(Exception):
    """Base class of all napari-pathfm errors meant to be shown to a user."""


class SlideError(PathFMError):
    """A whole-slide image cannot be opened or a region of it cannot be decoded."""

    def __init__(self, path: str | Path, problem: str, fix: str = ""):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        text = f"{self.path}: {problem}"
        if fix:
            text += f" {fix}"
        super().__init__(text)


class ZStackError(SlideError):
    """A z-stack is missing planes, has mismatched planes, or cannot be read."""


class CheckpointError(SlideError):
    """A checkpoint or model card cannot be loaded or does not fit the model."""


class RecipeError(SlideError):
    """A training recipe is malformed or refers to data that does not exist."""


class DeviceError(PathFMError, RuntimeError):
    """A requested device (CUDA, MPS) is not available on this machine."""


class Cancelled(PathFMError):
    """Raised by long-running functions when the user asked them to stop."""


class FeatureError(SlideError):
    """A patch-feature file is missing, incomplete, or inconsistent (lengths, NaN, dimension)."""


class CorrectionError(SlideError):
    """Painted corrections cannot be saved, or a corrections folder does not fit the model."""
