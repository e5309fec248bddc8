"""The two image encoders of Path-SAM2 and the module that aligns their features.

- SAM2's Hiera trunk, built by timm (``sam2_hiera_tiny|small|base_plus|large``)
  or the small ``hiera_micro`` preset for CPU training. Its last stage (stride 32)
  is used; SAM2's FPN neck is removed, as in Path-SAM2.
- UNI: timm ViT-L/16 with UNI's configuration (``init_values=1e-5``, dynamic
  image size, no classifier), or the small ``uni_micro`` preset (same design,
  2 blocks of width 96). Its patch tokens form a stride-16 feature map.
- :class:`DimensionAlignment`: the two maps are brought to stride 16 and
  concatenated on channels, then 1×1 conv → LayerNorm2d → 3×3 conv →
  LayerNorm2d to the decoder's width (256 for SAM2's decoder).

Weights come only from files the user gives: an original SAM2 checkpoint
(``image_encoder.trunk.*`` keys) and UNI's ``pytorch_model.bin`` (timm ViT keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import LayerNorm2d

__all__ = [
    "HIERA_PRESETS",
    "UNI_PRESETS",
    "DimensionAlignment",
    "build_hiera",
    "build_uni",
    "hiera_pyramid",
    "sam2_trunk_keys",
]

# Small Hiera for CPU training and tests. hiera_micro: 4 stages of 1-1-2-1 blocks, 32→256 channels;
# hiera_mini: 1-2-5-1 blocks, 64→512 channels (about 4x micro's cost per training step, 2/5 of SAM2-tiny's).
HIERA_PRESETS = {
    "hiera_micro": dict(embed_dim=32, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,), global_pos_size=(7, 7)),
    "hiera_mini": dict(
        embed_dim=64, num_heads=1, stages=(1, 2, 5, 1), global_att_blocks=(5, 7), global_pos_size=(7, 7)
    ),
}
# UNI (Chen et al. 2024): ViT-L/16, 1024-d, 24 blocks, LayerScale 1e-5; uni_micro keeps the design at toy size.
UNI_PRESETS = {
    "uni": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
    "uni_micro": dict(patch_size=16, embed_dim=96, depth=2, num_heads=3, init_values=1e-5),
}


def build_hiera(name: str) -> nn.Module:
    """SAM2 Hiera trunk by timm name or preset, without classifier; ``.out_channels`` = last stage width."""
    import timm
    from timm.models.hieradet_sam2 import HieraDet

    if name in HIERA_PRESETS:
        trunk = HieraDet(num_classes=0, **HIERA_PRESETS[name])
    elif name.startswith("sam2_hiera_"):
        trunk = timm.create_model(name, pretrained=False, num_classes=0)
    else:
        raise ValueError(f"encoder must be one of {list(HIERA_PRESETS)} or a timm sam2_hiera_* name, not {name!r}")
    trunk.out_channels = trunk.feature_info[-1]["num_chs"]
    return trunk


def build_uni(name: str, img_size: int) -> nn.Module:
    """UNI-style ViT by preset or timm ViT name (patch 16, LayerScale, dynamic image size, no classifier)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if name in UNI_PRESETS:
        vit = VisionTransformer(img_size=224, num_classes=0, dynamic_img_size=True, **UNI_PRESETS[name])
    else:
        vit = timm.create_model(name, pretrained=False, num_classes=0, init_values=1e-5, dynamic_img_size=True)
    vit.out_channels = vit.embed_dim
    return vit


def hiera_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Last-stage Hiera features ``(B, C, H/32, W/32)``."""
    return trunk.forward_intermediates(x, indices=1, intermediates_only=True)[-1]


def hiera_pyramid(trunk: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every Hiera stage's features, strides 4, 8, 16 and 32 (one pass of the trunk)."""
    return list(trunk.forward_intermediates(x, indices=len(trunk.feature_info), intermediates_only=True))


def uni_features(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """UNI patch tokens as a map ``(B, C, H/16, W/16)``."""
    tokens = vit.forward_features(x)[:, vit.num_prefix_tokens :]
    B, _N, C = tokens.shape
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    return tokens.transpose(1, 2).reshape(B, C, h, w)


class DimensionAlignment(nn.Module):
    """1×1 conv → LayerNorm2d → 3×3 conv → LayerNorm2d: concatenated encoder features to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size=1, bias=False)
        self.norm1 = LayerNorm2d(out_dim)
        self.conv2 = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


def to_stride16(feat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a feature map to the stride-16 grid ``size`` (bilinear)."""
    if tuple(feat.shape[-2:]) == tuple(size):
        return feat
    return F.interpolate(feat, size=size, mode="bilinear", align_corners=False)


def sam2_trunk_keys(state_dict: dict) -> dict:
    """Original SAM2 checkpoint → timm HieraDet keys: ``image_encoder.trunk.`` stripped, ``mlp.layers.i`` → ``mlp.fc{i+1}``."""
    prefix = "image_encoder.trunk."
    out = {}
    for k, v in state_dict.items():
        if k.startswith(prefix):
            k = k[len(prefix) :].replace("mlp.layers.0", "mlp.fc1").replace("mlp.layers.1", "mlp.fc2")
            out[k] = v
    return out
