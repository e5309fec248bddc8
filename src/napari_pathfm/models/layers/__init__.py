"""Building blocks shared by the model families (pure torch, imported lazily).

``S4D``/``S4DKernel`` (diagonal state-space layer, :mod:`.s4d`) and
``NystromAttention`` (:mod:`.nystrom`). Importing this package does not import
torch; a name is resolved on first access.
"""

from __future__ import annotations

from ..._lazy import lazy_exports

_LAZY = {
    "S4D": "s4d",
    "S4DKernel": "s4d",
    "fft_length": "s4d",
    "optim_groups": "s4d",
    "NystromAttention": "nystrom",
    "iterative_pinv": "nystrom",
    "normalise_tiles": "tile_input",
    "double_conv": "convs",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
