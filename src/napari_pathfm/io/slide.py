"""Whole-slide images as lazy dask pyramids: ``open_slide(path) -> Slide``.

OpenSlide reads the vendor formats (SVS, NDPI, VMS/VMU, SCN, MRXS, SVSLIDE, BIF,
generic tiled TIFF, DICOM WSI); tifffile + zarr 3 reads OME-TIFF and TIFFs
OpenSlide refuses; Pillow reads plain PNG/JPEG images. Every level is a dask
array (Y, X, 3) uint8 chunked on the file's native tiles, so viewing a slide
reads only the tiles on screen and opening one costs almost no memory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SlideError
from ._levels import RegionArray, TileCache, TiledReader
from ._tiff_backend import MAX_PLAUSIBLE_MPP

PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
TIFF_SUFFIXES = {".tif", ".tiff", ".btf", ".tf8"}
#: Suffixes the napari reader claims (folders are handled by the z-stack reader).
SLIDE_SUFFIXES = [
    ".svs",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".tif",
    ".tiff",
    ".dcm",
    ".btf",
    ".png",
    ".jpg",
    ".jpeg",
]
OVERVIEW_MAX = 2048  # a pyramid's smallest level should be at most this many px on its long side


@dataclass(frozen=True)
class SlideSignature:
    """Identity of a slide file for caches: cheap, never a hash of pixel data."""

    path: str
    size: int
    mtime_ns: int
    level_shapes: tuple[tuple[int, int], ...]

    def key(self) -> str:
        text = f"{self.path}|{self.size}|{self.mtime_ns}|{self.level_shapes}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class Slide:
    """An open whole-slide image.

    Attributes
    ----------
    path : Path
    backend : str
        ``"openslide"``, ``"tifffile"`` or ``"image"``.
    mpp : float or None
        µm per pixel at level 0 (None when the file does not say).
    level_shapes : list of (height, width)
    level_downsamples : list of float
        Level-0 pixels per pixel of each level.
    properties : dict
        Vendor properties as strings (OpenSlide's ``openslide.*`` keys and vendor keys).
    background : (r, g, b)
        Colour that transparent/unscanned regions are composited onto.

    Examples
    --------
    >>> slide = open_slide("CMU-1-Small-Region.svs")  # doctest: +SKIP
    >>> slide.read(0, 1000, 1000, 256, 256).shape  # doctest: +SKIP
    (256, 256, 3)
    """

    def __init__(self, path: Path, backend):
        self.path = path
        self._backend = backend
        self.backend: str = backend.name
        self.mpp: float | None = backend.mpp
        if self.mpp is not None and not 0 < self.mpp <= MAX_PLAUSIBLE_MPP:
            backend.properties["pathfm.ignored-mpp"] = str(self.mpp)
            self.mpp = None
        self.level_shapes: list[tuple[int, int]] = list(backend.level_shapes)
        self.level_downsamples: list[float] = list(backend.level_downsamples)
        self.tile_sizes: list[tuple[int, int]] = list(backend.tile_sizes)
        self.properties: dict[str, str] = dict(backend.properties)
        self.vendor: str | None = backend.vendor
        self.objective_power: float | None = backend.objective_power
        self.background: tuple[int, int, int] = tuple(backend.background)  # type: ignore[assignment]
        #: Decoded native tiles served to :attr:`pyramid` (viewing); :meth:`read` bypasses it.
        self.tile_cache = TileCache()

    # -- geometry ---------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_shapes)

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (height, width)."""
        return self.level_shapes[0]

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """Deepest level whose downsample does not exceed ``downsample`` (never upsample)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = i
        return best

    # -- pixels -----------------------------------------------------------------
    def probe(self) -> None:
        """Decode the first tile of the smallest level, so a file whose pixels cannot be
        decoded fails when it is opened (naming the file) rather than later in a viewer."""
        level = self.level_count - 1
        h, w = self.level_shapes[level]
        th, tw = self.tile_sizes[level]
        self.read(level, 0, 0, min(h, th, 64), min(w, tw, 64))

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Read a region as (h, w, 3) uint8; y, x, h, w are in pixels of ``level``.

        Parts outside the image are filled with the background colour. A tile that
        fails to decode raises :class:`SlideError`; it is never silently zero-filled.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(self.path, f"has no level {level} (it has {self.level_count}).")
        return self._backend.read_region(level, int(y), int(x), int(h), int(w))

    def nonfinite_fraction(self) -> float | None:
        """Share of NaN/Inf among the float values read so far; None for integer images (or nothing read).

        Float TIFFs are shown with NaN/Inf as black; this tells an image that was all
        NaN apart from a black one (see :func:`check_has_content`).
        """
        read, bad = getattr(self._backend, "nonfinite", (0, 0))
        return bad / read if read else None

    @cached_property
    def pyramid(self) -> list:
        """Dask arrays (Y, X, 3) uint8, level 0 first, chunked on native tiles.

        Whole native tiles are decoded once and kept in :attr:`tile_cache` (64 MB LRU)
        so that panning and zooming do not decode the same tile again.

        When the file's own pyramid stops above :data:`OVERVIEW_MAX` px, coarser
        levels are added by lazy 2x averaging so that napari can show an overview.
        """
        import dask.array as da

        token = self.signature().key()
        levels = []
        for i, shape in enumerate(self.level_shapes):
            th, tw = self.tile_sizes[i]
            chunks = (min(th, shape[0]), min(tw, shape[1]), 3)
            reader = TiledReader(_LevelReader(self, i), shape, chunks[:2], self.tile_cache, i)
            levels.append(
                da.from_array(
                    RegionArray(shape, reader),
                    chunks=chunks,
                    name=f"pathfm-slide-{token}-level{i}",
                    lock=False,
                    asarray=False,
                    fancy=False,
                    meta=np.empty((0, 0, 0), np.uint8),
                )
            )
        while max(levels[-1].shape[:2]) > OVERVIEW_MAX:
            levels.append(_coarsen2(levels[-1]))
        return levels

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """An RGB overview whose long side is at most ``max_size`` px."""
        from PIL import Image

        h0, w0 = self.shape
        ds = max(h0, w0) / max_size
        level = self.best_level_for_downsample(max(ds, 1.0))
        h, w = self.level_shapes[level]
        img = self.read(level, 0, 0, h, w)
        scale = max_size / max(h, w)
        if scale < 1:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX))
        return img

    # -- metadata ---------------------------------------------------------------
    @property
    def associated_image_names(self) -> list[str]:
        return list(self._backend.associated_names)

    def associated_image(self, name: str) -> np.ndarray:
        """Label, macro or thumbnail image stored beside the slide, as RGB uint8."""
        if name not in self._backend.associated_names:
            raise SlideError(
                self.path, f"has no associated image {name!r}.", f"Available: {self.associated_image_names}."
            )
        return self._backend.associated(name)

    def signature(self) -> SlideSignature:
        st = os.stat(self.path)
        return SlideSignature(str(self.path.resolve()), st.st_size, st.st_mtime_ns, tuple(self.level_shapes))

    def metadata(self) -> dict[str, Any]:
        """JSON-friendly summary: what ``pathfm open`` prints and napari attaches to the layer."""
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vendor": self.vendor,
            "mpp": self.mpp,
            "objective_power": self.objective_power,
            "level_count": self.level_count,
            "level_shapes": [list(s) for s in self.level_shapes],
            "level_downsamples": self.level_downsamples,
            "tile_sizes": [list(s) for s in self.tile_sizes],
            "background": list(self.background),
            "associated_images": self.associated_image_names,
            "properties": self.properties,
        }

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, backend={self.backend}, levels={self.level_shapes}, mpp={self.mpp})"


class _LevelReader:
    """Picklable region reader for one level (dask may serialise graphs)."""

    def __init__(self, slide: Slide, level: int):
        self.slide, self.level = slide, level

    def __call__(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.slide.read(self.level, y, x, h, w)


def _coarsen2(arr):
    """Halve a dask RGB level by 2x2 averaging (odd edges trimmed), keeping uint8."""
    import dask.array as da

    h, w = (arr.shape[0] // 2) * 2, (arr.shape[1] // 2) * 2
    arr = arr[:h, :w]
    cy, cx = arr.chunksize[0], arr.chunksize[1]
    arr = arr.rechunk((max(2, cy - cy % 2), max(2, cx - cx % 2), 3))
    out = da.coarsen(np.mean, arr.astype(np.float32), {0: 2, 1: 2}, trim_excess=True)
    return out.round().astype(np.uint8)


def _prefer_tifffile_pyramid(path: Path, slide: Slide, background) -> Slide:
    """OpenSlide sees one level in TIFFs whose pyramid lives in SubIFDs; tifffile sees them all."""
    from ._tiff_backend import TiffBackend

    try:
        other = Slide(path, TiffBackend(path, background))
        other.probe()
    except SlideError:
        return slide
    if other.level_count > slide.level_count:
        other.mpp = other.mpp if other.mpp is not None else slide.mpp
        slide.close()
        return other
    other.close()
    return slide


def open_slide(path: str | os.PathLike, *, background: tuple[int, int, int] | None = None) -> Slide:
    """Open a whole-slide image, OME-TIFF, generic TIFF or plain image.

    Raises
    ------
    SlideError
        When the file does not exist or no backend can read it; the message names
        the file, what is wrong and what to do.
    """
    p = Path(path)
    if not p.exists():
        raise SlideError(p, "does not exist.", "Check the path.")
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        raise SlideError(
            p, "is a folder, not a slide file.", "Open a slide file (or use open_zstack for plane folders)."
        )
    suffix = p.suffix.lower()
    if suffix in PLAIN_IMAGE_SUFFIXES:
        from ._tiff_backend import PlainImageBackend

        return Slide(p, PlainImageBackend(p, background))

    from ._openslide_backend import OpenSlideBackend
    from ._tiff_backend import TiffBackend

    errors: list[str] = []
    is_ome = p.name.lower().endswith((".ome.tif", ".ome.tiff"))
    backends = [TiffBackend, OpenSlideBackend] if is_ome else [OpenSlideBackend]
    if suffix in TIFF_SUFFIXES and not is_ome:
        backends.append(TiffBackend)
    for backend_cls in backends:
        try:
            slide = Slide(p, backend_cls(p, background))
        except SlideError as exc:
            errors.append(f"{backend_cls.name}: {exc.problem.rstrip('.')}")
            continue
        try:
            slide.probe()
        except SlideError as exc:
            slide.close()
            errors.append(f"{backend_cls.name}: {exc.problem.rstrip('.')}")
            continue
        if slide.vendor == "generic-tiff" and slide.level_count == 1:
            slide = _prefer_tifffile_pyramid(p, slide, background)
        return slide
    raise SlideError(
        p,
        "cannot be read as a slide (" + "; ".join(errors) + ").",
        "Check that the file is complete and in a supported format (SVS, NDPI, MRXS, SCN, BIF, DICOM, "
        "OME-TIFF, pyramidal TIFF, PNG/JPEG); converting to pyramidal OME-TIFF usually helps.",
    )


def check_has_content(slide: Any, overview: np.ndarray) -> None:
    """Refuse a slide whose low-resolution overview shows nothing at all: only NaN/Inf, or one flat colour.

    A failed export or computation writes such files; treating them as "no tissue" would
    hand back an empty result with success. ``overview`` is the (h, w, 3) image the
    tissue detector has already read (whole blocks only), so the check reads no pixels.

    Raises
    ------
    SlideError
        Every float value read was NaN/Inf, or every overview pixel has the same colour.
    """
    fraction = slide.nonfinite_fraction() if hasattr(slide, "nonfinite_fraction") else None
    if fraction is not None and fraction >= 1.0:
        raise SlideError(
            slide.path,
            "holds only NaN/Inf values (a float image without one finite pixel), so there is no image to analyse.",
            "A failed computation or export writes NaN; re-export the image or open the original scan.",
        )
    ov = np.asarray(overview, np.float32)
    if ov.size and float(ov.max()) - float(ov.min()) < 0.5:
        colour = tuple(int(round(float(v))) for v in ov.reshape(-1, ov.shape[-1])[0])
        raise SlideError(
            slide.path,
            f"is one flat colour (every pixel is RGB {colour}), so there is neither tissue nor background to find.",
            "Check that this is the scan you meant; a failed export or an empty placeholder writes a blank image.",
        )
