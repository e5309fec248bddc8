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

__all__ = ["cli_progress", "fail", "folders", "json_text", "preflight", "preflight_recipe"]


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


def _names_a_path(text) -> bool:
    """Whether a recipe string is an existing file or folder (a long description is not; it may not even be
    a valid path: a part over the file system's name limit makes ``stat`` raise)."""
    if not (isinstance(text, str) and text and len(text) < 4096 and ("/" in text or "." in text)):
        return False
    try:
        return Path(text).exists()
    except (OSError, ValueError):
        return False


def _recipe_paths(config, skip=("output", "description")) -> list:
    """Every existing file or folder a recipe names (data folders, CSVs, weights): the run's inputs."""
    found = []
    if isinstance(config, dict):
        for k, v in config.items():
            if k not in skip:
                found += _recipe_paths(v, ())
    elif isinstance(config, list):
        for v in config:
            found += _recipe_paths(v, ())
    elif _names_a_path(config):
        found.append(Path(config))
    return found


def preflight_recipe(recipe: Path, overrides, out: Path | None) -> None:
    """Check a training run's output folder against the recipe (a file or bundled name) and the data it names."""
    from .io.preflight import Output
    from .recipe_files import resolve_recipe
    from .training.recipes import load_recipe

    recipe = resolve_recipe(recipe)  # as given when it is a file, else the bundled recipe of that name
    loaded = load_recipe(recipe, overrides)
    folder = Path(out or loaded.get("output") or Path("runs") / loaded.name)
    inputs = _recipe_paths(loaded.config)
    preflight(
        [Output(folder, folder=True, names=("model.safetensors", "model.json"))], [recipe, *inputs], folders(inputs)
    )
