"""Fine-tune a segmentation checkpoint on painted corrections (the human-in-the-loop step).

:func:`finetune_recipe` turns a checkpoint's model card and a corrections
folder (``images/`` + ``masks/`` written by
:class:`~napari_pathfm.pipelines.corrections.CorrectionRecorder`) into an
ordinary ``segment`` recipe: same model and classes, weights initialised from
the checkpoint (``data.init_checkpoint``), tiles at the model's µm/px, the
checkpoint's own training data optionally mixed in (``base_root``). The
training goes through the one engine (progress, Stop, logs), and the result is a
NEW checkpoint in its own run folder: the starting checkpoint is never touched.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import CorrectionError

__all__ = ["finetune_recipe", "finetune_from_corrections"]


def _pairs(folder: Path) -> list[str]:
    masks = {p.stem for p in (folder / "masks").glob("*.png")}
    return sorted(p.stem for p in (folder / "images").glob("*.png") if p.stem in masks)


def finetune_recipe(
    checkpoint: str | Path,
    corrections: str | Path,
    *,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 4,
    base_root: Optional[str | Path] = None,
    output: Optional[str | Path] = None,
    seed: int = 0,
):
    """A ``segment`` recipe that continues training ``checkpoint`` on the corrections.

    Parameters
    ----------
    checkpoint : path
        The segmentation checkpoint that made the mask (``.safetensors`` with its card).
    corrections : path
        Folder with ``images/`` + ``masks/`` PNG pairs (+ ``corrections.json``).
    epochs, lr, batch_size : training length, learning rate and crops per step.
    base_root : path, optional
        The original ``images/`` + ``masks/`` data, mixed in so the model does not
        forget it (the corrections are then repeated to keep their weight).
    output : path, optional
        Run folder (default: ``<corrections>/finetune/<checkpoint stem>-<time>``).
    """
    from ..models.checkpoint import checkpoint_paths, read_card, refuse_pickle
    from .recipes import Recipe, load_recipe

    refuse_pickle(checkpoint)  # a .pt/.ckpt: say what it is, not "card not found"
    weights, card_path = checkpoint_paths(checkpoint)
    card = read_card(card_path)
    corrections = Path(corrections)
    names = _pairs(corrections)
    if not names:
        raise CorrectionError(
            corrections, "holds no corrected tiles (images/*.png with masks/*.png).",
            "Paint on the segmentation layer with 'Record corrections' on, then fine-tune.",
        )  # fmt: skip
    tile = int(card.get("tile_size") or (card.get("config") or {}).get("image_size") or 256)
    mpp = card.get("input_mpp")
    corr = {"path": str(corrections), "mpp": mpp, "mask_format": "index"}
    if base_root is None:
        data = {"root": str(corrections), "mask_format": "index", "mpp": mpp,
                "val_names": names[:1] if len(names) > 1 else [], "extra_dirs": []}  # fmt: skip
    else:
        data = {"root": str(base_root), "extra_dirs": [{**corr, "repeat": 4}], "mpp": card.get("data_mpp") or mpp}
    data.update(
        classes=list(card.get("classes") or []), input_mpp=mpp, tile_size=tile, init_checkpoint=str(weights),
        samples_per_image=2, ignore_index=int(card.get("ignore_index", 255)),
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = {
        "family": "segment",
        "description": f"Fine-tune of {weights.name} on {len(names)} corrected tiles from {corrections}.",
        "seed": int(seed),
        "output": str(output or corrections / "finetune" / f"{weights.stem}-ft-{stamp}"),
        "model": {"name": card["name"]},
        "data": data,
        "optim": {"name": "adamw", "lr": float(lr), "weight_decay": 1e-2},
        "trainer": {"max_epochs": int(epochs), "batch_size": int(batch_size), "accelerator": "auto", "devices": 1},
    }
    return load_recipe(Recipe(config, None))


def finetune_from_corrections(
    checkpoint: str | Path,
    corrections: str | Path,
    *,
    epochs: int = 5,
    lr: float = 1e-4,
    base_root: Optional[str | Path] = None,
    device: str = "auto",
    progress: Optional[Callable[..., Any]] = None,
    cancel: Any = None,
) -> Path:
    """Run :func:`finetune_recipe` through the engine; returns the new checkpoint's ``.safetensors``.

    A Stop (``cancel``) ends training at the next batch; the weights of the last
    finished epoch are still exported when there is one.
    """
    from .engine import run_recipe

    recipe = finetune_recipe(checkpoint, corrections, epochs=epochs, lr=lr, base_root=base_root)
    result = run_recipe(recipe, device=device, progress=progress, cancel=cancel)
    if result.checkpoint is None:
        raise CorrectionError(corrections, "fine-tuning stopped before the first epoch ended; nothing was saved.",
                              "Let it run at least one epoch.")  # fmt: skip
    return Path(result.checkpoint)
