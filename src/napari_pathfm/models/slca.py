"""SLCA tile classifier: a frozen SAM ViT encoder guides a timm CNN/Swin through channel attention.

Architecture (``create_model("slca", ...)``)
--------------------------------------------
1. **SAM encoder** (frozen): timm's ``samvit_*`` image encoder (the original SAM
   ViT-B/L/H; the paper used ViT-H), fed the tile resized to ``sam_img_size``. Its
   *taps* are stride-16 feature maps:

   ``"patch_embed"``  tokens entering the first block (patch embedding + position embedding),
   ``"first"``        output of block 0,
   ``"middle"``       output of block ``(depth - 1) // 2``,
   ``"last"``         output of the last block (before the neck),
   ``"neck"``         output of SAM's conv neck (256 channels for SAM),
   an ``int`` ``i``   output of block ``i`` (negative counts from the end).

2. **Backbone**: any timm model with a hierarchy of feature stages (ResNet,
   SE-ResNet/SENet154, SwinV2, ConvNeXt, EfficientNet ...), built with
   ``pretrained=False``. The stages are the ``feature_info`` entries at stride 4 and
   more (ResNet ``layer1..4``, SwinV2 ``layers.0..3``; the stride-2 stem is not a
   stage). Each stage module is wrapped (:class:`FusedStage`) so the tap's attention
   is applied *after* the stage and *before* the next one:
   ``F_stage + F_stage * SLCA(tap)`` (see :mod:`napari_pathfm.models.layers.slca`).
   Stages that emit NHWC (timm ``output_fmt``, e.g. SwinV2) are permuted around the
   fusion and handed on unchanged in layout.

3. **Tap-to-stage mapping**: ``taps[i]`` feeds stage ``i + 1``. With the default
   ``("patch_embed", "first", "middle", "last", "neck")`` and a 4-stage backbone:
   patch embedding -> stage 1 (stride 4), first block -> stage 2, middle block ->
   stage 3, last block -> stage 4, and the 5th tap (neck) -> projector, as in the
   paper's figure: shallow SAM features guide shallow stages. A list with one entry
   per stage leaves the projector on the neck; ``None`` at position ``i`` leaves
   stage ``i + 1`` without attention. With ``projector=False`` a 5th tap is unused
   (and not computed).

4. **Projector head**: the projector tap is resized to 8x the last stage's size
   (56x56 for 224-px tiles), 3x3 conv-BN-ReLU to ``projector_dim`` channels, then
   three stride-2 3x3 conv-BN-ReLU blocks down to the last stage's size (7x7),
   concatenated on channels with the backbone's final features (timm ``forward_features``:
   the fused last stage, plus e.g. Swin's final norm or EfficientNet's final 1x1 conv).

5. **Classifier**: global average pool -> dropout -> linear (timm ``ClassifierHead``).

Ablation switches: ``fusion`` (``"slca"``, ``"sigmoid"``, ``"add"``), ``projector``
(on/off) and ``taps`` (which SAM features, and which stages get none).

Only the fusions, the projector, the backbone and the classifier train; the SAM
encoder has ``requires_grad=False``, runs under ``torch.no_grad()`` and stays in
eval mode when the model is put in train mode (``freeze_sam=False`` fine-tunes it).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from .layers.slca import FUSIONS, TapFusion, resize_to
from .registry import register_model
from .slca_sources import (
    SAM_BY_WIDTH,
    ViTTaps,
    build_sam_encoder,
    check_timm_name,
    foreign_checkpoint_kind,
    foundation_taps,
    sam_checkpoint_filter,
)

__all__ = ["DEFAULT_TAPS", "TAP_NAMES", "FusedStage", "Projector", "SLCAClassifier", "sam_checkpoint_filter", "slca"]

log = logging.getLogger(__name__)

TAP_NAMES = ("patch_embed", "first", "middle", "last", "neck")
DEFAULT_TAPS = TAP_NAMES
Tap = str | int | None


# --- modules ----------------------------------------------------------------------------------


# SAM taps of the forward pass running in this thread/context, keyed by FusedStage. A context
# variable rather than module state: the same model may run in two threads at once (e.g. a
# classification worker and a Grad-CAM worker in napari), and modules stay deep-copyable.
_STAGE_TAPS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("slca_stage_taps", default=None)


class FusedStage(nn.Module):
    """One backbone stage followed by the fusion of its SAM tap.

    :meth:`SLCAClassifier.forward` publishes the taps of the current pass (a context
    variable, so concurrent passes in other threads do not mix) before running the
    backbone. ``fusion=None`` (a stage without a tap) passes the stage output on.
    """

    def __init__(self, stage: nn.Module, fusion: TapFusion | None, nhwc: bool = False):
        super().__init__()
        self.stage = stage
        self.fusion = fusion
        self.nhwc = bool(nhwc)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.stage(*args, **kwargs)
        if self.fusion is None:
            return out
        tap = (_STAGE_TAPS.get() or {}).get(self)
        if tap is None:
            raise RuntimeError("FusedStage ran without its SAM tap; call the SLCA model, not its backbone alone")
        if self.nhwc:
            return self.fusion(out.permute(0, 3, 1, 2), tap).permute(0, 2, 3, 1)
        return self.fusion(out, tap)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Projector(nn.Module):
    """Projector head: tap at 8x the target size -> 3x3 conv-BN-ReLU -> 3 stride-2 conv-BN-ReLU blocks."""

    def __init__(self, in_channels: int, dim: int = 256):
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, dim, 1)
        self.down = nn.Sequential(*[_conv_bn_relu(dim, dim, 2) for _ in range(3)])

    def forward(self, tap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, dim, *size)`` from a tap of any spatial size."""
        x = resize_to(tap, (8 * size[0], 8 * size[1]))
        return resize_to(self.down(self.stem(x)), size)  # exact for any size: 8h -> 4h -> 2h -> h


class SLCAClassifier(nn.Module):
    """See the module docstring; build with :func:`slca` / ``create_model("slca", ...)`` (the defaults live there).

    Takes normalised images ``(B, 3, H, W)`` (any size the backbone accepts) and
    returns logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        *,
        backbone: str,
        sam: str,
        num_classes: int,
        sam_img_size: int,
        taps: Sequence[Tap],
        fusion: str,
        projector: bool,
        projector_dim: int,
        slca_kernel: int,
        slca_reduction: int,
        drop_rate: float,
        freeze_sam: bool,
        sam_kwargs: dict | None,
        backbone_kwargs: dict | None,
        backbone_weights: str | Path | None,
        sam_weights: str | Path | None = None,
    ):
        super().__init__()
        import timm
        from timm.layers import ClassifierHead

        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {list(FUSIONS)}, not {fusion!r}")
        from .hub_cache import is_foundation_name

        self.sam_name, self.sam_img_size, self.freeze_sam = sam, int(sam_img_size), bool(freeze_sam)
        self.load_reports: dict[str, Any] = {}
        if is_foundation_name(sam):  # UNI, Virchow2, … found offline: its ViT blocks are the taps
            self.sam, built = foundation_taps(sam, sam_weights)
            self.load_reports["sam"] = built.report
            self.pathfm_foundation = {"sam": built.record()}
        else:
            self.sam = build_sam_encoder(sam, self.sam_img_size, sam_kwargs)
        patch = getattr(self.sam, "patch", 16)
        if int(sam_img_size) % patch:
            raise ValueError(f"sam_img_size must be a multiple of the encoder's patch size {patch}, not {sam_img_size}")
        depth = len(self.sam.blocks)

        check_timm_name(backbone, "backbone")
        net = timm.create_model(backbone, pretrained=False, num_classes=0, **dict(backbone_kwargs or {}))
        if backbone_weights:
            self._load_backbone(net, backbone_weights, backbone)
        stages = [f for f in net.feature_info if f["reduction"] >= 4]
        reductions = [f["reduction"] for f in stages]
        if len(stages) < 2 or reductions != sorted(set(reductions)):
            raise ValueError(
                f"backbone {backbone!r} has no hierarchy of feature stages (strides {reductions}); "
                "use a CNN or Swin-type timm model such as resnet152, legacy_senet154 or swinv2_tiny_window8_256."
            )
        stage_taps, proj_tap = self._split_taps(taps, len(stages), projector)
        self.taps = [self._tap_key(t, depth) for t in stage_taps]
        self.projector_tap = self._tap_key(proj_tap, depth) if projector else None

        nhwc = getattr(net, "output_fmt", "NCHW") == "NHWC"
        self.nhwc = nhwc
        self.fused: list[FusedStage] = []
        for info, key in zip(stages, self.taps):
            fusion_mod = None
            if key is not None:
                fusion_mod = TapFusion(self._tap_channels(key), info["num_chs"], fusion, slca_kernel, slca_reduction)
            wrapped = FusedStage(net.get_submodule(info["module"]), fusion_mod, nhwc)
            net.set_submodule(info["module"], wrapped)
            self.fused.append(wrapped)
        self.backbone = net
        last_chs = net.num_features  # forward_features width: the last stage's, or a final conv's (EfficientNet)
        self.projector = Projector(self._tap_channels(self.projector_tap), projector_dim) if projector else None
        self.cam_layer = nn.Identity()  # last backbone stage after fusion (NCHW), hooked by Grad-CAM
        in_features = last_chs + (projector_dim if projector else 0)
        self.head = ClassifierHead(in_features, num_classes, pool_type="avg", drop_rate=drop_rate)
        self.num_classes = int(num_classes)

        self.sam.requires_grad_(not self.freeze_sam)
        if self.freeze_sam:
            self.sam.eval()

    # -- config helpers ----------------------------------------------------------------------
    @staticmethod
    def _split_taps(taps: Sequence[Tap], n_stages: int, projector: bool) -> tuple[list[Tap], Tap]:
        taps = list(taps) if taps is not None else list(DEFAULT_TAPS)
        if len(taps) == n_stages:
            return taps, "neck"
        if len(taps) == n_stages + 1:
            return taps[:n_stages], taps[n_stages]
        raise ValueError(
            f"taps has {len(taps)} entries but the backbone has {n_stages} stages: give one tap per stage "
            f"(None for a stage without attention), plus optionally one for the projector; e.g. {list(DEFAULT_TAPS)}"
        )

    @staticmethod
    def _tap_key(tap: Tap, depth: int) -> str | int | None:
        """``"patch_embed"``, ``"neck"``, a block index ``0..depth-1``, or None."""
        if tap is None or (isinstance(tap, str) and tap.lower() in ("none", "null", "")):
            return None
        if isinstance(tap, str) and not tap.lstrip("-").isdigit():
            named = {"first": 0, "middle": (depth - 1) // 2, "last": depth - 1}
            if tap in named:
                return named[tap]
            if tap in ("patch_embed", "neck"):
                return tap
            raise ValueError(f"unknown tap {tap!r}; use one of {list(TAP_NAMES)}, a block index, or None")
        i = int(tap)
        if not -depth <= i < depth:
            raise ValueError(f"tap block index {i} is outside the SAM encoder's {depth} blocks")
        return i % depth

    def _tap_channels(self, key: str | int) -> int:
        return self.sam.num_features if key == "neck" else self.sam.embed_dim

    # -- weights -----------------------------------------------------------------------------
    def _load_backbone(self, net: nn.Module, path: str | Path, name: str) -> None:
        from .weights import load_into, load_state_dict_file

        sd = load_state_dict_file(path)
        rep = load_into(net, sd, source=path, dry_run=True)
        if rep.missing or rep.mismatched:
            raise CheckpointError(
                path,
                f"does not fit the timm backbone {name!r}: {rep}.",
                f"Give timm weights of {name} (a classifier head of any size is fine), or change model.backbone.",
            )
        self.load_reports["backbone"] = load_into(net, sd, source=path)

    def load_sam(self, path: str | Path):
        """Load an original SAM checkpoint (``sam_vit_b/l/h_*.pth``) or timm ``samvit`` weights into the encoder.

        The prompt encoder and mask decoder are ignored. Every encoder tensor must be
        found with a fitting shape (position tables are resampled to
        ``sam_img_size``); otherwise :class:`~napari_pathfm.errors.CheckpointError`
        names the file and which ``sam`` it fits.
        """
        from .weights import load_into, load_state_dict_file

        sd = load_state_dict_file(path)
        kind = foreign_checkpoint_kind(sd)
        if kind is not None:
            raise CheckpointError(
                path,
                f"is a {kind} checkpoint, not a SAM (v1) ViT image encoder.",
                "Pass the original Segment Anything checkpoint (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or "
                "sam_vit_h_4b8939.pth) as sam_checkpoint, with the matching model.sam.",
            )
        mapped = sam_checkpoint_filter(sd, self.sam)
        rep = load_into(self.sam, mapped, source=path, dry_run=True)
        if rep.missing or rep.mismatched:
            pe = sd.get("image_encoder.patch_embed.proj.weight", sd.get("patch_embed.proj.weight"))
            width = int(pe.shape[0]) if pe is not None else None
            fits = SAM_BY_WIDTH.get(width)
            hint = f" The file holds a {width}-wide ViT{f' ({fits})' if fits else ''}." if width else ""
            raise CheckpointError(
                path,
                f"does not fit the SAM encoder {self.sam_name!r}: {rep}.{hint}",
                f"Set model.sam to {fits!r} (and no sam_kwargs)."
                if fits and fits != self.sam_name
                else "Use the checkpoint made for this SAM size, or remove sam_kwargs.",
            )
        self.load_reports["sam"] = load_into(self.sam, mapped, source=path)
        return self.load_reports["sam"]

    def weights_report(self) -> str:
        """Plain-words summary of the weight files loaded at build time (or that none was)."""
        if not self.load_reports:
            return "no pretrained weights loaded: SAM encoder and backbone are randomly initialised"
        return "; ".join(f"{k}: {v}" for k, v in self.load_reports.items())

    # -- train/eval --------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_sam:  # the frozen encoder keeps eval behaviour (no dropout / drop-path)
            self.sam.eval()
        return self

    def get_classifier(self) -> nn.Module:
        """The final linear layer (what "fine-tune the head only" trains)."""
        return self.head.fc

    def gradcam_target_layers(self) -> list[nn.Module]:
        """Modules for Grad-CAM to hook: the last backbone stage after fusion (NCHW, before the projector concat)."""
        return [self.cam_layer]

    # -- forward -----------------------------------------------------------------------------
    def sam_features(self, x: torch.Tensor) -> dict:
        """The SAM taps this model uses, ``{key: (B, C, S/16, S/16)}``; ``x`` is resized to ``sam_img_size``."""
        from timm.layers import resample_abs_pos_embed_nhwc

        wanted = {k for k in [*self.taps, self.projector_tap] if k is not None}
        if not wanted:
            return {}
        blocks = [k for k in wanted if isinstance(k, int)]
        stop = max(blocks, default=-1)
        if "neck" in wanted:
            stop = len(self.sam.blocks) - 1
        s = (self.sam_img_size, self.sam_img_size)
        x = F.interpolate(x, size=s, mode="bilinear", align_corners=False, antialias=x.shape[-1] > s[-1])
        sam = self.sam
        if isinstance(sam, ViTTaps):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_sam):
                return sam.taps(x, wanted, stop)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_sam):
            t = sam.patch_embed(x)
            if sam.pos_embed is not None:
                t = t + resample_abs_pos_embed_nhwc(sam.pos_embed, list(t.shape[1:3]))
            t = sam.norm_pre(sam.patch_drop(sam.pos_drop(t)))
            out = {"patch_embed": t.permute(0, 3, 1, 2)} if "patch_embed" in wanted else {}
            for i in range(stop + 1):
                t = sam.blocks[i](t)
                if i in wanted:
                    out[i] = t.permute(0, 3, 1, 2)
            if "neck" in wanted:
                out["neck"] = sam.neck(t.permute(0, 3, 1, 2))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x, self.encode(x))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`sam_features` with string keys (``"patch_embed"``, ``"neck"``, ``"3"``): what the cache stores.

        Contiguous, so that fresh and cached taps take the same kernels (and give the same rounding)."""
        return {str(k): v.contiguous() for k, v in self.sam_features(x).items()}

    def embedding_spec(self) -> dict:
        """What the tile-embedding cache keys on: the SAM encoder (by weights hash) and the taps used."""
        cfg = getattr(self, "pathfm_config", {}) or {}
        taps = sorted(str(k) for k in {*self.taps, self.projector_tap} if k is not None)
        return {
            "name": f"sam:{self.sam_name}",
            "modules": [self.sam],
            "config": {
                "sam": self.sam_name,
                "sam_img_size": self.sam_img_size,
                "taps": taps,
                "sam_kwargs": cfg.get("sam_kwargs"),
            },
        }

    def decode(self, x: torch.Tensor, feats: dict) -> torch.Tensor:
        """Logits from the pixels ``x`` and the SAM taps ``feats`` (:meth:`sam_features` or :meth:`encode`)."""
        feats = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in feats.items()}
        token = _STAGE_TAPS.set({s: feats[k] for s, k in zip(self.fused, self.taps) if k is not None})
        try:
            y = self.backbone.forward_features(x)
        finally:
            _STAGE_TAPS.reset(token)
        if self.nhwc:
            y = y.permute(0, 3, 1, 2)
        y = self.cam_layer(y)
        if self.projector is not None:
            y = torch.cat([y, self.projector(feats[self.projector_tap].to(y.dtype), tuple(y.shape[-2:]))], 1)
        return self.head(y)


@register_model(family="classify")
def slca(
    backbone: str = "resnet152",
    sam: str = "samvit_base_patch16",
    num_classes: int = 2,
    sam_img_size: int = 1024,
    taps: Sequence[Tap] = DEFAULT_TAPS,
    fusion: str = "slca",
    projector: bool = True,
    projector_dim: int = 256,
    slca_kernel: int = 3,
    slca_reduction: int = 16,
    drop_rate: float = 0.0,
    freeze_sam: bool = True,
    sam_kwargs: dict | None = None,
    backbone_kwargs: dict | None = None,
    sam_checkpoint: str | None = None,
    backbone_weights: str | None = None,
):
    """SLCA: frozen SAM ViT taps steer a timm CNN/Swin classifier through spatially localized channel attention.

    Parameters
    ----------
    backbone : str
        timm classifier with feature stages: ``resnet152`` (paper), ``legacy_senet154``,
        ``swinv2_*``, or small ones for CPU work (``resnet10t``, ``resnet18``, ``seresnet18``).
    sam : str
        timm SAM encoder: ``samvit_base_patch16`` / ``samvit_large_patch16`` /
        ``samvit_huge_patch16`` (the paper's ViT-H); or a foundation ViT found offline
        (``"hf-hub:MahmoodLab/UNI"``, a model folder; :class:`ViTTaps`), whose weights are
        loaded and recorded in the card (``foundation_weights``). Loading such a checkpoint
        later needs that model's files again (its architecture), as for ``timm_classifier``.
    num_classes : int
        Number of output logits.
    sam_img_size : int
        Side the tile is resized to for SAM (1024 as in SAM; 224/256 for CPU recipes).
    taps : sequence
        SAM feature per backbone stage (+ optionally one for the projector); names
        ``patch_embed``, ``first``, ``middle``, ``last``, ``neck``, block indices or
        None. See the module docstring for the mapping.
    fusion : {"slca", "sigmoid", "add"}
        ``F + F*SLCA(P(tap))``; ``F + F*sigmoid(P(tap))``; ``F + P(tap)``.
    projector : bool
        Concatenate the projector head's 7x7 map with the backbone's final features before the classifier.
    projector_dim : int
        Projector channels.
    slca_kernel, slca_reduction : int
        SLAP window (odd) and bottleneck ratio ``r`` of the SLCA block.
    drop_rate : float
        Dropout before the linear classifier.
    freeze_sam : bool
        Keep the SAM encoder frozen (paper). False fine-tunes it too.
    sam_kwargs : dict, optional
        Passed to ``timm.create_model`` for the SAM encoder, e.g. a small CPU encoder
        ``{"depth": 4, "embed_dim": 192, "num_heads": 3, "neck_chans": 64}``; with
        ``depth`` but no ``global_attn_indexes`` the last block of each quarter is global.
    backbone_kwargs : dict, optional
        Passed to ``timm.create_model`` for the backbone (e.g. ``img_size``/``window_size`` for SwinV2).
    sam_checkpoint : str, optional
        Local original SAM checkpoint (``sam_vit_h_4b8939.pth``) or timm samvit
        ``.safetensors``; build-time only (a saved SLCA checkpoint holds the weights).
    backbone_weights : str, optional
        Local timm weights of ``backbone`` (head of any size is skipped); build-time only.

    Returns
    -------
    SLCAClassifier
        ``(B, 3, H, W)`` normalised tiles -> ``(B, num_classes)`` logits.
    """
    from .hub_cache import is_foundation_name

    cfg = dict(locals())  # the arguments above; the factory is the one place with defaults
    cfg.pop("is_foundation_name")
    sam_checkpoint = cfg.pop("sam_checkpoint")
    if is_foundation_name(sam):  # a weights file for the foundation ViT replaces its cached one
        cfg["sam_weights"], sam_checkpoint = sam_checkpoint, None
    model = SLCAClassifier(**cfg)
    if sam_checkpoint:
        report = model.load_sam(sam_checkpoint)
        log.info("%s: %s", sam_checkpoint, report)
    return model
