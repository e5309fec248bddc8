"""Convolution blocks shared by the U-Nets (HASTE's baseline and the segmentation baseline)."""

from __future__ import annotations

from torch import nn

__all__ = ["double_conv"]


def double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolution–BatchNorm–ReLU blocks (a U-Net level, Ronneberger et al. 2015)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
