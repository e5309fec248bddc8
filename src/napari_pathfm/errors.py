"""User-facing error types, grouped by kind, and their exit codes.

Every error raised towards a user names the file involved, says what is wrong and what to do
about it (contract 5 in ``docs/architecture.md``). The kinds decide the exit code of the
``pathfm`` command (see :mod:`napari_pathfm.error_boundary`, which also maps OS errors):

================  ==========================================================  =========
kind              what went wrong                                              exit code
================  ==========================================================  =========
InputError        a slide, image, z-stack, recipe, manifest or option is bad   2
CheckpointError   a checkpoint or model card is missing, damaged or unfit      2
OutputError       an output location cannot be written or would hit an input   2
ResourceError     the machine ran out of something (disk, memory, device)      1
Cancelled         the user stopped the run (Ctrl-C, Stop)                      130
================  ==========================================================  =========

Errors about a file take ``(path, problem, fix)`` and read ``"<path>: <problem> <fix>"``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "Cancelled",
    "CheckpointError",
    "CorrectionError",
    "DeviceError",
    "DiskFullError",
    "FeatureError",
    "FileProblem",
    "InputError",
    "ManifestError",
    "OutOfMemory",
    "OutputError",
    "PathFMError",
    "RecipeError",
    "ResourceError",
    "SlideError",
    "UsageError",
    "ZStackError",
]


class PathFMError(Exception):
    """Base class of all napari-pathfm errors meant to be shown to a user (a runtime failure: exit 1)."""

    exit_code = 1


class FileProblem(PathFMError):
    """An error about one file: ``"<path>: <problem> <fix>"`` (``path`` may be None for option errors)."""

    def __init__(self, path: str | Path | None, problem: str, fix: str = ""):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        text = problem if self.path is None else f"{self.path}: {problem}"
        if fix:
            text += f" {fix}"
        super().__init__(text)


# -- bad input (exit 2) -----------------------------------------------------------------------
class InputError(FileProblem):
    """Something the user gave (a file, an option value) cannot be used as it is."""

    exit_code = 2


class UsageError(InputError):
    """A command-line option or ``--set`` value is wrong (no file involved)."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(None, problem, fix)


class SlideError(InputError):
    """A whole-slide image or plain image cannot be opened or a region of it cannot be decoded."""


class ZStackError(SlideError):
    """A z-stack is missing planes, has mismatched planes, or cannot be read."""


class RecipeError(InputError):
    """A training recipe is malformed or refers to data that does not exist."""


class ManifestError(InputError):
    """A batch manifest (CSV) cannot be read or lists slides that do not exist."""


class FeatureError(InputError):
    """A patch-feature file is missing, incomplete, or inconsistent (lengths, NaN, dimension)."""


class CorrectionError(InputError):
    """Painted corrections cannot be saved, or a corrections folder does not fit the model."""


# -- bad checkpoint (exit 2) ------------------------------------------------------------------
class CheckpointError(FileProblem):
    """A checkpoint or model card cannot be loaded, holds NaN/Inf, or does not fit the model."""

    exit_code = 2


# -- output location (exit 2) -----------------------------------------------------------------
class OutputError(FileProblem):
    """An output cannot be written there (not writable, a file in the way) or would overwrite an input."""

    exit_code = 2


# -- the machine (exit 1) ---------------------------------------------------------------------
class ResourceError(FileProblem):
    """The machine ran out of something the run needs: disk space, memory, a device."""

    exit_code = 1


class DiskFullError(ResourceError):
    """No space left where an output or cache is written."""


class OutOfMemory(ResourceError):
    """The CPU or GPU ran out of memory."""


class DeviceError(ResourceError, RuntimeError):
    """A requested device (CUDA, MPS) is not available on this machine."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(None, problem, fix)


class Cancelled(PathFMError):
    """Raised by long-running functions when the user asked them to stop."""

    exit_code = 130
