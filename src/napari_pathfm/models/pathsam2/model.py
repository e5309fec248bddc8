"""Path-SAM2: SAM2 Hiera + UNI encoders, KAN class prompts, SAM-style decoder → per-class masks.

Forward: ``x (B, 3, S, S)`` normalised → ``{"logits": (B, K, S, S), "iou": (B, K)}``;
``K`` includes the background class 0 and the class map is ``logits.argmax(1)``.
:meth:`PathSAM2.preprocess` turns RGB uint8 tiles into ``x`` (ImageNet
normalisation, which SAM2 and UNI both use, resized to ``input_size``).

Pipeline (Zhang et al. 2024, "Path-SAM2"): Hiera trunk (last stage, stride 32,
neck removed) and UNI (stride 16) → both at stride 16, concatenated →
:class:`~.encoders.DimensionAlignment` (→ ``decoder_dim``) → two-way transformer
with ``K`` class prompt tokens made by a 3-layer KAN from learned class
embeddings (no clicks) → masks upsampled 4x by the decoder, then bilinearly to
the input size. The encoders are frozen by default (``freeze_encoders``).

With ``prompts=True`` the model also has SAM's interactive path: :meth:`PathSAM2.decode_prompt` turns
clicks and boxes (:class:`~.prompt.PromptEncoder`) and the same encoder outputs into one object's mask
through a prompt decoder of its own, so the class masks do not depend on it (:mod:`napari_pathfm.pipelines.prompt`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError
from ..layers.tile_input import normalise_tiles
from ..registry import register_model
from .decoder import MaskDecoder, PositionEmbeddingRandom
from .encoders import (
    DimensionAlignment,
    build_hiera,
    build_uni,
    hiera_features,
    hiera_pyramid,
    sam2_trunk_keys,
    to_stride16,
    uni_features,
)
from .kan import head
from .prompt import PromptEncoder

log = logging.getLogger(__name__)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PROMPT_PATH", "PathSAM2", "pathsam2"]

#: State-dict prefixes of the click/box path alone (``prompts=True``); everything else makes the class masks.
PROMPT_PATH = ("prompt_encoder.", "prompt_decoder.")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PathSAM2(nn.Module):
    """See the module docstring; build it with :func:`pathsam2` / ``create_model("pathsam2", ...)``."""

    prompt_path_keys = PROMPT_PATH

    def __init__(
        self,
        num_classes: int = 2,
        encoder: str = "sam2_hiera_base_plus",
        uni: str | None = "uni",
        image_size: int = 1024,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        decoder_mlp_dim: int = 2048,
        prompt_head: str = "kan",
        freeze_encoders: bool = True,
        high_res: bool = False,
        prompts: bool = False,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes counts the background too: at least 2")
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (Hiera's stride), not {image_size}")
        self.num_classes, self.input_size = int(num_classes), int(image_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.freeze_encoders = bool(freeze_encoders)
        self.trunk = build_hiera(encoder)
        self.uni = build_uni(uni, image_size) if uni else None
        in_dim = self.trunk.out_channels + (self.uni.out_channels if self.uni is not None else 0)
        self.align = DimensionAlignment(in_dim, decoder_dim)
        self.pe_layer = PositionEmbeddingRandom(decoder_dim // 2)
        self.class_embed = nn.Embedding(num_classes, decoder_dim)
        self.prompt_generator = head(prompt_head, [decoder_dim] * 4)  # 3 KAN layers
        self.high_res = bool(high_res)
        stages = [int(f["num_chs"]) for f in self.trunk.feature_info]
        shape = dict(
            dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_heads,
            mlp_dim=decoder_mlp_dim,
            head_kind=prompt_head,
            high_res_channels=(stages[0], stages[1]) if self.high_res else None,
        )
        self.decoder = MaskDecoder(num_classes, **shape)
        self.prompt_encoder = self.prompt_decoder = None
        if prompts:  # SAM's interactive path: clicks/boxes → tokens → a one-mask decoder of its own
            self.prompt_encoder = PromptEncoder(decoder_dim, self.pe_layer)
            self.prompt_decoder = MaskDecoder(1, **shape)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.load_reports: dict[str, Any] = {}
        self._apply_freeze()

    # -- encoders -----------------------------------------------------------------
    def encoders(self) -> list[nn.Module]:
        return [m for m in (self.trunk, self.uni) if m is not None]

    def prompt_path(self) -> list[nn.Module]:
        """The modules only clicks and boxes use (empty without ``prompts``): training just these adds
        prompting to a trained model and leaves its class masks exactly as they were."""
        return [] if self.prompt_encoder is None else [self.prompt_encoder, self.prompt_decoder]

    def prompt_init(self, state_dict: dict) -> dict:
        """``prompt_decoder.*`` tensors made from a checkpoint's class decoder (``decoder.*``), for a model
        that gains the prompt path after training: the same transformer and upscaling, the first
        foreground class's mask token and head as the one prompted mask's (SAM's decoder starts from
        what the class decoder learnt about the tissue; the clicks then have to pick the object).
        Tensors the model does not have, or whose shapes differ (the IoU head's last layer), are left out."""
        if self.prompt_decoder is None:
            return {}
        own, out = self.state_dict(), {}
        fg = 1 if self.num_classes > 1 else 0
        for key, value in state_dict.items():
            if not key.startswith("decoder."):
                continue
            rest = key[len("decoder.") :]
            if rest == "mask_tokens.weight":
                value = value[fg : fg + 1]
            elif rest.startswith("output_hypernetworks_mlps."):
                index, tail = rest[len("output_hypernetworks_mlps.") :].split(".", 1)
                if int(index) != fg:
                    continue
                rest = f"output_hypernetworks_mlps.0.{tail}"
            target = "prompt_decoder." + rest
            if target in own and tuple(own[target].shape) == tuple(value.shape):
                out[target] = value
        return out

    def _apply_freeze(self) -> None:
        for enc in self.encoders():
            enc.requires_grad_(not self.freeze_encoders)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoders:  # frozen encoders stay in eval mode (dropout/drop-path off)
            for enc in self.encoders():
                enc.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Aligned image embedding ``(B, decoder_dim, S/16, S/16)``."""
        return self._align(self.encode(x), (x.shape[-2] // 16, x.shape[-1] // 16))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw encoder outputs: ``hiera`` (stride 32) and, with UNI, ``uni`` (stride 16) feature maps.

        These are what the embedding cache stores (see :meth:`embedding_spec`).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoders):
            if self.high_res:  # SAM2's stride-4 and stride-8 features for the decoder's upscaling too
                s0, s1, _s2, s3 = hiera_pyramid(self.trunk, x)
                out = {"hiera": s3, "hiera_s0": s0, "hiera_s1": s1}
            else:
                out = {"hiera": hiera_features(self.trunk, x)}
            if self.uni is not None:
                out["uni"] = uni_features(self.uni, x)
        # one memory layout whether fresh or read from the cache: the decoder's kernels, and so its
        # rounding, depend on it
        return {k: v.contiguous() for k, v in out.items()}

    def _align(self, encoded: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        feats = [to_stride16(encoded["hiera"], size)]
        if self.uni is not None:
            feats.append(to_stride16(encoded["uni"], size))
        return self.align(torch.cat(feats, 1))

    def embedding_spec(self) -> dict:
        """What the tile-embedding cache keys on: the Hiera (+ UNI) encoders, by weights hash (so entries
        are shared by checkpoints whose encoders were frozen in training and never go stale)."""
        cfg = getattr(self, "pathfm_config", {}) or {}
        enc, uni = cfg.get("encoder", type(self.trunk).__name__), cfg.get("uni", None if self.uni is None else "vit")
        return {
            "name": f"{enc}+{uni}" if uni else str(enc),
            "modules": self.encoders(),
            "config": {"encoder": enc, "uni": uni, "image_size": self.input_size, "high_res": self.high_res},
        }

    def class_prompts(self) -> torch.Tensor:
        """``K`` class prompt tokens ``(K, decoder_dim)`` (they replace manual point prompts)."""
        return self.prompt_generator(self.class_embed.weight)

    # -- forward ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"input sides must be multiples of 32, got {tuple(x.shape[-2:])}")
        return self.decode(x, self.encode(x))

    def decode(self, x: torch.Tensor | None, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``forward`` from :meth:`encode`'s outputs; ``x`` is not needed (the output is ``input_size``, or
        ``x``'s size when given)."""
        size = tuple(x.shape[-2:]) if x is not None else (self.input_size, self.input_size)
        emb = self._align(encoded, (size[0] // 16, size[1] // 16))
        prompts = self.class_prompts().unsqueeze(0).expand(emb.shape[0], -1, -1)
        high = (encoded["hiera_s0"], encoded["hiera_s1"]) if self.high_res else None
        masks, iou = self.decoder(emb, self.pe_layer(emb.shape[-2:]), prompts, high)
        logits = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return {"logits": logits, "iou": iou}

    def decode_prompt(
        self,
        x: torch.Tensor | None,
        encoded: dict[str, torch.Tensor],
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, 1, H, W)`` of the object under clicks ``points (B, N, 2)`` (x, y input pixels;
        ``labels`` 1 positive, 0 negative, -1 padding) and/or ``boxes (B, 4)`` (x0, y0, x1, y1), from
        :meth:`encode`'s outputs (a cached tile embedding serves every prompt on that tile)."""
        if self.prompt_encoder is None:
            raise ValueError("this Path-SAM2 model has no prompt path (built with prompts=False)")
        size = tuple(x.shape[-2:]) if x is not None else (self.input_size, self.input_size)
        emb = self._align(encoded, (size[0] // 16, size[1] // 16))
        sparse = self.prompt_encoder(points, labels, boxes, size)
        dense, extra = self.prompt_encoder.dense(points, labels, boxes, size, tuple(emb.shape[-2:]))
        high = (encoded["hiera_s0"], encoded["hiera_s1"]) if self.high_res else None
        masks, _iou = self.prompt_decoder(emb, self.pe_layer(emb.shape[-2:]), sparse, high, dense, extra)
        return F.interpolate(masks, size=size, mode="bilinear", align_corners=False)

    def preprocess(self, images: Any, device: Any = None) -> torch.Tensor:
        """RGB uint8 tiles ``(B, T, T, 3)`` (numpy or tensor) → normalised ``(B, 3, S, S)`` at ``input_size``."""
        return normalise_tiles(images, self._mean, self._std, self.input_size, device)

    @torch.no_grad()
    def predict(self, images: Any) -> np.ndarray:
        """Class map ``(B, S, S)`` uint8 of RGB uint8 tiles (at ``input_size``)."""
        return self(self.preprocess(images))["logits"].argmax(1).to(torch.uint8).cpu().numpy()

    # -- foundation weights ------------------------------------------------------------
    def load_sam2(self, path: str | Path, *, decoder: bool = True):
        """Load an original SAM2 checkpoint (``sam2_hiera_*.pt``): trunk, and where compatible the decoder.

        The trunk must load completely (a file for another Hiera size is refused).
        Decoder parts that fit: the two-way transformer, the output upscaling, the
        positional encoding and ``no_mask_embed``; SAM2's mask tokens, MLP heads,
        neck, memory modules and high-res convs are reported as unused.
        """
        from ..weights import load_into, load_state_dict_file

        sd = load_state_dict_file(path)
        trunk_sd = sam2_trunk_keys(sd)
        if not trunk_sd:
            raise CheckpointError(
                path,
                "has no image_encoder.trunk.* tensors; it is not an original SAM2 checkpoint.",
                "Use sam2_hiera_tiny.pt / small / base_plus / large from the SAM2 release.",
            )
        rep = load_into(self.trunk, trunk_sd, source=path, dry_run=True)
        missing = [k for k in rep.missing if not k.startswith("head.")]
        if missing or rep.mismatched:
            raise CheckpointError(
                path,
                f"does not fit the {self._encoder_name()} trunk: {rep}.",
                "Pick the SAM2 checkpoint of the same size as model.encoder.",
            )
        self.load_reports["sam2_trunk"] = load_into(self.trunk, trunk_sd, source=path)
        if decoder:
            self.load_reports["sam2_decoder"] = self._load_decoder(sd, path, "sam_mask_decoder.", "sam_prompt_encoder.")
        return self.load_reports

    def load_sam_decoder(self, path: str | Path):
        """Load the compatible decoder parts of an original SAM (v1) checkpoint (``sam_vit_*.pth``)."""
        from ..weights import load_state_dict_file

        sd = load_state_dict_file(path)
        sd = {
            k.replace(".mlp.lin1.", ".mlp.layers.0.").replace(".mlp.lin2.", ".mlp.layers.1."): v for k, v in sd.items()
        }
        self.load_reports["sam_decoder"] = self._load_decoder(sd, path, "mask_decoder.", "prompt_encoder.")
        return self.load_reports

    def _load_decoder(self, sd: dict, path, dec: str, prompt: str):
        from ..weights import load_into

        mapped = {}
        for k, v in sd.items():
            if k.startswith((dec + "transformer.", dec + "output_upscaling.")):
                mapped["decoder." + k[len(dec) :]] = v
            elif k.startswith(prompt + "pe_layer."):
                mapped["pe_layer." + k[len(prompt + "pe_layer.") :]] = v
            elif k.startswith(prompt + "no_mask_embed."):
                mapped["decoder.no_mask_embed." + k[len(prompt + "no_mask_embed.") :]] = v
        if not mapped:
            raise CheckpointError(
                path,
                f"has no {dec}* tensors to load into the decoder.",
                "Pass a SAM2 or SAM checkpoint, or leave the decoder random.",
            )
        report = load_into(self, mapped, source=path)
        if report.mismatched:
            log.warning("%s: decoder tensors of another width were skipped: %s", path, report)
        return report

    def load_uni(self, path: str | Path):
        """Load UNI's ``pytorch_model.bin`` (timm ViT keys); the ViT must load completely."""
        from ..weights import load_into, load_state_dict_file

        if self.uni is None:
            raise CheckpointError(
                path,
                "is UNI weights, but this model has no UNI encoder (uni: null).",
                "Set model.uni: uni to use them.",
            )
        sd = load_state_dict_file(path)
        rep = load_into(self.uni, sd, source=path, dry_run=True)
        if rep.missing or rep.mismatched:
            raise CheckpointError(
                path,
                f"does not fit the UNI encoder: {rep}.",
                "Use UNI's pytorch_model.bin (ViT-L/16) with model.uni: uni.",
            )
        self.load_reports["uni"] = load_into(self.uni, sd, source=path)
        return self.load_reports

    def weights_report(self) -> str:
        """Plain-words summary of every foundation-weights file loaded (or that none was)."""
        if not self.load_reports:
            return "no foundation weights loaded: encoders and decoder are randomly initialised"
        return "; ".join(f"{k}: {v}" for k, v in self.load_reports.items())

    def _encoder_name(self) -> str:
        return getattr(self, "pathfm_config", {}).get("encoder", "Hiera")


@register_model(family="segment")
def pathsam2(
    num_classes: int = 2,
    encoder: str = "sam2_hiera_base_plus",
    uni: str | None = "uni",
    image_size: int = 1024,
    decoder_dim: int = 256,
    decoder_depth: int = 2,
    decoder_heads: int = 8,
    decoder_mlp_dim: int = 2048,
    prompt_head: str = "kan",
    freeze_encoders: bool = True,
    sam2_checkpoint: str | None = None,
    uni_checkpoint: str | None = None,
    sam_checkpoint: str | None = None,
    high_res: bool = False,
    prompts: bool = False,
) -> PathSAM2:
    """Path-SAM2 semantic segmenter (see :class:`PathSAM2`).

    Parameters
    ----------
    num_classes : int
        Classes including background (class 0).
    encoder : str
        ``sam2_hiera_tiny|small|base_plus|large`` (timm) or ``hiera_micro`` (CPU preset).
    uni : str or None
        ``"uni"`` (ViT-L/16 as UNI), ``"uni_micro"``, any timm ViT name, or None (SAM2 alone).
    image_size : int
        Model input side (multiple of 32; SAM2 uses 1024).
    decoder_dim, decoder_depth, decoder_heads, decoder_mlp_dim : int
        Decoder size (SAM2: 256, 2, 8, 2048; the original decoder weights only fit that size).
    prompt_head : str
        ``"kan"`` (Path-SAM2) or ``"mlp"`` (ablation) for the class prompts and decoder heads.
    freeze_encoders : bool
        Keep the Hiera and UNI weights fixed (the paper's setting).
    high_res : bool
        Feed the Hiera trunk's stride-4 and stride-8 features into the decoder's upscaling, as SAM2's
        decoder does (``use_high_res_features``); sharper gland edges and gaps between glands.
    prompts : bool
        Add SAM's click/box prompt path (:meth:`PathSAM2.decode_prompt`): a prompt encoder (tokens and
        click/box maps) and a one-mask prompt decoder of its own, trained with simulated clicks
        (``loss.prompt_weight``; ``optim.trainable: prompt`` adds it to a trained model).
    sam2_checkpoint, uni_checkpoint, sam_checkpoint : str, optional
        Local original weights: SAM2 (trunk + decoder), UNI ``pytorch_model.bin`` (or
        ``"hf-hub:MahmoodLab/UNI"``, found in the local Hugging Face cache), SAM v1 (decoder
        only). Load reports: ``model.load_reports`` / ``weights_report()``; UNI's name and
        sha256 go into the checkpoint card (``foundation_weights``).
    """
    model = PathSAM2(
        num_classes,
        encoder,
        uni,
        image_size,
        decoder_dim,
        decoder_depth,
        decoder_heads,
        decoder_mlp_dim,
        prompt_head,
        freeze_encoders,
        high_res,
        prompts,
    )
    if sam_checkpoint:
        model.load_sam_decoder(sam_checkpoint)
    if sam2_checkpoint:
        model.load_sam2(sam2_checkpoint)
    if uni_checkpoint:
        model.load_uni(_foundation_file(model, "uni", uni_checkpoint))
    if model.load_reports:
        log.info("Path-SAM2 weights: %s", model.weights_report())
    return model


def _foundation_file(model: PathSAM2, key: str, source: str) -> Path:
    """The local file of foundation weights ``source`` (a file, or ``hf-hub:ORG/NAME`` found offline);
    records its name and sha256 in ``model.pathfm_foundation[key]`` for the checkpoint card."""
    from ..checkpoint import _sha256
    from ..hub_cache import is_foundation_name, resolve_local_model

    path = resolve_local_model(source).weights if is_foundation_name(source) else Path(source)
    if path.is_file():
        records = dict(getattr(model, "pathfm_foundation", None) or {})
        records[key] = {"backbone": str(source), "weights": str(path), "weights_sha256": _sha256(path)}
        model.pathfm_foundation = records
    return path
