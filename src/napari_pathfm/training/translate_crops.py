"""Training crops and validation tiles of the ``translate`` family (HASTE) from normalised fields of view.

Augmentation (training only): random crops, flips and 90° rotations; with
``shift_scale_rotate`` an affine warp around a centre that, for a share
``nuclei_centred`` of the crops, is a pixel of the nuclei mask (Otsu threshold of the
first target), as HASTE did for its nuclei model. Crops come only from the
:class:`~napari_pathfm.training.translate_data.FieldOfView` they are given, so
augmentation never reads across the train/validation split. Validation tiles cover
each validation FOV without augmentation.
"""

from __future__ import annotations

import numpy as np

from .affine_crop import ssr_matrix, warp_crop
from .translate_data import FieldOfView

__all__ = ["TranslateCropDataset", "TranslateTileDataset", "random_crop", "tile_origins"]


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


def random_crop(
    fov: FieldOfView,
    tile: int,
    rng: np.random.Generator,
    *,
    centre_on_mask: bool = False,
    ssr: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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
    shift, scale, rot = ssr
    if centre is None:
        centre = (float(rng.uniform(0, h)), float(rng.uniform(0, w)))
    mat = ssr_matrix(centre, tile, rng, shift=shift, scale=scale, rotate_deg=rot)
    cx = np.stack([warp_crop(p, mat, tile) for p in x])
    cy = np.stack([warp_crop(p, mat, tile) for p in y])
    cm = None if m is None else warp_crop(m, mat, tile, nearest=True)
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

    def __init__(
        self,
        fovs: list[FieldOfView],
        tile: int,
        samples: int,
        *,
        augment: bool = True,
        nuclei_centred: float = 0.0,
        ssr: tuple[float, float, float] | None = None,
    ):
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
        item = {
            "input": torch.from_numpy(np.ascontiguousarray(x, np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(y, np.float32)),
        }
        if m is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(m, np.float32)[None])
        return item


class TranslateTileDataset:
    """Validation tiles covering every validation FOV (last tile aligned to the edge, no augmentation)."""

    def __init__(self, fovs: list[FieldOfView], tile: int):
        self.fovs, self.tile = fovs, int(tile)
        self.index = [
            (i, y, x)
            for i, f in enumerate(fovs)
            for y in tile_origins(f.shape[0], self.tile)
            for x in tile_origins(f.shape[1], self.tile)
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        import torch

        k, y0, x0 = self.index[i]
        f, t = self.fovs[k], self.tile
        sl = (slice(None), slice(y0, y0 + t), slice(x0, x0 + t))
        item = {
            "input": torch.from_numpy(np.ascontiguousarray(_pad(f.planes[sl], t))),
            "target": torch.from_numpy(np.ascontiguousarray(_pad(f.targets[sl], t))),
        }
        if f.mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(_pad(f.mask[sl[1:]], t))[None])
        return item
