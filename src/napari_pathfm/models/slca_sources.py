"""SLCA's frozen tap sources: timm SAM ViT encoders, Meta's SAM checkpoints mapped onto them, and plain
foundation ViTs (UNI, Virchow2, ...) giving the same stride-16 taps.

:mod:`.slca` builds the classifier around one of these; this module knows how to build and load the
source (timm names checked with close matches, position tables resampled to another input size,
checkpoints of the wrong kind named) and how to read taps from a plain ViT's blocks.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SAM_BY_WIDTH",
    "ViTTaps",
    "build_sam_encoder",
    "check_timm_name",
    "foreign_checkpoint_kind",
    "foundation_taps",
    "sam_checkpoint_filter",
]

# SAM ViT width -> the timm encoder of that size (to say which ``sam`` fits a checkpoint).
SAM_BY_WIDTH = {768: "samvit_base_patch16", 1024: "samvit_large_patch16", 1280: "samvit_huge_patch16"}


# --- timm names -------------------------------------------------------------------------------


def check_timm_name(name: str, what: str, pattern: str = "*") -> None:
    """Raise ``ValueError`` for an unknown timm model name, listing the closest known ones."""
    import timm

    if timm.is_model(name) and (pattern == "*" or name.startswith(pattern.rstrip("*"))):
        return
    names = timm.list_models(pattern)
    close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else f"e.g. {', '.join(names[:5])}"
    raise ValueError(
        f"unknown {what} {name!r} ({hint}). Use a timm model name; list them with timm.list_models({pattern!r})."
    )


def _default_global_attn(depth: int) -> list[int]:
    """SAM's global-attention blocks for another depth: the last block of each quarter (SAM-B: 2, 5, 8, 11)."""
    return sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)})


def build_sam_encoder(name: str, img_size: int, sam_kwargs: dict | None = None) -> nn.Module:
    """timm SAM ViT image encoder (no classifier) for ``img_size`` inputs; ``sam_kwargs`` override its shape."""
    import timm

    check_timm_name(name, "SAM encoder", "samvit*")
    kw = dict(sam_kwargs or {})
    if "depth" in kw and "global_attn_indexes" not in kw:
        kw["global_attn_indexes"] = _default_global_attn(int(kw["depth"]))
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kw)


# --- SAM checkpoints --------------------------------------------------------------------------


def _resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resize of a ``(L, head_dim)`` relative-position table, as timm's ``get_rel_pos`` does at run time."""
    out = F.interpolate(rel_pos.float().t()[None], size=length, mode="linear")
    return out[0].t().to(rel_pos.dtype)


def sam_checkpoint_filter(state_dict: dict, model: nn.Module) -> dict:
    """Original SAM (``sam_vit_*.pth``) or timm ``samvit`` keys -> ``model``'s keys and shapes.

    timm's own ``checkpoint_filter_fn`` does the renaming (``image_encoder.`` prefix
    dropped, ``mlp.lin1/2`` -> ``mlp.fc1/2``, prompt encoder and mask decoder left
    out). Position tables made for another input size (SAM: 1024 px, a 64x64 grid)
    are then resampled to the model's ``img_size``: the absolute ``pos_embed`` with
    timm's ``resample_abs_pos_embed_nhwc`` and the ``rel_pos_h/w`` tables linearly,
    which is what timm would do to them on every forward pass at that size.
    """
    from timm.layers import resample_abs_pos_embed_nhwc
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    sd = checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    for k, v in list(sd.items()):
        ref = own.get(k)
        if ref is None or tuple(v.shape) == tuple(ref.shape):
            continue
        if k == "pos_embed" and v.ndim == 4 and v.shape[-1] == ref.shape[-1]:
            sd[k] = resample_abs_pos_embed_nhwc(v.float(), list(ref.shape[1:3])).to(v.dtype)
        elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.ndim == 2 and v.shape[1] == ref.shape[1]:
            sd[k] = _resize_rel_pos(v, ref.shape[0])
    return sd


def foreign_checkpoint_kind(sd: dict) -> str | None:
    """Name of a known non-SAM-v1 checkpoint kind, judged from its keys (None when it may be SAM)."""
    keys = list(sd)
    if any(k.startswith("image_encoder.trunk.") or ".trunk.blocks." in k for k in keys):
        return "SAM2 (Hiera trunk)"
    if "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd:
        return "plain ViT (e.g. UNI / DINOv2 style, with a class token)"
    if not any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "non-ViT"
    return None


# --- plain ViTs -------------------------------------------------------------------------------


class ViTTaps(nn.Module):
    """A plain (foundation) ViT as SLCA's frozen tap source, in place of SAM's encoder.

    UNI, Virchow2, H-optimus and Prov-GigaPath are plain ViTs: a patch embedding, class (and
    register) tokens, blocks and a final norm, no neck. Their patch tokens at each tap become
    ``(B, C, S/p, S/p)`` maps like SAM's: ``patch_embed`` (with positions), block outputs, and
    ``neck`` = the final norm's output (the embedding the model was trained to give). Built with
    timm's ``dynamic_img_size``, so ``sam_img_size`` may differ from the model's own input size.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.embed_dim = self.num_features = int(vit.embed_dim)
        self.patch = int(vit.patch_embed.patch_size[0])

    @property
    def blocks(self) -> nn.Module:
        return self.vit.blocks

    def _grid(self, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        t = t[:, self.vit.num_prefix_tokens :]
        return t.reshape(t.shape[0], hw[0], hw[1], t.shape[-1]).permute(0, 3, 1, 2)

    def taps(self, x: torch.Tensor, wanted: set, stop: int) -> dict:
        """``{key: (B, C, S/p, S/p)}`` for ``wanted`` taps, running the blocks up to ``stop``."""
        vit = self.vit
        t = vit.patch_embed(x)  # (B, h, w, C) with dynamic_img_size
        hw, out = tuple(t.shape[1:3]), {}
        t = vit.norm_pre(vit.patch_drop(vit._pos_embed(t)))
        if "patch_embed" in wanted:  # with positions, as SAM's patch_embed tap
            out["patch_embed"] = self._grid(t, hw)
        for i in range(stop + 1):
            t = vit.blocks[i](t)
            if i in wanted:
                out[i] = self._grid(t, hw)
        if "neck" in wanted:
            out["neck"] = self._grid(vit.norm(t), hw)
        return out


def foundation_taps(name: str, weights: str | None) -> tuple[ViTTaps, Any]:
    """:class:`ViTTaps` of a foundation model found offline, and what was built (for the card)."""
    from .foundation import build_foundation

    built = build_foundation(name, weights=weights, timm_kwargs={"dynamic_img_size": True})
    vit = getattr(built.module, "vit", built.module)  # Virchow's class ⊕ mean-token wrapper
    if not all(hasattr(vit, a) for a in ("patch_embed", "blocks", "norm", "_pos_embed", "num_prefix_tokens")):
        raise ValueError(f"{name} ({type(vit).__name__}) is not a plain ViT: SLCA takes its taps from ViT blocks")
    return ViTTaps(vit), built
