"""Device selection (contract 2): ``auto`` picks CUDA, then MPS, then CPU.

Imports torch lazily so that importing this module stays cheap.
"""

from __future__ import annotations


def resolve_device(device: str = "auto") -> str:
    """Return a concrete torch device string for ``device``.

    ``"auto"`` → ``"cuda"`` if available, else ``"mps"``, else ``"cpu"``. Explicit
    names are checked so that asking for CUDA on a machine without it fails with
    a clear :class:`~napari_pathfm.errors.DeviceError` instead of deep inside torch.

    >>> resolve_device("cpu")
    'cpu'
    """
    import torch

    from .errors import DeviceError

    name = (device or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was requested but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' was requested but MPS is not available; use --device cpu or auto")
    return name


def reader_workers(device: str) -> int:
    """Tile-reading threads to pair with a model on ``device``: 2 beside a CPU model, more feeding a GPU."""
    import os

    return 2 if device == "cpu" else min(8, os.cpu_count() or 2)


def autocast_dtype(device: str):
    """Mixed-precision dtype for ``device``: bfloat16/float16 on CUDA, None (fp32) elsewhere."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None
