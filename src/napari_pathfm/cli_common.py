"""What every ``pathfm`` command module shares: the progress bar, the one error message, JSON output,
and the output checks made before anything heavy loads. Below :mod:`napari_pathfm.cli` and its
subcommand modules, so each of them can use it."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import typer

from .errors import Cancelled

__all__ = ["cli_progress", "fail", "folders", "json_text", "preflight"]


@contextmanager
def cli_progress(description: str):
    """Yield ``(progress, cancel)``: a rich progress bar callback and a Ctrl-C cancel event."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cancel = threading.Event()
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[msg]}"),
        transient=False,
        disable=not sys.stderr.isatty(),
    )
    task = bar.add_task(description, total=None, msg="")

    def progress(done: int, total: int, message: str = "") -> None:
        bar.update(task, completed=done, total=total or None, msg=message)

    with bar:
        try:
            yield progress, cancel
        except KeyboardInterrupt:
            cancel.set()
            raise Cancelled(f"{description} cancelled by the user") from None


def fail(exc: BaseException) -> None:
    """Print the one message for ``exc`` (traceback first with --debug) and exit with its code."""
    from .error_boundary import debug_enabled, describe, format_traceback

    if debug_enabled():
        typer.echo(format_traceback(exc), err=True, nl=False)
    message = describe(exc)
    typer.secho(f"error: {message.text}", fg=typer.colors.RED, err=True)
    raise typer.Exit(message.exit_code)


def json_text(obj, **kwargs) -> str:
    """JSON for stdout: undefined numbers (NaN/Inf) as null with a warning, never invalid JSON."""
    from .io.jsonsafe import dumps

    return dumps(obj, where="pathfm output", **{"default": str, **kwargs})


def preflight(outputs, inputs=(), input_folders=(), need_bytes: int = 0) -> None:
    """Refuse outputs over inputs and unwritable/full locations before anything heavy is imported or loaded."""
    from .io.preflight import check_outputs

    check_outputs(outputs, inputs, input_folders=input_folders, need_bytes=need_bytes)


def folders(paths) -> list:
    """The paths among ``paths`` that are folders (z-stacks, data sets): nothing is written inside them."""
    return [p for p in paths if p is not None and Path(p).is_dir()]
