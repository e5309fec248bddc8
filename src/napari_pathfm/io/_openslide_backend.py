"""OpenSlide backend: every vendor format OpenSlide reads (SVS, NDPI, MRXS, DICOM …)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SlideError
from ._levels import composite_rgba

CORRUPT_FIX = "The file may be truncated or corrupt: copy it again from the scanner or re-export it."


def _parse_hex_colour(value: str | None) -> tuple[int, int, int] | None:
    if not value or len(value) != 6:
        return None
    try:
        return tuple(int(value[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return None


class OpenSlideBackend:
    """Reads regions through ``openslide.OpenSlide`` and composites RGBA onto the background."""

    name = "openslide"

    def __init__(self, path: Path, background: tuple[int, int, int] | None = None):
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideError(path, "is not a format OpenSlide recognises.") from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(path, f"OpenSlide could not open it ({exc}).", CORRUPT_FIX) from exc
        props = dict(self._osr.properties)
        self.properties = props
        self.vendor = props.get("openslide.vendor")
        self.background = background or _parse_hex_colour(props.get("openslide.background-color")) or (255, 255, 255)
        self.level_shapes = [(h, w) for (w, h) in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        self.tile_sizes = []
        for i in range(len(self.level_shapes)):
            th = int(props.get(f"openslide.level[{i}].tile-height", 0) or 0)
            tw = int(props.get(f"openslide.level[{i}].tile-width", 0) or 0)
            self.tile_sizes.append((th or 512, tw or 512))
        mpp_x, mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
        self.mpp = float(mpp_x) if mpp_x else (float(mpp_y) if mpp_y else None)
        power = props.get("openslide.objective-power")
        self.objective_power = float(power) if power else None
        self.associated_names = list(self._osr.associated_images.keys())

    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Read (h, w) level pixels at (y, x) of ``level``; RGB uint8, never silently zero-filled."""
        import openslide

        ds = self.level_downsamples[level]
        try:
            img = self._osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (int(w), int(h)))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                self.path,
                f"a tile could not be decoded (level {level}, y={y}, x={x}, {h}x{w} px): {exc}.",
                CORRUPT_FIX,
            ) from exc
        return composite_rgba(np.asarray(img), self.background)

    def associated(self, name: str) -> np.ndarray:
        img = self._osr.associated_images[name]
        arr = np.asarray(img.convert("RGBA"))
        return composite_rgba(arr, self.background)

    def close(self) -> None:
        self._osr.close()
