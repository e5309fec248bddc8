"""Datasets for training: folders of images, one sub-folder per class.

:func:`split_files` makes the train/validation split: seeded, deterministic and
stratified (each class with at least two images keeps one or more for
validation), or read from a JSON split file so a split can be fixed and shared
(:func:`read_split_file`, which also knows an optional held-out ``"test"`` list).
:func:`subsample_per_class` keeps a seeded share of each class's training images
for label-efficiency runs (10 / 50 / 100 % of the labels).
:func:`classify_transforms` gives the ImageNet-normalised resize pipeline and the
flip/90-degree-rotation augmentation, which suits H&E tiles because tissue has no
preferred orientation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import RecipeError
from .recipe_fields import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ClassFolderDataset",
    "RandomRot90",
    "classify_transforms",
    "find_class_files",
    "read_split_file",
    "split_files",
    "subsample_per_class",
]

SPLIT_PARTS = ("train", "val", "test")


def find_class_files(
    root: str | Path, classes: Sequence[str] | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and ``(file, label)`` pairs under ``root/<class>/``, sorted.

    Raises
    ------
    RecipeError
        ``root`` is missing, a listed class has no folder, or there are no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise RecipeError(root, "data folder not found.", "Set data.root to a folder with one sub-folder per class.")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise RecipeError(root, f"has no folder for class {name!r}.", f"Create {folder} or fix data.classes.")
        items += [(f, label) for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in exts]
    if not items:
        raise RecipeError(
            root,
            f"contains no images with suffixes {sorted(exts)} in class folders.",
            "Check data.root and data.extensions.",
        )
    return list(classes), items


def split_files(
    items: list[tuple[Path, int]],
    val_fraction: float = 0.2,
    seed: int = 0,
    split_file: str | Path | None = None,
    root: str | Path | None = None,
) -> tuple[list, list]:
    """Split ``(file, label)`` pairs into train and validation lists.

    With ``split_file`` (JSON ``{"train": [...], "val": [...]}``, paths relative
    to ``root``) the split is read from it by :func:`read_split_file` (a
    ``"test"`` list there is left out of both). Otherwise each class is shuffled with
    ``seed`` and ``round(n * val_fraction)`` of it (at least 1 when the class has
    2 or more images, never all) goes to validation.
    """
    if split_file is not None:
        parts = read_split_file(split_file, items, root)
        return parts["train"], parts["val"]
    rng = np.random.default_rng(seed)
    train, val = [], []
    labels = sorted({y for _, y in items})
    for label in labels:
        group = [it for it in items if it[1] == label]
        order = rng.permutation(len(group))
        n_val = int(round(len(group) * val_fraction))
        if val_fraction > 0 and len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        else:
            n_val = 0
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def read_split_file(
    split_file: str | Path, items: list[tuple[Path, int]], root: str | Path | None = None
) -> dict[str, list[tuple[Path, int]]]:
    """The ``train``, ``val`` and ``test`` lists of a JSON split file.

    Parameters
    ----------
    split_file : str or Path
        JSON ``{"train": [...], "val": [...], "test": [...]}``; each list is
        optional and holds paths relative to ``root`` (``test`` items are held
        out: they never train or validate).
    items : list of (Path, int)
        All ``(file, label)`` pairs found under ``root`` (:func:`find_class_files`).
    root : str or Path, optional
        Folder the listed paths are relative to.

    Returns
    -------
    dict
        ``{"train": [...], "val": [...], "test": [...]}`` of ``(file, label)`` pairs.

    Raises
    ------
    RecipeError
        The file is unreadable, is not a JSON object, lists a file that is not
        under ``root``, or lists one file in two parts.
    """
    split_file = Path(split_file)
    try:
        spec = json.loads(split_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RecipeError(
            split_file, f"split file cannot be read ({exc}).", 'Write JSON {"train": [...], "val": [...]}.'
        ) from exc
    if not isinstance(spec, dict):
        raise RecipeError(
            split_file, "is not a JSON object.", 'Write JSON {"train": [...], "val": [...], "test": [...]}.'
        )
    by_rel = {str(Path(f).relative_to(root)) if root else str(f): (f, y) for f, y in items}
    out, seen = {}, {}
    for part in SPLIT_PARTS:
        listed = [str(Path(p)) for p in spec.get(part, [])]
        missing = [p for p in listed if p not in by_rel]
        if missing:
            raise RecipeError(
                split_file,
                f"lists files not found under the data root: {missing[:5]}.",
                "Paths are relative to data.root.",
            )
        twice = [p for p in listed if p in seen]
        if twice:
            raise RecipeError(
                split_file,
                f"lists {twice[:3]} in both '{seen[twice[0]]}' and '{part}'.",
                "Put each file in one part only.",
            )
        seen.update((p, part) for p in listed)
        out[part] = [by_rel[p] for p in listed]
    return out


def subsample_per_class(items: list[tuple[Path, int]], fraction: float = 1.0, seed: int = 0) -> list:
    """Keep a seeded share of each class's ``(file, label)`` pairs (label-efficiency runs).

    Each class keeps ``round(n * fraction)`` of its ``n`` items, at least one.
    The kept items are the first ones of a per-class permutation drawn from
    ``seed``, so with one seed a smaller fraction is a subset of a larger one
    (10 % ⊂ 50 % ⊂ 100 %). The input order is preserved.

    Raises
    ------
    ValueError
        ``fraction`` is not in (0, 1].

    Examples
    --------
    >>> items = [(f"a{i}", 0) for i in range(10)] + [("b0", 1)]
    >>> kept = subsample_per_class(items, 0.3, seed=0)
    >>> sum(y == 0 for _, y in kept), sum(y == 1 for _, y in kept)
    (3, 1)
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], not {fraction}")
    if fraction == 1.0:
        return list(items)
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for label in sorted({y for _, y in items}):
        idx = [i for i, (_, y) in enumerate(items) if y == label]
        n_keep = max(1, round(len(idx) * fraction))
        keep.update(idx[j] for j in rng.permutation(len(idx))[:n_keep])
    return [it for i, it in enumerate(items) if i in keep]


class RandomRot90:
    """Rotate a ``(..., H, W)`` tensor by a random multiple of 90 degrees."""

    def __call__(self, x):
        import torch

        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


def classify_transforms(
    image_size: int,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = True,
) -> Callable:
    """PIL image → normalised float tensor ``(3, image_size, image_size)``; random flips/rot90 when training."""
    import torch
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if train and augment:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class ClassFolderDataset:
    """Images in ``root/<class>/`` folders as ``(tensor, label)`` pairs.

    Parameters
    ----------
    root : str or Path
        Folder with one sub-folder per class.
    classes : sequence of str, optional
        Class folder names in label order (default: all sub-folders, sorted).
    transform : callable, optional
        Applied to the RGB ``PIL.Image`` (e.g. :func:`classify_transforms`).
    extensions : sequence of str
        Image suffixes to include.
    items : list of (Path, int), optional
        Use exactly these files (a split made by :func:`split_files`).
    """

    def __init__(self, root, classes=None, transform=None, extensions=IMAGE_EXTENSIONS, items=None):
        self.root = Path(root)
        self.classes, found = find_class_files(root, classes, extensions)
        self.items = list(items) if items is not None else found
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            image = im.convert("RGB")
        return (self.transform(image) if self.transform else image), label

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name."""
        counts = np.bincount([y for _, y in self.items], minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}
