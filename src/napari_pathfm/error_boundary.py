"""One mapping from failures to what the user reads and the exit code (contract 9).

The ``pathfm`` command and the napari docks both call :func:`describe` on whatever a run
raised: the package's own errors (:mod:`napari_pathfm.errors`) carry their message and kind;
ordinary OS errors (permission denied, read-only file system, disk full, missing file, a folder
where a file was expected, a file in the way), undecodable text, YAML errors and running out of
memory become one or two lines — what failed, which file, what to do — instead of a traceback.

Exit codes: 2 bad input or usage, 1 runtime failure, 130 Ctrl-C, 143 SIGTERM (set by
``pathfm train``'s signal handling). ``--debug`` or ``PATHFM_DEBUG=1`` adds the traceback.

>>> describe(FileNotFoundError(2, "No such file or directory", "slide.svs")).text
'slide.svs: file or folder not found. Check the path.'
"""

from __future__ import annotations

import errno
import os
import traceback
from dataclasses import dataclass

from .errors import PathFMError

__all__ = ["UserMessage", "debug_enabled", "describe", "format_traceback"]

EXIT_INPUT, EXIT_RUNTIME, EXIT_CANCELLED = 2, 1, 130


@dataclass(frozen=True)
class UserMessage:
    """What to show: ``text`` (one or two lines), ``exit_code``, ``kind`` (input, checkpoint, output,
    resource, cancelled, internal) and whether it is an error nobody planned for (``unexpected``: a bug)."""

    text: str
    exit_code: int
    kind: str
    unexpected: bool = False


def debug_enabled() -> bool:
    """True when tracebacks were asked for (``PATHFM_DEBUG=1``; ``pathfm --debug`` sets it)."""
    return os.environ.get("PATHFM_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def format_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` as text (what ``--debug`` prints)."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _kind_of(exc: PathFMError) -> str:
    from . import errors as e

    for cls, name in (
        (e.Cancelled, "cancelled"),
        (e.CheckpointError, "checkpoint"),
        (e.OutputError, "output"),
        (e.ResourceError, "resource"),
        (e.InputError, "input"),
    ):
        if isinstance(exc, cls):
            return name
    return "runtime"


def _os_names(exc: OSError) -> str:
    names = [str(n) for n in (exc.filename, exc.filename2) if n not in (None, "")]
    return " -> ".join(names)


#: errno → (what went wrong, what to do, exit code, kind)
_OS_ERRORS = {
    errno.EACCES: ("permission denied.", "Choose a location you can read/write, or fix its permissions.", 2, "input"),
    errno.EPERM: (
        "operation not permitted.",
        "Choose a location you can read/write, or fix its permissions.",
        2,
        "input",
    ),
    errno.EROFS: ("is on a read-only file system.", "Write the output somewhere writable (--out).", 2, "output"),
    errno.ENOSPC: ("no space left on the device.", "Free some space or write to another disk.", 1, "resource"),
    errno.EDQUOT: ("disk quota exceeded.", "Free some space or write to another disk.", 1, "resource"),
    errno.ENOENT: ("file or folder not found.", "Check the path.", 2, "input"),
    errno.EISDIR: ("is a folder where a file was expected.", "Give a file path.", 2, "input"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder.", "Check the path.", 2, "input"),
    errno.EEXIST: ("already exists.", "Remove it or choose another name.", 2, "input"),
    errno.ENAMETOOLONG: ("the path is too long.", "Use a shorter path.", 2, "input"),
    errno.EMFILE: ("too many open files.", "Raise the limit (ulimit -n) or run fewer slides at once.", 1, "resource"),
    errno.EIO: (
        "input/output error while reading or writing.",
        "Check the disk or network share; copy the file elsewhere and retry.",
        1,
        "resource",
    ),
}


def _describe_os(exc: OSError) -> UserMessage:
    where = _os_names(exc)
    known = _OS_ERRORS.get(exc.errno)
    if known is None:
        what, fix, code, kind = f"{exc.strerror or exc}.", "", EXIT_RUNTIME, "resource"
    else:
        what, fix, code, kind = known
    text = f"{where}: {what}" if where else what[0].upper() + what[1:]
    return UserMessage(f"{text} {fix}".strip(), code, kind)


def _describe_unicode(exc: UnicodeDecodeError) -> UserMessage:
    where = getattr(exc, "path", None)
    head = f"{where}: " if where else ""
    return UserMessage(
        f"{head}is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start} cannot be decoded). "
        "Save it as UTF-8 and try again.",
        EXIT_INPUT,
        "input",
    )


def _describe_yaml(exc: BaseException) -> UserMessage:
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return UserMessage(
        f"{where}not valid YAML ({problem}). Fix the syntax (indentation, a missing ':' or quote).", EXIT_INPUT, "input"
    )


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError / torch.OutOfMemoryError
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _is_yaml_error(exc: BaseException) -> bool:
    return any(c.__module__.startswith("yaml") and c.__name__ == "YAMLError" for c in type(exc).__mro__)


def describe(exc: BaseException) -> UserMessage:
    """The user message and exit code for ``exc`` (any exception a run raised).

    Parameters
    ----------
    exc : BaseException
        What the run raised. The package's errors keep their text; OS errors, text decoding
        errors, YAML errors and out-of-memory errors get one plain sentence naming the file
        and the fix; anything else is reported as an unexpected internal error.
    """
    if isinstance(exc, KeyboardInterrupt):
        return UserMessage("cancelled by the user.", EXIT_CANCELLED, "cancelled")
    if isinstance(exc, PathFMError):
        return UserMessage(str(exc), int(getattr(exc, "exit_code", EXIT_RUNTIME)), _kind_of(exc))
    if isinstance(exc, UnicodeDecodeError):
        return _describe_unicode(exc)
    if _is_yaml_error(exc):
        return _describe_yaml(exc)
    if _is_out_of_memory(exc):
        device = "GPU" if "cuda" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError" else "machine"
        return UserMessage(
            f"the {device} ran out of memory. Lower --batch-size (or the tile size), close other "
            "programs, or run on --device cpu.",
            EXIT_RUNTIME,
            "resource",
        )
    if isinstance(exc, OSError):
        return _describe_os(exc)
    return UserMessage(
        f"internal error: {type(exc).__name__}: {exc}. Run again with --debug for the traceback and report it.",
        EXIT_RUNTIME,
        "internal",
        unexpected=True,
    )


def message_for(exc: BaseException, *, debug: bool | None = None) -> str:
    """``describe(exc).text``, preceded by the traceback when debugging is on."""
    text = describe(exc).text
    if debug if debug is not None else debug_enabled():
        return format_traceback(exc) + text
    return text
