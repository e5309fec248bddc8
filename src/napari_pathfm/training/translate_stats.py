"""Pooled z-stack statistics: the min–max normalisation table of the ``translate`` family and ``pathfm zstats``.

:func:`pooled_stats` computes exact min/max/percentiles per plane and per target
over several stacks (optionally only some rows, e.g. the training rows of a row
split); :func:`zstack_stats` opens every site under some paths and pools them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ZStackError
from ..io.normalize import StatsTable, compute_stats
from .translate_data import open_stacks

__all__ = ["pooled_stats", "zstack_stats"]


def pooled_stats(
    stacks: list,
    *,
    percentiles: Sequence[float] = (1.0, 99.8),
    magnification: str = "",
    rows: tuple[int, int] | None = None,
    planes: Sequence[int] | None = None,
    channels: Sequence[str] | None = None,
    progress=None,
    cancel=None,
) -> StatsTable:
    """One stats table over several z-stacks (exact pooled min/max/percentiles per plane and target).

    Parameters
    ----------
    stacks : list of ZStack
        Stacks of one kind (same plane count, input channel and targets).
    rows : (start, stop), optional
        Only these rows of every stack (e.g. the ISL training rows ``(0, 768)``).
    planes : list of int, optional
        Only these planes (table rows keep their 0-based position among the used planes).
    channels : list of str, optional
        Targets to include (default: all targets every stack has).
    """
    import dask.array as da

    if not stacks:
        raise ValueError("no stacks")
    ref = stacks[0]
    for zs in stacks[1:]:
        if zs.n_planes != ref.n_planes:
            raise ZStackError(
                zs.path,
                f"has {zs.n_planes} planes but {ref.path} has {ref.n_planes}.",
                "Compute one table per kind of stack (same plane count).",
            )
    sel = slice(*rows) if rows else slice(None)
    for zs in stacks:
        height = int(zs.data.shape[-2])
        if rows and not (0 <= rows[0] < rows[1] <= height):
            raise ZStackError(
                zs.path,
                f"has rows 0..{height}, so rows {rows[0]}..{rows[1]} cannot be used.",
                f"Give --rows START STOP with 0 <= START < STOP <= {height}.",
            )
    idx = list(range(ref.n_planes)) if planes is None else list(planes)
    flat = [zs.data[idx][:, sel].reshape(len(idx), 1, -1) for zs in stacks]
    data = da.concatenate(flat, axis=2) if len(flat) > 1 else flat[0]
    chan = ref.channel_name or "input"
    table = compute_stats(
        data,
        percentiles=percentiles,
        magnification=magnification,
        channel=chan,
        include_targets=False,
        progress=progress,
        cancel=cancel,
    )
    names = list(channels) if channels is not None else [n for n in ref.targets if all(n in s.targets for s in stacks)]
    for name in names:
        parts = [zs.targets[name][sel].reshape(1, -1) for zs in stacks if name in zs.targets]
        t = compute_stats(
            da.concatenate(parts, axis=1),
            percentiles=percentiles,
            magnification=magnification,
            channel=name,
            include_targets=False,
            cancel=cancel,
        )
        table.rows += t.rows
    return table


def zstack_stats(
    paths: Sequence[str | Path],
    *,
    magnification: str = "",
    percentiles: Sequence[float] = (1.0, 99.8),
    rows: tuple[int, int] | None = None,
    channel: str | None = None,
    progress=None,
    cancel=None,
) -> StatsTable:
    """The ``pathfm zstats`` table: pooled statistics of every stack (site) under ``paths``.

    Examples
    --------
    >>> t = zstack_stats(["isl-blue-sample"], magnification="20x", rows=(0, 768))  # doctest: +SKIP
    >>> t.limits("PHASE_CONTRAST", "20x", "p1", "p99.8")[0].shape  # doctest: +SKIP
    (13,)
    """
    stacks = [zs for p in paths for zs in open_stacks(p, channel=channel)]
    return pooled_stats(
        stacks, percentiles=percentiles, magnification=magnification, rows=rows, progress=progress, cancel=cancel
    )
