"""The segmentation model of a run: which checkpoint, its classes, its tile geometry, its logits.

:func:`load_segmentation_model` turns a checkpoint path, a ``(model, card)`` pair or a module into
``(model, card, source)`` and refuses checkpoints of other families; :func:`tile_logits` runs it
on one batch of tiles (through the embedding cache where the model has the cache protocol).
Used by :func:`~napari_pathfm.pipelines.segment.segment_slide`. Importing this module does not
import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = [
    "class_names",
    "default_segment_checkpoint",
    "encoder_preprocess",
    "load_segmentation_model",
    "tile_geometry",
    "tile_logits",
]


def default_segment_checkpoint() -> Path:
    """The checkpoint ``pathfm segment`` uses without ``--checkpoint``.

    The first checkpoint of family ``"segment"`` found by
    :func:`napari_pathfm.checkpoints.find_checkpoints`, preferring the bundled
    ``pathsam2-glas-*`` model, then other bundled ones, then the user's model folder.

    Raises
    ------
    CheckpointError
        No segmentation checkpoint is installed; the message says how to get one.
    """
    from ..checkpoints import BUNDLED_MODELS, find_checkpoints, user_models_dir

    found = find_checkpoints("segment")

    def rank(item: tuple[Path, dict]) -> tuple[int, int]:
        path = item[0]
        bundled = path.parent.resolve() == BUNDLED_MODELS.resolve()
        return (0 if bundled else 1, 0 if path.name.startswith("pathsam2-glas") else 1)

    if not found:
        raise CheckpointError(
            BUNDLED_MODELS,
            f"holds no segmentation model, and none was found in {user_models_dir()} either.",
            "Pass a checkpoint with --checkpoint (a .safetensors + .json pair of family 'segment'), "
            "train one with `pathfm train training/pathsam2/<recipe>.yaml`, or copy one into the user "
            "model folder (set PATHFM_MODELS to use another folder).",
        )
    return min(found, key=rank)[0]


def load_segmentation_model(model_or_checkpoint: Any = None, device: str = "cpu") -> tuple[Any, dict, str | None]:
    """``(model, card, source)`` from a checkpoint path, a ``(model, card)`` pair or a module.

    ``None`` loads :func:`default_segment_checkpoint`. A checkpoint of another family, or a card
    whose class list does not match the model's number of outputs, is a
    :class:`~napari_pathfm.errors.CheckpointError`.
    """
    if model_or_checkpoint is None:
        model_or_checkpoint = default_segment_checkpoint()
    if isinstance(model_or_checkpoint, (str, Path)):
        from ..models.checkpoint import load_family_checkpoint

        source = str(model_or_checkpoint)
        model, card = load_family_checkpoint(model_or_checkpoint, "segment", device=device)
    elif isinstance(model_or_checkpoint, tuple):
        model, card = model_or_checkpoint
        source = card.get("weights_file")
    else:
        model, card, source = model_or_checkpoint, dict(getattr(model_or_checkpoint, "pathfm_card", None) or {}), None
    k = getattr(model, "num_classes", None)
    names = card.get("classes")
    if names is not None and k is not None and len(names) != int(k):
        raise CheckpointError(
            source or "the model card",
            f"lists {len(names)} classes ({', '.join(map(str, names))}) but the model predicts {int(k)}.",
            "Use the card that was saved with these weights, or fix its 'classes'.",
        )
    return model, dict(card), source


def class_names(card: dict, k: int | None) -> list[str] | None:
    """Class names of the card, else ``background, class 1, ...`` for ``k`` outputs (None: unknown yet)."""
    names = card.get("classes")
    if names:
        return [str(n) for n in names]
    if k is None:
        return None
    return ["background"] + [f"class {i}" for i in range(1, int(k))]


def encoder_preprocess(model: Any) -> dict:
    """How tiles become ``model``'s encoder input (normalisation, input size): part of the embedding cache
    key, so a segment run and a prompt session on the same slide share their cached tiles."""
    return {
        "mean": list(getattr(model, "mean", ())),
        "std": list(getattr(model, "std", ())),
        "input_size": getattr(model, "input_size", None),
    }


def tile_geometry(model: Any, card: dict, tile_size: int | None, overlap: float) -> tuple[int, int]:
    """``(tile side, overlap in pixels)`` at the model's µm/px: the argument, else the card's, else the model's."""
    t = int(tile_size or card.get("tile_size") or getattr(model, "input_size", 0) or 256)
    if t < 16:
        raise ValueError(f"tile_size must be at least 16 pixels, got {t}")
    px = int(round(overlap * t)) if 0 <= overlap < 1 else int(overlap)
    if not 0 <= px < t:
        raise ValueError(f"overlap must be a fraction in [0, 1) or a pixel count below the tile size, got {overlap}")
    return t, px


def tile_logits(
    model: Any, batch: Any, dev: str, t: int, k: int | None, source: Any, encoder: Any = None, flips: bool = False
):
    """Model logits of a batch of uint8 tiles as ``(B, K, T, T)`` float32 torch on ``dev``.

    With an active :class:`~napari_pathfm.tiles.cached_encoder.CachedEncoder` the encoder outputs come
    from the embedding cache where stored (``batch.images`` is None when all of them are). With
    ``flips`` the logits are the mean over the tile and its three mirror images
    (:func:`~.tile_run.flip_average`) through ``model(x)``: the cache holds unflipped tiles only, so
    a flips run opens none and needs the pixels of every tile.
    """
    import torch
    import torch.nn.functional as F

    from .tile_run import flip_average

    def logits_of(out: Any) -> Any:
        return (out["logits"] if isinstance(out, dict) else out).float()

    x = None if batch.images is None else model.preprocess(torch.from_numpy(batch.images).to(dev)).to(dev)
    if flips:  # through forward: the cache holds the encoder outputs of unflipped tiles only
        logits = flip_average(lambda v: logits_of(model(v)), x)
    elif encoder is not None and encoder.active:
        logits = logits_of(model.decode(x, encoder(batch.indices, x, dev)))
    else:
        logits = logits_of(model(x))
    if logits.ndim != 4 or (k is not None and logits.shape[1] != k):
        raise CheckpointError(
            source or "the model",
            f"produced logits of shape {tuple(logits.shape)}, expected {k} classes "
            "(B, K, H, W) as its model card says.",
            "Use the card saved with these weights.",
        )
    if tuple(logits.shape[-2:]) != (t, t):
        logits = F.interpolate(logits, size=(t, t), mode="bilinear", align_corners=False)
    return logits
