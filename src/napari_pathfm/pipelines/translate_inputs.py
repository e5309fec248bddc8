"""What a translation checkpoint takes from a z-stack: its planes, their normalisation, sanity checks.

:func:`stack_array` gives the planes of a ZStack, a path or an array with their names and files;
:func:`plane_indices` picks the planes a checkpoint was trained on; :func:`limits` reads the card's
normalisation ranges; :func:`check_input` refuses constant, NaN or 8-bit-for-16-bit planes with a
message naming the plane file and the checkpoint, on a cheap :func:`sample_planes` of the stack.
Used by :func:`~napari_pathfm.pipelines.translate.translate_stack`. Importing this module does not
import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import CheckpointError, ZStackError
from .translate_tiles import selector

__all__ = ["StackPlanes", "check_input", "limits", "plane_indices", "sample_planes", "stack_array"]


def plane_indices(card: dict, n_planes: int, stack_name: str, label: str) -> list[int]:
    """Which stack planes the checkpoint takes, or a ZStackError naming the stack and checkpoint."""
    picked = card.get("plane_indices") or card.get("planes")
    wanted = int(card.get("input_planes") or (len(picked) if picked else n_planes))
    if picked:
        picked = [int(p) for p in picked]
        if max(picked) >= n_planes:
            raise ZStackError(
                stack_name,
                f"has {n_planes} planes but checkpoint {label} uses planes {picked}.",
                "Open the full z-stack the checkpoint was trained on.",
            )
        return picked
    if n_planes != wanted:
        raise ZStackError(
            stack_name,
            f"has {n_planes} planes but checkpoint {label} takes {wanted}.",
            f"Open a stack with {wanted} planes (HASTE: Z01..Z07), or use a checkpoint trained on "
            f"{n_planes}-plane stacks.",
        )
    return list(range(n_planes))


def limits(card: dict, key_lo: str, key_hi: str, n: int, label: str) -> tuple[np.ndarray, np.ndarray] | None:
    norm = card.get("normalization") or {}
    if key_lo not in norm or key_hi not in norm:
        return None
    lo, hi = np.asarray(norm[key_lo], np.float64).ravel(), np.asarray(norm[key_hi], np.float64).ravel()
    if lo.size == 1 and n > 1:
        lo, hi = np.repeat(lo, n), np.repeat(hi, n)
    if lo.size != n or hi.size != n:
        raise CheckpointError(
            label,
            f"normalization.{key_lo}/{key_hi} have {lo.size}/{hi.size} values for {n} planes or channels.",
            "Re-export the checkpoint with the training statistics.",
        )
    return lo, hi


def sample_planes(data: Any, planes: list[int]) -> np.ndarray:
    """A sample of every used plane for the input checks (``(Z, h, w)``, at most ~1024 px across).

    In-memory stacks are strided; lazy ones give up to 8 evenly spaced strips of 32 rows, so
    only the chunks under those strips are read, not the whole stack.
    """
    H, W = int(data.shape[1]), int(data.shape[2])
    step = max(1, max(H, W) // 1024)
    if isinstance(data, np.ndarray) or H <= 1024:
        return np.stack([np.asarray(data[p, ::step, ::step]) for p in planes])
    starts = np.linspace(0, H - 32, 8).astype(int)
    sel = selector(data, planes)
    return np.concatenate([np.asarray(data[sel, y : y + 32, ::step]) for y in starts], axis=1)


def check_input(
    sample: np.ndarray,
    dtype: np.dtype,
    card: dict,
    lims: Any,
    names: Sequence[str],
    files: Sequence[Any],
    label: str,
    messages: list[str],
) -> None:
    """Constant/NaN planes and 8-bit vs 16-bit surprises, naming the plane file and the checkpoint."""
    for i, plane in enumerate(sample):
        if plane.dtype.kind == "f" and not np.isfinite(plane).all():
            raise ZStackError(
                files[i],
                f"plane {names[i]} holds NaN or infinite values.",
                "Replace them (e.g. by the background value) before translating.",
            )
        if plane.min() == plane.max():
            raise ZStackError(
                files[i],
                f"plane {names[i]} is constant (every pixel {plane.min()}).",
                "An empty or failed acquisition; re-acquire the plane or open another stack.",
            )
    card_dtype = card.get("input_dtype")  # another dtype than the card's: a note (pipelines.notes.translate_notes)
    if lims is not None and np.dtype(dtype) == np.uint8 and float(lims[1].max()) > 255:
        raise ZStackError(
            files[0],
            f"is 8-bit (uint8) but checkpoint {label} was trained on "
            f"{card_dtype or '16-bit'} planes with values up to {float(lims[1].max()):g}: every "
            "pixel would look dark to it.",
            "Open the 16-bit export of the planes (8-bit exports lose the intensity scale).",
        )
    if lims is not None:
        above = [names[i] for i, p in enumerate(sample) if np.mean(p > lims[1][i]) > 0.5]
        if above:
            messages.append(
                f"most pixels of planes {above} are brighter than checkpoint {label}'s training maximum "
                "(saturated after normalisation): different exposure or bit depth?"
            )


class StackPlanes(NamedTuple):
    """The planes of a z-stack and what names them in messages."""

    data: Any  #: (Z, Y, X) numpy, dask or zarr
    name: str  #: the stack's path, or ``"<array>"``
    names: list[str]  #: one per plane (``Z01``..., or ``z0``... for an array)
    files: list[Any]  #: the file of each plane (the stack's path when one file holds them all)
    pixel_size: float | None  #: µm per pixel, when the stack says


def stack_array(stack: Any) -> StackPlanes:
    """The :class:`StackPlanes` of a ZStack, a path to one, or an array ``(Z, Y, X)``."""
    if hasattr(stack, "plane_names"):
        meta = getattr(stack, "metadata", {}) or {}
        return StackPlanes(
            stack.data,
            str(stack.path),
            list(stack.plane_names),
            list(stack.plane_files) or [stack.path] * stack.n_planes,
            meta.get("PhysicalSizeX"),
        )
    if isinstance(stack, (str, Path)):
        from ..io.zstack import open_zstack

        return stack_array(open_zstack(stack))
    data = stack if hasattr(stack, "shape") and hasattr(stack, "dtype") else np.asarray(stack)
    if data.ndim != 3:
        raise ZStackError(
            "<array>",
            f"has shape {tuple(data.shape)}, not (Z, Y, X) planes.",
            "Pass a z-stack (open_zstack) or a 3-D array of planes.",
        )
    names = [f"z{i}" for i in range(data.shape[0])]
    return StackPlanes(data, "<array>", names, ["<array>"] * data.shape[0], None)
