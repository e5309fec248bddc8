"""SAM's sparse prompt encoder: clicks and boxes on the image → tokens for the mask decoder.

Path-SAM2 replaces SAM's manual prompts by learned class prompts to segment every gland at once;
interactive use (click a gland, get that gland) needs the manual prompts back. :class:`PromptEncoder`
is SAM/SAM2's: a click is the random-Fourier encoding of its position
(:class:`~napari_pathfm.models.pathsam2.decoder.PositionEmbeddingRandom`, the same matrix the image
positions use) plus a learned embedding of its kind — negative (0), positive (1), box top-left (2),
box bottom-right (3) — and padding clicks (label -1) are a learned "not a point". The parameter
names are SAM's (``point_embeddings.{0..3}.weight``, ``not_a_point_embed.weight``), so they load from
a SAM or SAM2 checkpoint's ``prompt_encoder.*`` / ``sam_prompt_encoder.*``.

:meth:`PromptEncoder.dense` adds what SAM feeds through its dense (mask) prompt path, drawn from the
clicks and boxes instead of a previous mask, as click-map interactive segmenters (RITM) do: a map of
positive clicks, one of negative clicks (Gaussians of 8 input px) and the filled box, at 4x the
embedding's size, through SAM's ``mask_downscaling`` convolutions to one vector per embedding cell,
added to the image embedding. Its last convolution starts at zero, so a prompt decoder copied from a
trained class decoder starts from exactly that decoder's view of the image. The click positions are
then where the image embedding says them, not only in tokens the decoder must learn to place (on 85
GlaS images and a CPU budget, the sparse tokens alone did not learn to pick a gland).
"""

from __future__ import annotations

import torch
from torch import nn

from .decoder import LayerNorm2d, PositionEmbeddingRandom

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
        self.mask_downscaling = nn.Sequential(  # SAM's, on 3 click/box maps instead of 1 mask
            nn.Conv2d(3, 4, kernel_size=2, stride=2),
            LayerNorm2d(4),
            nn.GELU(),
            nn.Conv2d(4, 16, kernel_size=2, stride=2),
            LayerNorm2d(16),
            nn.GELU(),
            nn.Conv2d(16, dim, kernel_size=1),
        )
        nn.init.zeros_(self.mask_downscaling[-1].weight)
        nn.init.zeros_(self.mask_downscaling[-1].bias)
        # the same maps into the decoder's stride-8 and stride-4 upscaling (SAM2's high-resolution path),
        # so the object's outline is not only what the stride-16 embedding can say; zero at the start too
        self.hr_s1 = nn.Conv2d(3, dim // 4, kernel_size=3, stride=2, padding=1)
        self.hr_s0 = nn.Conv2d(3, dim // 8, kernel_size=3, padding=1)
        for conv in (self.hr_s1, self.hr_s0):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def maps(self, points, labels, boxes, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """``(B, 3, 4h, 4w)`` click/box maps for an embedding of ``grid`` (h, w) cells over an input of
        ``size``: positive clicks, negative clicks (Gaussians, σ = 8 input px), the box filled."""
        h, w = 4 * grid[0], 4 * grid[1]
        ref = points if points is not None else boxes
        sy, sx = size[0] / h, size[1] / w
        yy = ((torch.arange(h, device=ref.device, dtype=torch.float32) + 0.5) * sy).view(1, 1, h, 1)
        xx = ((torch.arange(w, device=ref.device, dtype=torch.float32) + 0.5) * sx).view(1, 1, 1, w)
        b = ref.shape[0]
        out = torch.zeros(b, 3, h, w, device=ref.device)
        if points is not None:
            p = points.float()
            d2 = (xx - p[..., 0, None, None]) ** 2 + (yy - p[..., 1, None, None]) ** 2  # (B, N, h, w)
            g = torch.exp(-d2 / (2 * 8.0**2))
            lab = labels.to(p.device)[..., None, None]
            out[:, 0] = (g * (lab == 1)).amax(1)
            out[:, 1] = (g * (lab == 0)).amax(1)
        if boxes is not None:
            x0, y0, x1, y1 = (boxes.float()[:, i, None, None] for i in range(4))
            out[:, 2] = ((xx[:, 0] >= x0) & (xx[:, 0] <= x1) & (yy[:, 0] >= y0) & (yy[:, 0] <= y1)).float()
        return out

    def dense(self, points, labels, boxes, size: tuple[int, int], grid: tuple[int, int]):
        """``(B, C, h, w)`` (the click/box maps through ``mask_downscaling``) and the maps' terms for the
        decoder's stride-8 and stride-4 upscaling, ``(B, C/4, 2h, 2w)`` and ``(B, C/8, 4h, 4w)``; all zero
        before training."""
        maps = self.maps(points, labels, boxes, size, grid)
        return self.mask_downscaling(maps), (self.hr_s1(maps), self.hr_s0(maps))

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
