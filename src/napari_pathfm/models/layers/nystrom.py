"""Nyström self-attention (Xiong et al. 2021), the attention TransMIL uses.

Softmax attention over ``n`` tokens costs ``O(n²)``; Nyström attention picks ``m``
landmarks (means of consecutive token segments) and approximates

    softmax(QKᵀ) V  ≈  softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) V,

with the pseudo-inverse from a few Newton–Schulz-style iterations (Razavi et al.)
so that it runs on GPUs without an SVD. A depthwise convolution of the values
along the sequence is added as a residual, as in the reference implementation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NystromAttention", "iterative_pinv"]


def iterative_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Approximate Moore–Penrose pseudo-inverse of square matrices ``x`` (..., m, m).

    Starts from ``Z₀ = xᵀ / (‖x‖₁·‖x‖_∞)``, which guarantees convergence, and
    iterates ``Z ← ¼ Z (13I − xZ (15I − xZ (7I − xZ)))``. The scale is taken
    per matrix (the reference code takes one maximum over the whole batch), so
    the bags of a batch do not influence each other.
    """
    abs_x = x.abs()
    col = abs_x.sum(-1).amax(-1)
    row = abs_x.sum(-2).amax(-1)
    z = x.transpose(-1, -2) / (col * row)[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström attention on (B, n, dim) tokens.

    Parameters
    ----------
    dim : int
        Token width.
    heads, dim_head : int
        Attention heads and their width (TransMIL: 8 × 64).
    num_landmarks : int
        Landmarks ``m`` (TransMIL: 256). The sequence is zero-padded at the
        front to a multiple of ``m``; each landmark is the mean of ``⌈n/m⌉``
        consecutive tokens.
    pinv_iterations : int
        Iterations of :func:`iterative_pinv` (TransMIL: 6).
    residual : bool
        Add a depthwise convolution (kernel ``residual_conv_kernel`` along the
        sequence) of the values.
    dropout : float
        Dropout on the output projection.
    reassociate : bool
        Evaluate ``attn1 · (pinv · (attn3 · V))`` instead of the published
        ``(attn1 · pinv) · (attn3 · V)``. Same result up to rounding and about
        half the multiply-adds for long sequences; off by default so timings
        match the published model.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual: bool = True,
        residual_conv_kernel: int = 33,
        dropout: float = 0.0,
        reassociate: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.num_landmarks, self.pinv_iterations = heads, num_landmarks, pinv_iterations
        self.scale = dim_head**-0.5
        self.reassociate = reassociate
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = None
        if residual:
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over all tokens of ``x`` (B, n, dim); returns (B, n, dim)."""
        B, n, _ = x.shape
        h, m = self.heads, self.num_landmarks
        pad = (-n) % m
        if pad:
            x = nn.functional.pad(x, (0, 0, pad, 0))
        N = x.shape[1]
        q, k, v = (t.reshape(B, N, h, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.scale
        seg = math.ceil(n / m)
        q_l = q.reshape(B, h, m, seg, -1).mean(-2)
        k_l = k.reshape(B, h, m, seg, -1).mean(-2)
        attn1 = (q @ k_l.transpose(-1, -2)).softmax(-1)
        attn2 = (q_l @ k_l.transpose(-1, -2)).softmax(-1)
        attn3 = (q_l @ k.transpose(-1, -2)).softmax(-1)
        attn2_inv = iterative_pinv(attn2, self.pinv_iterations)
        if self.reassociate:
            out = attn1 @ (attn2_inv @ (attn3 @ v))
        else:
            out = (attn1 @ attn2_inv) @ (attn3 @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(B, N, -1))
        return out[:, -n:]
