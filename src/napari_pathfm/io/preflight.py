"""Check output locations before a run starts: never over an input, writable, plausibly roomy.

A whole-slide run can take minutes before it writes anything; finding only then that ``--out``
points at the slide itself, at a read-only share or at a full disk wastes the run (or, worse,
destroys the input). :func:`check_outputs` runs before any model is loaded and in well under a
second: it refuses an output that resolves to an input (same path, a hard link to it, or a file
inside an input folder such as a z-stack's), makes each output's folder, writes and removes a
small probe file there, and checks the free space against what the run will write.

>>> check_outputs([Output("out/mask.ome.tif")], inputs=["slide.svs"])   # doctest: +SKIP
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DiskFullError, OutputError

__all__ = ["MIN_FREE_BYTES", "Output", "check_outputs"]

#: Free space below which no run starts (a mask, a CSV and a summary need at least this much).
MIN_FREE_BYTES = 8 << 20
PathLike = str | os.PathLike


@dataclass(frozen=True)
class Output:
    """One place a run writes.

    Parameters
    ----------
    path
        The output file, or the folder the run writes into (``folder=True``).
    folder
        ``path`` is a folder of outputs (``--out DIR``) rather than one file.
    names
        File names the run writes inside a folder output (checked against the inputs too).
    option
        The option that set it (``--out``, ``--geojson``), named in messages.
    """

    path: PathLike
    folder: bool = False
    names: Sequence[str] = field(default_factory=tuple)
    option: str = "--out"


def _shown(path: PathLike) -> Path:
    """The path as the user gave it, made absolute (links kept): what messages name."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _resolved(path: PathLike) -> Path:
    """The path with links resolved: what comparisons use."""
    return _shown(path).resolve(strict=False)


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts, case-insensitive file systems
    except OSError:
        return False


def _written_paths(out: Output) -> list[Path]:
    base = _shown(out.path)
    return [base] + [base / name for name in out.names] if out.folder else [base]


def _check_not_an_input(out: Output, inputs: list[Path], input_folders: list[tuple[Path, Path]]) -> None:
    """``input_folders``: (resolved, as given) pairs; messages name the paths as the user gave them."""
    for shown in _written_paths(out):
        target = _resolved(shown)
        for src in inputs:
            if _same(target, src):
                raise OutputError(
                    shown,
                    f"is an input of this run ({out.option} would overwrite it).",
                    f"Choose another {out.option} path; inputs are never overwritten.",
                )
        for folder, given in input_folders:
            if target == folder or folder in target.parents:
                raise OutputError(
                    shown,
                    f"is inside the input folder {given} ({out.option} would add files to it "
                    "and change what is read next time).",
                    f"Choose a {out.option} outside it.",
                )


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _os_problem(where: Path, exc: OSError, out: Output) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(where, "has no space left.", f"Free some space or choose another {out.option}.")
    reason = {
        errno.EROFS: "is on a read-only file system",
        errno.EACCES: "is not writable (permission denied)",
        errno.EPERM: "is not writable (operation not permitted)",
        errno.ENOTDIR: "cannot be created: a part of the path is a file",
    }.get(exc.errno, f"cannot be written ({exc.strerror or exc})")
    return OutputError(where, f"{reason}.", f"Choose a writable {out.option} location.")


def _check_writable(out: Output) -> Path:
    """Make the folder the output goes to, write and remove a probe file there; returns that folder."""
    path = _shown(out.path)
    if path.exists():
        if out.folder and not path.is_dir():
            raise OutputError(
                path, f"is a file, but {out.option} needs a folder.", f"Give a folder path for {out.option}."
            )
        if not out.folder and path.is_dir():
            raise OutputError(
                path,
                f"is a folder, but {out.option} needs a file name.",
                f"Give a file path, e.g. {path / 'result.ome.tif'}.",
            )
    folder = path if out.folder else path.parent
    existing = _first_existing(folder)
    if not existing.is_dir():
        raise OutputError(
            folder, f"cannot be created: {existing} is a file, not a folder.", f"Choose another {out.option} location."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_problem(folder, exc, out) from None
    probe = folder / f".pathfm-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _os_problem(folder, exc, out) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return folder


def check_outputs(
    outputs: Iterable[Output | PathLike],
    inputs: Iterable[PathLike | None] = (),
    *,
    input_folders: Iterable[PathLike | None] = (),
    need_bytes: int = 0,
) -> list[Path]:
    """Refuse outputs that would overwrite inputs or cannot be written; make their folders.

    Parameters
    ----------
    outputs
        Where the run writes: :class:`Output` items, or plain paths (files).
    inputs
        Files (and folders) the run reads: slides, images, checkpoints, manifests, recipes,
        corrections. ``None`` items are skipped. Checkpoints' model cards count too.
    input_folders
        Input folders whose contents are read as a whole (a z-stack's planes, a data set):
        nothing may be written inside them.
    need_bytes
        About how much the run writes; a location with less free space (or less than
        :data:`MIN_FREE_BYTES`) is refused.

    Returns
    -------
    list of Path
        The folders outputs go to (now existing).

    Raises
    ------
    OutputError
        An output resolves to an input, lies in an input folder, or cannot be created/written.
    DiskFullError
        Too little free space where an output goes.
    """
    outs = [o if isinstance(o, Output) else Output(o) for o in outputs if o is not None]
    srcs = [_resolved(p) for p in inputs if p is not None]
    srcs += [s.with_suffix(".json") for s in srcs if s.suffix == ".safetensors"]  # a checkpoint's card
    folders = [(_resolved(p), _shown(p)) for p in input_folders if p is not None]
    for out in outs:
        _check_not_an_input(out, srcs, folders)
    made = []
    for out in outs:
        folder = _check_writable(out)
        need = max(int(need_bytes), MIN_FREE_BYTES)
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        if free is not None and free < need:
            raise DiskFullError(
                folder,
                f"has {free / 2**20:.1f} MB free; this run needs about {need / 2**20:.0f} MB.",
                f"Free some space or choose another {out.option}.",
            )
        made.append(folder)
    return made
