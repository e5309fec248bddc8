"""HASTE's nuclei network: learning using privileged information (LUPI) with two decoders.

At training time a nuclei mask (the *privileged* information, e.g. an Otsu mask of the
real nuclei stain) is available; at test time only the z-stack is. The network
(Wieslander et al. 2021, §2.3; HASTE's ``DenseUNetLUPISkipSum``) has

- one tiramisu encoder shared by both tasks (:class:`~.layers.TiramisuEncoder`);
- a **segmentation decoder** (pixel shuffle + dense blocks, no encoder skips) ending in
  a 1×1 conv: ``mask_logits`` (N, 1, H, W), trained with BCE against the mask. Its
  sigmoid is a per-pixel nuclei confidence;
- a **regression decoder** with the U-Net skips of the encoder. Before each transition
  up its features are *summed* with the segmentation decoder's features of the same
  scale, so what the segmentation branch learned about where nuclei are steers the
  intensity prediction. After every decoder block but the last, a 1×1 conv makes a
  **side output** (N, 1, h, w) (logits at 1/8, 1/4, 1/2 scale with four blocks) for the
  deep supervision of the loss-weight modules (:func:`.losses.lwm_loss`);
- a small extra dense block (two layers, growth 2) before the final 1×1 conv of the
  regression output, which goes through (tanh + 1) / 2.

Differences from HASTE, on purpose: the mask has one sigmoid channel instead of a
two-class softmax (same information, what the pipeline's confidence map needs), and
the first regression transition up takes the bottleneck once instead of twice
(HASTE adds the bottleneck to itself). With HASTE's nuclei settings (32 stem filters,
otherwise as :func:`~.dense_unet.dense_unet`) the network has about 1.6 M parameters
(:data:`PAPER_LUPI_UNET_PARAMS`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..registry import register_model
from .layers import DenseBlock, TiramisuNet, TransitionUp, tanh_scaled

__all__ = ["PAPER_LUPI_UNET_PARAMS", "LUPIOutput", "LUPIUNet", "lupi_unet"]

#: Parameter count the paper gives for the nuclei network (§3.2, "about 1.6M").
PAPER_LUPI_UNET_PARAMS = 1_600_000


class LUPIOutput(NamedTuple):
    """What :class:`LUPIUNet` returns.

    Attributes
    ----------
    image : Tensor (N, out_channels, H, W)
        Predicted fluorescence in [0, 1].
    mask_logits : Tensor (N, 1, H, W)
        Segmentation logits; ``sigmoid`` is the per-pixel nuclei confidence.
    side_outputs : list of Tensor (N, out_channels, h, w)
        Regression logits at the coarser decoder scales (coarsest first), for deep
        supervision; apply :func:`~.layers.tanh_scaled` before comparing with a target.
    """

    image: torch.Tensor
    mask_logits: torch.Tensor
    side_outputs: list


class LUPIUNet(TiramisuNet):
    """Shared tiramisu encoder, segmentation decoder and regression decoder with side outputs.

    Parameters are those of :class:`~.dense_unet.DenseUNet`; ``up_blocks`` is used by both
    decoders. ``final_layers`` and ``final_growth`` size the extra dense block before the
    regression output.
    """

    translate_kind = "lupi"

    def __init__(
        self,
        in_channels: int = 7,
        out_channels: int = 1,
        init_filters: int = 32,
        down_blocks: tuple[int, ...] = (4, 4, 4, 4),
        up_blocks: tuple[int, ...] = (4, 4, 4, 4),
        bottleneck_layers: int = 4,
        growth_rate: int = 12,
        dropout: float = 0.2,
        final_layers: int = 2,
        final_growth: int = 2,
    ):
        super().__init__(
            in_channels, out_channels, init_filters, down_blocks, up_blocks, bottleneck_layers, growth_rate, dropout
        )
        skips = self.encoder.skip_channels[::-1]
        n_up = len(up_blocks)
        self.seg_ups, self.seg_blocks = nn.ModuleList(), nn.ModuleList()
        self.reg_ups, self.reg_blocks, self.side_heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        seg_prev = reg_prev = self.encoder.out_channels
        for i, n in enumerate(up_blocks):
            last = i == n_up - 1
            self.seg_ups.append(TransitionUp(seg_prev, seg_prev))
            seg_block = DenseBlock(seg_prev, growth_rate, n, dropout, new_only=not last)
            self.seg_blocks.append(seg_block)
            self.reg_ups.append(TransitionUp(reg_prev, reg_prev))
            reg_block = DenseBlock(reg_prev + skips[i], growth_rate, n, dropout, new_only=not last)
            self.reg_blocks.append(reg_block)
            if not last:
                self.side_heads.append(nn.Conv2d(reg_block.out_channels, out_channels, kernel_size=1))
            seg_prev, reg_prev = seg_block.out_channels, reg_block.out_channels
        self.seg_head = nn.Conv2d(seg_prev, 1, kernel_size=1)
        self.final_block = DenseBlock(reg_prev, final_growth, final_layers, dropout)
        self.reg_head = nn.Conv2d(self.final_block.out_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> LUPIOutput:
        self.check(x)
        bottom, skips = self.encoder(x)
        seg, seg_feats = bottom, []
        for up, block in zip(self.seg_ups, self.seg_blocks):
            seg_feats.append(seg)  # the segmentation features entering each transition up
            seg = block(up(seg))
        reg, sides = bottom, []
        for i, (up, block, skip) in enumerate(zip(self.reg_ups, self.reg_blocks, reversed(skips))):
            if i > 0:
                reg = reg + seg_feats[i]  # combine with the segmentation decoder at this scale
            reg = block(torch.cat([skip, up(reg)], 1))
            if i < len(self.side_heads):
                sides.append(self.side_heads[i](reg))
        image = tanh_scaled(self.reg_head(self.final_block(reg)))
        return LUPIOutput(image=image, mask_logits=self.seg_head(seg), side_outputs=sides)


@register_model(family="translate")
def lupi_unet(
    in_channels: int = 7,
    out_channels: int = 1,
    init_filters: int = 32,
    down_blocks: tuple = (4, 4, 4, 4),
    up_blocks: tuple = (4, 4, 4, 4),
    bottleneck_layers: int = 4,
    growth_rate: int = 12,
    dropout: float = 0.2,
    final_layers: int = 2,
    final_growth: int = 2,
) -> LUPIUNet:
    """HASTE LUPI nuclei net: shared encoder, mask + regression decoders, side outputs; ~1.6M parameters."""
    return LUPIUNet(
        in_channels,
        out_channels,
        init_filters,
        tuple(down_blocks),
        tuple(up_blocks),
        bottleneck_layers,
        growth_rate,
        dropout,
        final_layers,
        final_growth,
    )
