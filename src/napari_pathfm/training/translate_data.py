"""Z-stack training data for the ``translate`` family (HASTE): fields of view, crops, augmentation.

One field of view (FOV) is N brightfield/phase planes plus fluorescence targets of
the same site, opened with :func:`napari_pathfm.io.zstack.open_zstack` (HASTE
``...Z01C04.tif`` files or the in-silico-labeling ``z_depth-N`` layout). Every plane
and target is min–max normalised to ``[0, 1]`` with limits from a
:class:`~napari_pathfm.io.normalize.StatsTable` (a ``pathfm zstats`` CSV, or computed
here from the training part when no table is given), so training and inference use
the same numbers: they go on the model card as ``normalization``.

Splits: whole FOVs (``val_stacks``) or rows of every FOV (``val_rows``; the ISL
convention is rows 768–1024 for validation, the rest for training). Training crops
come only from the training rows; augmentation never reads across the split.

Augmentation (training only): random crops, flips and 90° rotations; with
``shift_scale_rotate`` an affine warp around a centre that, for a share
``nuclei_centred`` of the crops, is a pixel of the nuclei mask (Otsu threshold of the
first target), as HASTE did for its nuclei model.

Errors (:class:`~napari_pathfm.errors.RecipeError` / :class:`~napari_pathfm.errors.ZStackError`)
name the file and the fix: a plane count that differs from the model's input
channels, 8-bit vs 16-bit surprises, constant or NaN planes, missing targets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RecipeError, ZStackError
from ..io.atomic import atomic_path
from ..io.normalize import StatsTable, compute_stats, normalize_minmax

__all__ = [
    "FieldOfView",
    "StackSpec",
    "TranslateCropDataset",
    "TranslateTileDataset",
    "check_dtypes",
    "check_planes",
    "fov_limits",
    "load_fov",
    "open_fov_stack",
    "otsu_mask",
    "pooled_stats",
    "random_crop",
    "stack_specs",
    "tile_origins",
]  # fmt: skip

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
            raise RecipeError(base or "<recipe>", f"data.stacks entry {entry!r} is not a path or a mapping "
                              "{path, well, field, channel}.", "Write a folder path or {path: ..., well: D04}.")
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
        return FieldOfView(f"{self.source} rows {start}:{stop}", self.planes[:, start:stop],
                           self.targets[:, start:stop], m, dict(self.meta))


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
        raise ZStackError(zs.path, f"has {n} planes ({zs.plane_names[0]}..{zs.plane_names[-1]}) but data.planes "
                          f"asks for plane(s) {bad}.", f"Use 0-based plane indices below {n} in data.planes.")
    if len(idx) != int(in_channels):
        pick = ", ".join(str(i) for i in np.linspace(0, n - 1, int(in_channels)).round().astype(int))
        raise ZStackError(zs.path, f"gives {len(idx)} input planes but the model takes {in_channels} "
                          f"(model.in_channels in {where}).",
                          f"Set model.in_channels: {len(idx)}, or choose {in_channels} planes with "
                          f"data.planes (e.g. [{pick}]).")
    return idx


def _target_files(zs, name: str) -> str:
    files = (zs.metadata.get("target_files") or {}).get(name) or [str(zs.path)]
    return files[0]


def check_dtypes(zs, channels: Sequence[str], stats: StatsTable | None, *, magnification: str | None,
                 input_dtype: str | None, target_dtype: str | None) -> None:
    """8-bit vs 16-bit surprises, naming the file.

    * the stack (or a target) is 8-bit but the stats table says values above 255;
    * ``input_dtype``/``target_dtype`` are set and a file has another bit depth.
    """
    plane0 = zs.plane_files[0] if zs.plane_files else zs.path
    if input_dtype and np.dtype(zs.dtype) != np.dtype(input_dtype):
        raise ZStackError(plane0, f"is {zs.dtype} but data.input_dtype is {input_dtype}.",
                          f"Re-export the planes as {input_dtype}, or set data.input_dtype: {zs.dtype} "
                          "(and statistics computed on such files).")
    for name in channels:
        t = zs.targets[name]
        if target_dtype and np.dtype(t.dtype) != np.dtype(target_dtype):
            raise ZStackError(_target_files(zs, name), f"target {name} is {t.dtype} but data.target_dtype is "
                              f"{target_dtype}.", f"Use the {target_dtype} export of this channel (8-bit exports "
                              "lose the intensity scale), or set data.target_dtype: null.")
    if stats is None:
        return
    checks = [(zs.channel_name or "input", zs.dtype, plane0)] + [(n, zs.targets[n].dtype, _target_files(zs, n))
                                                                  for n in channels]
    for chan, dtype, path in checks:
        if np.dtype(dtype) != np.uint8:
            continue
        try:
            _, highs = stats.limits(chan, magnification)
        except (KeyError, ValueError):
            continue
        if float(np.max(highs)) > MAX_UINT8:
            raise ZStackError(path, f"is 8-bit (uint8) but the stats table gives {chan} a max of "
                              f"{float(np.max(highs)):g}: the table was computed on 16-bit data.",
                              "Use the 16-bit files the table was made from, or compute a new table on these "
                              "files with `pathfm zstats`.")


def check_targets(zs, channels: Sequence[str]) -> None:
    """Raise when a target channel needed for training is missing from the stack's site."""
    missing = [c for c in channels if c not in zs.targets]
    if missing:
        raise ZStackError(zs.path, f"has no target channel(s) {missing} (it has {sorted(zs.targets) or 'none'}).",
                          "Training needs the fluorescence targets beside the planes: add the files, fix "
                          "data.channels, or select another site with well/field.")


def _check_finite(arr: np.ndarray, what: str, path: Any) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ZStackError(path, f"{what} holds NaN or infinite values.",
                          "Fix or drop this plane (e.g. replace NaN by the background value) before training.")
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        raise ZStackError(path, f"{what} is constant (every pixel {lo}).",
                          "An empty or failed acquisition; remove this field of view or re-acquire the plane.")


def fov_limits(stats: StatsTable, channel: str, n: int, magnification: str | None, columns: Sequence[str],
               where: Any, planes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-plane ``(lows, highs)`` for one channel from the table (``columns`` like ``["p1", "p99.8"]``)."""
    try:
        lows, highs = stats.limits(channel, magnification, low=columns[0], high=columns[1])
    except KeyError as exc:
        have = sorted({str(r["channel"]) for r in stats.rows})
        raise RecipeError(where, f"the stats table has no rows for channel {channel!r} at magnification "
                          f"{magnification!r} (it has channels {have}).",
                          "Compute one with `pathfm zstats` on the training stacks, or fix data.magnification.") from exc
    except ValueError as exc:
        raise RecipeError(where, str(exc), "Set data.magnification (20x, 40x or 60x).") from exc
    if planes is not None and len(lows) > 1:
        if max(planes) >= len(lows):
            raise RecipeError(where, f"the stats table has {len(lows)} planes for {channel!r} but plane "
                              f"{max(planes)} is used.", "Compute the table on stacks with all planes.")
        lows, highs = lows[list(planes)], highs[list(planes)]
    if len(lows) not in (1, n):
        raise RecipeError(where, f"the stats table has {len(lows)} planes for {channel!r}, the data {n}.",
                          "Compute the table on the same kind of stacks (`pathfm zstats`).")
    if len(lows) == 1 and n > 1:
        lows, highs = np.repeat(lows, n), np.repeat(highs, n)
    return lows.astype(np.float64), highs.astype(np.float64)


def otsu_mask(target01: np.ndarray) -> np.ndarray:
    """Nuclei mask of a normalised target: Otsu threshold (float32 0/1)."""
    from skimage.filters import threshold_otsu

    t = threshold_otsu(np.asarray(target01, np.float32))
    return (target01 > t).astype(np.float32)


def load_fov(spec: StackSpec, zs, channels: Sequence[str], planes: Sequence[int], in_limits, target_limits,
             *, with_mask: bool, where: Any) -> FieldOfView:
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


def tile_origins(size: int, tile: int) -> list[int]:
    """Starts of ``tile``-long windows covering ``size`` (last one aligned to the end; [0] if shorter)."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, tile))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def _pad(a: np.ndarray, tile: int) -> np.ndarray:
    h, w = a.shape[-2:]
    if h >= tile and w >= tile:
        return a
    pads = [(0, 0)] * (a.ndim - 2) + [(0, max(0, tile - h)), (0, max(0, tile - w))]
    return np.pad(a, pads, mode="reflect" if min(h, w) > 1 else "edge")


def random_crop(fov: FieldOfView, tile: int, rng: np.random.Generator, *, centre_on_mask: bool = False,
                ssr: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One ``tile`` crop ``(planes, targets, mask)`` of ``fov``.

    Without ``ssr`` a plain random window. With ``ssr = (shift, scale, rotate_deg)`` an
    affine shift-scale-rotate around a centre (a nuclei-mask pixel when
    ``centre_on_mask``), sampled with reflection at the borders of ``fov`` only.
    """
    x, y, m = fov.planes, fov.targets, fov.mask
    h, w = fov.shape
    centre = None
    if centre_on_mask and m is not None:
        ys, xs = np.nonzero(m)
        if len(ys):
            k = int(rng.integers(0, len(ys)))
            centre = (float(ys[k]), float(xs[k]))
    if ssr is None:
        if centre is not None:
            y0 = int(np.clip(centre[0] - tile // 2, 0, max(0, h - tile)))
            x0 = int(np.clip(centre[1] - tile // 2, 0, max(0, w - tile)))
        else:
            y0, x0 = int(rng.integers(0, max(0, h - tile) + 1)), int(rng.integers(0, max(0, w - tile) + 1))
        sl = (slice(None), slice(y0, y0 + tile), slice(x0, x0 + tile))
        cx, cy = _pad(x[sl], tile), _pad(y[sl], tile)
        cm = None if m is None else _pad(m[sl[1:]], tile)
        return cx, cy, cm
    import cv2

    shift, scale, rot = ssr
    if centre is None:
        centre = (float(rng.uniform(0, h)), float(rng.uniform(0, w)))
    cyy = centre[0] + float(rng.uniform(-shift, shift)) * tile
    cxx = centre[1] + float(rng.uniform(-shift, shift)) * tile
    s = 1.0 + float(rng.uniform(-scale, scale))
    a = np.deg2rad(float(rng.uniform(-rot, rot)))
    # output pixel (u, v) relative to the crop centre -> source = centre + R(a) @ (u, v) / s
    cos, sin = np.cos(a) / s, np.sin(a) / s
    half = (tile - 1) / 2.0
    mat = np.array([[cos, -sin, cxx - cos * half + sin * half],
                    [sin, cos, cyy - sin * half - cos * half]], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP

    def warp(plane: np.ndarray, interp: int = flags) -> np.ndarray:
        return cv2.warpAffine(np.ascontiguousarray(plane), mat, (tile, tile), flags=interp,
                              borderMode=cv2.BORDER_REFLECT_101)

    cx = np.stack([warp(p) for p in x])
    cy = np.stack([warp(p) for p in y])
    cm = None if m is None else warp(m, cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    return cx, cy, cm


def _flip_rot(arrays: list, rng: np.random.Generator) -> list:
    k, flip = int(rng.integers(0, 4)), bool(rng.random() < 0.5)
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        a = np.rot90(a, k, axes=(-2, -1))
        out.append(a[..., ::-1] if flip else a)
    return out


class TranslateCropDataset:
    """Random training crops: ``samples`` per epoch over the training FOVs (torch ``Dataset`` protocol).

    Items are dicts ``{"input": float32 (Z, T, T), "target": float32 (C, T, T)}`` plus
    ``"mask"`` float32 (1, T, T) when the FOVs carry one. Randomness comes from
    torch's generator, so ``seed_everything`` makes it reproducible.
    """

    def __init__(self, fovs: list[FieldOfView], tile: int, samples: int, *, augment: bool = True,
                 nuclei_centred: float = 0.0, ssr: tuple[float, float, float] | None = None):
        if not fovs:
            raise ValueError("no training fields of view")
        self.fovs, self.tile, self.samples = fovs, int(tile), int(samples)
        self.augment, self.nuclei_centred, self.ssr = bool(augment), float(nuclei_centred), ssr
        areas = np.array([f.shape[0] * f.shape[1] for f in fovs], np.float64)
        self.p = areas / areas.sum()

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> dict:
        import torch

        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        fov = self.fovs[int(rng.choice(len(self.fovs), p=self.p))]
        centred = self.augment and rng.random() < self.nuclei_centred
        ssr = self.ssr if self.augment else None
        x, y, m = random_crop(fov, self.tile, rng, centre_on_mask=centred, ssr=ssr)
        if self.augment:
            x, y, m = _flip_rot([x, y, m], rng)
        item = {"input": torch.from_numpy(np.ascontiguousarray(x, np.float32)),
                "target": torch.from_numpy(np.ascontiguousarray(y, np.float32))}
        if m is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(m, np.float32)[None])
        return item


class TranslateTileDataset:
    """Validation tiles covering every validation FOV (last tile aligned to the edge, no augmentation)."""

    def __init__(self, fovs: list[FieldOfView], tile: int):
        self.fovs, self.tile = fovs, int(tile)
        self.index = [(i, y, x) for i, f in enumerate(fovs)
                      for y in tile_origins(f.shape[0], self.tile) for x in tile_origins(f.shape[1], self.tile)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        import torch

        k, y0, x0 = self.index[i]
        f, t = self.fovs[k], self.tile
        sl = (slice(None), slice(y0, y0 + t), slice(x0, x0 + t))
        item = {"input": torch.from_numpy(np.ascontiguousarray(_pad(f.planes[sl], t))),
                "target": torch.from_numpy(np.ascontiguousarray(_pad(f.targets[sl], t)))}
        if f.mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(_pad(f.mask[sl[1:]], t))[None])
        return item


def pooled_stats(stacks: list, *, percentiles: Sequence[float] = (1.0, 99.8), magnification: str = "",
                 rows: tuple[int, int] | None = None, planes: Sequence[int] | None = None,
                 channels: Sequence[str] | None = None, progress=None, cancel=None) -> StatsTable:
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
            raise ZStackError(zs.path, f"has {zs.n_planes} planes but {ref.path} has {ref.n_planes}.",
                              "Compute one table per kind of stack (same plane count).")
    sel = slice(*rows) if rows else slice(None)
    for zs in stacks:
        height = int(zs.data.shape[-2])
        if rows and not (0 <= rows[0] < rows[1] <= height):
            raise ZStackError(zs.path, f"has rows 0..{height}, so rows {rows[0]}..{rows[1]} cannot be used.",
                              f"Give --rows START STOP with 0 <= START < STOP <= {height}.")  # fmt: skip
    idx = list(range(ref.n_planes)) if planes is None else list(planes)
    flat = [zs.data[idx][:, sel].reshape(len(idx), 1, -1) for zs in stacks]
    data = da.concatenate(flat, axis=2) if len(flat) > 1 else flat[0]
    chan = ref.channel_name or "input"
    table = compute_stats(data, percentiles=percentiles, magnification=magnification, channel=chan,
                          include_targets=False, progress=progress, cancel=cancel)
    names = list(channels) if channels is not None else [n for n in ref.targets if all(n in s.targets for s in stacks)]
    for name in names:
        parts = [zs.targets[name][sel].reshape(1, -1) for zs in stacks if name in zs.targets]
        t = compute_stats(da.concatenate(parts, axis=1), percentiles=percentiles, magnification=magnification,
                          channel=name, include_targets=False, cancel=cancel)
        table.rows += t.rows
    return table


def write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` as JSON atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")


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


def zstack_stats(paths: Sequence[str | Path], *, magnification: str = "", percentiles: Sequence[float] = (1.0, 99.8),
                 rows: tuple[int, int] | None = None, channel: str | None = None, progress=None,
                 cancel=None) -> StatsTable:
    """The ``pathfm zstats`` table: pooled statistics of every stack (site) under ``paths``.

    Examples
    --------
    >>> t = zstack_stats(["isl-blue-sample"], magnification="20x", rows=(0, 768))  # doctest: +SKIP
    >>> t.limits("PHASE_CONTRAST", "20x", "p1", "p99.8")[0].shape  # doctest: +SKIP
    (13,)
    """
    stacks = [zs for p in paths for zs in open_stacks(p, channel=channel)]
    return pooled_stats(stacks, percentiles=percentiles, magnification=magnification, rows=rows, progress=progress,
                        cancel=cancel)
