"""A gland / non-gland tile classification data set cut from GlaS images and masks.

GlaS (MICCAI 2015) ships H&E images with binary gland masks, not tile labels.
:func:`build_glas_tiles` turns an ``images/`` + ``masks/`` folder (the layout of
``../shared/data/glas/train``) into the class-folder layout the ``classify`` engine
reads:

- every image is cut into ``tile`` x ``tile`` px tiles on a grid with step ``stride``
  (default 224 / 224: non-overlapping; the strip at the right and bottom edge that
  does not fill a whole tile is left out);
- a tile is **gland** when at least ``gland_min`` (0.5) of its pixels are gland in the
  mask, **non_gland** when at most ``non_gland_max`` (0.1) are, and is **dropped**
  otherwise (mixed tiles have no clear label);
- the split is by *image* (no image has tiles in two parts), seeded: ``test_fraction``
  and ``val_fraction`` of the images are held out, the rest trains.

Output folder::

    OUT/gland/<image>_y<row>_x<col>.png
    OUT/non_gland/<image>_y<row>_x<col>.png
    OUT/split.json      {"train": [...], "val": [...], "test": [...]}  (paths relative to OUT)
    OUT/tiles.json      parameters, counts per class and split, and every tile's image,
                        position and gland fraction

The folder is written atomically (a temporary folder renamed at the end). Calling
again with the same parameters returns the existing data set; other parameters need
``overwrite=True``. numpy + Pillow only (no torch).

Example
-------
>>> info = build_glas_tiles("../shared/data/glas/train", "runs/glas_tiles")  # doctest: +SKIP
>>> info["counts"]["train"]  # doctest: +SKIP
{'gland': ..., 'non_gland': ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import RecipeError
from ..io.atomic import atomic_path
from ..progress import check_cancel, report
from .segment_data import find_pairs, read_mask, read_rgb

__all__ = ["CLASSES", "GLAS_MPP", "build_glas_tiles", "label_tile", "split_images"]

CLASSES = ("gland", "non_gland")
GLAS_MPP = 0.62  # µm per pixel of the GlaS images (20x, Zeiss MIRAX MIDI)
_FORMAT = "napari-pathfm-glas-tiles/1"


def label_tile(gland_fraction: float, gland_min: float = 0.5, non_gland_max: float = 0.1) -> str | None:
    """Class of a tile from the share of its pixels that are gland, or ``None`` when it is dropped.

    >>> label_tile(0.7), label_tile(0.05), label_tile(0.3)
    ('gland', 'non_gland', None)
    """
    if gland_fraction >= gland_min:
        return "gland"
    if gland_fraction <= non_gland_max:
        return "non_gland"
    return None


def split_images(
    names: Sequence[str], val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[str]]:
    """Seeded split of image names into ``train`` / ``val`` / ``test`` (``round(n * fraction)`` each).

    >>> parts = split_images([f"i{k}" for k in range(10)], 0.2, 0.3, seed=1)
    >>> [len(parts[p]) for p in ("train", "val", "test")]
    [5, 2, 3]
    """
    names = list(names)
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be in [0, 1)")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test, n_val = round(len(names) * test_fraction), round(len(names) * val_fraction)
    held = {"test": set(order[:n_test]), "val": set(order[n_test : n_test + n_val])}
    return {
        "train": [n for n in names if n not in held["test"] | held["val"]],
        "val": [n for n in names if n in held["val"]],
        "test": [n for n in names if n in held["test"]],
    }


def _tiles_of(image: np.ndarray, mask: np.ndarray, tile: int, stride: int):
    """``(y, x, rgb_tile, gland_fraction)`` over the grid (whole tiles only)."""
    h, w = mask.shape
    for y in range(0, h - tile + 1, stride):
        for x in range(0, w - tile + 1, stride):
            yield y, x, image[y : y + tile, x : x + tile], float((mask[y : y + tile, x : x + tile] > 0).mean())


def build_glas_tiles(
    src: str | Path,
    out: str | Path,
    *,
    tile: int = 224,
    stride: int = 224,
    gland_min: float = 0.5,
    non_gland_max: float = 0.1,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    images: Sequence[str] | None = None,
    overwrite: bool = False,
    progress=None,
    cancel=None,
) -> dict:
    """Cut GlaS images into labelled tiles and write a class-folder data set with a by-image split.

    Parameters
    ----------
    src : str or Path
        Folder with ``images/`` and ``masks/`` (same file names; masks 0 = background,
        > 0 = gland), e.g. ``../shared/data/glas/train``.
    out : str or Path
        Output folder (layout in the module docstring).
    tile, stride : int
        Tile size and grid step in pixels (at the images' 0.62 µm/px).
    gland_min, non_gland_max : float
        Gland-pixel share at or above which a tile is ``gland`` / at or below which it
        is ``non_gland``; tiles in between are dropped.
    val_fraction, test_fraction : float
        Share of the *images* held out for validation / test.
    seed : int
        Seed of the image split.
    images : sequence of str, optional
        Use only these image names (file stems), e.g. for a quick test.
    overwrite : bool
        Replace an existing ``out`` that was built with other parameters.
    progress, cancel
        ``progress(done, total, message)`` per image; ``cancel`` checked per image
        (:class:`~napari_pathfm.errors.Cancelled`; nothing is left behind).

    Returns
    -------
    dict
        The content of ``tiles.json``: parameters, ``classes``, ``split`` (image
        names per part), ``counts`` (tiles per part and class), ``dropped`` and
        ``tiles`` (one entry per kept tile: ``file``, ``image``, ``y``, ``x``,
        ``gland_fraction``, ``label``, ``split``).

    Raises
    ------
    RecipeError
        ``src`` lacks images/masks, a listed image is missing, ``out`` holds another
        data set, or no tile could be labelled.
    """
    from PIL import Image

    src, out = Path(src), Path(out)
    params = {
        "format": _FORMAT,
        "source": str(src.resolve()),
        "tile": tile,
        "stride": stride,
        "gland_min": gland_min,
        "non_gland_max": non_gland_max,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "images": sorted(images) if images is not None else None,
    }
    existing = out / "tiles.json"
    if existing.is_file():
        info = json.loads(existing.read_text(encoding="utf-8"))
        if {k: info.get(k) for k in params} == params:
            return info
        if not overwrite:
            raise RecipeError(
                out,
                "already holds a GlaS tile data set built with other parameters.",
                "Choose another output folder or pass overwrite=True.",
            )
    elif out.exists() and any(out.iterdir()):
        raise RecipeError(out, "exists and is not a GlaS tile data set.", "Choose an empty or new output folder.")

    pairs = find_pairs(src)
    if images is not None:
        missing = sorted(set(images) - {n for n, _, _ in pairs})
        if missing:
            raise RecipeError(src, f"has no images named {missing[:5]}.", "Use file names without suffix.")
        pairs = [p for p in pairs if p[0] in set(images)]
    split = split_images([n for n, _, _ in pairs], val_fraction, test_fraction, seed)
    part_of = {n: part for part, names in split.items() for n in names}
    counts = {part: dict.fromkeys(CLASSES, 0) for part in split}
    tiles, dropped = [], 0
    with atomic_path(out, directory=True) as tmp:
        for c in CLASSES:
            (tmp / c).mkdir(parents=True)
        for i, (name, image_path, mask_path) in enumerate(pairs):
            check_cancel(cancel, "building GlaS tiles")
            image, mask = read_rgb(image_path), read_mask(mask_path)
            if image.shape[:2] != mask.shape:
                raise RecipeError(mask_path, f"is {mask.shape} px but its image is {image.shape[:2]}.", "Fix the mask.")
            for y, x, rgb, frac in _tiles_of(image, mask, tile, stride):
                label = label_tile(frac, gland_min, non_gland_max)
                if label is None:
                    dropped += 1
                    continue
                rel = f"{label}/{name}_y{y}_x{x}.png"
                Image.fromarray(np.ascontiguousarray(rgb)).save(tmp / rel)
                part = part_of[name]
                counts[part][label] += 1
                tiles.append(
                    {
                        "file": rel,
                        "image": name,
                        "y": y,
                        "x": x,
                        "gland_fraction": round(frac, 6),
                        "label": label,
                        "split": part,
                    }
                )
            report(progress, i + 1, len(pairs), f"GlaS tiles: {name}")
        if not tiles:
            raise RecipeError(
                src, "gave no tile that could be labelled.", "Use a smaller tile or loosen gland_min/non_gland_max."
            )
        files = {part: [t["file"] for t in tiles if t["split"] == part] for part in split}
        (tmp / "split.json").write_text(json.dumps(files, indent=1), encoding="utf-8")
        info = {
            **params,
            "mpp": GLAS_MPP,
            "classes": list(CLASSES),
            "split": split,
            "counts": counts,
            "dropped": dropped,
            "tiles": tiles,
        }
        (tmp / "tiles.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m napari_pathfm.training.glas_tiles SRC [OUT] [--seed N]``: build the data set, print the counts.

    OUT defaults to ``<per-user data folder>/glas_tiles``, where the ``slca/glas*`` recipes look for the tiles
    unless ``PATHFM_GLAS_TILES`` says otherwise.
    """
    import argparse

    from ..userdata import data_dir

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("src")
    ap.add_argument("out", nargs="?", default=None, help="output folder (default: <per-user data folder>/glas_tiles)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)
    out = a.out or os.environ.get("PATHFM_GLAS_TILES") or data_dir() / "glas_tiles"
    info = build_glas_tiles(a.src, out, tile=a.tile, stride=a.tile, seed=a.seed, overwrite=a.overwrite)
    print(json.dumps({"counts": info["counts"], "dropped": info["dropped"]}, indent=1))


if __name__ == "__main__":
    main()
