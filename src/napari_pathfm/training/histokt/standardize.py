"""HistoKT data standardisation: one resolution, one crop size, seeded splits by source image.

HistoKT (Chen et al.) makes many small histology data sets comparable before transferring between them:
every image is rescaled to the same µm/px (1.0 by default), cut into 272 x 272 crops, images smaller than a
crop are reflection-wrapped up to the crop size, and crops with almost no contrast (blank glass, empty
background) are dropped. :func:`standardize` does that for a class-folder data set (``SRC/<class>/*.png``)
or a CSV of ``path,label`` rows and writes a new class-folder data set that the ``classify`` engine reads:

``DST/<class>/<image>__y<Y>_x<X>.png``
    The crops (PNG, RGB uint8); ``Y``/``X`` are the crop's top-left corner in the rescaled image.
``DST/split.json``
    ``{"train": [...], "val": [...], "test": [...]}``, paths relative to ``DST`` (usable as
    ``data.split_file``). The split is made per class over *source images* (seeded), so the crops of one image
    never land in two parts; a CSV ``group`` column (patient, parent image) splits whole groups instead.
``DST/standardize.json``
    What was done: source, µm/px, target µm/px, crop, stride, the contrast rule, images/crops per class and
    split, dropped crops, padded images.

Rules, exactly:

- Resolution: ``--mpp`` applies to every image and wins over the files; without it the µm/px comes from TIFF
  ``XResolution``/``ResolutionUnit`` or OME ``PhysicalSizeX``. Resolutions above 100 µm/px (the 72/96 dpi that
  image editors write) are treated as unknown, and an image without a known µm/px is an error naming it.
- Rescaling: Lanczos (PIL) by ``source_mpp / target_mpp``, rounded to whole pixels.
- Crop grid: stride ``crop`` without overlap, ``crop // 2`` with ``overlap=True``; the last crop of a row or
  column is aligned to the image edge, so every pixel is covered.
- Reflection wrap: a rescaled image smaller than ``crop`` along an axis is padded by mirror reflection
  (``numpy.pad(mode="symmetric")``, repeated for very small images) equally on both sides to ``crop``.
- Low contrast: a crop is dropped when the span between the 5th and 99th percentile of its grey values
  (ITU-R 601 luma of the RGB crop, 0-255) is below 5 % of the 0-255 range, i.e.
  ``skimage.exposure.is_low_contrast(grey, 0.05, lower_percentile=5, upper_percentile=99)`` on the uint8
  grey crop. (Called on an RGB image, scikit-image would convert to float grey and compare with the float
  range -1..1, which doubles the threshold; we pass uint8 grey so the rule is exactly 5 % of 0-255.)

This module needs only numpy, PIL, tifffile and scikit-image (no torch), so it runs anywhere.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import RecipeError
from ...io.atomic import atomic_path
from ...progress import check_cancel, report
from ..segment_data import tile_starts

__all__ = [
    "Source",
    "find_sources",
    "image_mpp",
    "is_low_contrast",
    "reflect_pad",
    "split_by_source",
    "standardize",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MAX_PLAUSIBLE_MPP = 100.0


@dataclass(frozen=True)
class Source:
    """One source image, its class label and its split group (default: the image itself)."""

    path: Path
    label: str
    group: str = ""


def find_sources(src: str | Path) -> list[Source]:
    """Source images with labels from a class-folder data set or a ``path,label`` CSV.

    Parameters
    ----------
    src : str or Path
        A folder with one sub-folder of images per class, or a CSV file with a header row containing ``path``
        and ``label`` columns (relative paths resolve against the CSV's folder) and optionally ``group``
        (e.g. patient or parent image): images of one group always land in the same split.

    Raises
    ------
    RecipeError
        ``src`` is missing, a class folder has no images, a CSV row names a missing file, or nothing was found.
    """
    src = Path(src)
    if src.is_file() and src.suffix.lower() == ".csv":
        return _sources_from_csv(src)
    if not src.is_dir():
        raise RecipeError(src, "not found.", "Give a folder with one sub-folder per class, or a path,label CSV.")
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise RecipeError(src, "has no class sub-folders.", "Put the images of each class in SRC/<class>/.")
    out = []
    for folder in classes:
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RecipeError(
                folder,
                f"class {folder.name!r} contains no images ({', '.join(IMAGE_SUFFIXES)}).",
                "Add images to it or remove the empty folder.",
            )
        out += [Source(f, folder.name) for f in files]
    return out


def _sources_from_csv(path: Path) -> list[Source]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise RecipeError(path, "needs a header row with 'path' and 'label' columns.", "Write path,label first.")
    out = []
    for i, row in enumerate(rows, start=2):
        file, label = Path(row["path"] or ""), (row["label"] or "").strip()
        file = file if file.is_absolute() else path.parent / file
        if not label:
            raise RecipeError(path, f"line {i} has no label.", "Give every image a class label.")
        if not file.is_file():
            raise RecipeError(
                path, f"line {i} names {file}, which does not exist.", "Fix the path (relative to the CSV)."
            )
        out.append(Source(file, label, (row.get("group") or "").strip()))
    return out


def image_mpp(path: str | Path) -> float | None:
    """µm/px recorded in an image file (OME ``PhysicalSizeX`` or TIFF resolution tags), else ``None``.

    Resolutions above 100 µm/px are the 72/96 dpi defaults of image editors, not a microscope's, and count as
    unknown. PNG/JPEG files carry no usable resolution and give ``None``.
    """
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    import tifffile

    from ...io._tiff_backend import ome_mpp, resolution_to_mpp

    try:
        with tifffile.TiffFile(path) as tif:
            mpp = ome_mpp(tif.ome_metadata) if tif.is_ome else None
            mpp = mpp or resolution_to_mpp(tif.pages[0])
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    return mpp if mpp and 0 < mpp <= MAX_PLAUSIBLE_MPP else None


def reflect_pad(image: np.ndarray, size: int) -> np.ndarray:
    """Mirror-pad ``image`` (H, W, C) equally on both sides until each side is at least ``size``.

    Repeats the reflection for images less than half the target size (``numpy.pad`` symmetric mode handles
    widths larger than the axis by reflecting again).
    """
    pads = []
    for n in image.shape[:2]:
        extra = max(0, size - n)
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return image
    return np.pad(image, pads + [(0, 0)] * (image.ndim - 2), mode="symmetric")


def is_low_contrast(tile: np.ndarray, fraction: float = 0.05) -> bool:
    """True when the 5th-99th percentile span of the tile's grey values is below ``fraction`` of 0-255."""
    from skimage.exposure import is_low_contrast as _low

    grey = tile if tile.ndim == 2 else (tile[..., :3] @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    return bool(_low(grey.astype(np.uint8), fraction_threshold=fraction, lower_percentile=5, upper_percentile=99))


def split_by_source(labels: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> list[str]:
    """Assign each item (source image) to ``train``/``val``/``test``, per class, seeded.

    Each class is shuffled with ``seed``; ``round(n * fraction)`` items go to val and to test, with at least one
    each when the class has 3 or more items (2 items: one train, one test; 1 item: train) and never all of them.

    Returns
    -------
    list of str
        The part of every item, in input order.
    """
    f_train, f_val, f_test = (float(f) for f in fractions)
    total = f_train + f_val + f_test
    if min(fractions) < 0 or total <= 0:
        raise ValueError(f"split fractions must be >= 0 and not all 0, got {list(fractions)}")
    f_val, f_test = f_val / total, f_test / total
    rng = np.random.default_rng(seed)
    parts = [""] * len(labels)
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        order = [idx[j] for j in rng.permutation(len(idx))]
        n = len(order)
        n_test, n_val = round(n * f_test), round(n * f_val)
        if n >= 3:
            n_test, n_val = max(n_test, 1 if f_test > 0 else 0), max(n_val, 1 if f_val > 0 else 0)
        elif n == 2:
            n_test, n_val = (1 if f_test > 0 else 0), (1 if f_test == 0 and f_val > 0 else 0)
        else:
            n_test = n_val = 0
        while n_test + n_val >= n > 0 and n_test + n_val > 0:  # keep one for training
            if n_val >= n_test and n_val:
                n_val -= 1
            else:
                n_test -= 1
        for k, i in enumerate(order):
            parts[i] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return parts


def _split_sources(sources: list[Source], fractions: Sequence[float], seed: int) -> list[str]:
    """Per-class split by image; with CSV groups, groups are split (unstratified) so none spans two parts."""
    if not any(s.group for s in sources):
        return split_by_source([s.label for s in sources], fractions, seed)
    groups = sorted({s.group or str(s.path) for s in sources})
    part_of = dict(zip(groups, split_by_source(["all"] * len(groups), fractions, seed)))
    return [part_of[s.group or str(s.path)] for s in sources]


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise RecipeError(path, f"cannot be read as an image ({exc}).", "Remove or re-save the file.") from exc


def _rescale(image: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    if abs(scale - 1.0) < 1e-6:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def _safe_stem(path: Path, used: set) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    name, k = stem, 1
    while name in used:
        k += 1
        name = f"{stem}_{k}"
    used.add(name)
    return name


def _check_dst(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise RecipeError(
            dst,
            "already exists and is not empty; standardize writes a new data set and never mixes into an old one.",
            "Choose a new DST folder or delete this one.",
        )


def standardize(
    src: str | Path,
    dst: str | Path,
    *,
    mpp: float | None = None,
    target_mpp: float = 1.0,
    crop: int = 272,
    overlap: bool = False,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    min_contrast: float = 0.05,
    split_by: str = "image",
    progress=None,
    cancel=None,
) -> dict:
    """Standardise a labelled image set to ``target_mpp`` µm/px crops of ``crop`` px (HistoKT).

    Parameters
    ----------
    src : str or Path
        Class-folder data set (``SRC/<class>/*``) or ``path,label`` CSV.
    dst : str or Path
        New output folder (must not exist or be empty). Written into a hidden temporary folder beside it and
        renamed at the end, so an interrupted run leaves nothing half-written under ``dst``.
    mpp : float, optional
        µm/px of every source image; required unless the files record it (TIFF/OME).
    target_mpp : float
        µm/px of the crops (HistoKT: 1.0).
    crop : int
        Crop side in pixels (HistoKT: 272).
    overlap : bool
        Stride ``crop // 2`` instead of ``crop``.
    fractions : (float, float, float)
        Train/val/test shares, per class over source images.
    seed : int
        Seed of the split.
    min_contrast : float
        Low-contrast threshold (fraction of 0-255 spanned by the 5th-99th grey percentiles).
    split_by : {"image", "crop"}
        ``"image"`` (default) keeps the crops of one source image in one part. ``"crop"`` splits crops
        independently: only for toy sets with one image per class, and it leaks (neighbouring crops of one image
        in train and test); ``standardize.json`` records the choice.
    progress : callable, optional
        ``progress(done, total, message)`` per source image.
    cancel : Event-like or callable, optional
        Checked per source image; raises :class:`~napari_pathfm.errors.Cancelled` and leaves no output.

    Returns
    -------
    dict
        The content of ``standardize.json``.

    Raises
    ------
    RecipeError
        Missing/empty classes, an image without known µm/px (pass ``mpp``), unreadable images, a non-empty
        ``dst``, or no crop left after the contrast filter.
    """
    src, dst = Path(src), Path(dst)
    if crop < 8:
        raise ValueError(f"crop must be at least 8 px, got {crop}")
    if split_by not in ("image", "crop"):
        raise ValueError(f"split_by must be 'image' or 'crop', got {split_by!r}")
    _check_dst(dst)
    sources = find_sources(src)
    resolutions = [mpp if mpp else image_mpp(s.path) for s in sources]
    unknown = [s.path for s, r in zip(sources, resolutions) if not r]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise RecipeError(
            unknown[0],
            f"has no known µm/px{more}: the file records no physical pixel size (72/96 dpi tags do not count).",
            "Pass the scanner's resolution with --mpp (e.g. --mpp 0.5 for 20x scans).",
        )
    stride = crop // 2 if overlap else crop
    image_parts = _split_sources(sources, fractions, seed)
    classes = sorted({s.label for s in sources})
    stats = {c: {"images": 0, "crops": 0, "dropped_low_contrast": 0, "padded_images": 0} for c in classes}
    crops: list[tuple[str, str, str]] = []  # (relative path, label, part of its source image)
    total = len(sources)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, directory=True) as tmp:
        tmp.mkdir()
        used: dict[str, set] = {c: set() for c in classes}
        for i, (source, res, part) in enumerate(zip(sources, resolutions, image_parts)):
            check_cancel(cancel, f"standardize of {src}")
            image = _rescale(_read_rgb(source.path), res / target_mpp)
            st = stats[source.label]
            st["images"] += 1
            if min(image.shape[:2]) < crop:
                image, st["padded_images"] = reflect_pad(image, crop), st["padded_images"] + 1
            stem = _safe_stem(source.path, used[source.label])
            (tmp / source.label).mkdir(exist_ok=True)
            for y in tile_starts(image.shape[0], crop, stride):
                for x in tile_starts(image.shape[1], crop, stride):
                    tile = np.ascontiguousarray(image[y : y + crop, x : x + crop])
                    if is_low_contrast(tile, min_contrast):
                        st["dropped_low_contrast"] += 1
                        continue
                    rel = f"{source.label}/{stem}__y{y}_x{x}.png"
                    _write_png(tmp / rel, tile)
                    crops.append((rel, source.label, part))
                    st["crops"] += 1
            report(progress, i + 1, total, f"{source.path.name}: {st['crops']} crops in {source.label}")
        if not crops:
            raise RecipeError(
                src, "gives no crops: every crop was dropped as low-contrast.", "Check the images and the --mpp value."
            )
        for c in classes:  # a class whose crops were all dropped would be an empty class downstream
            if stats[c]["crops"] == 0:
                (tmp / c).rmdir()
        if split_by == "crop":
            parts = split_by_source([lab for _, lab, _ in crops], fractions, seed)
        else:
            parts = [p for _, _, p in crops]
        split = {p: [rel for (rel, _, _), q in zip(crops, parts) if q == p] for p in ("train", "val", "test")}
        info = _summary(src, dst, sources, resolutions, image_parts, crops, parts, stats, locals())
        (tmp / "split.json").write_text(json.dumps(split, indent=1) + "\n", encoding="utf-8")
        (tmp / "standardize.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _write_png(path: Path, tile: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(tile).save(path, compress_level=1)


def _summary(src, dst, sources, resolutions, image_parts, crops, parts, stats, args) -> dict:
    per_split = {
        c: {p: sum(1 for (_, lab, _), q in zip(crops, parts) if lab == c and q == p) for p in ("train", "val", "test")}
        for c in stats
    }
    images_per_split = {
        c: {
            p: sum(1 for s, q in zip(sources, image_parts) if s.label == c and q == p) for p in ("train", "val", "test")
        }
        for c in stats
    }
    mpps = sorted({round(float(r), 6) for r in resolutions})
    return {
        "format": "napari-pathfm-histokt-standardized/1",
        "source": str(Path(src).resolve()),
        "output": str(Path(dst).resolve()),
        "source_mpp": mpps[0] if len(mpps) == 1 else mpps,
        "mpp_from": "--mpp" if args["mpp"] else "file metadata",
        "target_mpp": args["target_mpp"],
        "crop": args["crop"],
        "overlap": args["overlap"],
        "stride": args["stride"],
        "resample": "PIL Lanczos",
        "pad": "reflection (numpy symmetric), centred, for images smaller than the crop",
        "low_contrast_rule": f"grey 5th-99th percentile span < {args['min_contrast']:.0%} of 0-255 -> dropped",
        "split_by": args["split_by"],
        "split_fractions": list(args["fractions"]),
        "seed": args["seed"],
        "classes": [c for c in stats if stats[c]["crops"]],
        "classes_without_crops": [c for c in stats if not stats[c]["crops"]],
        "per_class": stats,
        "crops_per_split": per_split,
        "images_per_split": images_per_split,
        "totals": {
            "images": len(sources),
            "crops": len(crops),
            "dropped_low_contrast": sum(s["dropped_low_contrast"] for s in stats.values()),
            "padded_images": sum(s["padded_images"] for s in stats.values()),
        },
        "source_images": {str(s.path): p for s, p in zip(sources, image_parts)},
    }
