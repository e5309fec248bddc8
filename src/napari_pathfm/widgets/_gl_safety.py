"""Keep Triton out of napari sessions, where loading it next to Mesa's OpenGL crashes.

PyPI torch ships Triton, and importing torchvision/Lightning makes torch probe it
(``import triton``). Triton's shared library carries its own LLVM; on Linux with
Mesa OpenGL (llvmpipe, Intel/AMD drivers, VMs, ``xvfb``) the GL driver has already
loaded the system ``libLLVM``, and loading the second one after a napari canvas
exists kills the process with a segmentation fault (reproduced here with napari
0.9 + torch 2.14 + Mesa llvmpipe: ``napari.Viewer(); import triton``).

Widgets run inference and training eagerly on CPU or CUDA without
``torch.compile``, so they do not need Triton: before a widget task first imports
torch, :func:`keep_triton_out` marks ``triton`` as not installed, which torch
handles as "no Triton". The CLI and scripts are untouched.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["keep_triton_out"]


def keep_triton_out() -> bool:
    """Make ``import triton`` fail in this process unless it is already loaded. Returns True if it did."""
    if not sys.platform.startswith("linux") or "triton" in sys.modules:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # import system: "not installed"
    # torch then logs "triton not found; flop counting will not work for triton kernels" once; it is expected.
    logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)
    return True
