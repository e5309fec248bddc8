"""MIL baselines with the same interface as ``s4mil``: mean/max pooling, ABMIL, TransMIL.

They exist for honest comparisons (same features, same training loop, same
heatmap contract; see :mod:`.mil` for the output dict).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers.nystrom import NystromAttention
from .mil import MILModel
from .registry import register_model

__all__ = ["ABMIL", "PoolMIL", "TransMIL", "abmil", "maxpool", "meanpool", "transmil"]


class PoolMIL(MILModel):
    """Linear + ReLU on each patch, mean or max over the patches, Linear.

    ``patch_scores`` are the classifier applied to each patch's hidden vector;
    for ``pool="mean"`` their mean over the patches equals the slide logits.
    """

    def __init__(self, in_dim: int, n_classes: int, pool: str, d_model: int = 512, dropout: float = 0.0):
        super().__init__(in_dim, n_classes)
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
        self.pool = pool
        self.fc1 = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.fc1(self.check_input(x))
        pooled = h.mean(1) if self.pool == "mean" else h.amax(1)
        return {"logits": self.classifier(pooled), "patch_scores": self.classifier(h)}


class ABMIL(MILModel):
    """Gated attention MIL (Ilse et al. 2018).

    ``h = ReLU(W x)``; ``a = softmax_l( w·(tanh(V h) ⊙ sigmoid(U h)) )``; slide
    logits ``= classifier(Σ_l a_l h_l)``.

    ``patch_scores[l] = L · a_l · classifier(h_l)``: attention-weighted patch
    logits, scaled by the bag length so that uniform attention gives the plain
    per-patch logits and their mean over the patches equals the slide logits.
    Patches the model ignores score near 0 (neutral).
    """

    def __init__(self, in_dim: int, n_classes: int, d_model: int = 512, attn_dim: int = 128, dropout: float = 0.0):
        super().__init__(in_dim, n_classes)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout))
        self.attention_V = nn.Linear(d_model, attn_dim)
        self.attention_U = nn.Linear(d_model, attn_dim)
        self.attention_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(d_model, n_classes)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, L) over the patches of hidden bags ``h`` (B, L, d_model)."""
        gate = torch.tanh(self.attention_V(h)) * torch.sigmoid(self.attention_U(h))
        return self.attention_w(gate).squeeze(-1).softmax(-1)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.fc1(self.check_input(x))
        a = self.attention(h)
        logits = self.classifier(torch.einsum("bl,bld->bd", a, h))
        scores = self.classifier(h) * (a * h.shape[1])[..., None]
        return {"logits": logits, "patch_scores": scores}


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention block of TransMIL."""

    def __init__(self, dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim, heads=8, dim_head=dim // 8, num_landmarks=dim // 2, pinv_iterations=6, residual=True, dropout=dropout
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: 7x7, 5x5 and 3x3 depthwise convs on the token grid, plus identity."""

    def __init__(self, dim: int = 512):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        B, _, C = x.shape
        cls_token, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(B, C, side, side)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILModel):
    """TransMIL (Shao et al. 2021) as published.

    fc1 (in_dim → 512) + ReLU; the patch sequence is padded to the next square
    ``side²`` by repeating its first patches; a class token is prepended;
    TransLayer → PPEG on the ``side × side`` grid → TransLayer → LayerNorm; the
    class token goes to the classifier.

    ``patch_scores`` are the classifier applied to each patch token's final
    (normalised) state: per-token logits, padding and class token dropped.
    """

    def __init__(self, in_dim: int, n_classes: int, dropout: float = 0.1, dim: int = 512):
        super().__init__(in_dim, n_classes)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, dropout)
        self.pos_layer = PPEG(dim)
        self.layer2 = TransLayer(dim, dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.fc1(self.check_input(x))
        B, L, _ = h.shape
        side = math.isqrt(L - 1) + 1
        extra = side * side - L
        if extra:
            h = torch.cat([h, h[:, torch.arange(extra, device=h.device) % L]], dim=1)
        h = torch.cat([self.cls_token.expand(B, -1, -1).to(h.dtype), h], dim=1)
        h = self.layer2(self.pos_layer(self.layer1(h), side))
        h = self.norm(h)
        return {"logits": self.classifier(h[:, 0]), "patch_scores": self.classifier(h[:, 1 : L + 1])}


@register_model(family="mil")
def meanpool(in_dim: int = 1024, n_classes: int = 2, d_model: int = 512, dropout: float = 0.0):
    """Mean-pooling MIL baseline: Linear + ReLU per patch, mean over patches, Linear."""
    return PoolMIL(in_dim, n_classes, "mean", d_model=d_model, dropout=dropout)


@register_model(family="mil")
def maxpool(in_dim: int = 1024, n_classes: int = 2, d_model: int = 512, dropout: float = 0.0):
    """Max-pooling MIL baseline: Linear + ReLU per patch, max over patches, Linear."""
    return PoolMIL(in_dim, n_classes, "max", d_model=d_model, dropout=dropout)


@register_model(family="mil")
def abmil(in_dim: int = 1024, n_classes: int = 2, d_model: int = 512, dropout: float = 0.0):
    """Gated-attention MIL baseline (Ilse et al. 2018): attention-weighted mean of patch embeddings."""
    return ABMIL(in_dim, n_classes, d_model=d_model, dropout=dropout)


@register_model(family="mil")
def transmil(in_dim: int = 1024, n_classes: int = 2, dropout: float = 0.1):
    """TransMIL baseline (Shao et al. 2021): Nyström-attention transformer with PPEG position encoding."""
    return TransMIL(in_dim, n_classes, dropout=dropout)
