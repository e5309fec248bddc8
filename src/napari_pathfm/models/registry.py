"""Model registry: build any model of the package by name.

Shaped like timm's ``_registry.py``: a model family is a module with small factory
functions decorated with :func:`register_model`; :func:`create_model` builds one by
name. Built-in models are listed in ``_BUILTINS`` as ``"module:function"`` strings
with their description and default config, so :func:`list_models` and
:func:`model_info` answer without importing torch (contract 6); the module is only
imported by the first :func:`create_model` of one of its models.

Every model built here carries ``model.pathfm_config = {"name": ..., **cfg}``, the
full config needed to rebuild it, which :func:`~napari_pathfm.models.save_checkpoint`
writes into the model card.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..families import load_plugins

__all__ = ["ModelEntry", "create_model", "list_models", "model_info", "register_model"]

# Config keys that point at files to load once at build time (and how to load them); they are not
# recorded in ``pathfm_config`` because a checkpoint card carries the weights itself.
_BUILD_ONLY_KEYS = (
    "weights",
    "sam2_checkpoint",
    "uni_checkpoint",
    "sam_checkpoint",
    "backbone_weights",
    "partial_weights",
)


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one model name.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"timm_classifier"``.
    target : str
        ``"module:function"`` of the factory (imported lazily).
    family : str
        Task family (``"classify"``, ``"segment"``, ``"mil"``, ...): the name of its
        :class:`~napari_pathfm.families.FamilySpec`.
    description : str
        One line for users and GUI lists.
    default_cfg : dict
        Keyword arguments of the factory with their defaults.
    """

    name: str
    target: str
    family: str
    description: str
    default_cfg: dict = field(default_factory=dict)


_BUILTINS: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry(
            name="timm_classifier",
            target="napari_pathfm.models.tile_classifier:timm_classifier",
            family="classify",
            description="Any timm image backbone with a linear classification head (tile classifier).",
            default_cfg={
                "backbone": "resnet18",
                "num_classes": 2,
                "in_chans": 3,
                "drop_rate": 0.0,
                "weights": None,
                "partial_weights": False,
            },
        ),
        ModelEntry(
            name="slca",
            target="napari_pathfm.models.slca:slca",
            family="classify",
            description="SLCA: frozen SAM ViT taps steer a timm CNN/Swin through spatially localized channel attention.",
            default_cfg={
                "backbone": "resnet152",
                "sam": "samvit_base_patch16",
                "num_classes": 2,
                "sam_img_size": 1024,
                "taps": ["patch_embed", "first", "middle", "last", "neck"],
                "fusion": "slca",
                "projector": True,
                "projector_dim": 256,
                "slca_kernel": 3,
                "slca_reduction": 16,
                "drop_rate": 0.0,
                "freeze_sam": True,
                "sam_kwargs": None,
                "backbone_kwargs": None,
                "sam_checkpoint": None,
                "backbone_weights": None,
            },
        ),
        ModelEntry(
            name="resnet_unet",
            target="napari_pathfm.models.unet_seg:resnet_unet",
            family="segment",
            description="Plain U-Net with a timm ResNet encoder (random init): the segmentation baseline.",
            default_cfg={"num_classes": 2, "encoder": "resnet18", "image_size": 256, "pretrained": False},
        ),
        ModelEntry(
            name="pathsam2",
            target="napari_pathfm.models.pathsam2.model:pathsam2",
            family="segment",
            description="Path-SAM2: SAM2 Hiera + UNI encoders, KAN class prompts, SAM-style decoder; semantic masks.",
            default_cfg={
                "num_classes": 2,
                "encoder": "sam2_hiera_base_plus",
                "uni": "uni",
                "image_size": 1024,
                "decoder_dim": 256,
                "decoder_depth": 2,
                "decoder_heads": 8,
                "decoder_mlp_dim": 2048,
                "prompt_head": "kan",
                "freeze_encoders": True,
                "sam2_checkpoint": None,
                "uni_checkpoint": None,
                "sam_checkpoint": None,
                "high_res": False,
                "prompts": False,
            },
        ),
        ModelEntry(
            name="s4mil",
            target="napari_pathfm.models.mil:s4mil",
            family="mil",
            description="S4 MIL: S4D state-space layer over the patch sequence, max-pooled (Fillioux et al. 2023).",
            default_cfg={
                "in_dim": 1024,
                "n_classes": 2,
                "d_model": 512,
                "d_state": 32,
                "dropout": 0.0,
                "multitask": False,
            },
        ),
        ModelEntry(
            name="meanpool",
            target="napari_pathfm.models.mil_baselines:meanpool",
            family="mil",
            description="Mean-pooling MIL baseline: Linear + ReLU per patch, mean over patches, Linear.",
            default_cfg={"in_dim": 1024, "n_classes": 2, "d_model": 512, "dropout": 0.0},
        ),
        ModelEntry(
            name="maxpool",
            target="napari_pathfm.models.mil_baselines:maxpool",
            family="mil",
            description="Max-pooling MIL baseline: Linear + ReLU per patch, max over patches, Linear.",
            default_cfg={"in_dim": 1024, "n_classes": 2, "d_model": 512, "dropout": 0.0},
        ),
        ModelEntry(
            name="abmil",
            target="napari_pathfm.models.mil_baselines:abmil",
            family="mil",
            description="Gated-attention MIL baseline (Ilse et al. 2018): attention-weighted mean of patch embeddings.",
            default_cfg={"in_dim": 1024, "n_classes": 2, "d_model": 512, "dropout": 0.0},
        ),
        ModelEntry(
            name="transmil",
            target="napari_pathfm.models.mil_baselines:transmil",
            family="mil",
            description="TransMIL baseline (Shao et al. 2021): Nyström-attention transformer with PPEG position encoding.",
            default_cfg={"in_dim": 1024, "n_classes": 2, "dropout": 0.1},
        ),
        ModelEntry(
            name="dense_unet",
            target="napari_pathfm.models.haste.dense_unet:dense_unet",
            family="translate",
            description="HASTE Dense U-Net (tiramisu): z-stack planes -> fluorescence in [0, 1], ~1.2M parameters.",
            default_cfg={
                "in_channels": 7,
                "out_channels": 1,
                "init_filters": 48,
                "down_blocks": (4, 4, 4, 4),
                "up_blocks": (4, 4, 4, 4),
                "bottleneck_layers": 4,
                "growth_rate": 12,
                "dropout": 0.2,
            },
        ),
        ModelEntry(
            name="lupi_unet",
            target="napari_pathfm.models.haste.lupi_unet:lupi_unet",
            family="translate",
            description="HASTE LUPI nuclei net: shared encoder, privileged-mask + regression decoders, side outputs.",
            default_cfg={
                "in_channels": 7,
                "out_channels": 1,
                "init_filters": 32,
                "down_blocks": (4, 4, 4, 4),
                "up_blocks": (4, 4, 4, 4),
                "bottleneck_layers": 4,
                "growth_rate": 12,
                "dropout": 0.2,
                "final_layers": 2,
                "final_growth": 2,
            },
        ),
        ModelEntry(
            name="patchgan",
            target="napari_pathfm.models.haste.patchgan:patchgan",
            family="translate",
            description="Conditional PatchGAN discriminator (z-stack + channel), 70x70 patches, for the HASTE GAN.",
            default_cfg={"in_channels": 8, "ndf": 48, "n_layers": 3},
        ),
        ModelEntry(
            name="resnet50_trunc",
            target="napari_pathfm.models.feature_extractor:resnet50_trunc",
            family="features",
            description="ResNet50 truncated after layer3, average-pooled: 1024-d patch features (CLAM / S4 MIL).",
            default_cfg={"backbone": "resnet50", "weights": None, "input_size": None, "partial_weights": False},
        ),
        ModelEntry(
            name="timm_features",
            target="napari_pathfm.models.feature_extractor:timm_features",
            family="features",
            description="Any timm backbone without its classifier: pooled patch features.",
            default_cfg={
                "backbone": "resnet50",
                "weights": None,
                "input_size": None,
                "mean": None,
                "std": None,
                "partial_weights": False,
            },
        ),
        ModelEntry(
            name="unet",
            target="napari_pathfm.models.haste.unet:unet",
            family="translate",
            description="Plain U-Net (conv-BN-ReLU, max-pool, transposed conv): the z-stack translation baseline.",
            default_cfg={"in_channels": 7, "out_channels": 1, "base": 32, "depth": 4},
        ),
    ]
}

# Filled by @register_model when a module is imported (built-in or user code).
_ENTRYPOINTS: dict[str, Callable[..., Any]] = {}
_RUNTIME: dict[str, ModelEntry] = {}


def _signature_defaults(fn: Callable[..., Any]) -> dict:
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def register_model(fn: Callable | None = None, *, name: str | None = None, family: str = "", description: str = ""):
    """Register a model factory under ``name`` (default: the function name).

    Usable bare (``@register_model``) or with arguments
    (``@register_model(family="classify")``). The description defaults to the
    first docstring line and the default config to the factory's keyword defaults.

    Examples
    --------
    >>> @register_model(family="classify")
    ... def tiny_net(num_classes=2):
    ...     '''A tiny test network.'''
    ...     import torch
    ...     return torch.nn.Linear(4, num_classes)
    >>> "tiny_net" in list_models()
    True
    """

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        key = name or f.__name__
        builtin = _BUILTINS.get(key)
        if builtin is not None and builtin.target != f"{f.__module__}:{f.__name__}":
            raise ValueError(f"model name {key!r} is already used by built-in {builtin.target}")
        doc = (inspect.getdoc(f) or "").strip().splitlines()
        _ENTRYPOINTS[key] = f
        _RUNTIME[key] = ModelEntry(
            name=key,
            target=f"{f.__module__}:{f.__name__}",
            family=family or (builtin.family if builtin else ""),
            description=description or (doc[0] if doc else ""),
            default_cfg=_signature_defaults(f),
        )
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(family: str | None = None) -> list[str]:
    """Sorted names of all known models, optionally only those of one ``family``.

    Does not import torch or any model module. Family plugins (:func:`napari_pathfm.families.load_plugins`)
    are imported first, so the models they register are listed.
    """
    load_plugins()
    entries = {**_BUILTINS, **_RUNTIME}
    return sorted(n for n, e in entries.items() if family is None or e.family == family)


def _entry(name: str) -> ModelEntry:
    entry = _RUNTIME.get(name) or _BUILTINS.get(name)
    if entry is None:
        load_plugins()
        entry = _RUNTIME.get(name)
    if entry is None:
        known = ", ".join(list_models()) or "none"
        raise KeyError(f"unknown model {name!r}; known models: {known}")
    return entry


def model_info(name: str) -> dict:
    """Family, description, factory target and default config of model ``name``.

    Raises
    ------
    KeyError
        If ``name`` is not registered; the message lists the known names.
    """
    e = _entry(name)
    return {
        "name": e.name,
        "family": e.family,
        "description": e.description,
        "target": e.target,
        "default_cfg": dict(e.default_cfg),
    }


def create_model(name: str, **cfg: Any):
    """Build model ``name`` with factory keyword arguments ``cfg``.

    Imports the family module on first use. Unknown config keys raise a
    ``TypeError`` naming the accepted keys. The returned module has
    ``pathfm_config`` (name + full config, without build-only keys such as
    ``weights``) so a checkpoint card can rebuild it.

    Examples
    --------
    >>> net = create_model("timm_classifier", backbone="resnet10t", num_classes=3)
    >>> net.pathfm_config["num_classes"]
    3
    """
    entry = _entry(name)
    if name not in _ENTRYPOINTS:
        module, _, func = entry.target.partition(":")
        importlib.import_module(module)
        if name not in _ENTRYPOINTS:  # module defines it without the decorator
            register_model(getattr(importlib.import_module(module), func), name=name, family=entry.family)
    fn = _ENTRYPOINTS[name]
    defaults = _signature_defaults(fn)
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise TypeError(f"model {name!r} does not accept {unknown}; accepted config keys: {sorted(defaults)}")
    model = fn(**cfg)
    if not isinstance(getattr(model, "pathfm_config", None), dict):
        full = {**defaults, **cfg}
        for key in _BUILD_ONLY_KEYS:
            full.pop(key, None)
        model.pathfm_config = {"name": name, **full}
    return model
