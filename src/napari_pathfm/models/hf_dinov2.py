"""A Hugging Face ``transformers`` DINOv2 model (Phikon-v2's layout) as a timm ViT, without transformers.

Phikon-v2 (``owkin/phikon-v2``) is published as a ``transformers`` ``Dinov2Model``: a ``config.json``
with ``model_type: dinov2`` and weights named ``embeddings.*``, ``encoder.layer.<i>.*`` and
``layernorm.*``. The network is a plain ViT with layer scale, which timm builds; only the names
differ (and query/key/value are three matrices where timm has one). :func:`timm_args` reads the
architecture from the config, :func:`to_timm` renames the weights (a ``checkpoint_filter_fn`` in
timm's sense), so :func:`~napari_pathfm.models.foundation.build_foundation` builds it like any timm
model, through the same safe loader and the same all-or-nothing fit check. The pooled output is the
class token after the final layer norm: ``Dinov2Model``'s ``pooler_output``, Phikon-v2's embedding.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["is_transformers_dinov2", "timm_args", "to_timm"]

#: The timm architecture the converted model is built as (its arguments come from the config).
ARCHITECTURE = "vit_large_patch16_224"

_RENAMES = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
)
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def is_transformers_dinov2(config: dict) -> bool:
    """Whether a ``config.json`` is a transformers DINOv2 model's."""
    return str(config.get("model_type", "")).lower() == "dinov2"


def timm_args(config: dict) -> dict:
    """``timm.create_model`` arguments of the ViT a transformers DINOv2 config describes.

    Raises
    ------
    ValueError
        A variant timm's plain ViT does not reproduce (SwiGLU feed-forward).
    """
    if config.get("use_swiglu_ffn"):
        raise ValueError("its feed-forward is SwiGLU (use_swiglu_ffn), which this conversion does not map")
    return {
        "embed_dim": int(config["hidden_size"]),
        "depth": int(config["num_hidden_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "patch_size": int(config.get("patch_size", 14)),
        "img_size": int(config.get("image_size", 518)),
        "mlp_ratio": float(config.get("mlp_ratio", 4)),
        "init_values": float(config.get("layerscale_value", 1.0)),
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "class_token": True,
        "global_pool": "token",
    }


def to_timm(state_dict: dict, model: Any = None) -> dict:
    """transformers ``Dinov2Model`` tensor names → timm ViT names (query/key/value stacked into ``qkv``);
    ``mask_token`` (pre-training only) and a ``dinov2.`` wrapper prefix are dropped."""
    import torch

    out: dict = {}
    qkv: dict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("dinov2.")
        if key == "embeddings.mask_token":
            continue
        m = _QKV.match(key)
        if m:
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
            continue
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value  # left as it is: the fit check names it
    for (i, kind), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out
