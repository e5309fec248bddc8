"""tifffile + zarr 3 backend: OME-TIFF and generic (pyramidal) TIFFs OpenSlide cannot open.

Also opens plain PNG/JPEG images as a one-level "slide" so that every pipeline
accepts a GlaS-style image as readily as a whole slide.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import SlideError
from ._levels import composite_rgba

MAX_PLAUSIBLE_MPP = 100.0  # µm/px; larger values come from default 72/96 dpi tags, not a microscope
UNREADABLE_FIX = "Convert it to a pyramidal OME-TIFF (e.g. with bfconvert or QuPath) and open that."


def resolution_to_mpp(page) -> float | None:
    """µm/px from TIFF XResolution/ResolutionUnit tags; None when absent or implausible."""
    tags = page.tags
    res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if res is None or unit is None:
        return None
    num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
    if not num or not den:
        return None
    per_unit = num / den
    unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    if unit_um is None:
        return None
    mpp = unit_um / per_unit
    return mpp if 0 < mpp <= MAX_PLAUSIBLE_MPP else None


def ome_mpp(ome_xml: str | None) -> float | None:
    """PhysicalSizeX of the first OME Pixels element, converted to µm."""
    if not ome_xml:
        return None
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome_xml)
    if not m:
        return None
    value = float(m.group(1))
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', ome_xml)
    scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(unit.group(1) if unit else "µm", 1.0)
    return value * scale


def to_rgb_uint8(arr: np.ndarray, axes: str, background: tuple[int, int, int]) -> np.ndarray:
    """Bring a tifffile block with ``axes`` to (Y, X, 3) uint8, compositing alpha."""
    for ax in "TZQI":
        while ax in axes:
            i = axes.index(ax)
            arr = arr.take(0, axis=i)
            axes = axes[:i] + axes[i + 1 :]
    chan = "S" if "S" in axes else ("C" if "C" in axes else None)
    if chan is None:
        arr = arr[..., None]
    else:
        arr = np.moveaxis(arr, axes.index(chan), -1)
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif arr.dtype.kind == "f":  # NaN/Inf count as 0 (black); callers see them in TiffBackend.nonfinite
            arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
            arr = np.clip(arr * 255.0 if arr.max(initial=0) <= 1.0 else arr, 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    c = arr.shape[-1]
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    if c == 2:
        return np.repeat(arr[..., :1], 3, axis=-1)
    if c == 4:
        return composite_rgba(arr, background)
    return np.ascontiguousarray(arr[..., :3])


class TiffBackend:
    """Reads a TIFF's first image series (all pyramid levels) through tifffile's zarr store."""

    name = "tifffile"

    def __init__(self, path: Path, background: tuple[int, int, int] | None = None):
        import tifffile
        import zarr

        self.path = path
        self.background = background or (255, 255, 255)
        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            self._axes = series.axes
            self._store = series.aszarr()
            root = zarr.open(self._store, mode="r")
        except Exception as exc:  # tifffile raises many types for broken files
            raise SlideError(path, f"is not a TIFF that tifffile can read ({exc}).", UNREADABLE_FIX) from exc
        self._levels = [root[str(i)] for i in range(len(series.levels))] if hasattr(root, "keys") else [root]
        yi, xi = self._axes.index("Y"), self._axes.index("X")
        self.level_shapes = [(int(a.shape[yi]), int(a.shape[xi])) for a in self._levels]
        self.level_downsamples = [self.level_shapes[0][1] / s[1] for s in self.level_shapes]
        self.tile_sizes = []
        #: Levels stored as tiles (region reads decode whole tiles, so reading them once pays off).
        self.native_tiled = [bool(lvl.keyframe.is_tiled) for lvl in series.levels]
        for lvl in series.levels:
            page = lvl.keyframe
            self.tile_sizes.append(
                (page.tilelength or min(512, page.imagelength), page.tilewidth or min(512, page.imagewidth))
            )
        page0 = series.levels[0].keyframe
        self.mpp = ome_mpp(self._tif.ome_metadata) if self._tif.is_ome else None
        self.mpp = self.mpp or resolution_to_mpp(page0)
        self.objective_power = None
        self.vendor = "ome-tiff" if self._tif.is_ome else "generic-tiff"
        self.properties = {
            "tiff.compression": str(
                page0.compression.name if hasattr(page0.compression, "name") else page0.compression
            ),
            "tiff.photometric": str(getattr(page0.photometric, "name", page0.photometric)),
            "tiff.axes": self._axes,
            "tiff.dtype": str(series.dtype),
        }
        if page0.description and not self._tif.is_ome:
            self.properties["tiff.ImageDescription"] = page0.description[:2000]
        self._assoc = {
            s.name.lower(): s
            for s in self._tif.series[1:]
            if s.name and s.name.lower() in {"label", "macro", "thumbnail"}
        }
        self.associated_names = list(self._assoc)
        #: ``[values read, of which NaN/Inf]`` over every float block read so far (float TIFFs only),
        #: so an all-NaN image can be told from a black one (:func:`napari_pathfm.io.slide.check_has_content`).
        self.nonfinite = [0, 0]

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        arr = self._levels[level]
        H, W = self.level_shapes[level]
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        out = np.empty((h, w, 3), np.uint8)
        out[...] = self.background
        if y1 <= y0 or x1 <= x0:
            return out
        index = tuple(slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) for a in self._axes)
        try:
            block = np.asarray(arr[index])
        except Exception as exc:
            raise SlideError(
                self.path,
                f"a tile could not be decoded (level {level}, y={y}, x={x}, {h}x{w} px): {exc}.",
                "The file may be truncated, corrupt or use a compression imagecodecs cannot decode. " + UNREADABLE_FIX,
            ) from exc
        if block.dtype.kind == "f":
            self.nonfinite[0] += block.size
            self.nonfinite[1] += block.size - int(np.count_nonzero(np.isfinite(block)))
        out[y0 - y : y1 - y, x0 - x : x1 - x] = to_rgb_uint8(block, self._axes, self.background)
        return out

    def associated(self, name: str) -> np.ndarray:
        s = self._assoc[name]
        return to_rgb_uint8(s.asarray(), s.axes, self.background)

    def close(self) -> None:
        self._tif.close()


class PlainImageBackend:
    """A PNG/JPEG/BMP image held in memory as a single-level slide (no physical size)."""

    name = "image"

    def __init__(self, path: Path, background: tuple[int, int, int] | None = None):
        from PIL import Image

        self.path = path
        self.background = background or (255, 255, 255)
        try:
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                rgba = img.convert("RGBA")
        except Exception as exc:
            raise SlideError(
                path, f"is not an image Pillow can read ({exc}).", "Save it as PNG or TIFF and try again."
            ) from exc
        self._rgb = composite_rgba(np.asarray(rgba), self.background)
        h, w = self._rgb.shape[:2]
        self.level_shapes = [(h, w)]
        self.level_downsamples = [1.0]
        self.tile_sizes = [(min(512, h), min(512, w))]
        self.mpp = None
        self.objective_power = None
        self.vendor = "image"
        self.properties = {"image.mode": mode}
        self.associated_names: list[str] = []

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        H, W = self.level_shapes[0]
        out = np.empty((h, w, 3), np.uint8)
        out[...] = self.background
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        if y1 > y0 and x1 > x0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._rgb[y0:y1, x0:x1]
        return out

    def associated(self, name: str) -> np.ndarray:
        raise KeyError(name)

    def close(self) -> None:
        pass
