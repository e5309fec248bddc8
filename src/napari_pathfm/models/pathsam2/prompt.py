"""SAM's sparse prompt encoder: clicks and boxes on the image → tokens for the mask decoder.

Path-SAM2 replaces SAM's manual prompts by learned class prompts to segment every gland at once;
interactive use (click a gland, get that gland) needs the manual prompts back. :class:`PromptEncoder`
is SAM/SAM2's: a click is the random-Fourier encoding of its position
(:class:`~napari_pathfm.models.pathsam2.decoder.PositionEmbeddingRandom`, the same matrix the image
positions use) plus a learned embedding of its kind — negative (0), positive (1), box top-left (2),
box bottom-right (3) — and padding clicks (label -1) are a learned "not a point". The parameter
names are SAM's (``point_embeddings.{0..3}.weight``, ``not_a_point_embed.weight``), so they load from
a SAM or SAM2 checkpoint's ``prompt_encoder.*`` / ``sam_prompt_encoder.*``.
"""

from __future__ import annotations

import torch
from torch import nn

from .decoder import PositionEmbeddingRandom

__all__ = ["PromptEncoder"]


class PromptEncoder(nn.Module):
    """Clicks ``(B, N, 2)`` (x, y in input pixels) with labels ``(B, N)`` and boxes ``(B, 4)`` → tokens.

    Parameters
    ----------
    dim : int
        Token width (the decoder's).
    pe_layer : PositionEmbeddingRandom
        The model's image positional encoding, shared so clicks and image positions match.
    """

    def __init__(self, dim: int, pe_layer: PositionEmbeddingRandom):
        super().__init__()
        self.pe_layer = [pe_layer]  # shared, not a second copy in the state dict
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)

    def _encode(self, xy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Random-Fourier encoding of pixel positions ``(..., 2)`` (x, y) in an image of ``size`` (h, w)."""
        h, w = size
        m = self.pe_layer[0].positional_encoding_gaussian_matrix
        norm = (xy + 0.5) / torch.tensor([w, h], dtype=xy.dtype, device=xy.device)
        coords = 2 * torch.pi * ((2 * norm - 1) @ m.to(xy.dtype))
        return torch.cat([coords.sin(), coords.cos()], -1)

    def forward(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        size: tuple[int, int],
    ) -> torch.Tensor:
        """Sparse prompt tokens ``(B, N + 2·has_box, C)``; pixel coordinates in an input of ``size``.

        ``labels``: 1 positive click, 0 negative click, -1 padding (ignored clicks, for bags of
        prompts of different lengths). At least one of ``points`` and ``boxes`` must be given.
        """
        tokens = []
        if points is not None:
            labels = labels.to(points.device)
            emb = self._encode(points.float(), size)
            emb = torch.where((labels == -1)[..., None], torch.zeros_like(emb), emb)
            emb = emb + torch.where((labels == -1)[..., None], self.not_a_point_embed.weight, torch.zeros_like(emb))
            emb = emb + torch.where((labels == 0)[..., None], self.point_embeddings[0].weight, torch.zeros_like(emb))
            emb = emb + torch.where((labels == 1)[..., None], self.point_embeddings[1].weight, torch.zeros_like(emb))
            tokens.append(emb)
        if boxes is not None:
            corners = self._encode(boxes.float().reshape(-1, 2, 2), size)
            corners = corners + torch.stack([self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]])
            tokens.append(corners)
        if not tokens:
            raise ValueError("a prompt needs points or a box")
        return torch.cat(tokens, 1)
