"""Write-to-temp-then-rename, so a crash or a cancel never leaves a half-written result.

Every writer in :mod:`napari_pathfm.io` writes through :func:`atomic_path`: the data go to a
hidden temporary file (or directory, for OME-Zarr) beside the final path, which replaces the
final path with :func:`os.replace` only after the writer finished without error. On any
exception (including ``KeyboardInterrupt`` and :class:`~napari_pathfm.errors.Cancelled`) the
temporary is removed and an existing file at the final path is left untouched.

The temporary name keeps the final path's suffix (``.ome.tif``, ``.ome.zarr``, ``.geojson`` ...)
because writers such as tifffile decide the format from it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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
    stem, suffix = split_suffix(final.name)
    token = uuid.uuid4().hex[:8]
    tmp = final.parent / f".{stem}.tmp-{token}{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: the writer did not create {tmp.name}")
        if directory and final.exists():
            backup = final.parent / f".{stem}.old-{token}{suffix}"
            os.replace(final, backup)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(backup, final)
                raise
            _remove(backup)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
