"""SAM-style mask decoder with one mask token, one class prompt and one KAN head per class.

The transformer is SAM/SAM2's two-way transformer, with SAM2's parameter names
(``transformer.layers.0.self_attn.q_proj.weight``, ``mlp.layers.0``, ``norm1…4``,
``final_attn_token_to_image``, ``norm_final_attn``) so that the transformer,
the output upscaling and the positional encoding load from an original SAM2
(``sam_mask_decoder.*``, ``sam_prompt_encoder.pe_layer.*``) or SAM
(``mask_decoder.*``, ``prompt_encoder.*``) checkpoint. What Path-SAM2 changes:

- the sparse prompts are ``K`` learned class prompts (no clicks or boxes);
- there are ``K`` mask tokens, one per class, decoded in one pass;
- the per-class hypernetwork heads and the IoU head are KANs (``head="kan"``)
  or SAM's MLPs (``head="mlp"``, the ablation);
- the decoder works on the aligned SAM2 + UNI embedding; SAM2's high-resolution
  skip features (``conv_s0``, ``conv_s1``) belong to the removed neck and are not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kan import MLP, head

__all__ = ["Attention", "LayerNorm2d", "MaskDecoder", "PositionEmbeddingRandom", "TwoWayTransformer"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``(B, C, H, W)`` (SAM's ``LayerNorm2d``)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections and an optional ``downsample_rate``."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        self.internal_dim = dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide {self.internal_dim}")
        self.q_proj = nn.Linear(dim, self.internal_dim)
        self.k_proj = nn.Linear(dim, self.internal_dim)
        self.v_proj = nn.Linear(dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock(nn.Module):
    """Tokens attend to themselves and to the image; the image attends to the tokens (SAM)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2, skip_first_layer_pe: bool = False
    ):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP([dim, mlp_dim, dim])
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer over image embeddings ``(B, C, h, w)`` and tokens ``(B, N, C)``."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class PositionEmbeddingRandom(nn.Module):
    """SAM's random-Fourier positional encoding of a ``(h, w)`` grid: ``(C, h, w)``."""

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        m = self.positional_encoding_gaussian_matrix
        y = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) / h
        x = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) / w
        coords = torch.stack(torch.meshgrid(x, y, indexing="xy"), -1)  # (h, w, 2) as (x, y)
        coords = 2 * math.pi * ((2 * coords - 1) @ m)
        return torch.cat([coords.sin(), coords.cos()], -1).permute(2, 0, 1)


class MaskDecoder(nn.Module):
    """Per-class masks and IoU predictions from an image embedding and ``K`` class prompt tokens.

    Parameters
    ----------
    num_classes : int
        ``K`` (background included).
    dim : int
        Transformer width (256 in SAM/SAM2).
    depth, num_heads, mlp_dim : int
        Two-way transformer size (2, 8, 2048 in SAM/SAM2).
    head_kind : str
        ``"kan"`` (Path-SAM2) or ``"mlp"`` (SAM) for the hypernetwork and IoU heads.
    high_res_channels : (int, int), optional
        Channels of the encoder's stride-4 and stride-8 features. Given, the output upscaling adds
        them (through 1x1 convolutions ``conv_s0``/``conv_s1``) after each of its two 2x steps, as
        SAM2's decoder does with ``use_high_res_features``: the masks then follow edges at stride 4
        instead of being painted from stride-16 tokens.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        head_kind: str = "kan",
        iou_hidden: int = 256,
        high_res_channels: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.transformer = TwoWayTransformer(depth, dim, num_heads, mlp_dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(num_classes, dim)
        self.no_mask_embed = nn.Embedding(1, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            head(head_kind, [dim, dim, dim // 8]) for _ in range(num_classes)
        )
        self.iou_prediction_head = head(head_kind, [dim, iou_hidden, num_classes])
        self.high_res = high_res_channels is not None
        if self.high_res:
            self.conv_s0 = nn.Conv2d(high_res_channels[0], dim // 8, kernel_size=1)
            self.conv_s1 = nn.Conv2d(high_res_channels[1], dim // 4, kernel_size=1)

    def _upscale(self, src: torch.Tensor, high_res, extra=None) -> torch.Tensor:
        """4x upscaling of the image tokens; ``extra``: ``(stride-8, stride-4)`` terms added with the
        high-resolution features (a prompt's click/box maps)."""
        dc1, ln1, act1, dc2, act2 = self.output_upscaling  # SAM2's MaskDecoder with use_high_res_features
        e1, e0 = extra if extra is not None else (0, 0)
        if not self.high_res:
            return act2(dc2(act1(ln1(dc1(src) + e1))) + e0)
        feat_s0, feat_s1 = high_res
        up = act1(ln1(dc1(src) + self.conv_s1(feat_s1) + e1))
        return act2(dc2(up) + self.conv_s0(feat_s0) + e0)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, prompts: torch.Tensor, high_res=None, dense=None, extra=None
    ):
        """``image (B, C, h, w)``, ``image_pe (C, h, w)``, ``prompts (B, K, C)`` (and, with high-resolution
        features, ``(stride-4, stride-8)`` maps of sides 4h and 2h) → masks ``(B, K, 4h, 4w)``, IoU ``(B, K)``."""
        hs, up = self._run(image, image_pe, self.mask_tokens.weight, prompts, high_res, dense, extra)
        hyper = torch.stack([mlp(hs[:, 1 + k]) for k, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        masks = (hyper @ up.flatten(2)).reshape(image.shape[0], self.num_classes, *up.shape[-2:])
        return masks, self.iou_prediction_head(hs[:, 0])

    def _run(self, image, image_pe, mask_tokens, prompts, high_res, dense=None, extra=None):
        """The two-way transformer over ``[iou token, mask tokens, prompts]`` and the upscaled image
        (``dense``: SAM's dense prompt embedding, added to the image's)."""
        B, C, h, w = image.shape
        out_tokens = torch.cat([self.iou_token.weight, mask_tokens], 0).expand(B, -1, -1)
        tokens = torch.cat([out_tokens, prompts], 1)
        src = image + self.no_mask_embed.weight.reshape(1, C, 1, 1)
        if dense is not None:
            src = src + dense
        pe = image_pe.unsqueeze(0).expand(B, -1, -1, -1)
        hs, src = self.transformer(src, pe, tokens)
        return hs, self._upscale(src.transpose(1, 2).reshape(B, C, h, w), high_res, extra)
