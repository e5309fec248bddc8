"""Tiramisu building blocks shared by the HASTE generators (:mod:`.dense_unet`, :mod:`.lupi_unet`).

A Fully Convolutional DenseNet ("One Hundred Layers Tiramisu", Jégou et al. 2017) as the
HASTE team configured it for the Adipocyte Cell Challenge:

- :class:`DenseLayer`: BatchNorm → ReLU → 3×3 conv (``growth_rate`` maps) → dropout.
- :class:`DenseBlock`: each layer sees the concatenation of the block input and all
  earlier layer outputs. Down the encoder a block returns ``[input, new maps]``; up
  the decoder (``new_only=True``) only the new maps, as in the paper, so the decoder
  width does not explode.
- :class:`TransitionDown`: BN → ReLU → 1×1 conv → dropout → 2×2 max-pool.
- :class:`TransitionUp`: 3×3 conv to ``4·C`` maps → ReLU → pixel shuffle (×2) → blur
  (replication pad + 2×2 average, stride 1). The conv is ICNR-initialised
  (:func:`icnr_`): the four sub-pixel kernels of each output channel start equal, so
  at initialisation the shuffle is a nearest-neighbour upsampling and produces no
  checkerboard; the blur removes what training may add (Aitken et al. 2017,
  Sugawara et al. 2019).

:func:`tanh_scaled` maps logits to [0, 1] as ``(tanh(x) + 1) / 2``, HASTE's output
activation for images normalised to [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "TiramisuEncoder",
    "TiramisuNet",
    "TransitionDown",
    "TransitionUp",
    "check_input",
    "count_parameters",
    "icnr_",
    "tanh_scaled",
]


def tanh_scaled(x: torch.Tensor) -> torch.Tensor:
    """``(tanh(x) + 1) / 2``: logits to [0, 1] (HASTE's image output activation)."""
    return (torch.tanh(x) + 1) / 2


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@torch.no_grad()
def icnr_(weight: torch.Tensor, scale: int = 2, init=nn.init.kaiming_normal_) -> torch.Tensor:
    """ICNR-initialise, in place, the weight of a conv that feeds ``PixelShuffle(scale)``.

    ``weight`` has shape ``(C·scale², C_in, k, k)``. One kernel per output channel ``c``
    is drawn with ``init`` and copied to the ``scale²`` sub-pixel channels
    ``c·scale² … c·scale² + scale² − 1`` (the channels ``PixelShuffle`` spreads over one
    ``scale×scale`` output block), so every block of the shuffled output is constant.

    Returns
    -------
    Tensor
        ``weight`` itself.
    """
    out_ch = weight.shape[0]
    r2 = scale * scale
    if out_ch % r2:
        raise ValueError(f"ICNR needs out channels divisible by scale**2={r2}, got {out_ch}")
    base = init(weight.new_empty((out_ch // r2, *weight.shape[1:])))
    weight.copy_(base.repeat_interleave(r2, dim=0))
    return weight


class DenseLayer(nn.Sequential):
    """BN → ReLU → 3×3 conv → dropout, producing ``growth_rate`` new feature maps."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float = 0.2):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=True))
        if dropout:
            self.add_module("drop", nn.Dropout(dropout))


class DenseBlock(nn.Module):
    """``n_layers`` densely connected :class:`DenseLayer`.

    Parameters
    ----------
    in_channels, growth_rate, n_layers : int
        The block outputs ``in_channels + n_layers·growth_rate`` maps, or
        ``n_layers·growth_rate`` with ``new_only``.
    dropout : float
        Dropout after each conv.
    new_only : bool
        Return only the maps the layers made (decoder blocks), not the input.
    """

    def __init__(self, in_channels: int, growth_rate: int, n_layers: int, dropout: float = 0.2, new_only: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, dropout) for i in range(n_layers)
        )
        self.new_only = new_only
        self.out_channels = n_layers * growth_rate + (0 if new_only else in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats[1:] if self.new_only else feats, 1)


class TransitionDown(nn.Sequential):
    """BN → ReLU → 1×1 conv → dropout → 2×2 max-pool (halves H and W, keeps the width)."""

    def __init__(self, channels: int, dropout: float = 0.2):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(channels, channels, kernel_size=1, bias=True))
        if dropout:
            self.add_module("drop", nn.Dropout(dropout))
        self.add_module("pool", nn.MaxPool2d(2))


class TransitionUp(nn.Module):
    """×2 upsampling: 3×3 conv (ICNR) → ReLU → pixel shuffle → blur.

    The blur is ``ReplicationPad2d((1, 0, 1, 0))`` + ``AvgPool2d(2, stride=1)``: each
    output pixel is the mean of a 2×2 neighbourhood, which keeps the size and smooths
    the sub-pixel seams a pixel shuffle can leave.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, kernel_size=3, padding=1, bias=True)
        icnr_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = nn.PixelShuffle(2)
        self.blur = nn.Sequential(nn.ReplicationPad2d((1, 0, 1, 0)), nn.AvgPool2d(2, stride=1))

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """Conv → ReLU → pixel shuffle, without the blur (exposed to test ICNR)."""
        return self.shuffle(self.relu(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blur(self.upsample(x))


def check_input(x: torch.Tensor, in_channels: int, multiple: int, model: str) -> None:
    """Raise a ``ValueError`` that says what to do when ``x`` is not ``(N, in_channels, H, W)``.

    ``H`` and ``W`` must be multiples of ``multiple`` (2 to the number of poolings) so
    that every decoder scale meets its encoder skip at the same size.
    """
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(
            f"{model} expects (N, {in_channels}, H, W) z-planes, got shape {tuple(x.shape)}; "
            f"pass {in_channels} planes (the model's in_channels) as channels"
        )
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{model} needs H and W divisible by {multiple} (one halving per transition down), "
            f"got {h}x{w}; pad or crop the tile (512x512 tiles work)"
        )


class TiramisuEncoder(nn.Module):
    """3×3 stem conv, dense blocks each followed by a transition down, and a bottleneck block.

    ``forward`` returns ``(bottleneck, skips)``: the bottleneck's new maps
    (``bottleneck_layers·growth_rate`` channels, at 1/2^len(down_blocks) scale) and the
    outputs of the down blocks, finest first, for the decoder's skip connections.
    ``skip_channels`` lists their widths in the same order.
    """

    def __init__(
        self,
        in_channels: int,
        init_filters: int,
        down_blocks: tuple[int, ...],
        bottleneck_layers: int,
        growth_rate: int,
        dropout: float,
    ):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, init_filters, kernel_size=3, padding=1, bias=True)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.skip_channels: list[int] = []
        ch = init_filters
        for n in down_blocks:
            block = DenseBlock(ch, growth_rate, n, dropout)
            ch = block.out_channels
            self.blocks.append(block)
            self.transitions.append(TransitionDown(ch, dropout))
            self.skip_channels.append(ch)
        self.bottleneck = DenseBlock(ch, growth_rate, bottleneck_layers, dropout, new_only=True)
        self.out_channels = self.bottleneck.out_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)
        skips = []
        for block, down in zip(self.blocks, self.transitions):
            x = block(x)
            skips.append(x)
            x = down(x)
        return self.bottleneck(x), skips


class TiramisuNet(nn.Module):
    """Base of the HASTE generators: validated sizes, the shared :class:`TiramisuEncoder`, input checks.

    Subclasses add their decoder(s); ``check(x)`` raises a clear ``ValueError`` for a wrong
    plane count or a size that is not a multiple of ``2 ** len(down_blocks)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        init_filters: int,
        down_blocks: tuple[int, ...],
        up_blocks: tuple[int, ...],
        bottleneck_layers: int,
        growth_rate: int,
        dropout: float,
    ):
        super().__init__()
        if len(down_blocks) != len(up_blocks):
            raise ValueError(f"down_blocks {down_blocks} and up_blocks {up_blocks} must have the same length")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.multiple = 2 ** len(down_blocks)
        self.encoder = TiramisuEncoder(
            in_channels, init_filters, tuple(down_blocks), bottleneck_layers, growth_rate, dropout
        )

    def check(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the fix when ``x`` does not fit the network."""
        check_input(x, self.in_channels, self.multiple, type(self).__name__)
