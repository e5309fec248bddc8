"""Kolmogorov-Arnold network layers in plain torch (the efficient-KAN formulation).

A :class:`KANLinear` maps ``x (…, in)`` to ``(…, out)`` as

    y = W_base · SiLU(x) + Σ_i Σ_j c_{o,i,j} · s_{o,i} · B_j(x_i)

where ``B_j`` are cubic B-spline bases (``spline_order`` 3) on a uniform grid of
``grid_size`` (5) intervals over ``grid_range`` [-1, 1], extended by
``spline_order`` knots on each side, so each edge of the network is a learnable
univariate function (spline) plus a SiLU "base" branch. This is the
efficient-KAN layout (Blealtan's ``efficient-kan``): the spline evaluation is a
batched Cox-de Boor recursion and the sum over edges is one matrix product, so a
KAN layer costs about ``grid_size + spline_order + 1`` linear layers.

Path-SAM2 uses KANs for its class-prompt generator and for the mask decoder's
hypernetwork and IoU heads.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KAN", "MLP", "KANLinear"]


class KANLinear(nn.Module):
    """One KAN layer (see the module docstring).

    Parameters
    ----------
    in_features, out_features : int
    grid_size : int
        Spline intervals over ``grid_range``.
    spline_order : int
        Degree of the B-splines (3 = cubic).
    scale_noise : float
        Std of the initial spline coefficients, divided by ``grid_size``: the
        splines start near zero so the layer starts close to its base branch.
    scale_base, scale_spline : float
        Gains of the Kaiming-uniform init of the base weight and spline scaler.
    grid_range : (float, float)
        Interval the grid covers; inputs outside it only use the base branch
        (and the extended knots' tails).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        grid_size: int = 5,
        spline_order: int = 3,
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
        grid_range: Sequence[float] = (-1.0, 1.0),
    ):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.grid_size, self.spline_order = int(grid_size), int(spline_order)
        h = (grid_range[1] - grid_range[0]) / grid_size
        knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * h + grid_range[0]
        self.register_buffer("grid", knots.expand(in_features, -1).contiguous())
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * scale_base)
        nn.init.normal_(self.spline_weight, std=scale_noise / grid_size)
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * scale_spline)

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """B-spline bases of ``x (N, in)``: ``(N, in, grid_size + spline_order)`` (Cox-de Boor)."""
        g = self.grid.to(x.dtype)
        x = x.unsqueeze(-1)
        bases = ((x >= g[:, :-1]) & (x < g[:, 1:])).to(x.dtype)
        for k in range(1, self.spline_order + 1):
            left = (x - g[:, : -(k + 1)]) / (g[:, k:-1] - g[:, : -(k + 1)]) * bases[..., :-1]
            right = (g[:, k + 1 :] - x) / (g[:, k + 1 :] - g[:, 1:-k]) * bases[..., 1:]
            bases = left + right
        return bases

    @property
    def scaled_spline_weight(self) -> torch.Tensor:
        return self.spline_weight * self.spline_scaler.unsqueeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        base = F.linear(F.silu(x), self.base_weight)
        spline = F.linear(self.b_splines(x).flatten(1), self.scaled_spline_weight.flatten(1))
        return (base + spline).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, grid_size={self.grid_size}, spline_order={self.spline_order}"


class KAN(nn.Module):
    """A stack of :class:`KANLinear` layers: ``widths = [in, hidden…, out]``.

    A KAN layer has its own non-linearity on every edge, so there is no
    activation between layers; ``layers`` mirrors the MLP naming below.
    """

    def __init__(self, widths: Sequence[int], **kan_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(KANLinear(a, b, **kan_kwargs) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MLP(nn.Module):
    """SAM's MLP (``layers.0 … layers.n-1``, ReLU between): the ``prompt_head: mlp`` ablation."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def head(kind: str, widths: Sequence[int]) -> nn.Module:
    """A KAN or an MLP with ``widths`` (``kind``: ``"kan"`` or ``"mlp"``)."""
    if kind == "kan":
        return KAN(widths)
    if kind == "mlp":
        return MLP(widths)
    raise ValueError(f"prompt_head must be 'kan' or 'mlp', not {kind!r}")
