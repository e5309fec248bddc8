"""Pathology foundation models from local files: what timm needs to build each, and the one builder.

:data:`FOUNDATION_MODELS` is the one table of the known models: the timm arguments that their
``config.json`` cannot hold (layer classes such as ``SwiGLUPacked``) or that their model cards
tell users to pass, their normalisation, embedding size, licence and access terms.
:func:`build_foundation` builds any ``hf-hub:ORG/NAME`` model found offline
(:mod:`.hub_cache`) — known or not — with ``pretrained=False`` and loads the local weights
through the safe loader (:func:`~.weights.load_backbone_weights`: safetensors, or pickles with
``weights_only=True``); a file that leaves part of the network random is refused. The weights'
sha256 goes with the built trunk, so every output made with it can record and later check it.

Sources of the table: the model cards' usage code as quoted in public code (UNI, UNI2-h,
Virchow2, H-optimus-0/1, Prov-GigaPath, CONCH, Phikon-v2 loaders in lazyslide, TRIDENT, eva and
others), read through this project's search tool; entries marked *unverified* in ``note`` were
not confirmed there and should be checked against the model card on huggingface.co.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import hf_dinov2
from .hub_cache import LocalModel, resolve_local_model, split_hub_name

__all__ = ["FOUNDATION_MODELS", "BuiltTrunk", "FoundationModel", "build_foundation", "foundation_spec"]

log = logging.getLogger(__name__)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
_NC_ND = "CC-BY-NC-ND-4.0"
_GATED = (
    "Gated on Hugging Face: you accepted its terms there to download it; they bind every use of these "
    "weights and of what is made with them."
)


@dataclass(frozen=True)
class FoundationModel:
    """What one known foundation model needs beyond its files.

    Attributes
    ----------
    repo_id : str
        Hugging Face repository, ``"ORG/NAME"``.
    title : str
        Human name.
    licence : str
        SPDX identifier or short description of the weights' licence.
    terms : str
        Access and use terms, shown once per user (:func:`show_terms_once`).
    embed_dim : int
        Length of the tile embedding the feature extractor returns.
    mean, std : tuple of 3 float
        Input normalisation of ``[0, 1]`` RGB.
    timm_args : dict
        Keyword arguments of ``timm.create_model`` on top of ``config.json``'s ``model_args``
        (layer classes by name: ``"SwiGLUPacked"``, ``"SiLU"``).
    architecture : str or None
        timm architecture used when only a weights file is given (no ``config.json``);
        None: a ``config.json`` is required.
    pooling : str
        ``"model"`` (timm's own pooled output) or ``"cls+mean"`` (class token concatenated with
        the mean of the patch tokens, register tokens excluded).
    framework : str
        ``"timm"``, or what builds it otherwise (those are not built here).
    note : str
        What was verified, and how to use a model timm cannot build.
    """

    repo_id: str
    title: str
    licence: str
    terms: str
    embed_dim: int
    mean: tuple = IMAGENET[0]
    std: tuple = IMAGENET[1]
    timm_args: dict = field(default_factory=dict)
    architecture: str | None = None
    pooling: str = "model"
    framework: str = "timm"
    note: str = ""


FOUNDATION_MODELS: dict[str, FoundationModel] = {
    m.repo_id.lower(): m
    for m in [
        FoundationModel(
            "MahmoodLab/UNI",
            "UNI (ViT-L/16)",
            _NC_ND,
            f"UNI: {_NC_ND}, non-commercial academic research only, no derivatives shared. {_GATED}",
            1024,
            timm_args={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            architecture="vit_large_patch16_224",
            note="Arguments and ImageNet normalisation as in the model card's timm code.",
        ),
        FoundationModel(
            "MahmoodLab/UNI2-h",
            "UNI2-h (ViT-H/14, 8 registers)",
            _NC_ND,
            f"UNI2-h: {_NC_ND}, non-commercial academic research only. {_GATED}",
            1536,
            timm_args={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            architecture="vit_giant_patch14_224",
            note="Arguments as in the model card's timm code; licence as for UNI (unverified here).",
        ),
        FoundationModel(
            "paige-ai/Virchow2",
            "Virchow2 (ViT-H/14, 4 registers)",
            _NC_ND,
            f"Virchow2: {_NC_ND}, non-commercial research only (unverified here). {_GATED}",
            2560,
            timm_args={"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
            pooling="cls+mean",
            note="mlp_layer/act_layer from the model card; the rest from its config.json (required). "
            "Embedding: class token + mean of the patch tokens, registers excluded (2 x 1280).",
        ),
        *(
            FoundationModel(
                f"bioptimus/H-optimus-{v}",
                f"H-optimus-{v} (ViT-g/14, 4 registers)",
                licence,
                f"H-optimus-{v}: {terms}",
                1536,
                *HOPTIMUS,
                timm_args={"init_values": 1e-5, "dynamic_img_size": False},
                note="Arguments and its own mean/std from the model card; architecture from its config.json. "
                "H-optimus-1's licence as listed by lazyslide (not read from the card itself).",
            )
            for v, licence, terms in (
                (0, "Apache-2.0", "Apache-2.0; research use, not a medical device."),
                (1, _NC_ND, f"{_NC_ND}, non-commercial use only. {_GATED}"),
            )
        ),
        FoundationModel(
            "prov-gigapath/prov-gigapath",
            "Prov-GigaPath tile encoder (ViT-g/14, DINOv2)",
            "Prov-GigaPath licence (unverified here)",
            f"Prov-GigaPath: research use under its own licence; read it on the model card. {_GATED}",
            1536,
            note="Built from its config.json (vit_giant_patch14_dinov2); ImageNet normalisation as in its "
            "demo (resize 256 bicubic, crop 224). Only the tile encoder; the LongNet slide encoder is not timm.",
        ),
        FoundationModel(
            "owkin/phikon-v2",
            "Phikon-v2 (ViT-L/16, DINOv2)",
            "Owkin non-commercial licence (unverified here)",
            "Phikon-v2: non-commercial research use (check the model card).",
            1024,
            note="Published as a transformers Dinov2Model: built as a timm ViT from its config.json and its "
            "weights renamed (models/hf_dinov2.py); the embedding is the class token after the final norm "
            "(Dinov2Model's pooler_output). ImageNet normalisation, 224 px.",
        ),
        FoundationModel(
            "MahmoodLab/CONCH",
            "CONCH vision tower (CoCa ViT-B/16)",
            _NC_ND,
            f"CONCH: {_NC_ND}, non-commercial academic research only. {_GATED}",
            512,
            framework="conch (open_clip CoCa)",
            note="Needs the conch package (open_clip-based CoCa; 448 px input, 512-d projected embedding); "
            "timm cannot build it from its checkpoint. Extract features with conch and write them with "
            "napari_pathfm.io.features.write_features.",
        ),
    ]
}

_LAYERS = {
    "SwiGLUPacked": ("timm.layers", "SwiGLUPacked"),
    "SwiGLU": ("timm.layers", "SwiGLU"),
    "GluMlp": ("timm.layers", "GluMlp"),
    "SiLU": ("torch.nn", "SiLU"),
    "GELU": ("torch.nn", "GELU"),
}


def foundation_spec(name: str) -> FoundationModel | None:
    """The table entry of ``hf-hub:ORG/NAME`` (or ``ORG/NAME``), case-insensitive; None when unknown."""
    repo, _ = split_hub_name(name)
    return FOUNDATION_MODELS.get(repo.lower())


def _timm_kwargs(args: dict) -> dict:
    """``timm_args`` with layer names replaced by the classes (``"SiLU"`` → ``torch.nn.SiLU``)."""
    out = {}
    for key, value in args.items():
        if isinstance(value, str) and value in _LAYERS:
            module, attr = _LAYERS[value]
            value = getattr(importlib.import_module(module), attr)
        out[key] = value
    return out


def _terms_file() -> Path:
    from ..userdata import data_dir

    return data_dir() / "foundation-model-terms-shown.json"


def show_terms_once(spec: FoundationModel | None) -> bool:
    """Log the licence and access terms of ``spec`` the first time this user builds it; True if shown.

    What was shown is remembered in the per-user data folder (``foundation-model-terms-shown.json``).
    """
    if spec is None:
        return False
    path = _terms_file()
    try:
        shown = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        shown = {}
    if spec.repo_id in shown:
        return False
    log.warning("%s (licence %s) — %s", spec.title, spec.licence, spec.terms)
    shown[spec.repo_id] = time.strftime("%Y-%m-%d")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(shown, indent=2) + "\n", encoding="utf-8")
    except OSError:
        pass  # read-only home: shown again next time, which is harmless
    return True


@dataclass
class BuiltTrunk:
    """A foundation model built from local files, with what outputs made with it must record."""

    module: Any
    out_dim: int
    mean: tuple
    std: tuple
    input_size: int
    name: str
    weights: Path
    sha256: str
    report: Any
    spec: FoundationModel | None

    def record(self) -> dict:
        """What a model card keeps of these weights (``foundation_weights``), for ``pathfm models verify``."""
        return {
            "backbone": self.name,
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "licence": self.spec.licence if self.spec else None,
        }


def _class_mean_tokens(vit):
    """Wrap a timm ViT so that it returns class token ⊕ mean of the patch tokens (Virchow's embedding)."""
    import torch
    from torch import nn

    class ClassMeanTokens(nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit
            self.num_features = 2 * vit.num_features
            self.pretrained_cfg = vit.pretrained_cfg

        def forward(self, x):
            tokens = self.vit.forward_features(x)
            return torch.cat([tokens[:, 0], tokens[:, self.vit.num_prefix_tokens :].mean(1)], dim=-1)

    return ClassMeanTokens(vit)


def _source(name: str, spec: FoundationModel | None, weights: str | Path | None) -> tuple[LocalModel | None, dict]:
    """The local model and the ``config.json`` to build from; a weights file alone needs a table architecture."""
    try:
        local = resolve_local_model(name)
        return local, local.config
    except InputError:
        if weights is None or spec is None or spec.architecture is None:
            raise
    return None, {"architecture": spec.architecture}


def build_foundation(
    name: str,
    *,
    weights: str | Path | None = None,
    num_classes: int = 0,
    partial: bool = False,
    partial_hint: str = "pass partial_weights=True (pathfm features --partial-weights)",
    timm_kwargs: dict | None = None,
) -> BuiltTrunk:
    """Build a foundation model from files on this machine: never a download, never a random network.

    Parameters
    ----------
    name : str
        ``"hf-hub:ORG/NAME[@REV]"``, ``"local-dir:FOLDER"`` or a model folder (:mod:`.hub_cache`).
    weights : str or Path, optional
        A weights file to use instead of the one in the cache/folder. Without a local
        ``config.json`` this works for models of :data:`FOUNDATION_MODELS` with an ``architecture``.
    num_classes : int
        0: a feature trunk (pooled embedding); >0: with a new classifier head of that size.
    partial : bool
        Accept weights that fit only partly (the rest stays random).
    partial_hint : str
        How the user asks for a partial load, named when weights do not fit.
    timm_kwargs : dict, optional
        More ``timm.create_model`` arguments (e.g. ``drop_rate``); they win over the config's.

    Returns
    -------
    BuiltTrunk

    Raises
    ------
    InputError
        Not found locally, a model timm cannot build (CONCH), or timm refused the config.
    CheckpointError
        The weights do not fit the network built from the config.
    """
    import timm

    from .checkpoint import _sha256
    from .weights import load_backbone_weights

    spec = foundation_spec(name) if not Path(str(name)).is_dir() else None
    if spec is not None and spec.framework != "timm":
        raise InputError(name, f"is {spec.title}, a {spec.framework} model that timm cannot build.", spec.note)
    local, config = _source(name, spec, weights)
    if spec is None and local is not None and local.repo_id:
        spec = foundation_spec(local.repo_id)  # a folder saved from a known hub model
        if spec is not None and spec.framework != "timm":
            raise InputError(name, f"is {spec.title}, a {spec.framework} model that timm cannot build.", spec.note)
    cfg = config.get("pretrained_cfg") or dict(config)  # timm's legacy configs are one flat dict
    arch = config.get("architecture") or cfg.get("architecture")
    where = local.folder / "config.json" if local else name
    key_map, model_args = None, dict(config.get("model_args") or {})
    if hf_dinov2.is_transformers_dinov2(config):  # Phikon-v2: a transformers Dinov2Model, renamed for timm
        try:
            model_args = hf_dinov2.timm_args(config)
        except (KeyError, ValueError) as exc:
            raise InputError(where, f"is a transformers DINOv2 config, but {exc}.", "Use a plain DINOv2 ViT.") from None
        arch, key_map = hf_dinov2.ARCHITECTURE, hf_dinov2.to_timm
        cfg = {**cfg, "input_size": (3, model_args["img_size"], model_args["img_size"])}
    if not arch:
        raise InputError(where, "names no timm architecture.", "Use a model saved by timm (push_to_hub/save_for_hf).")
    kwargs = {**model_args, **_timm_kwargs(spec.timm_args if spec else {})}
    kwargs.update(timm_kwargs or {}, num_classes=int(num_classes))
    if spec is not None and spec.pooling == "cls+mean":
        kwargs["global_pool"] = ""
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as exc:
        raise InputError(
            where, f"could not be built as timm {arch!r} ({type(exc).__name__}: {exc}).", "Check the timm version."
        ) from exc
    path = Path(weights) if weights is not None else local.weights
    head = (model.pretrained_cfg.get("classifier") or "head") if num_classes else None
    label = local.name if local else name
    report = load_backbone_weights(
        model,
        path,
        f"{label} ({arch})",
        partial=partial,
        ignore=(f"{head}.",) if head else (),
        partial_hint=partial_hint,
        key_map=key_map,
    )
    show_terms_once(spec)
    if spec is not None and spec.pooling == "cls+mean" and not num_classes:
        model = _class_mean_tokens(model)
    size = cfg.get("input_size") or (3, 224, 224)
    return BuiltTrunk(
        module=model,
        out_dim=int(model.num_features),
        mean=tuple(spec.mean if spec else cfg.get("mean", IMAGENET[0])),
        std=tuple(spec.std if spec else cfg.get("std", IMAGENET[1])),
        input_size=int(size[-1]),
        name=label,
        weights=path,
        sha256=_sha256(path),
        report=report,
        spec=spec,
    )
