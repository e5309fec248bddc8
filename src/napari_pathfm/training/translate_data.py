"""Fields of view of the ``translate`` family (HASTE): open z-stacks, check them, normalise them.

One field of view (FOV) is N brightfield/phase planes plus fluorescence targets of
the same site, opened with :func:`napari_pathfm.io.zstack.open_zstack` (HASTE
``...Z01C04.tif`` files or the in-silico-labeling ``z_depth-N`` layout). Every plane
and target is min–max normalised to ``[0, 1]`` with limits from a
:class:`~napari_pathfm.io.normalize.StatsTable` (a ``pathfm zstats`` CSV, or computed
from the training part when no table is given, :mod:`napari_pathfm.training.translate_stats`),
so training and inference use the same numbers: they go on the model card as ``normalization``.

Crops, augmentation and validation tiles are in :mod:`napari_pathfm.training.translate_crops`;
the split into training and validation parts in :mod:`napari_pathfm.training.translate_datamodule`.

Errors (:class:`~napari_pathfm.errors.RecipeError` / :class:`~napari_pathfm.errors.ZStackError`)
name the file and the fix: a plane count that differs from the model's input
channels, 8-bit vs 16-bit surprises, constant or NaN planes, missing targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError, ZStackError
from ..io.normalize import StatsTable, normalize_minmax

__all__ = [
    "FieldOfView",
    "StackSpec",
    "check_dtypes",
    "check_planes",
    "check_targets",
    "fov_limits",
    "load_fov",
    "open_fov_stack",
    "open_spec_sites",
    "open_stacks",
    "otsu_mask",
    "stack_specs",
]

MAX_UINT8 = 255


@dataclass
class StackSpec:
    """One entry of ``data.stacks``: a z-stack path plus optional ``well``/``field``/``channel`` selection."""

    path: Path
    well: str | None = None
    field: int | None = None
    channel: str | None = None

    @classmethod
    def parse(cls, entry: Any, base: Path | None = None) -> StackSpec:
        spec = {"path": entry} if isinstance(entry, (str, Path)) else dict(entry or {})
        unknown = set(spec) - {"path", "well", "field", "channel"}
        if "path" not in spec or unknown:
            raise RecipeError(
                base or "<recipe>",
                f"data.stacks entry {entry!r} is not a path or a mapping {{path, well, field, channel}}.",
                "Write a folder path or {path: ..., well: D04}.",
            )
        p = Path(str(spec["path"]))
        if base is not None and not p.is_absolute():
            p = (base / p).resolve()
        return cls(p, spec.get("well"), spec.get("field"), spec.get("channel"))

    @property
    def label(self) -> str:
        extra = [f"{k}={v}" for k, v in (("well", self.well), ("field", self.field)) if v is not None]
        return str(self.path) + (f" ({', '.join(extra)})" if extra else "")


def stack_specs(entries: Any, base: Path | None = None) -> list[StackSpec]:
    """``data.stacks`` / ``data.val_stacks`` (a path or a list) as :class:`StackSpec` objects."""
    if entries in (None, ""):
        return []
    if isinstance(entries, (str, Path, dict)):
        entries = [entries]
    return [StackSpec.parse(e, base) for e in entries]


@dataclass
class FieldOfView:
    """One normalised field of view (or one row band of it).

    Attributes
    ----------
    source : str
        Where it came from (path, selection and rows), for messages and the card.
    planes : ndarray float32 (Z, H, W)
        Input planes in [0, 1].
    targets : ndarray float32 (C, H, W)
        Target channels in [0, 1], in ``channels`` order.
    mask : ndarray float32 (H, W) or None
        Nuclei mask (Otsu of the first target), the LUPI net's privileged information.
    """

    source: str
    planes: np.ndarray
    targets: np.ndarray
    mask: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.planes.shape[-2:])  # type: ignore[return-value]

    def rows(self, start: int, stop: int) -> FieldOfView:
        """Rows ``start:stop`` of every array (a view, no copy)."""
        m = None if self.mask is None else self.mask[start:stop]
        return FieldOfView(
            f"{self.source} rows {start}:{stop}",
            self.planes[:, start:stop],
            self.targets[:, start:stop],
            m,
            dict(self.meta),
        )


def open_fov_stack(spec: StackSpec):
    """Open one stack lazily (:func:`~napari_pathfm.io.zstack.open_zstack`)."""
    from ..io.zstack import open_zstack

    return open_zstack(spec.path, well=spec.well, field=spec.field, channel=spec.channel)


def open_spec_sites(spec: StackSpec) -> list:
    """Every site a ``data.stacks`` entry names: one stack, or each site of a folder when none is selected."""
    if spec.well is None and spec.field is None:
        return open_stacks(spec.path, channel=spec.channel)
    return [open_fov_stack(spec)]


def check_planes(zs, planes: Sequence[int] | None, in_channels: int, where: Any) -> list[int]:
    """Plane indices to use; raises when their count differs from the model's ``in_channels``."""
    n = zs.n_planes
    idx = list(range(n)) if planes is None else [int(p) for p in planes]
    bad = [p for p in idx if not 0 <= p < n]
    if bad:
        raise ZStackError(
            zs.path,
            f"has {n} planes ({zs.plane_names[0]}..{zs.plane_names[-1]}) but data.planes asks for plane(s) {bad}.",
            f"Use 0-based plane indices below {n} in data.planes.",
        )
    if len(idx) != int(in_channels):
        pick = ", ".join(str(i) for i in np.linspace(0, n - 1, int(in_channels)).round().astype(int))
        raise ZStackError(
            zs.path,
            f"gives {len(idx)} input planes but the model takes {in_channels} (model.in_channels in {where}).",
            f"Set model.in_channels: {len(idx)}, or choose {in_channels} planes with data.planes (e.g. [{pick}]).",
        )
    return idx


def _target_files(zs, name: str) -> str:
    files = (zs.metadata.get("target_files") or {}).get(name) or [str(zs.path)]
    return files[0]


def check_dtypes(
    zs,
    channels: Sequence[str],
    stats: StatsTable | None,
    *,
    magnification: str | None,
    input_dtype: str | None,
    target_dtype: str | None,
) -> None:
    """8-bit vs 16-bit surprises, naming the file.

    * the stack (or a target) is 8-bit but the stats table says values above 255;
    * ``input_dtype``/``target_dtype`` are set and a file has another bit depth.
    """
    plane0 = zs.plane_files[0] if zs.plane_files else zs.path
    if input_dtype and np.dtype(zs.dtype) != np.dtype(input_dtype):
        raise ZStackError(
            plane0,
            f"is {zs.dtype} but data.input_dtype is {input_dtype}.",
            f"Re-export the planes as {input_dtype}, or set data.input_dtype: {zs.dtype} "
            "(and statistics computed on such files).",
        )
    for name in channels:
        t = zs.targets[name]
        if target_dtype and np.dtype(t.dtype) != np.dtype(target_dtype):
            raise ZStackError(
                _target_files(zs, name),
                f"target {name} is {t.dtype} but data.target_dtype is {target_dtype}.",
                f"Use the {target_dtype} export of this channel (8-bit exports "
                "lose the intensity scale), or set data.target_dtype: null.",
            )
    if stats is None:
        return
    checks = [(zs.channel_name or "input", zs.dtype, plane0)] + [
        (n, zs.targets[n].dtype, _target_files(zs, n)) for n in channels
    ]
    for chan, dtype, path in checks:
        if np.dtype(dtype) != np.uint8:
            continue
        try:
            _, highs = stats.limits(chan, magnification)
        except (KeyError, ValueError):
            continue
        if float(np.max(highs)) > MAX_UINT8:
            raise ZStackError(
                path,
                f"is 8-bit (uint8) but the stats table gives {chan} a max of "
                f"{float(np.max(highs)):g}: the table was computed on 16-bit data.",
                "Use the 16-bit files the table was made from, or compute a new table on these "
                "files with `pathfm zstats`.",
            )


def check_targets(zs, channels: Sequence[str]) -> None:
    """Raise when a target channel needed for training is missing from the stack's site."""
    missing = [c for c in channels if c not in zs.targets]
    if missing:
        raise ZStackError(
            zs.path,
            f"has no target channel(s) {missing} (it has {sorted(zs.targets) or 'none'}).",
            "Training needs the fluorescence targets beside the planes: add the files, fix "
            "data.channels, or select another site with well/field.",
        )


def _check_finite(arr: np.ndarray, what: str, path: Any) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ZStackError(
            path,
            f"{what} holds NaN or infinite values.",
            "Fix or drop this plane (e.g. replace NaN by the background value) before training.",
        )
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise ZStackError(
            path,
            f"{what} is constant (every pixel {lo}).",
            "An empty or failed acquisition; remove this field of view or re-acquire the plane.",
        )


def fov_limits(
    stats: StatsTable,
    channel: str,
    n: int,
    magnification: str | None,
    columns: Sequence[str],
    where: Any,
    planes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-plane ``(lows, highs)`` for one channel from the table (``columns`` like ``["p1", "p99.8"]``)."""
    try:
        lows, highs = stats.limits(channel, magnification, low=columns[0], high=columns[1])
    except KeyError as exc:
        have = sorted({str(r["channel"]) for r in stats.rows})
        raise RecipeError(
            where,
            f"the stats table has no rows for channel {channel!r} at magnification "
            f"{magnification!r} (it has channels {have}).",
            "Compute one with `pathfm zstats` on the training stacks, or fix data.magnification.",
        ) from exc
    except ValueError as exc:
        raise RecipeError(where, str(exc), "Set data.magnification (20x, 40x or 60x).") from exc
    if planes is not None and len(lows) > 1:
        if max(planes) >= len(lows):
            raise RecipeError(
                where,
                f"the stats table has {len(lows)} planes for {channel!r} but plane {max(planes)} is used.",
                "Compute the table on stacks with all planes.",
            )
        lows, highs = lows[list(planes)], highs[list(planes)]
    if len(lows) not in (1, n):
        raise RecipeError(
            where,
            f"the stats table has {len(lows)} planes for {channel!r}, the data {n}.",
            "Compute the table on the same kind of stacks (`pathfm zstats`).",
        )
    if len(lows) == 1 and n > 1:
        lows, highs = np.repeat(lows, n), np.repeat(highs, n)
    return lows.astype(np.float64), highs.astype(np.float64)


def otsu_mask(target01: np.ndarray) -> np.ndarray:
    """Nuclei mask of a normalised target: Otsu threshold (float32 0/1)."""
    from skimage.filters import threshold_otsu

    t = threshold_otsu(np.asarray(target01, np.float32))
    return (target01 > t).astype(np.float32)


def load_fov(
    spec: StackSpec,
    zs,
    channels: Sequence[str],
    planes: Sequence[int],
    in_limits,
    target_limits,
    *,
    with_mask: bool,
    where: Any,
) -> FieldOfView:
    """Read, check and normalise one FOV (all rows).

    ``in_limits``/``target_limits`` are ``(lows, highs)`` per used plane / per channel.
    Raises for constant/NaN planes (naming the plane file) and missing targets.
    """
    raw = np.asarray(zs.data[list(planes)].compute())
    for i, p in enumerate(planes):
        _check_finite(raw[i], f"plane {zs.plane_names[p]}", zs.plane_files[p])
    check_targets(zs, channels)
    x = normalize_minmax(raw, in_limits[0], in_limits[1])
    ys = []
    for j, name in enumerate(channels):
        t = np.asarray(zs.targets[name].compute())
        _check_finite(t, f"target {name}", _target_files(zs, name))
        ys.append(normalize_minmax(t, target_limits[0][j], target_limits[1][j]))
    y = np.stack(ys).astype(np.float32)
    mask = otsu_mask(y[0]) if with_mask else None
    label = spec.label
    if spec.well is None and spec.field is None and zs.metadata.get("site") and zs.path != spec.path:
        label = f"{spec.path} ({zs.metadata['site']})"
    return FieldOfView(label, x, y, mask, {"path": str(zs.path)})


def open_stacks(path: str | Path, *, channel: str | None = None) -> list:
    """Every z-stack at ``path``: one per site of a folder (HASTE wells/fields), else the one stack.

    A folder holding several sites (which :func:`~napari_pathfm.io.zstack.open_zstack`
    refuses without a selection) is opened site by site, through one plane file each.
    """
    from ..io.zstack import open_zstack
    from ..io.zstack_naming import _scan

    path = Path(path)
    if not path.is_dir():
        return [open_zstack(path, channel=channel)]
    sites: dict[tuple, Path] = {}
    for f in _scan(path):
        if f.z is not None and (channel is None or f.channel == channel):
            sites.setdefault(f.site, f.path)
    if len(sites) <= 1:
        return [open_zstack(path, channel=channel)]
    return [open_zstack(p, channel=channel) for p in sites.values()]
