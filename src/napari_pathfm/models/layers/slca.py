"""Spatially Localized Channel Attention (SLCA) and the two simpler fusions it is compared with.

A *tap* is a feature map of the frozen SAM encoder, ``(B, C_tap, h, w)``. A fusion
module resizes it to the spatial size of one backbone stage's output ``F``
``(B, C, H, W)``, projects it to ``C`` channels with a 1x1 convolution, and adds it
to ``F`` through a residual connection:

``"slca"`` (the method)
    ``F + F * SLCA(P(tap))`` with
    ``SLCA(x) = sigmoid(Conv1x1_up(ReLU(Conv1x1_down(SLAP(x)))))``. SLAP, spatial
    local average pooling, is a stride-1 ``k x k`` average pool that keeps the
    spatial size, so unlike squeeze-and-excitation's global pooling the channel
    attention differs from place to place. ``Conv1x1_down`` reduces the channels by
    ``reduction`` (at least 8 are kept), ``Conv1x1_up`` restores them.
``"sigmoid"`` (ablation)
    ``F + F * sigmoid(P(tap))``: the same gating, without SLAP and the bottleneck.
``"add"`` (ablation)
    ``F + P(tap)``: the projected tap added as it is.

``P`` is the same 1x1 projection (with bias) in all three, so the ablations differ
only in what comes after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FUSIONS", "SLAP", "SLCA", "TapFusion", "resize_to"]

FUSIONS = ("slca", "sigmoid", "add")


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``size`` (returned unchanged when it already fits)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SLAP(nn.Module):
    """Spatial local average pooling: stride-1 ``kernel x kernel`` mean that keeps the spatial size.

    Border windows average only the pixels inside the map (``count_include_pad=False``),
    so edges are not darkened by zero padding. The kernel must be odd (centred window).
    """

    def __init__(self, kernel: int = 3):
        super().__init__()
        kernel = int(kernel)
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"slca_kernel must be an odd number >= 1 (a centred window), not {kernel}")
        self.kernel = kernel
        self.pool = nn.AvgPool2d(kernel, stride=1, padding=kernel // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.kernel == 1 else self.pool(x)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"


class SLCA(nn.Module):
    """Attention map ``sigmoid(up(ReLU(down(SLAP(x)))))`` in ``(0, 1)``, same shape as ``x``.

    Parameters
    ----------
    channels : int
        Channels of ``x`` (and of the attention map).
    kernel : int
        SLAP window size.
    reduction : int
        Bottleneck ratio ``r``: the hidden width is ``max(channels // r, 8)``
        (never more than ``channels``).
    """

    def __init__(self, channels: int, kernel: int = 3, reduction: int = 16):
        super().__init__()
        if int(reduction) < 1:
            raise ValueError(f"slca_reduction must be >= 1, not {reduction}")
        hidden = min(channels, max(channels // int(reduction), 8))
        self.slap = SLAP(kernel)
        self.down = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.up = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(self.act(self.down(self.slap(x)))))


class TapFusion(nn.Module):
    """Fuse one SAM tap into one backbone stage output (see the module docstring).

    Parameters
    ----------
    tap_channels : int
        Channels of the SAM tap.
    channels : int
        Channels of the stage output ``F``.
    fusion : {"slca", "sigmoid", "add"}
        How the projected tap acts on ``F``.
    kernel, reduction : int
        SLAP window and bottleneck ratio (``"slca"`` only).
    """

    def __init__(self, tap_channels: int, channels: int, fusion: str = "slca", kernel: int = 3, reduction: int = 16):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, not {fusion!r}")
        self.fusion = fusion
        self.proj = nn.Conv2d(tap_channels, channels, kernel_size=1)
        self.attn = SLCA(channels, kernel, reduction) if fusion == "slca" else None

    def attention(self, feat: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        """What multiplies (``slca``/``sigmoid``) or is added to (``add``) ``feat``, at ``feat``'s size."""
        p = self.proj(resize_to(tap, feat.shape[-2:]))
        if self.fusion == "add":
            return p
        return self.attn(p) if self.attn is not None else torch.sigmoid(p)

    def forward(self, feat: torch.Tensor, tap: torch.Tensor) -> torch.Tensor:
        a = self.attention(feat, tap.to(feat.dtype))
        return feat + a if self.fusion == "add" else feat + feat * a

    def extra_repr(self) -> str:
        return f"fusion={self.fusion!r}"
