"""Which plane files form one z-stack, and in which order (pure filename logic).

No pixels are read here, so :func:`napari_pathfm.io.zstack.looks_like_zstack` can
use it cheaply and it is easy to test. Two naming schemes are understood:

* **HASTE / Yokogawa CV7000**: ``<plate>_<well>_T0001F006L01A04Z01C04.tif`` — well,
  time point ``T``, field ``F``, timeline ``L``, action ``A``, plane ``Z`` (1-based)
  and channel ``C``. In the HASTE adipocyte challenge ``C04`` is brightfield with
  planes ``Z01..Z07``; ``C01`` (nuclei), ``C02`` (lipids) and ``C03`` (cytoplasm)
  are fluorescence targets with one plane each.
* **In-silico labeling** (Christiansen et al., Cell 2018): comma-separated
  ``key-value`` fields; input planes carry ``z_depth-N`` (0-based) and targets carry
  ``depth_computation-MAXPROJECT`` with another ``channel-`` (e.g. ``DAPI_CONFOCAL``).

Files of one *site* (well/field/time, i.e. one imaged position) share a site key;
the input stack is one channel of that site and every other channel is a target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ZStackError

__all__ = ["PLANE_SUFFIXES", "PlaneFile", "StackFiles", "find_stack_files", "parse_plane_name"]

PLANE_SUFFIXES = (".tif", ".tiff", ".png")

_HASTE_RE = re.compile(
    r"^(?P<plate>.+)_(?P<well>[A-Za-z]{1,2}\d{1,3})_T(?P<t>\d+)F(?P<f>\d+)L(?P<l>\d+)"
    r"A(?P<a>\d+)Z(?P<z>\d+)C(?P<c>\d+)$",
    re.IGNORECASE,
)
#: HASTE challenge channel numbers of the fluorescence targets and of brightfield.
HASTE_TARGETS = {1: "nuclei", 2: "lipids", 3: "cytoplasm"}
HASTE_BRIGHTFIELD = "C04"
# Acquisition-mode suffixes dropped from in-silico-labeling target names (DAPI_CONFOCAL -> DAPI).
_MODALITY_SUFFIXES = ("_CONFOCAL", "_WIDEFIELD", "_EPIFLUORESCENCE", "_TIRF")


@dataclass(frozen=True)
class PlaneFile:
    """One file named after a plane (``z`` set) or a target projection (``z`` is None)."""

    path: Path
    scheme: str  # "haste" or "zdepth"
    site: tuple  # shared by the input planes and the targets of one imaged position
    site_label: str  # human-readable site, e.g. "well D04 F006 T0001"
    well: str
    field: int | None
    channel: str  # "C04", "PHASE_CONTRAST", ...
    z: int | None

    @property
    def plane_name(self) -> str:
        return plane_label(self.scheme, self.z) if self.z is not None else "projection"

    @property
    def target_name(self) -> str:
        """Name of this file's channel when it is used as a target."""
        if self.scheme == "haste":
            return HASTE_TARGETS.get(int(self.channel[1:]), self.channel)
        name = self.channel
        for suffix in _MODALITY_SUFFIXES:
            if name.upper().endswith(suffix):
                return name[: -len(suffix)]
        return name


def plane_label(scheme: str, z: int) -> str:
    """How plane ``z`` is written in a file name of ``scheme`` (``Z05`` or ``z_depth-5``)."""
    return f"Z{z:02d}" if scheme == "haste" else f"z_depth-{z}"


def parse_plane_name(path: str | Path) -> PlaneFile | None:
    """Parse a plane file name; ``None`` when it follows neither naming scheme.

    Examples
    --------
    >>> p = parse_plane_name("AssayPlate_Greiner_#655090_D04_T0001F006L01A04Z01C04.tif")
    >>> p.well, p.field, p.channel, p.z
    ('D04', 6, 'C04', 1)
    """
    path = Path(path)
    if path.suffix.lower() not in PLANE_SUFFIXES:
        return None
    stem = path.name[: -len(path.suffix)]
    m = _HASTE_RE.match(stem)
    if m:
        well, f, t, l = m["well"].upper(), int(m["f"]), int(m["t"]), int(m["l"])
        return PlaneFile(
            path=path,
            scheme="haste",
            site=(m["plate"], well, t, f, l),
            site_label=f"well {well} F{f:03d} T{t:04d}" + (f" L{l:02d}" if l != 1 else ""),
            well=well,
            field=f,
            channel=f"C{int(m['c']):02d}",
            z=int(m["z"]),
        )
    if "z_depth-" not in stem and "depth_computation-" not in stem:
        return None
    tokens = stem.split(",")
    values = dict(t.split("-", 1) for t in tokens if "-" in t)
    if "channel" not in values or values.get("is_mask", "false").lower() == "true":
        return None
    try:
        z = int(values["z_depth"]) if "z_depth" in values else None
    except ValueError:
        return None
    site = tuple(t for t in tokens if t.split("-", 1)[0] not in ("z_depth", "depth_computation", "channel"))
    well = values.get("well", "")
    label = " ".join(f"{k} {values[k]}" for k in ("condition", "well") if k in values) or stem
    return PlaneFile(
        path=path, scheme="zdepth", site=site, site_label=label, well=well, field=None, channel=values["channel"], z=z
    )


@dataclass
class StackFiles:
    """The files of one z-stack: planes sorted by index plus one entry per target channel."""

    folder: Path
    scheme: str
    site_label: str
    channel: str
    planes: list[PlaneFile]
    targets: dict[str, list[PlaneFile]] = field(default_factory=dict)
    well: str = ""
    field: int | None = None


def _scan(folder: Path) -> list[PlaneFile]:
    found = []
    for entry in sorted(folder.iterdir()):
        parsed = parse_plane_name(entry)
        if parsed is not None and entry.is_file():
            found.append(parsed)
    return found


def find_stack_files(
    folder: str | Path,
    *,
    well: str | None = None,
    field: int | None = None,
    channel: str | None = None,
    like: str | Path | None = None,
) -> StackFiles:
    """Collect the plane and target files of one z-stack in ``folder``.

    Parameters
    ----------
    folder : path
        Folder holding per-plane files.
    well, field : optional
        Pick one site when the folder holds several (``well="D04"``, ``field=6``).
    channel : str, optional
        Input channel (``"C04"``, ``"PHASE_CONTRAST"``). Default: HASTE ``C04`` when
        present, else the only channel with several planes.
    like : path, optional
        One plane file: select its site, and its channel when that channel has
        several planes (a single-plane target file keeps the default channel).

    Raises
    ------
    ZStackError
        No plane files, several stacks and no selection, ambiguous channel, missing
        (gap) or duplicated plane indices.
    """
    folder = Path(folder)
    files = _scan(folder)
    if not files:
        raise ZStackError(
            folder,
            "holds no plane files named like '...,z_depth-N,...' or '..._T0001F001L01A01Z01C01.tif'.",
            "Pass a folder of per-plane images, a multipage TIFF or an OME-TIFF with a Z axis.",
        )
    if like is not None:
        ref = parse_plane_name(like)
        if ref is None:
            raise ZStackError(
                like, "is not named like a z-stack plane file.", "Pass the folder or a multipage TIFF instead."
            )
        files = [f for f in files if f.site == ref.site]
        # A plane of a multi-plane channel selects that channel; a single-plane target
        # file (HASTE C01..C03 Z01) selects its site with the default input channel.
        if channel is None and sum(f.channel == ref.channel and f.z is not None for f in files) > 1:
            channel = ref.channel
    if well is not None:
        files = [f for f in files if f.well.upper() == str(well).upper()]
    if field is not None:
        files = [f for f in files if f.field == int(field)]
    sites: dict[tuple, list[PlaneFile]] = {}
    for f in files:
        sites.setdefault(f.site, []).append(f)
    if not sites:
        raise ZStackError(
            folder,
            f"holds no plane files for well={well!r} field={field!r}.",
            "Check the well/field names in the file names.",
        )
    if len(sites) > 1:
        labels = "; ".join(sorted(v[0].site_label for v in sites.values()))
        raise ZStackError(
            folder,
            f"holds {len(sites)} z-stacks ({labels}).",
            "Pass the path of one plane file of the stack you want, or choose one with "
            "open_zstack(folder, well=..., field=...).",
        )
    site_files = next(iter(sites.values()))
    channel = _pick_channel(folder, site_files, channel)
    planes = sorted((f for f in site_files if f.channel == channel and f.z is not None), key=lambda f: f.z)
    _check_indices(folder, planes)
    targets: dict[str, list[PlaneFile]] = {}
    for f in sorted(site_files, key=lambda f: (f.channel, f.z if f.z is not None else -1)):
        if f.channel != channel:
            targets.setdefault(f.target_name, []).append(f)
    first = planes[0]
    return StackFiles(
        folder=folder,
        scheme=first.scheme,
        site_label=first.site_label,
        channel=channel,
        planes=planes,
        targets=targets,
        well=first.well,
        field=first.field,
    )


def _pick_channel(folder: Path, files: list[PlaneFile], channel: str | None) -> str:
    counts: dict[str, int] = {}
    for f in files:
        if f.z is not None:
            counts[f.channel] = counts.get(f.channel, 0) + 1
    if channel is not None:
        wanted = f"C{int(channel[1:]):02d}" if re.fullmatch(r"[cC]\d+", str(channel)) else str(channel)
        if wanted not in counts:
            raise ZStackError(
                folder,
                f"has no planes of channel {channel!r} (channels: {sorted(counts)}).",
                "Pass one of the listed channels.",
            )
        return wanted
    if not counts:
        raise ZStackError(folder, "holds only target/projection files, no z planes.", "Add the z-plane files.")
    if HASTE_BRIGHTFIELD in counts:
        return HASTE_BRIGHTFIELD
    multi = [c for c, n in counts.items() if n > 1]
    if len(multi) == 1:
        return multi[0]
    if len(counts) == 1:
        return next(iter(counts))
    raise ZStackError(
        folder,
        f"holds z planes of several channels {sorted(counts)}.",
        "Choose one with open_zstack(path, channel=...) or pass one plane file.",
    )


def _check_indices(folder: Path, planes: list[PlaneFile]) -> None:
    zs = [p.z for p in planes]
    seen: dict[int, Path] = {}
    for p in planes:
        if p.z in seen:
            raise ZStackError(
                folder,
                f"has two files for plane {p.plane_name}: {seen[p.z].name} and {p.path.name}.",
                "Remove one of them.",
            )
        seen[p.z] = p.path
    missing = sorted(set(range(min(zs), max(zs) + 1)) - set(zs))
    if missing:
        names = ", ".join(plane_label(planes[0].scheme, z) for z in missing)
        raise ZStackError(
            folder,
            f"is missing plane {names} of the {planes[0].channel} stack "
            f"({planes[0].site_label}; found {len(zs)} planes from "
            f"{planes[0].plane_name} to {planes[-1].plane_name}).",
            "Restore the missing plane file(s), or remove the planes after the gap so the indices are contiguous.",
        )
