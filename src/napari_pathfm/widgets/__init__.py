"""napari docks (Qt). Public here: ``keep_triton_out``, for scripts that open a viewer and then import torch."""

from ._gl_safety import keep_triton_out

__all__ = ["keep_triton_out"]
