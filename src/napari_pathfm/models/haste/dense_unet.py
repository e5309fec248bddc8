"""HASTE's Dense U-Net (tiramisu) generator: z-stack planes in, one or more fluorescence channels out.

The lipid and cytoplasm generator of the HASTE team (Wieslander et al., "Learning to
see colours", 2021), used alone (pre-training with the log-squared loss) and as the
generator of the conditional GAN. With the paper's settings — 48 stem filters, four
dense blocks down and four up with four layers each, a four-layer bottleneck, growth
rate 12, dropout 0.2, pixel-shuffle + blur upsampling — it has about 1.2 M parameters
(:data:`PAPER_DENSE_UNET_PARAMS`; the exact count for 7 input planes is checked in the
tests).

Input ``(N, in_channels, H, W)``: the z-planes, min–max normalised to [0, 1]; ``H`` and
``W`` multiples of 16. Output ``(N, out_channels, H, W)`` in [0, 1] through
:func:`~.layers.tanh_scaled`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_model
from .layers import DenseBlock, TiramisuNet, TransitionUp, tanh_scaled

__all__ = ["PAPER_DENSE_UNET_PARAMS", "DenseUNet", "dense_unet"]

#: Parameter count the paper gives for this generator (§3.2, "about 1.2M").
PAPER_DENSE_UNET_PARAMS = 1_200_000


class DenseUNet(TiramisuNet):
    """Fully convolutional DenseNet with U-Net skips (tiramisu).

    Parameters
    ----------
    in_channels, out_channels : int
        Z-planes in, fluorescence channels out.
    init_filters : int
        Width of the 3×3 stem conv.
    down_blocks, up_blocks : tuple of int
        Layers per dense block in the encoder and the decoder (same length).
    bottleneck_layers : int
        Layers of the dense block at the lowest scale.
    growth_rate : int
        New maps per dense layer.
    dropout : float
        Dropout after every conv of the dense layers and transitions down.
    """

    translate_kind = "regression"

    def __init__(
        self,
        in_channels: int = 7,
        out_channels: int = 1,
        init_filters: int = 48,
        down_blocks: tuple[int, ...] = (4, 4, 4, 4),
        up_blocks: tuple[int, ...] = (4, 4, 4, 4),
        bottleneck_layers: int = 4,
        growth_rate: int = 12,
        dropout: float = 0.2,
    ):
        super().__init__(
            in_channels, out_channels, init_filters, down_blocks, up_blocks, bottleneck_layers, growth_rate, dropout
        )
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        prev = self.encoder.out_channels
        skips = self.encoder.skip_channels[::-1]
        for i, n in enumerate(up_blocks):
            last = i == len(up_blocks) - 1
            self.ups.append(TransitionUp(prev, prev))
            block = DenseBlock(prev + skips[i], growth_rate, n, dropout, new_only=not last)
            self.blocks.append(block)
            prev = block.out_channels
        self.head = nn.Conv2d(prev, out_channels, kernel_size=1, bias=True)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Output before the (tanh + 1) / 2 activation."""
        self.check(x)
        x, skips = self.encoder(x)
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips)):
            x = block(torch.cat([skip, up(x)], 1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tanh_scaled(self.forward_logits(x))


@register_model(family="translate")
def dense_unet(
    in_channels: int = 7,
    out_channels: int = 1,
    init_filters: int = 48,
    down_blocks: tuple = (4, 4, 4, 4),
    up_blocks: tuple = (4, 4, 4, 4),
    bottleneck_layers: int = 4,
    growth_rate: int = 12,
    dropout: float = 0.2,
) -> DenseUNet:
    """HASTE Dense U-Net (tiramisu): z-stack → fluorescence in [0, 1], ~1.2M parameters."""
    return DenseUNet(
        in_channels,
        out_channels,
        init_filters,
        tuple(down_blocks),
        tuple(up_blocks),
        bottleneck_layers,
        growth_rate,
        dropout,
    )
