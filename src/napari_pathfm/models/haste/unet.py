"""A plain U-Net (Ronneberger et al. 2015) for z-stack → fluorescence: the baseline HASTE is compared with.

Same interface as :func:`~napari_pathfm.models.haste.dense_unet.dense_unet`: input
``(N, in_channels, H, W)`` in [0, 1] with H, W multiples of ``2**depth``; output
``(N, out_channels, H, W)`` in [0, 1] as ``(tanh(x) + 1) / 2``. Two 3x3 conv–BN–ReLU
per level, max-pool down, transposed conv up, skip concatenation. It exists so that
the evaluation can report what the HASTE nets add over an ordinary U-Net trained
with L1 on the same budget.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.convs import double_conv

__all__ = ["UNet", "unet"]


class UNet(nn.Module):
    """Plain U-Net with ``depth`` poolings and ``base * 2**level`` channels per level.

    Examples
    --------
    >>> m = UNet(in_channels=7, out_channels=1, base=8, depth=2)
    >>> m(torch.rand(1, 7, 32, 32)).shape
    torch.Size([1, 1, 32, 32])
    """

    def __init__(self, in_channels: int = 7, out_channels: int = 1, base: int = 32, depth: int = 4):
        super().__init__()
        self.in_channels, self.out_channels, self.depth = int(in_channels), int(out_channels), int(depth)
        widths = [int(base) * 2**i for i in range(self.depth + 1)]
        self.down = nn.ModuleList([double_conv(self.in_channels, widths[0])])
        self.down.extend(double_conv(widths[i], widths[i + 1]) for i in range(self.depth))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(self.depth))
        )
        self.dec = nn.ModuleList(double_conv(2 * widths[i], widths[i]) for i in reversed(range(self.depth)))
        self.head = nn.Conv2d(widths[0], self.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = 2**self.depth
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(
                f"UNet expects (N, {self.in_channels}, H, W) with H, W multiples of {m}; "
                f"got {tuple(x.shape)}. Pad or crop the tiles."
            )
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return (torch.tanh(self.head(x)) + 1.0) / 2.0


def unet(in_channels: int = 7, out_channels: int = 1, base: int = 32, depth: int = 4) -> UNet:
    """Plain U-Net baseline (``base`` 32, ``depth`` 4: about 7.8M parameters; ``base`` 16: about 1.9M)."""
    return UNet(in_channels, out_channels, base, depth)
