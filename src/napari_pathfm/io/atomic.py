"""Write-to-temp-then-rename, so a crash or a cancel never leaves a half-written result.

Every writer in :mod:`napari_pathfm.io` writes through :func:`atomic_path`: the data go to a
hidden temporary file (or directory, for OME-Zarr) beside the final path, which replaces the
final path with :func:`os.replace` only after the writer finished without error. On any
exception (including ``KeyboardInterrupt`` and :class:`~napari_pathfm.errors.Cancelled`) the
temporary is removed and an existing file at the final path is left untouched.

The temporary name keeps the final path's suffix (``.ome.tif``, ``.ome.zarr``, ``.geojson`` ...)
because writers such as tifffile decide the format from it, and carries its owner (host and process
id, :mod:`napari_pathfm.io.scratch`): a write first sweeps the target folder (one ``listdir``) for
temporaries of dead processes, so what a killed run left is removed by the next write there.
Cleanup after a failure never replaces the original error with its own.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .scratch import sweep, temp_name

log = logging.getLogger(__name__)

__all__ = ["atomic_path", "split_suffix"]

_COMPOUND_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".ome.btf", ".tar.gz")


def split_suffix(name: str) -> tuple[str, str]:
    """Split a file name into stem and (possibly compound) suffix.

    >>> split_suffix("slide.mask.ome.tif")
    ('slide.mask', '.ome.tif')
    """
    lower = name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix) :]
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _cleanup(path: Path) -> None:
    """Remove a temporary after a failure; a failure to remove is logged, never raised over the first error."""
    try:
        _remove(path)
    except Exception as exc:  # noqa: BLE001 - the original error is the one to report
        log.warning("could not remove the temporary %s (%s); the next write in that folder removes it", path, exc)


def _restore(backup: Path, final: Path) -> None:
    """Put a moved-aside output back; on failure the backup stays (a later sweep restores it)."""
    try:
        os.replace(backup, final)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not put %s back from %s (%s)", final, backup.name, exc)


@contextmanager
def atomic_path(final_path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final_path`` that replaces it only on success.

    Parameters
    ----------
    final_path
        Where the result should end up. Missing parent directories are created.
    directory
        The writer creates a directory (OME-Zarr) rather than a file. An existing directory at
        ``final_path`` is moved aside, replaced, and deleted only after the new one is in place.

    The yielded path does not exist yet; the writer creates it. If the block raises (any
    ``BaseException``), whatever the writer created there is removed and the exception
    propagates; the final path is not touched.

    Examples
    --------
    >>> with atomic_path("out/mask.ome.tif") as tmp:      # doctest: +SKIP
    ...     tifffile.imwrite(tmp, data)
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent)
    stem, suffix = split_suffix(final.name)
    tmp = final.parent / temp_name(stem, suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: the writer did not create {tmp.name}")
        if directory and final.exists():
            backup = final.parent / temp_name(stem, suffix, kind="old")
            os.replace(final, backup)
            try:
                os.replace(tmp, final)
            except BaseException:
                _restore(backup, final)
                raise
            _remove(backup)
        else:
            os.replace(tmp, final)
    except BaseException as exc:
        _cleanup(tmp)
        if isinstance(exc, OSError) and (not exc.filename or str(exc.filename).startswith(str(tmp))):
            exc.filename = str(final)  # name the output the user asked for, not our temporary (or nothing)
        raise
