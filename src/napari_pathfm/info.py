"""Environment report for ``pathfm info`` and bug reports."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


DISTRIBUTIONS = [
    "napari-pathfm",
    "napari",
    "torch",
    "torchvision",
    "timm",
    "lightning",
    "openslide-python",
    "openslide-bin",
    "tifffile",
    "zarr",
    "dask",
    "numpy",
    "safetensors",
    "magicgui",
    "PyQt6",
]


def collect_info() -> dict:
    """Versions of the key packages, available compute devices and registered models."""
    info: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in DISTRIBUTIONS},
    }
    try:
        import openslide

        info["versions"]["libopenslide"] = openslide.__library_version__
    except Exception as exc:  # noqa: BLE001 - report, don't fail: info is for diagnosing broken installs
        info["versions"]["libopenslide"] = f"unavailable ({exc})"
    try:
        import torch

        from .device import resolve_device

        info["devices"] = {
            "auto": resolve_device("auto"),
            "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
            "cpu_threads": torch.get_num_threads(),
        }
    except Exception as exc:  # noqa: BLE001 - a broken torch install is what info reports
        info["devices"] = f"torch unavailable ({exc})"
    try:
        from .models import list_models

        info["models"] = list_models()
    except Exception as exc:  # noqa: BLE001 - a broken model folder is what info reports
        info["models"] = f"unavailable ({exc})"
    return info
