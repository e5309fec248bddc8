"""Grad-CAM heat maps of classified slide tiles, placed over the slide.

:func:`gradcam_images` runs Grad-CAM (``pytorch-grad-cam``) on a batch of uint8 tiles;
:func:`gradcam_tiles` does it for chosen tiles of a :class:`~napari_pathfm.pipelines.classify.ClassifyResult`
(a clicked tile, the tiles in view, the top tiles of a class) and returns a :class:`GradCAMResult`
whose :meth:`~GradCAMResult.mosaic` lays the maps side by side on the tile grid with the napari
scale/translate that puts them over the slide (contract 4).

Target layers: ``model.gradcam_target_layers()`` when the model defines it (the ``slca`` model
returns its last backbone stage after SLCA fusion); else the last feature stage that timm
records in ``model.feature_info`` (``layer4`` of a ResNet, the last stage of a Swin/ConvNeXt,
the first norm of the last block of a class-token ViT). Token (ViT) and channels-last (Swin)
activations are reshaped to ``(B, C, H, W)`` before Grad-CAM weighs them. Each map is scaled to [0, 1] per tile (as
pytorch-grad-cam does) and resized to the tile's pixels. Importing this module does not import
torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..progress import check_cancel, report

__all__ = ["MAX_TILES", "GradCAMResult", "default_target_layers", "gradcam_images", "gradcam_tiles"]

#: Most tiles one Grad-CAM request computes (the "current view" of a zoomed-out slide is capped).
MAX_TILES = 64


@dataclass
class GradCAMResult:
    """Grad-CAM maps of some tiles of a classified slide.

    Attributes
    ----------
    heat : ndarray float32 (K, T, T)
        One map per tile in [0, 1] at the tile's pixels (the model's input).
    indices : ndarray int64 (K,)
        Tile indices in the classification result's grid.
    targets : ndarray int64 (K,)
        Class index (0-based, model logit) each map explains.
    grid : TileGrid
        The grid the tiles come from (geometry for placing the maps).
    mpp : float or None
        µm/px of the slide's level 0.
    capped : int
        How many requested tiles were left out because of the :data:`MAX_TILES` cap.
    images : ndarray uint8 (K, T, T, 3) or None
        The tiles as the model saw them (before normalisation).
    """

    heat: np.ndarray
    indices: np.ndarray
    targets: np.ndarray
    grid: Any
    mpp: float | None
    capped: int = 0
    images: np.ndarray | None = None

    def empty_tiles(self) -> list[int]:
        """Tiles whose map is all 0: the class has no positive evidence there (Grad-CAM's ReLU)."""
        return [int(i) for i, h in zip(self.indices, self.heat) if not h.any()]

    def mosaic(self) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
        """``(image, scale, translate)``: the maps on their bounding box of the grid, 0 elsewhere.

        ``image`` is float32 ``(rows * T, cols * T)``; ``scale``/``translate`` place it over the
        slide layer (level-0 µm when the µm/px is known, else level-0 pixels).
        """
        from ..coords import layer_transform

        t = int(self.grid.tile_size)
        rc = self.grid.tile_index[self.indices]
        r0, c0 = rc.min(axis=0)
        r1, c1 = rc.max(axis=0) + 1
        img = np.zeros(((r1 - r0) * t, (c1 - c0) * t), np.float32)
        for (r, c), h in zip(rc, self.heat):
            img[(r - r0) * t : (r - r0 + 1) * t, (c - c0) * t : (c - c0 + 1) * t] = h
        cell = float(self.grid.level0_size)
        scale, translate = layer_transform(self.mpp, float(self.grid.scale), (r0 * cell, c0 * cell))
        return img, tuple(map(float, scale)), tuple(map(float, translate))


def _find_num_chs(model: Any) -> int | None:
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["num_chs"]) if isinstance(info, (list, tuple)) else int(info.channels()[-1])
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def default_target_layers(model: Any) -> tuple[list, Callable | None]:
    """``(target layers, reshape_transform)`` Grad-CAM should use for ``model``.

    ``model.gradcam_target_layers()`` wins; else the module of timm's last ``feature_info``
    entry; else the last child module that has parameters.
    """
    if hasattr(model, "gradcam_target_layers"):
        layers = list(model.gradcam_target_layers())
        return layers, getattr(model, "gradcam_reshape_transform", None) or _to_nchw(model, None)
    info = getattr(model, "feature_info", None)
    name = None
    if isinstance(info, (list, tuple)) and info and isinstance(info[-1], dict):
        name = info[-1].get("module")
    elif info is not None and hasattr(info, "module_name"):
        name = info.module_name()[-1]
    if name:
        layer = model.get_submodule(name)
        if getattr(model, "global_pool", None) == "token" and hasattr(layer, "norm1"):
            # class-token ViT: the last block's patch tokens never reach the head, so their gradient is 0;
            # the input of its attention (norm1) does, through the class token (pytorch-grad-cam's ViT recipe)
            layer = layer.norm1
        return [layer], _to_nchw(model, _find_num_chs(model))
    children = [m for m in model.children() if any(True for _ in m.parameters())]
    if not children:
        raise ValueError(f"cannot find a layer for Grad-CAM in {type(model).__name__}")
    return [children[-2] if len(children) > 1 else children[-1]], _to_nchw(model, None)


def _to_nchw(model: Any, num_chs: int | None) -> Callable:
    """Reshape token (B, N, C) and channels-last (B, H, W, C) activations to (B, C, H, W)."""
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)

    def transform(t):
        if t.ndim == 3:  # ViT tokens: drop class/register tokens, fold the rest into a square
            t = t[:, prefix:]
            side = round(t.shape[1] ** 0.5)
            return t.reshape(t.shape[0], side, -1, t.shape[2]).permute(0, 3, 1, 2)
        if t.ndim == 4:
            if num_chs:
                nhwc = t.shape[3] == num_chs and t.shape[1] != num_chs
            else:  # square tiles: (B, S, S, C) with C != S
                nhwc = t.shape[1] == t.shape[2] and t.shape[3] != t.shape[1]
            if nhwc:
                return t.permute(0, 3, 1, 2)
        return t

    return transform


def _logits_module(model: Any):
    """``model`` as a module returning the logits tensor (Grad-CAM needs a tensor, not ``{"logits": ...}``)."""
    import torch

    from .classify import class_logits

    class _Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return class_logits(self.inner(x))

    return _Logits(model)


def gradcam_images(
    model: Any,
    images: np.ndarray,
    targets: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: str = "cpu",
    batch_size: int = 16,
    cancel: Any = None,
) -> np.ndarray:
    """Grad-CAM maps ``(B, T, T)`` in [0, 1] of uint8 tiles ``(B, T, T, 3)`` for class ``targets[i]``.

    The model is run in float32 with gradients (no autocast), in eval mode; hooks are removed
    afterwards.
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from .classify import preprocess_tiles

    layers, reshape = default_target_layers(model)
    wrapped = _logits_module(model).to(device).eval()
    out = []
    with GradCAM(model=wrapped, target_layers=layers, reshape_transform=reshape) as cam:
        for s in range(0, len(images), batch_size):
            check_cancel(cancel, "Grad-CAM")
            x = preprocess_tiles(images[s : s + batch_size], device, mean, std).requires_grad_(True)
            with torch.enable_grad():
                maps = cam(
                    input_tensor=x, targets=[ClassifierOutputTarget(int(k)) for k in targets[s : s + batch_size]]
                )
            out.append(np.asarray(maps, np.float32))
    heat = np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), np.float32)
    return np.clip(np.nan_to_num(heat), 0.0, 1.0)


def gradcam_tiles(
    slide: Any,
    result: Any,
    model_or_checkpoint: Any,
    indices: Sequence[int],
    *,
    target: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_tiles: int = MAX_TILES,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> GradCAMResult:
    """Grad-CAM of tiles ``indices`` of a classification ``result`` of ``slide``.

    Parameters
    ----------
    slide : Slide
        The slide that was classified (tiles are read again, as the classifier saw them).
    result : ClassifyResult
    model_or_checkpoint : path, (model, card) or module
        The classifier (same one as for ``result``).
    indices : sequence of int
        Tiles of ``result.grid``; at most ``max_tiles`` are computed (the first ones; the
        result's ``capped`` says how many were left out).
    target : int, optional
        Class (0-based) every map explains; default each tile's predicted class.
    """
    from ..device import resolve_device
    from ..tiles import iter_tiles
    from .classify import card_normalization, load_classifier

    dev = resolve_device(device)
    model, card, _ = load_classifier(model_or_checkpoint, device=dev)
    idx = np.asarray(indices, np.int64).reshape(-1)
    capped = max(0, idx.size - int(max_tiles))
    idx = idx[: int(max_tiles)]
    if not idx.size:
        raise ValueError("no tiles to explain: pick a classified (tissue) tile")
    pred = result.predicted
    targets = np.full(idx.size, int(target), np.int64) if target is not None else pred[idx].astype(np.int64)
    report(progress, 0, 2, f"Grad-CAM: reading {idx.size} tiles")
    images = np.stack([t.image for t in iter_tiles(slide, result.grid, indices=idx, workers=0, cancel=cancel)])
    check_cancel(cancel, "Grad-CAM")
    report(progress, 1, 2, f"Grad-CAM: {idx.size} tiles")
    mean, std = card_normalization(card)
    heat = gradcam_images(model, images, targets, mean=mean, std=std, device=dev, batch_size=batch_size, cancel=cancel)
    report(progress, 2, 2, "Grad-CAM done")
    return GradCAMResult(
        heat=heat, indices=idx, targets=targets, grid=result.grid, mpp=result.mpp, capped=capped, images=images
    )


def overlay_rgb(tile: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The tile with its heat map (matplotlib ``jet``) blended on top, uint8 RGB."""
    from matplotlib import colormaps

    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * tile.astype(np.float32) + alpha * colour, 0, 255).astype(np.uint8)


def write_top_gradcam(
    slide: Any,
    result: Any,
    model_or_checkpoint: Any,
    out_dir: Any,
    top_n: int,
    *,
    device: str = "auto",
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> list:
    """PNG of the ``top_n`` most probable tiles of each class: the tile beside its Grad-CAM overlay.

    Files are ``<out_dir>/<class>_<rank>_tile<index>.png``; each map explains its class, whatever
    the tile's predicted class. The folder is written as a whole (a temporary folder renamed into
    place at the end, replacing an older one), so a cancel leaves no partial set. Returns the paths.
    """
    from pathlib import Path

    from PIL import Image

    from ..io.atomic import atomic_path
    from .classify import load_classifier

    out = Path(out_dir)
    model_card = load_classifier(model_or_checkpoint, device="cpu")[:2]  # load once for all classes
    names = []
    n_classes = len(result.classes)
    with atomic_path(out, directory=True) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(result.classes):
            report(progress, k, n_classes, f"Grad-CAM: {name}")
            order = np.argsort(-result.probabilities[:, k], kind="stable")[: max(0, int(top_n))]
            if not order.size:
                continue
            cam = gradcam_tiles(slide, result, model_card, order, target=k, device=device, cancel=cancel)
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
            for rank, (i, tile, heat) in enumerate(zip(cam.indices, cam.images, cam.heat), start=1):
                names.append(f"{safe}_{rank}_tile{int(i)}.png")
                image = Image.fromarray(np.concatenate([tile, overlay_rgb(tile, heat)], axis=1))
                image.save(Path(tmp) / names[-1], format="PNG")
    written = [out / n for n in names]
    report(progress, n_classes, n_classes, "Grad-CAM written")
    return written
