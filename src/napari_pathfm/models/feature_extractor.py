"""Patch feature extractors for MIL: RGB tiles in, one feature vector per tile out.

Two registry entries (family ``"features"``):

- ``resnet50_trunc``: the extractor of CLAM and of the S4 MIL paper. A timm
  ``resnet50`` cut after ``layer3`` and average-pooled, giving 1024-d features.
  Inputs are ImageNet-normalised; ImageNet weights come from a local file with
  torchvision/timm key names (``conv1.weight`` ... ``layer3.5.bn3.running_var``);
  the file's ``layer4.*`` and ``fc.*`` are unused and reported as such.
- ``timm_features``: any timm backbone with its classifier removed
  (``num_classes=0``), giving ``model.num_features``-d pooled features, with the
  normalisation and input size of the backbone's ``pretrained_cfg``.

Both return a :class:`FeatureExtractor`, which records everything a feature file
must say about how its features were made: ``out_dim``, ``mean``, ``std``,
``input_size``, ``weights`` and ``weights_sha256``. Backbones are always built with
``pretrained=False``: nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import _sha256
from .registry import register_model
from .weights import LoadReport, load_backbone_weights

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "FeatureExtractor", "resnet50_trunc", "timm_features"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureExtractor(nn.Module):
    """A backbone ("trunk") that maps tiles to pooled feature vectors, plus its input recipe.

    Parameters
    ----------
    trunk : torch.nn.Module
        Maps normalised ``(B, 3, S, S)`` float images to ``(B, out_dim)``.
    name : str
        Registry name (``"resnet50_trunc"``, ``"timm_features"``).
    backbone : str
        timm model name of the trunk.
    out_dim : int
        Feature length.
    mean, std : sequence of 3 float
        Per-channel normalisation applied to ``[0, 1]`` RGB.
    input_size : int or None
        Side the tiles are resized to before the trunk; None keeps the tile size.
    weights : str, optional
        Local weights file the trunk was loaded from (None: random init).
    weights_sha256 : str, optional
        sha256 of that file, so a feature file can prove which weights made it.
    load_report : LoadReport, optional
        What loading the weights file did.

    Notes
    -----
    ``forward`` takes either RGB uint8 tiles ``(B, T, T, 3)`` (numpy or tensor),
    which it passes through :meth:`preprocess`, or a float tensor
    ``(B, 3, S, S)`` that is already preprocessed. It returns ``(B, out_dim)``.
    """

    def __init__(
        self,
        trunk: nn.Module,
        *,
        name: str,
        backbone: str,
        out_dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int | None,
        weights: str | None = None,
        weights_sha256: str | None = None,
        load_report: LoadReport | None = None,
    ):
        super().__init__()
        self.trunk = trunk
        self.name = name
        self.backbone = backbone
        self.out_dim = int(out_dim)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.input_size = int(input_size) if input_size else None
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.load_report = load_report
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: Any, device: Any = None) -> torch.Tensor:
        """Turn RGB uint8 tiles into the normalised float batch the trunk expects.

        Parameters
        ----------
        images : ndarray or Tensor, uint8 (B, T, T, 3) or (T, T, 3)
            Tiles as read by :func:`napari_pathfm.tiles.read_tile`.
        device : torch.device or str, optional
            Where to compute (default: the extractor's device). The uint8 data is
            moved first, which is 4x less to copy than floats.

        Returns
        -------
        Tensor float32 (B, 3, S, S)
            ``(x / 255 - mean) / std``, resized (bilinear, antialiased) to
            ``input_size`` when that differs from ``T``.
        """
        if isinstance(images, np.ndarray):
            images = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
            x = torch.from_numpy(images)
        else:
            x = images
        if x.ndim == 3:
            x = x[None]
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected RGB uint8 tiles of shape (B, T, T, 3), got {x.dtype} {tuple(x.shape)}")
        device = self._mean.device if device is None else device
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.input_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - self._mean) / self._std

    def forward(self, x: Any) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            x = self.preprocess(x)
        return self.trunk(x)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"features": (B, out_dim)}`` of a preprocessed batch (the tile-embedding cache protocol)."""
        return {"features": self.trunk(x)}

    def decode(self, x: Any, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The features themselves: an extractor is all encoder."""
        return encoded["features"]

    def embedding_spec(self) -> dict:
        """What the tile-embedding cache keys on: the trunk's weights and how it was built."""
        return {
            "name": f"{self.name}:{self.backbone}",
            "modules": [self.trunk],
            "config": {"extractor": self.name, "backbone": self.backbone, "feature_dim": self.out_dim},
        }

    def describe(self) -> dict:
        """JSON-friendly record of how features are made (written into feature files)."""
        return {
            "extractor": self.name,
            "backbone": self.backbone,
            "feature_dim": self.out_dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, backbone={self.backbone!r}, out_dim={self.out_dim}, input_size={self.input_size}"


def _load_trunk_weights(
    trunk: nn.Module, weights: str | Path, what: str, partial: bool = False
) -> tuple[LoadReport, str]:
    """Load a local weights file into ``trunk`` (:func:`~.weights.load_backbone_weights`); returns the
    load report and the file's sha256, which every feature file records."""
    return load_backbone_weights(trunk, weights, what, partial=partial), _sha256(Path(weights))


def _resolve_input_size(input_size: int | None, model: nn.Module) -> int | None:
    if input_size is None:
        return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return int(input_size) or None


@register_model(family="features")
def resnet50_trunc(
    backbone: str = "resnet50",
    weights: str | Path | None = None,
    input_size: int | None = None,
    partial_weights: bool = False,
) -> FeatureExtractor:
    """ResNet50 truncated after layer3, average-pooled: 1024-d patch features (CLAM / S4 MIL).

    Parameters
    ----------
    backbone : str
        A timm ResNet-family model with ``layer3`` (``"resnet50"`` for the paper's
        extractor; ``"resnet18"`` etc. give smaller features).
    weights : str or Path, optional
        Local ImageNet weights (``.safetensors``/``.pth``/``.pt``/``.bin``) with
        torchvision/timm key names. ``fc.*`` and ``layer4.*`` are not used; a file
        that leaves any trunk tensor unloaded is refused. None: random init.
    input_size : int, optional
        Side tiles are resized to; None: 224 (the backbone's training size);
        0: keep the tile size.
    partial_weights : bool
        Accept ``weights`` that fit the trunk only partly (the rest stays random);
        a file in which nothing fits is refused anyway.

    Returns
    -------
    FeatureExtractor
        ``out_dim`` = channels of layer3 (1024 for resnet50).
    """
    import timm

    trunk = timm.create_model(backbone, pretrained=False, num_classes=0)
    chans = [f["num_chs"] for f in getattr(trunk, "feature_info", []) if f.get("module") == "layer3"]
    if not chans or not hasattr(trunk, "layer4"):
        raise ValueError(f"{backbone!r} is not a ResNet-family timm model with layer3; use 'timm_features' instead")
    trunk.layer4 = nn.Identity()
    trunk.num_features = trunk.head_hidden_size = chans[0]
    what = f"{backbone} trunk (up to layer3)"
    report, sha = _load_trunk_weights(trunk, weights, what, partial_weights) if weights else (None, None)
    return FeatureExtractor(
        trunk.eval(),
        name="resnet50_trunc",
        backbone=backbone,
        out_dim=chans[0],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=_resolve_input_size(input_size, trunk),
        weights=str(weights) if weights else None,
        weights_sha256=sha,
        load_report=report,
    )


@register_model(family="features")
def timm_features(
    backbone: str = "resnet50",
    weights: str | Path | None = None,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    partial_weights: bool = False,
) -> FeatureExtractor:
    """Any timm backbone without its classifier: pooled ``num_features``-d patch features.

    Parameters
    ----------
    backbone : str
        Any timm model name (``"resnet10t"``, ``"efficientnet_b0"``,
        ``"vit_small_patch16_224"``, ...), built with ``num_classes=0``; or a foundation
        model found offline: ``"hf-hub:ORG/NAME"`` from the local Hugging Face cache, or a
        model folder (:mod:`.foundation`), whose own weights are then loaded.
    weights : str or Path, optional
        Local weights file with timm key names; classifier keys are unused. A file
        that leaves any backbone tensor unloaded is refused. None: random init (a
        foundation model: its own weights).
    input_size : int, optional
        Side tiles are resized to; None: the backbone's ``pretrained_cfg`` size
        (needed by ViTs); 0: keep the tile size.
    mean, std : sequence of 3 float, optional
        Input normalisation; default: the backbone's ``pretrained_cfg``.
    partial_weights : bool
        Accept ``weights`` that fit the backbone only partly (the rest stays random).

    Returns
    -------
    FeatureExtractor
    """
    from .hub_cache import is_foundation_name

    if is_foundation_name(backbone):
        return _foundation_features(backbone, weights, input_size, mean, std, partial_weights)
    import timm

    trunk = timm.create_model(backbone, pretrained=False, num_classes=0)
    cfg = trunk.pretrained_cfg
    report, sha = (
        _load_trunk_weights(trunk, weights, f"{backbone} backbone", partial_weights) if weights else (None, None)
    )
    return FeatureExtractor(
        trunk.eval(),
        name="timm_features",
        backbone=backbone,
        out_dim=trunk.num_features,
        mean=mean or cfg.get("mean", IMAGENET_MEAN),
        std=std or cfg.get("std", IMAGENET_STD),
        input_size=_resolve_input_size(input_size, trunk),
        weights=str(weights) if weights else None,
        weights_sha256=sha,
        load_report=report,
    )


def _foundation_features(backbone, weights, input_size, mean, std, partial_weights) -> FeatureExtractor:
    """:func:`timm_features` of a foundation model found offline (:func:`.foundation.build_foundation`)."""
    from .foundation import build_foundation

    fm = build_foundation(backbone, weights=weights, partial=partial_weights)
    return FeatureExtractor(
        fm.module.eval(),
        name="timm_features",
        backbone=fm.name,
        out_dim=fm.out_dim,
        mean=mean or fm.mean,
        std=std or fm.std,
        input_size=fm.input_size if input_size is None else (int(input_size) or None),
        weights=str(fm.weights),
        weights_sha256=fm.sha256,
        load_report=fm.report,
    )
