"""Multiple-instance learning family: S4 MIL (Fillioux et al. 2023) and its output contract.

A slide is a bag of ``L`` patch feature vectors ``x`` (B, L, D), in the patch order
of the feature file (S4 MIL is order-sensitive: it convolves along that order).
Every model of the family (``s4mil`` here; ``meanpool``, ``maxpool``, ``abmil``,
``transmil`` in :mod:`.mil_baselines`) returns a dict:

``"logits"`` (B, C)
    Slide logits. Train with cross-entropy on these, never on softmax outputs.
``"patch_logits"`` (B, L, C)
    Only for models with a trained per-patch head (``s4mil(multitask=True)``);
    the multitask loss uses these.
``"patch_scores"`` (B, L, C)
    Always there: per-patch class evidence for heatmaps, higher = more evidence
    for that class. The per-patch head's logits when present, otherwise a
    model-specific attribution documented on each model.

:func:`heatmap_scores` turns ``patch_scores`` into one [0, 1] map per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers.s4d import S4D
from .registry import register_model

__all__ = ["PAPER_S4MIL_PARAMS", "S4MIL", "MILModel", "heatmap_scores", "s4mil"]

PAPER_S4MIL_PARAMS = 1_085_954


def heatmap_scores(out: dict, cls: int) -> torch.Tensor:
    """Per-patch evidence in [0, 1] for class ``cls``: (B, L).

    ``softmax(patch_scores, dim=-1)[..., cls]``; for two classes this is
    ``sigmoid(s_cls - s_other)``, the patch's own probability of ``cls`` when
    ``patch_scores`` are logits. It is monotone in how much more a patch
    supports ``cls`` than the other classes, so maps of different models share
    one colour scale (0.5 = neutral for binary models).

    Parameters
    ----------
    out : dict
        Output of a MIL model's forward.
    cls : int
        Class index (negative indices count from the end).
    """
    scores = out["patch_scores"]
    n = scores.shape[-1]
    if not -n <= cls < n:
        raise IndexError(f"class index {cls} is out of range for a model with {n} classes")
    return scores.float().softmax(-1)[..., cls]


class MILModel(nn.Module):
    """Base of the MIL family: input checks and the per-patch classifier helper.

    Parameters
    ----------
    in_dim : int
        Feature dimension ``D`` of the patches.
    n_classes : int
        Number of slide classes ``C``.
    """

    has_patch_head = False

    def __init__(self, in_dim: int, n_classes: int):
        super().__init__()
        if in_dim < 1 or n_classes < 1:
            raise ValueError(f"in_dim and n_classes must be positive, got {in_dim} and {n_classes}")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raise ``ValueError`` in plain words unless ``x`` is a float (B, L >= 1, in_dim) bag."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ValueError(f"MIL models take a bag of patch features shaped (B, L, D); got {shape}")
        if x.shape[-1] != self.in_dim:
            raise ValueError(
                f"patch features have dimension {x.shape[-1]} but this model expects {self.in_dim}; "
                "extract features with the backbone the model was trained on"
            )
        if x.shape[1] < 1:
            raise ValueError("the bag is empty (0 patches); there is no tissue to classify")
        if not x.is_floating_point():
            raise ValueError(f"patch features must be floating point, got {x.dtype}")
        return x


class S4MIL(MILModel):
    """S4 MIL: Linear + ReLU → LayerNorm → S4D → max over patches → Linear.

    Parameters
    ----------
    in_dim : int
        Patch feature dimension (1024 for the ResNet50-layer3 features of the paper).
    n_classes : int
        Slide classes.
    d_model : int
        Width ``H`` of the S4D layer.
    d_state : int
        S4D state size ``N``.
    dropout : float
        Dropout after the first projection and inside the S4D layer.
    multitask : bool
        Add a per-patch head (Linear H → C on each patch's S4D output) whose
        logits are returned as ``patch_logits``.

    Notes
    -----
    ``patch_scores`` are the ``patch_logits`` when ``multitask``; otherwise the
    slide classifier applied to each patch's S4D output before max-pooling.
    Because the slide logits are ``W·max_l(y_l) + b``, a patch whose features
    reach the per-channel maxima where ``W`` is large scores high for that
    class.

    The binary model with ``in_dim=1024, d_model=512, d_state=32`` has exactly
    the paper's 1 085 954 parameters: 524 800 (input Linear) + 1 024 (LayerNorm)
    + 512 (``log_dt``) + 2·8 192 (``log_A_real``, ``A_imag``: 16 complex modes
    per channel, trainable) + 16 384 (complex ``C`` stored as real pairs) + 512
    (``D``) + 525 312 (1x1 conv H → 2H feeding the GLU) + 1 026 (classifier).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        n_classes: int = 2,
        d_model: int = 512,
        d_state: int = 32,
        dropout: float = 0.0,
        multitask: bool = False,
    ):
        super().__init__(in_dim, n_classes)
        self.fc1 = nn.Sequential(nn.Linear(in_dim, d_model), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(d_model)
        self.s4 = S4D(d_model, d_state, dropout=dropout, transposed=True)
        self.classifier = nn.Linear(d_model, n_classes)
        self.patch_head = nn.Linear(d_model, n_classes) if multitask else None
        self.has_patch_head = bool(multitask)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Each patch's S4D output before pooling, (B, H, L); position ``t`` sees patches ``<= t`` only."""
        x = self.check_input(x)
        plain = torch.is_grad_enabled() or self.training or x.dtype != self.norm.weight.dtype
        if plain or torch.is_autocast_enabled(x.device.type):
            return self.s4(self.norm(self.fc1(x)).transpose(1, 2))
        return self.s4(self._project_inference(x))

    @torch.no_grad()
    def _project_inference(self, x: torch.Tensor, rows: int = 4096) -> torch.Tensor:
        """``norm(fc1(x))`` laid out (B, H, L), a block of ``rows`` patches at a time.

        Same numbers as the plain path (eval mode: dropout is the identity). Each
        block's projection, ReLU and LayerNorm stay in cache and are written
        straight into the layout the S4D convolution reads, so a 200 000-patch
        bag never holds a second (L, H) copy; this keeps inference time linear
        in the bag length.
        """
        lin, H = self.fc1[0], self.norm.normalized_shape[0]
        out = x.new_empty(x.shape[0], H, x.shape[1])
        for b in range(x.shape[0]):
            for l0 in range(0, x.shape[1], rows):
                z = torch.addmm(lin.bias, x[b, l0 : l0 + rows], lin.weight.t()).relu_()
                z = F.layer_norm(z, (H,), self.norm.weight, self.norm.bias, self.norm.eps)
                out[b, :, l0 : l0 + rows].copy_(z.t())
        return out

    def _streams(self, x: torch.Tensor) -> bool:
        """Whether this forward runs block by block (:meth:`_forward_streaming`): inference without
        autograd or autocast, float32 like the weights, on a bag long enough for the chunked S4D."""
        fast = not (torch.is_grad_enabled() or self.training or torch.is_autocast_enabled(x.device.type))
        return fast and x.dtype == self.norm.weight.dtype and x.shape[1] >= 16 * self.s4.chunk_len

    @torch.no_grad()
    def _forward_streaming(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled S4D outputs (B, H) and patch scores (B, C, L) of a long bag, a block at a time.

        Each block of patches is projected, normalised, convolved (:meth:`S4D.stream`, the state
        carried from the block before), mixed and scored while it is in cache, so the only arrays as
        long as the bag are the input and the scores: nothing (H, L) is written and read back, which
        made a 200 000-patch bag cost more per patch than a 50 000-patch one. Same numbers as
        :meth:`hidden` followed by the pooling and the heads, to float rounding.
        """
        B, L, _ = x.shape
        s4, lin, H = self.s4, self.fc1[0], self.norm.normalized_shape[0]
        head = self.patch_head if self.patch_head is not None else self.classifier
        pooled = x.new_full((B, H), float("-inf"))
        patch = x.new_empty(B, head.out_features, L)

        def project(dst: torch.Tensor, l0: int, n: int) -> None:
            for b in range(B):
                z = torch.addmm(lin.bias, x[b, l0 : l0 + n], lin.weight.t()).relu_()
                dst[b] = F.layer_norm(z, (H,), self.norm.weight, self.norm.bias, self.norm.eps).t()

        for l0, n, y in s4.stream(B, L, project, x):
            y = s4._mix_inference(y)[..., :n]
            torch.maximum(pooled, y.amax(-1), out=pooled)
            patch[..., l0 : l0 + n] = torch.matmul(head.weight, y) + head.bias[:, None]
        return pooled, patch

    def forward(self, x: torch.Tensor) -> dict:
        """Slide logits and patch scores for bags ``x`` (B, L, in_dim); see the module docstring."""
        head = self.patch_head if self.patch_head is not None else self.classifier
        if self._streams(self.check_input(x)):
            pooled, patch = self._forward_streaming(x)
            logits, patch = self.classifier(pooled), patch.transpose(1, 2)
        else:
            y = self.hidden(x)
            logits = self.classifier(y.amax(-1))
            # (C, H) @ (B, H, L) in the layout y already has: no (B, L, H) copy of a long bag
            patch = (torch.matmul(head.weight, y) + head.bias[:, None]).transpose(1, 2)
        if self.patch_head is not None:
            return {"logits": logits, "patch_logits": patch, "patch_scores": patch}
        return {"logits": logits, "patch_scores": patch}


@register_model(family="mil")
def s4mil(
    in_dim: int = 1024,
    n_classes: int = 2,
    d_model: int = 512,
    d_state: int = 32,
    dropout: float = 0.0,
    multitask: bool = False,
):
    """S4 MIL: S4D state-space layer over the patch sequence, max-pooled (Fillioux et al. 2023).

    See :class:`S4MIL` for the parameters and the meaning of the outputs.
    """
    return S4MIL(in_dim, n_classes, d_model=d_model, d_state=d_state, dropout=dropout, multitask=multitask)
