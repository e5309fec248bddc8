"""Reading ``segment`` training data: image/mask files, mask values → classes, folder pairs, splits.

Plain numpy + Pillow (no torch, no Lightning), so it can be used to check a data set
quickly; the Lightning datasets and data module built on it are in
:mod:`napari_pathfm.training.segment_datamodule`; :mod:`napari_pathfm.training.tasks.segment`
describes the layout and the mask formats.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import RecipeError
from ..io.annotations import ANNOTATION_SUFFIXES, annotation_class_map
from .gland_targets import contour_target
from .recipe_fields import IMAGE_EXTENSIONS

IGNORE = 255
MASK_FORMATS = ("auto", "binary", "index", "nonzero")


# --- reading ---------------------------------------------------------------------------------


def _read_array(path: Path, what: str, fix: str) -> np.ndarray:
    """Pixels of an image file: tifffile for TIFF, Pillow otherwise (palette/alpha images as RGBA)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGBA") if what == "image" and img.mode in ("P", "PA", "LA", "RGBA") else img)
    except Exception as exc:
        raise RecipeError(path, f"cannot be read as {what} ({type(exc).__name__}: {exc}).", fix) from exc


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)``; alpha is composited onto white, grey is repeated.

    Raises
    ------
    RecipeError
        The file cannot be read or is not an 8-bit image.
    """
    path = Path(path)
    arr = _read_array(path, "image", "Save it as PNG or TIFF.")
    if arr.dtype != np.uint8:
        raise RecipeError(path, f"is a {arr.dtype} image; training expects 8-bit RGB.", "Convert it to 8-bit RGB.")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise RecipeError(path, f"has shape {arr.shape}; expected (height, width, 3) RGB.", "Save it as RGB.")
    if arr.shape[2] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255.0
        arr = np.round(arr[..., :3] * a + 255.0 * (1.0 - a)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def is_annotation(path: Path) -> bool:
    """Whether a mask file is an annotation file (QuPath GeoJSON / ASAP XML) rather than an image."""
    return path.suffix.lower() in ANNOTATION_SUFFIXES


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.height, img.width
    except Exception:  # noqa: BLE001 - Pillow cannot read every TIFF: read the pixels
        return read_rgb(path).shape[:2]


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as a 2-D integer array of raw values (an RGB mask must have equal channels)."""
    path = Path(path)
    arr = _read_array(path, "a mask image", "Save masks as PNG or TIFF.")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise RecipeError(
                path,
                "is a colour mask (its R, G and B channels differ).",
                "Save masks as single-channel images of class indices (or 0/255 for binary masks).",
            )
        arr = arr[..., 0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise RecipeError(
            path,
            f"has shape {arr.shape} and type {arr.dtype}; expected a 2-D integer mask.",
            "Save masks as 8-bit PNG.",
        )
    return arr


def _values_text(values) -> str:
    values = [int(v) for v in values]
    return str(values[:20])[:-1] + (", ...]" if len(values) > 20 else "]")


def mask_to_classes(
    raw: np.ndarray,
    mask_format: str = "auto",
    num_classes: int | None = None,
    mask_values: dict | None = None,
    ignore_index: int = IGNORE,
    where: str | Path = "mask",
) -> np.ndarray:
    """Raw mask values → uint8 class indices (``ignore_index`` kept as ignore).

    Parameters
    ----------
    raw : ndarray (H, W)
        As read by :func:`read_mask`.
    mask_format : {"auto", "binary", "index", "nonzero"}
        ``binary``: 0 → 0, 255 or 1 → 1. ``nonzero``: 0 → 0, anything else → 1.
        ``index``: values are classes;
        ``ignore_index`` is ignore. ``auto`` here means: binary when the values
        are within {0, 255}, else index (:class:`SegmentDataModule` decides per folder).
    num_classes : int, optional
        Index values must be below it (or equal ``ignore_index``).
    mask_values : dict, optional
        ``{raw value: class}`` applied first; every value present must be listed.
    where : str or Path
        File named in errors.

    Raises
    ------
    RecipeError
        Values that the format does not allow, naming the file and the values.

    Examples
    --------
    >>> mask_to_classes(np.array([[0, 255]], np.uint8)).tolist()
    [[0, 1]]
    >>> mask_to_classes(np.array([[0, 2, 255]], np.uint8), "index", 3).tolist()
    [[0, 2, 255]]
    """
    values = np.unique(raw)
    if mask_values:
        table = {int(k): int(v) for k, v in mask_values.items()}
        unknown = [v for v in values.tolist() if v not in table]
        if unknown:
            raise RecipeError(
                where,
                f"has mask values {_values_text(unknown)} that data.mask_values does not map "
                f"(values found: {_values_text(values)}).",
                "Add them to data.mask_values.",
            )
        lut_keys = np.array(sorted(table), dtype=np.int64)
        lut_vals = np.array([table[k] for k in lut_keys], dtype=np.int64)
        raw = lut_vals[np.searchsorted(lut_keys, raw.astype(np.int64))]
        values = np.unique(raw)
        mask_format = "index"
    if mask_format == "auto":
        mask_format = "binary" if set(values.tolist()) <= {0, 255} else "index"
    if mask_format == "nonzero":  # instance-labelled masks (GlaS/CRAG originals): any object = class 1
        return (raw != 0).astype(np.uint8)
    if mask_format == "binary":
        bad = [v for v in values.tolist() if v not in (0, 1, 255)]
        if bad:
            raise RecipeError(
                where,
                f"is read as a binary mask (0 = background, 255 = foreground) but holds the values "
                f"{_values_text(values)}.",
                "Set data.mask_format: index for class-index masks, or map the "
                "values with data.mask_values (e.g. {0: 0, 128: 1}).",
            )
        return (raw > 0).astype(np.uint8)
    if mask_format != "index":
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, not {mask_format!r}")
    limit = num_classes if num_classes is not None else min(ignore_index, 255)
    bad = [v for v in values.tolist() if (v < 0 or v >= limit) and v != ignore_index]
    if bad:
        what = f"{num_classes} classes (0..{num_classes - 1})" if num_classes is not None else "class indices below 255"
        raise RecipeError(
            where,
            f"has mask values {_values_text(bad)} that are not {what} or the ignore value "
            f"{ignore_index} (values found: {_values_text(values)}).",
            "Map them with data.mask_values, fix model.num_classes / data.classes, or fix the mask.",
        )
    out = raw.astype(np.int64)
    out[out == ignore_index] = IGNORE
    return out.astype(np.uint8)


# --- items and split -------------------------------------------------------------------------


@dataclass
class SegItem:
    """One image/mask pair.

    ``source`` is the folder it came from, ``scale`` the resampling factor
    (file µm/px ÷ model µm/px), ``repeat`` how often it is drawn per epoch (multiplies
    ``samples_per_image``), ``mask_format``/``mask_values`` how to read its mask.
    """

    name: str
    image: Path
    mask: Path
    source: Path
    scale: float = 1.0
    repeat: int = 1
    mask_format: str = "auto"
    mask_values: dict | None = None
    extra: bool = False
    meta: dict = field(default_factory=dict)


def _exts(extensions: Sequence[str]) -> set[str]:
    return {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}


def _files(folder: Path, exts: set[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in exts:
            if f.stem in out:
                raise RecipeError(f, f"has the same name as {out[f.stem].name} in {folder}.", "Keep one file per name.")
            out[f.stem] = f
    return out


def find_pairs(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[tuple[str, Path, Path]]:
    """``(name, image, mask)`` of every image in ``root/images`` with its mask in ``root/masks``, by name.

    Raises
    ------
    RecipeError
        Missing folders, no images, or images without masks (named).
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise RecipeError(
                root,
                f"has no '{d.name}/' folder.",
                "A segmentation data folder holds images/ and masks/ with one mask per image of the same name.",
            )
    exts = _exts(extensions)
    images, masks = _files(images_dir, exts), _files(masks_dir, exts | set(ANNOTATION_SUFFIXES))
    if not images:
        raise RecipeError(images_dir, f"contains no images with suffixes {sorted(exts)}.", "Check data.root.")
    lonely = sorted(set(images) - set(masks))
    if lonely:
        shown = ", ".join(images[n].name for n in lonely[:5]) + (
            f" and {len(lonely) - 5} more" if len(lonely) > 5 else ""
        )
        raise RecipeError(
            masks_dir,
            f"has no mask for {len(lonely)} image(s): {shown}.",
            "Add masks with the same file name (PNG/TIFF/JPG, or QuPath GeoJSON / ASAP XML annotations) "
            "or remove those images.",
        )
    return [(n, images[n], masks[n]) for n in sorted(images, key=_natural)]


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def split_names(
    names: Sequence[str],
    val_names: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    where: str | Path = "data.root",
) -> tuple[list[str], list[str]]:
    """Train and validation image names: ``val_names`` as given, or a seeded ``val_fraction`` of them.

    With a fraction, ``round(n * val_fraction)`` images (at least one when
    ``val_fraction > 0`` and n ≥ 2, never all) are held out.

    >>> split_names(["a", "b", "c", "d"], ["b"])
    (['a', 'c', 'd'], ['b'])
    """
    names = list(names)
    if val_names is not None:
        want = [str(Path(str(v)).stem) for v in val_names]
        missing = sorted(set(want) - set(names))
        if missing:
            raise RecipeError(
                where,
                f"has no images named {missing[:10]} (listed in data.val_names).",
                f"Use image names without suffix, e.g. {names[:3]}.",
            )
        held = set(want)
    else:
        n_val = int(round(len(names) * float(val_fraction)))
        if val_fraction > 0 and len(names) >= 2:
            n_val = min(max(n_val, 1), len(names) - 1)
        order = np.random.default_rng(seed).permutation(len(names))
        held = {names[i] for i in order[:n_val]}
    return [n for n in names if n not in held], [n for n in names if n in held]


def tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px every ``stride`` px along ``n`` ≥ ``tile`` px, the last one at the edge.

    >>> tile_starts(10, 4, 4)
    [0, 4, 6]
    """
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile + 1, max(1, stride)))
    if starts[-1] != n - tile:
        starts.append(n - tile)
    return starts


# --- datasets --------------------------------------------------------------------------------


def resize(arr: np.ndarray, scale: float, labels: bool) -> np.ndarray:
    """``arr`` scaled by ``scale`` (Pillow: nearest for label maps, bilinear for images); unchanged at 1.0."""
    if scale == 1.0:
        return arr
    from PIL import Image

    h, w = arr.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    resample = Image.NEAREST if labels else Image.BILINEAR
    return np.asarray(Image.fromarray(arr).resize(size, resample))


def _pad_to(image: np.ndarray, mask: np.ndarray, size: int, offset: tuple[int, int] = (0, 0)):
    """Pad to at least ``size`` x ``size`` (white image, ignore label), the data at ``offset``."""
    h, w = mask.shape
    H, W = max(h, size), max(w, size)
    if (H, W) == (h, w):
        return image, mask
    oy, ox = offset
    img = np.full((H, W, 3), 255, np.uint8)
    msk = np.full((H, W), IGNORE, np.uint8)
    img[oy : oy + h, ox : ox + w], msk[oy : oy + h, ox : ox + w] = image, mask
    return img, msk


def _jitter(tile: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation each scaled by a factor in ``1 ± strength``."""
    if strength <= 0:
        return tile
    x = tile.astype(np.float32)
    b, c, s = rng.uniform(1 - strength, 1 + strength, 3)
    x *= b
    x = (x - x.mean()) * c + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = grey[..., None] + (x - grey[..., None]) * s
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


class _Store:
    """Reads (and optionally keeps) images and masks of items, resampled and converted to classes."""

    def __init__(
        self, num_classes: int | None, ignore_index: int = IGNORE, in_memory: bool = True, contour_width: int = 0
    ):
        self.num_classes, self.ignore_index, self.in_memory = num_classes, ignore_index, in_memory
        self.contour_width = int(contour_width or 0)  # > 0: gland contours become class 2 (gland_targets)
        self.class_names: list[str] | None = None  # data.classes: annotation-file masks name their classes
        self.masks: dict[Path, np.ndarray] = {}
        self.images: dict[Path, np.ndarray] = {}

    def mask(self, item: SegItem) -> np.ndarray:
        m = self.masks.get(item.mask)
        if m is None:
            if is_annotation(item.mask):  # QuPath / ASAP shapes in the image's pixels, classes by name
                m = annotation_class_map(item.mask, image_size(item.image), self.class_names or ["background", "fg"])
            else:
                raw = read_mask(item.mask)
                fmt, values = item.mask_format, item.mask_values
                m = mask_to_classes(raw, fmt, self.num_classes, values, self.ignore_index, item.mask)
            m = resize(m, item.scale, labels=True)
            if self.contour_width and not item.extra:  # corrections already carry the model's classes
                m = contour_target(m, self.contour_width, self.ignore_index)
            self.masks[item.mask] = m  # masks are small (uint8): always kept
        return m

    def image(self, item: SegItem) -> np.ndarray:
        img = self.images.get(item.image)
        if img is None:
            img = resize(read_rgb(item.image), item.scale, labels=False)
            if self.in_memory:
                self.images[item.image] = img
        mask = self.mask(item)
        if img.shape[:2] != mask.shape:
            raise RecipeError(
                item.mask,
                f"is {mask.shape[1]}x{mask.shape[0]} px but its image {item.image.name} is "
                f"{img.shape[1]}x{img.shape[0]} px.",
                "Masks must have the size of their image.",
            )
        return img
