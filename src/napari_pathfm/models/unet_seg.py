"""A plain U-Net for semantic segmentation: the baseline every bundled segmenter is measured against.

Encoder: a timm ResNet (``resnet18`` by default, randomly initialised unless ``pretrained`` and the
weights are local) read at strides 2, 4, 8, 16 and 32. Decoder: five stages of 2x nearest upsampling,
concatenation with the encoder feature of that stride, and two 3x3 conv–BatchNorm–ReLU blocks
(channels 256, 128, 64, 32, 16, the widths segmentation_models_pytorch's ``Unet`` uses), then a 1x1
convolution to one logit per class at the input's resolution (Ronneberger et al. 2015, with a ResNet
encoder). Nothing pathology-specific: it is here so that "the model beats a plain U-Net trained with
the same budget" is a claim a user can rerun (``benchmarks/segment_glas/cv.py``).

It speaks the ``segment`` family's protocol — ``preprocess`` (RGB uint8 tiles → ImageNet-normalised
tensors at ``input_size``) and ``forward`` → ``{"logits", "iou"}`` — so the same training task, data,
checkpoints and ``pathfm segment`` run it. It has no IoU head: ``iou`` is None and the task's loss
leaves that term out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers.convs import double_conv
from .layers.tile_input import normalise_tiles
from .pathsam2.model import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SegUNet", "resnet_unet"]

DECODER_CHANNELS = (256, 128, 64, 32, 16)


class SegUNet(nn.Module):
    """See the module docstring; build it with :func:`resnet_unet` / ``create_model("resnet_unet", ...)``."""

    def __init__(self, num_classes: int = 2, encoder: str = "resnet18", image_size: int = 256, pretrained=False):
        super().__init__()
        import timm

        if num_classes < 2:
            raise ValueError("num_classes counts the background too: at least 2")
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (the encoder's stride), not {image_size}")
        self.num_classes, self.input_size = int(num_classes), int(image_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.encoder = timm.create_model(encoder, pretrained=bool(pretrained), features_only=True)
        skips = list(self.encoder.feature_info.channels())  # strides 2, 4, 8, 16, 32
        cin = skips[-1]
        blocks = []
        for i, cout in enumerate(DECODER_CHANNELS):
            skip = skips[-2 - i] if i + 1 < len(skips) else 0
            blocks.append(double_conv(cin + skip, cout))
            cin = cout
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, self.num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.encoder(x)
        y = feats[-1]
        for i, block in enumerate(self.decoder):
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            if i + 1 < len(feats):
                y = torch.cat([y, feats[-2 - i]], dim=1)
            y = block(y)
        return {"logits": self.head(y), "iou": None}

    def preprocess(self, images: Any, device: Any = None) -> torch.Tensor:
        """RGB uint8 tiles ``(B, T, T, 3)`` (numpy or tensor) → normalised ``(B, 3, S, S)`` at ``input_size``."""
        return normalise_tiles(images, self._mean, self._std, self.input_size, device)

    @torch.no_grad()
    def predict(self, images: Any) -> np.ndarray:
        """Class map ``(B, S, S)`` uint8 of RGB uint8 tiles (at ``input_size``)."""
        return self(self.preprocess(images))["logits"].argmax(1).to(torch.uint8).cpu().numpy()


def resnet_unet(
    num_classes: int = 2, encoder: str = "resnet18", image_size: int = 256, pretrained: bool = False
) -> SegUNet:
    """Plain U-Net with a timm ResNet encoder (see :class:`SegUNet`).

    Parameters
    ----------
    num_classes : int
        Classes including background (class 0).
    encoder : str
        A timm CNN with ``features_only`` support at strides 2–32 (``resnet18``, ``resnet34``, ``resnet50``).
    image_size : int
        Model input side (multiple of 32).
    pretrained : bool
        Load timm's pretrained encoder weights (only from a local cache: nothing is downloaded at run time).
    """
    return SegUNet(num_classes, encoder, image_size, pretrained)
