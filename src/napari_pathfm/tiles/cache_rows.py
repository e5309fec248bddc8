"""The packed row of the tile-embedding cache: every encoder output of one tile side by side in bytes.

A tile's outputs (one or more tensors, float32, float16 or bfloat16) are stored as one uint8 row of
the entry's ``data`` array, laid out by the entry's ``layout`` attribute (name, shape, storage dtype,
byte offset and size of each output), with the row's CRC32C kept in the row table. These pure
functions turn outputs into rows and back, bit for bit; :mod:`.cache_entry` decides where rows go.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_tensor", "pack_rows", "row_checksum", "to_numpy", "unpack_rows"]


def row_checksum(row: np.ndarray) -> int:
    """CRC32C of one packed row (C-contiguous uint8)."""
    import google_crc32c

    return int(google_crc32c.value(np.ascontiguousarray(row)))


def to_numpy(v: Any, want: str | None = None) -> tuple[np.ndarray, str]:
    """``(array to store, torch dtype name)``: float32 and float16 as they are, bfloat16 as its int16
    bits (numpy has no bfloat16), so a cached output is bit for bit the one the encoder gave."""
    if not hasattr(v, "detach"):
        return np.ascontiguousarray(v, dtype=np.float32), "float32"
    import torch

    v = v.detach()
    name = want or {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(v.dtype, "float32")
    v = v.to(getattr(torch, name)).cpu().contiguous()
    if name == "bfloat16":
        return v.view(torch.int16).numpy(), name
    return v.numpy(), name


def pack_rows(arrays: dict[str, np.ndarray], layout: list, b: int) -> np.ndarray:
    """``(b, bytes per tile)`` uint8 rows holding every output of ``layout`` side by side."""
    if sorted(arrays) != sorted(item["name"] for item in layout):
        raise ValueError(f"outputs {sorted(arrays)} differ from the stored {[item['name'] for item in layout]}")
    rows = np.empty((b, sum(item["nbytes"] for item in layout)), np.uint8)
    for item in layout:
        a = arrays[item["name"]]
        if list(a.shape[1:]) != item["shape"] or a.dtype.str != item["storage"]:
            raise ValueError(
                f"output {item['name']!r} is {a.dtype} {a.shape[1:]}, stored {item['storage']} {tuple(item['shape'])}"
            )
        rows[:, item["offset"] : item["offset"] + item["nbytes"]] = (
            np.ascontiguousarray(a).reshape(b, -1).view(np.uint8)
        )
    return rows


def unpack_rows(raw: np.ndarray | None, layout: list, b: int) -> dict[str, np.ndarray]:
    """The outputs of ``b`` packed rows ``raw`` (None or ``b == 0``: empty arrays of each output)."""
    out = {}
    for item in layout:
        dt = np.dtype(item["storage"])
        if raw is None or b == 0:
            out[item["name"]] = np.empty((0, *item["shape"]), dt)
            continue
        part = np.ascontiguousarray(raw[:, item["offset"] : item["offset"] + item["nbytes"]])
        out[item["name"]] = part.view(dt).reshape(b, *item["shape"])
    return out


def as_tensor(a: np.ndarray, dtype_name: str, device: Any):
    """A stored array back as the torch tensor the encoder gave (see :func:`to_numpy`)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype_name == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device)
