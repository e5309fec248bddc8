"""Intensity statistics and normalisation of z-stacks (HASTE-style min/max per plane).

HASTE normalises every channel and plane with min/max values computed over the
training set, per magnification. This module holds:

* :class:`StatsTable` — rows ``magnification, channel, plane, min, max`` plus optional
  percentile columns ``p<q>`` (``p1``, ``p99.8``); read/written as CSV. ``plane`` is
  the 0-based position in the stack; targets have one row with ``plane`` 0.
  :func:`example_stats_path` is a shipped *example* table (made-up values that only
  show the format).
* :func:`compute_stats` — exact per-plane min/max/percentiles, chunk-wise with dask.
* :func:`normalize_minmax`, :func:`normalize_percentile`, :func:`denormalize`.

Dtype and range rules: normalisers accept any real dtype (numpy or dask, lazy stays
lazy) and return ``float32`` where ``min -> 0`` and ``max -> 1``, clipped to
``[0, 1]`` unless ``clip=False``; a plane with ``max <= min`` maps to 0.
:func:`denormalize` maps ``[0, 1]`` back to ``[min, max]``, rounds for integer
dtypes and clips to the dtype's range.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import check_cancel, report

__all__ = [
    "StatsTable",
    "compute_stats",
    "denormalize",
    "example_stats_path",
    "normalize_minmax",
    "normalize_percentile",
]

_KEY_COLUMNS = ("magnification", "channel", "plane")


def _pcol(q: float) -> str:
    return f"p{q:g}"


@dataclass
class StatsTable:
    """Per channel/plane intensity statistics (one dict per row).

    Examples
    --------
    >>> t = StatsTable.read_csv(example_stats_path())
    >>> mins, maxs = t.limits("C04", magnification="20x")
    >>> mins.shape
    (7,)
    """

    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        cols = list(_KEY_COLUMNS) + ["min", "max"]
        for row in self.rows:
            cols += [c for c in row if c not in cols]
        return cols

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, channel: str, magnification: str | None = None) -> list[dict[str, Any]]:
        """Rows of one channel (and magnification), sorted by plane."""
        rows = [
            r
            for r in self.rows
            if str(r["channel"]) == str(channel)
            and (magnification is None or str(r["magnification"]) == str(magnification))
        ]
        if magnification is None and len({r["magnification"] for r in rows}) > 1:
            raise ValueError(f"channel {channel!r} has rows for several magnifications; pass magnification=")
        return sorted(rows, key=lambda r: int(r["plane"]))

    def limits(
        self, channel: str, magnification: str | None = None, low: str = "min", high: str = "max"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(lows, highs)`` float64 arrays, one value per plane, for :func:`normalize_minmax`.

        ``low``/``high`` name the columns to use, e.g. ``"p1"``/``"p99.8"``.
        """
        rows = self.select(channel, magnification)
        if not rows:
            raise KeyError(f"no statistics for channel {channel!r} magnification {magnification!r}")
        return (np.array([float(r[low]) for r in rows]), np.array([float(r[high]) for r in rows]))

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    @classmethod
    def read_csv(cls, path: str | Path) -> StatsTable:
        """Read a table; lines starting with ``#`` are comments."""
        with open(path, newline="") as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
        rows = []
        for raw in csv.DictReader(lines):
            row: dict[str, Any] = {k.strip(): v.strip() for k, v in raw.items() if k}
            missing = [c for c in (*_KEY_COLUMNS, "min", "max") if c not in row]
            if missing:
                raise ValueError(f"{path}: stats table lacks columns {missing}")
            row["plane"] = int(row["plane"])
            for k, v in row.items():
                if k not in _KEY_COLUMNS:
                    row[k] = float(v)
            rows.append(row)
        return cls(rows)


def example_stats_path() -> Path:
    """Path of the shipped example table ``data/haste_stats_example.csv`` (made-up values)."""
    return Path(__file__).resolve().parents[1] / "data" / "haste_stats_example.csv"


# --------------------------------------------------------------------------- statistics


def _small_int(dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind in "uib" and np.dtype(dtype).itemsize <= 2


def _bincount(block: np.ndarray, offset: int, nbins: int) -> np.ndarray:
    return np.bincount((np.asarray(block).ravel().astype(np.int64) + offset), minlength=nbins)


def _hist_stats(hist: np.ndarray, offset: int, qs: Sequence[float]) -> tuple[float, float, list[float]]:
    """Exact min, max and numpy-'linear' percentiles from a full-range histogram."""
    nz = np.flatnonzero(hist)
    cum = np.cumsum(hist)
    n = int(cum[-1])
    out = []
    for q in qs:
        idx = q / 100.0 * (n - 1)
        lo = math.floor(idx)
        vlo = float(np.searchsorted(cum, lo, side="right") - offset)
        vhi = float(np.searchsorted(cum, min(lo + 1, n - 1), side="right") - offset)
        out.append(vlo + (vhi - vlo) * (idx - lo))
    return float(nz[0] - offset), float(nz[-1] - offset), out


def _array_stats(arr: Any, qs: Sequence[float]) -> tuple[float, float, list[float]]:
    """min, max, percentiles of all elements of ``arr`` (numpy or dask).

    Integer data of at most 16 bits is histogrammed block by block (exact, memory
    bounded by the block size); other dtypes are loaded whole (one plane at a time
    when called per plane) and use ``np.nanpercentile``.
    """
    if hasattr(arr, "dask") and _small_int(arr.dtype):
        import dask

        info = np.iinfo(np.uint8 if arr.dtype == bool else arr.dtype)
        offset, nbins = -int(info.min), int(info.max) - int(info.min) + 1
        parts = [dask.delayed(_bincount)(b, offset, nbins) for b in arr.to_delayed().ravel()]
        (hist,) = dask.compute(dask.delayed(sum)(parts))
        return _hist_stats(hist, offset, qs)
    a = np.asarray(arr)
    pct = np.nanpercentile(a, list(qs)).tolist() if len(qs) else []
    return float(np.nanmin(a)), float(np.nanmax(a)), [float(v) for v in pct]


def compute_stats(
    stack: Any,
    *,
    percentiles: Sequence[float] = (1.0, 99.8),
    magnification: str = "",
    channel: str | None = None,
    include_targets: bool = True,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> StatsTable:
    """Per-plane min, max and percentiles of a z-stack.

    Parameters
    ----------
    stack : ZStack or array (Z, Y, X) or (Y, X)
        A :class:`~napari_pathfm.io.zstack.ZStack` (its targets add one row each
        when ``include_targets``) or a numpy/dask array. Dask arrays are read chunk
        by chunk and never loaded whole.
    percentiles : sequence of float
        Percentiles in [0, 100] stored as columns ``p<q>`` (``p1``, ``p99.8``); they
        equal ``np.percentile(plane, q)`` (linear interpolation).
    magnification, channel : str
        Values of the key columns (``channel`` defaults to ``ZStack.channel_name``).
    progress, cancel
        Progress callback ``(done, total, message)`` and cancel flag, checked per plane.

    Examples
    --------
    >>> import numpy as np
    >>> t = compute_stats(np.arange(8, dtype=np.uint16).reshape(2, 2, 2), percentiles=[50])
    >>> [(r["plane"], r["min"], r["max"], r["p50"]) for r in t.rows]
    [(0, 0.0, 3.0, 1.5), (1, 4.0, 7.0, 5.5)]
    """
    is_zstack = hasattr(stack, "plane_names")  # a ZStack (numpy arrays have an unrelated ``.data``)
    data = stack.data if is_zstack else stack
    if channel is None:
        channel = getattr(stack, "channel_name", "") or "input"
    jobs = [(channel, i, data[i] if data.ndim == 3 else data) for i in range(data.shape[0] if data.ndim == 3 else 1)]
    if include_targets:
        jobs += [(name, 0, t) for name, t in (stack.targets if is_zstack else {}).items()]
    rows = []
    for done, (chan, plane, arr) in enumerate(jobs):
        check_cancel(cancel, "statistics")
        lo, hi, pct = _array_stats(arr, percentiles)
        row = {"magnification": magnification, "channel": chan, "plane": plane, "min": lo, "max": hi}
        row.update({_pcol(q): v for q, v in zip(percentiles, pct)})
        rows.append(row)
        report(progress, done + 1, len(jobs), f"statistics {chan} plane {plane}")
    return StatsTable(rows)


# --------------------------------------------------------------------------- normalisation


def _per_plane(values: Any, ndim: int, name: str, nplanes: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0:
        return v
    if v.ndim != 1 or ndim < 2 or v.shape[0] != nplanes:
        raise ValueError(f"{name} has shape {v.shape}; expected a scalar or one value per plane ({nplanes})")
    return v.reshape((-1,) + (1,) * (ndim - 1))


def normalize_minmax(array: Any, mins: Any, maxs: Any, *, clip: bool = True) -> Any:
    """Scale ``array`` so that ``mins -> 0`` and ``maxs -> 1`` (float32).

    Parameters
    ----------
    array : numpy or dask array, any real dtype
        ``(Z, Y, X)`` (or any shape with planes along axis 0), or a single plane.
    mins, maxs : scalar or 1-D
        One value for the whole array or one per plane (axis 0).
    clip : bool
        Clip the result to [0, 1].

    Returns
    -------
    float32 array of the same kind (dask stays lazy). Planes with ``max <= min`` give 0.

    Examples
    --------
    >>> import numpy as np
    >>> normalize_minmax(np.array([[0, 5, 10]], np.uint16), [0], [10])
    array([[0. , 0.5, 1. ]], dtype=float32)
    """
    n = array.shape[0] if array.ndim else 1
    lo = _per_plane(mins, array.ndim, "mins", n)
    span = _per_plane(maxs, array.ndim, "maxs", n) - lo
    inv = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)
    out = (array.astype(np.float32) - lo.astype(np.float32)) * inv
    if clip:
        out = out.clip(0.0, 1.0)
    return out.astype(np.float32)


def normalize_percentile(
    array: Any,
    low: float = 1.0,
    high: float = 99.8,
    *,
    per_plane: bool = True,
    clip: bool = True,
    return_limits: bool = False,
) -> Any:
    """Normalise between the ``low`` and ``high`` percentiles (float32, see :func:`normalize_minmax`).

    With ``per_plane`` the percentiles are taken per plane along axis 0, else over the
    whole array. Dask input is read once (chunk-wise) for the percentiles and the
    result stays lazy. ``return_limits=True`` also returns ``(lows, highs)`` for
    :func:`denormalize`.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(101, dtype=np.uint8)[None]
    >>> normalize_percentile(x, 10, 90)[0, [0, 50, 100]]
    array([0. , 0.5, 1. ], dtype=float32)
    """
    planes: Iterable[Any] = array if (per_plane and array.ndim >= 3) else [array]
    stats = [_array_stats(p, (low, high))[2] for p in planes]
    lows, highs = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
    if not (per_plane and array.ndim >= 3):
        lows, highs = lows[0], highs[0]
    out = normalize_minmax(array, lows, highs, clip=clip)
    return (out, (lows, highs)) if return_limits else out


def denormalize(array01: Any, mins: Any, maxs: Any, dtype: Any = np.uint16) -> Any:
    """Inverse of :func:`normalize_minmax`: ``[0, 1] -> [mins, maxs]`` in ``dtype``.

    Integer dtypes are rounded to the nearest integer and clipped to the dtype's
    range; float dtypes are cast. Computation is in float64 for exact round trips.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[300, 1000, 4000]], np.uint16)
    >>> denormalize(normalize_minmax(x, [300], [4000]), [300], [4000], np.uint16)
    array([[ 300, 1000, 4000]], dtype=uint16)
    """
    dtype = np.dtype(dtype)
    n = array01.shape[0] if array01.ndim else 1
    lo = _per_plane(mins, array01.ndim, "mins", n)
    span = _per_plane(maxs, array01.ndim, "maxs", n) - lo
    out = array01.astype(np.float64) * span + lo
    if dtype.kind in "uib":
        info = np.iinfo(np.uint8 if dtype == bool else dtype)
        out = out.round().clip(info.min, info.max)
    return out.astype(dtype)
