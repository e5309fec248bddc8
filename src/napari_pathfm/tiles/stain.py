"""Stain statistics: the mean tissue colour of an image, and of a model's training images.

A model card may carry ``"stain": {"mean": [r, g, b], "std": [r, g, b], "images": n}`` — the
mean over its training images of each image's mean tissue colour (RGB in 0-1), and how much that
mean varies between the training images. A slide whose own mean tissue colour lies more than
:data:`napari_pathfm.pipelines.notes.STAIN_TOLERANCE` of those standard deviations away (in any
channel) was stained or scanned unlike anything the model saw, and the run says so
(:func:`~napari_pathfm.pipelines.notes.model_notes`).

Both sides are measured the same way: tissue pixels (a tissue mask, without the white of lumens
and glass and without black ink) of a low-resolution image (a slide's tissue-detection overview,
about 8 µm/px; a training image read at 1/8 of its size). The spread has a floor
(:data:`MIN_STD`) so a very uniform training set does not call every other slide out of domain.

    python -m napari_pathfm.tiles.stain CARD.json IMAGES_FOLDER   # record a card's reference

Pure numpy (no torch), cheap: the slide side reuses the overview the tissue mask was made from.
The statistic of one image, :func:`~napari_pathfm.tiles.tissue.tissue_stain`, lives in ``tissue.py``
(every tissue mask carries it); this module builds a card's reference from many images.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .tissue import rgb_tissue_mask, tissue_stain

__all__ = [
    "MIN_STD",
    "record_in_card",
    "stain_reference",
    "stain_reference_from_folder",
    "stain_reference_from_paths",
]

#: floor of the reference's between-image standard deviation (RGB, 0-1)
MIN_STD = 0.02
#: images of a training folder are read at 1/STEP of their size
STEP = 8
_IMAGE_SUFFIXES = {".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"}


def stain_reference(images: Iterable[np.ndarray]) -> dict | None:
    """A card's ``stain``: mean and between-image spread of the images' mean tissue colours.

    Each image's tissue is found with :func:`~napari_pathfm.tiles.tissue.rgb_tissue_mask`;
    images without stained pixels are skipped. Returns None when none has any.
    """
    means = []
    for rgb in images:
        stats = tissue_stain(rgb, rgb_tissue_mask(rgb, min_object_area_px=0))
        if stats is not None:
            means.append(stats["mean"])
    if not means:
        return None
    means = np.asarray(means, float)
    std = np.maximum(means.std(axis=0), MIN_STD)
    return {
        "mean": [round(float(v), 3) for v in means.mean(axis=0)],
        "std": [round(float(v), 3) for v in std],
        "images": len(means),
    }


def stain_reference_from_paths(paths, *, step: int = STEP, max_images: int = 200, min_images: int = 10) -> dict | None:
    """:func:`stain_reference` of image files (each read at 1/``step``), as a training task records it.

    At most ``max_images`` files are read, spread evenly over the list (a tile data set has
    thousands). Fewer than ``min_images`` files give None: a spread between two or three images
    (a fine-tune on a few painted tiles) says nothing about a stain's range.
    """
    from PIL import Image

    paths = [Path(p) for p in paths]
    if len(paths) < min_images:
        return None
    pick = np.unique(np.linspace(0, len(paths) - 1, min(max_images, len(paths))).round().astype(int))

    def images():
        for i in pick:
            with Image.open(paths[i]) as im:
                yield np.asarray(im.convert("RGB"))[::step, ::step]

    return stain_reference(images())


def stain_reference_from_folder(folder: str | Path, step: int = STEP) -> dict | None:
    """:func:`stain_reference` of every image in ``folder`` (PNG/BMP/JPEG/TIFF), each read at 1/``step``."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    return stain_reference_from_paths(paths, step=step, max_images=len(paths) or 1, min_images=1)


def record_in_card(card_path: str | Path, images_folder: str | Path) -> dict:
    """Write the ``stain`` reference of ``images_folder`` into the model card ``card_path`` (atomically).

    The card keeps its layout (indentation, escaped or plain non-ASCII), so the change is one key.
    """
    from ..io.atomic import atomic_path

    card_path = Path(card_path)
    text = card_path.read_text(encoding="utf-8")
    card = json.loads(text)
    ref = stain_reference_from_folder(images_folder)
    if ref is None:
        raise ValueError(f"no stained tissue found in the images of {images_folder}")
    lines = text.splitlines()
    indent = len(lines[1]) - len(lines[1].lstrip(" ")) if len(lines) > 1 else 2
    card["stain"] = {
        **ref,
        "source": "/".join(Path(images_folder).resolve().parts[-3:]),
        "how": "mean tissue RGB (0-1) per image at 1/8 size; std between images",
    }
    with atomic_path(card_path) as tmp:
        Path(tmp).write_text(
            json.dumps(card, indent=indent or None, ensure_ascii="\\u" in text) + "\n", encoding="utf-8"
        )
    return card["stain"]


if __name__ == "__main__":  # python -m napari_pathfm.tiles.stain CARD.json IMAGES_FOLDER [CARD2.json ...]
    *cards, folder = sys.argv[1:]
    for card in cards:
        print(card, record_in_card(card, folder))
