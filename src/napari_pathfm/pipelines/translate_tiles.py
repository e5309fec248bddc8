"""Tiled inference over a z-stack: tile positions, bands of planes, the model call, blending canvases.

The field is cut into ``tile`` x ``tile`` tiles every ``stride`` pixels (:func:`tile_positions`:
the last tile ends at the far edge; a field smaller than a tile runs as one tile of the next
multiple of 16, mirror-padded by :func:`pad_to`). Planes are read in horizontal bands one tile
tall (:func:`tile_bands`), so a lazy (zarr/dask) stack is never loaded whole, unless it is cheap to
read once (:func:`used_planes`). :class:`BlendRun` sends batches through the model (:class:`Forward`)
and blends overlapping outputs with pyramidal weights; :class:`CanvasStore` keeps large canvases
in a zarr directory and :func:`blockwise` turns a canvas channel into a result array block by
block. Used by :func:`~napari_pathfm.pipelines.translate.translate_stack`. Importing this module
does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.scratch import scratch_dir
from ..progress import check_cancel
from .tile_run import flip_average, uses_flips

__all__ = [
    "READ_ONCE_BYTES",
    "BlendRun",
    "CanvasStore",
    "Forward",
    "TileOptions",
    "blockwise",
    "pad_to",
    "selector",
    "tile_bands",
    "tile_positions",
    "used_planes",
]

PathLike = str | Path
#: Stacks whose planes are single dask chunks and smaller than this are read once, not per band.
READ_ONCE_BYTES = 1 << 30


@dataclass
class TileOptions:
    """Tile side (a multiple of 16: the models pool 4 times), step (None: half a tile), tiles per batch,
    and whether each tile is also predicted flipped (see :class:`Forward`; None: as each card says)."""

    tile: int = 512
    stride: int | None = None
    batch_size: int = 4
    flips: bool | None = None

    def flips_for(self, card: dict) -> bool:
        """Flip averaging for a checkpoint: the option when given, else the card's ``flips`` (default off)."""
        return uses_flips(self.flips, card)

    def __post_init__(self) -> None:
        if int(self.tile) % 16 or self.tile < 16:
            raise ValueError(f"tile must be a positive multiple of 16 (the model pools 4 times), got {self.tile}")
        stride = int(self.tile) // 2 if self.stride is None else self.stride
        if not 0 < int(stride) <= int(self.tile):
            raise ValueError(f"stride must be in 1..tile ({self.tile}), got {stride}")
        self.tile, self.stride, self.batch_size = int(self.tile), int(stride), int(self.batch_size)


def _ceil16(n: int) -> int:
    return -(-int(n) // 16) * 16


def tile_positions(n: int, tile: int, stride: int) -> tuple[list[int], int]:
    """Tile starts along one axis of length ``n`` and the tile size used there.

    The last tile ends at ``n``; a side shorter than ``tile`` gets one tile of the next
    multiple of 16 (mirror-padded).

    >>> tile_positions(1024, 512, 256)
    ([0, 256, 512], 512)
    >>> tile_positions(1000, 512, 256)
    ([0, 256, 488], 512)
    >>> tile_positions(250, 512, 256)
    ([0], 256)
    """
    t = min(int(tile), _ceil16(n))
    if n <= t:
        return [0], t
    pos = list(range(0, n - t, int(stride)))
    return pos + [n - t], t


def pad_to(a: np.ndarray, h: int, w: int) -> np.ndarray:
    ph, pw = h - a.shape[-2], w - a.shape[-1]
    if ph <= 0 and pw <= 0:
        return a
    pad = [(0, 0)] * (a.ndim - 2) + [(0, max(ph, 0)), (0, max(pw, 0))]
    mode = "symmetric" if ph <= a.shape[-2] and pw <= a.shape[-1] else "edge"
    return np.pad(a, pad, mode=mode)


def selector(data: Any, planes: list[int]) -> Any:
    """Index of the used planes: a plain slice when all are used (no fancy indexing of a lazy array)."""
    return slice(None) if planes == list(range(int(data.shape[0]))) else planes


def tile_bands(data: Any, planes: list[int], ys: list[int], th: int, cancel: Any):
    """Yield ``(y, raw band (Z, th, X))`` per tile row, read from ``data`` (numpy or lazy)."""
    sel = slice(None) if isinstance(data, np.ndarray) else selector(data, planes)
    for y in ys:
        check_cancel(cancel, "translation")
        yield y, np.asarray(data[sel, y : y + th])


def used_planes(data: Any, planes: list[int]) -> Any:
    """The used planes as one numpy array when that is cheap (see :func:`_read_once`), else ``data``."""
    if not _read_once(data, planes):
        return data
    if isinstance(data, np.ndarray) and planes == list(range(data.shape[0])):
        return data
    return np.asarray(data[planes])


def _read_once(data: Any, planes: list[int]) -> bool:
    """True for stacks held in memory, or lazy ones whose planes are single chunks (PNG/TIFF files)."""
    chunks = getattr(data, "chunks", None)
    nbytes = len(planes) * int(np.prod(data.shape[1:])) * np.dtype(data.dtype).itemsize
    if isinstance(data, np.ndarray):
        return True
    single = chunks is not None and hasattr(data, "dask") and len(chunks[1]) == 1 and len(chunks[2]) == 1
    return bool(single and nbytes <= READ_ONCE_BYTES)


class Forward:
    """The model call of one batch: float32 tiles in, numpy ``(N, C[+1], h, w)`` out.

    With ``flips``, each batch is also predicted flipped left-right, up-down and both, each
    prediction flipped back, and the four averaged (for LUPI models the nuclei probabilities
    too): 4x the compute for a prediction that depends less on which way the tissue lies,
    as ``pathfm segment`` does for class maps.
    """

    def __init__(self, model: Any, device: str, flips: bool = False):
        import torch

        from ..device import autocast_dtype

        self.torch, self.model, self.device, self.flips = torch, model, device, bool(flips)
        self.amp = autocast_dtype(device)
        self.has_mask: bool | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device)
        with torch.inference_mode():
            out = flip_average(self._once, x) if self.flips else self._once(x)
        return out.cpu().numpy()

    def _once(self, x: Any) -> Any:
        """One forward pass: the float32 channels (and the nuclei probability of LUPI models)."""
        torch = self.torch
        with torch.autocast(self.device.split(":")[0], dtype=self.amp, enabled=self.amp is not None):
            out = self.model(x)
        if isinstance(out, tuple) and hasattr(out, "mask_logits"):
            self.has_mask = True
            return torch.cat([out.image.float(), torch.sigmoid(out.mask_logits.float())], dim=1)
        self.has_mask = False
        return out.float()


class BlendRun:
    """Tiles of one checkpoint: pending batch, forward pass, blending canvas (made at the first batch)."""

    def __init__(self, forward: Forward, shape: tuple[int, int], tile: tuple[int, int], group: Any):
        self.forward, self.shape, self.tile, self.group = forward, shape, tile, group
        self.blender: Any = None
        self.batch: list[np.ndarray] = []
        self.where: list[tuple[int, int]] = []

    def flush(self) -> int:
        """Run the pending tiles, blend them in; returns how many there were."""
        from ..tiles.blend import TileBlender

        out = self.forward(np.stack(self.batch))
        (H, W), (th, tw) = self.shape, self.tile
        if self.blender is None:
            self.blender = TileBlender((H, W, out.shape[1]), weights="pyramidal", chunks=(1024, 1024), store=self.group)
        for (y, x), values in zip(self.where, out):
            self.blender.add(y, x, values.transpose(1, 2, 0)[: min(th, H - y), : min(tw, W - x)])
        n = len(self.batch)
        self.batch, self.where = [], []
        return n


class CanvasStore:
    """Where large canvases live: ``store`` (atomic directory), a temporary one, or nowhere (memory)."""

    def __init__(self, store: PathLike | None, large: bool):
        self.store, self.large = store, large
        self._atomic = self._tmpdir = self._root = None
        self.path: Path | None = None

    def __enter__(self) -> CanvasStore | None:
        from ..io.atomic import atomic_path

        if self.store is not None:
            self._atomic = atomic_path(self.store, directory=True)
            self.path = self._atomic.__enter__()
            self.path.mkdir()
        elif self.large:
            self._tmpdir = scratch_dir("translate")
            self.path = Path(self._tmpdir.name)
        return self if self.path is not None else None

    def group(self, key: str) -> Any:
        """The zarr group ``key`` under the root (created when missing)."""
        import zarr

        if self._root is None:
            self._root = zarr.open_group(str(self.path), mode="a")
        return self._root.require_group(key)

    def keep(self) -> Any:
        """Hand the temporary directory to the result (removed when the result is garbage-collected)."""
        tmp, self._tmpdir = self._tmpdir, None
        return tmp

    def __exit__(self, *exc: object) -> None:
        if self._atomic is not None:
            self._atomic.__exit__(*exc)
        if self._tmpdir is not None and exc[0] is not None:
            self._tmpdir.cleanup()


def blockwise(
    canvas: Any, c: int, fn: Callable[[np.ndarray], np.ndarray], dtype: Any, root: Any, key: str, name: str
) -> Any:
    """``fn`` of channel ``c`` of a blended canvas, into memory or a zarr array beside it."""
    if root is None:
        return fn(np.asarray(canvas[..., c]))
    out = root.group(key).create_array(name, shape=canvas.shape[:2], chunks=(1024, 1024), dtype=dtype, overwrite=True)
    for y in range(0, canvas.shape[0], 256):  # 256 rows at a time: fn works in float64
        out[y : y + 256] = fn(np.asarray(canvas[y : y + 256, :, c]))
    return out
