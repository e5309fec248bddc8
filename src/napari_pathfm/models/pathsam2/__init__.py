"""Path-SAM2 (Zhang et al. 2024): SAM2 + UNI encoders, KAN class prompts, semantic masks.

Modules: :mod:`.model` (the network and foundation-weight loading), :mod:`.encoders`
(Hiera, UNI, dimension alignment), :mod:`.decoder` (two-way transformer mask decoder),
:mod:`.kan` (KAN layers), :mod:`.loss` (Dice + Focal + IoU loss).
"""

from .model import PathSAM2, pathsam2

__all__ = ["PathSAM2", "pathsam2"]
