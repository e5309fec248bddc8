"""Fine-tune a segmentation checkpoint on painted corrections (the human-in-the-loop step).

:func:`finetune_recipe` turns a checkpoint's model card and a corrections
folder (``images/`` + ``masks/`` written by
:class:`~napari_pathfm.pipelines.corrections.CorrectionRecorder`) into an
ordinary ``segment`` recipe: same model and classes, weights initialised from
the checkpoint (``data.init_checkpoint``), tiles at the model's µm/px, the loss
terms it was trained with (:data:`INHERITED_LOSS`, e.g. the bundled model's border weights), the
checkpoint's own training data optionally mixed in (``base_root``). The
training goes through the one engine (progress, Stop, logs), and the result is a
NEW checkpoint in its own run folder: the starting checkpoint is never touched.

Run folders live in the per-user data folder (:func:`napari_pathfm.userdata.finetune_dir`
of the slide named in ``corrections.json``), never beside the slide. One corrected tile is
enough: it is then all training data and only the last epoch is kept; from two tiles on
about a fifth of them (at least one) is held out for validation and the epoch with the best
validation metric is exported. A fine-tune that fails or is stopped removes its run folder,
so nothing half-made is left behind (the corrections themselves are never touched).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import Cancelled, CorrectionError

__all__ = ["INHERITED_LOSS", "default_output", "finetune_from_corrections", "finetune_recipe"]

#: Loss settings a fine-tune takes over from the checkpoint's training recipe (its card's ``recipe.loss``).
INHERITED_LOSS = ("alpha", "beta", "border_weight", "border_sigma_um")


def _pairs(folder: Path) -> list[str]:
    masks = {p.stem for p in (folder / "masks").glob("*.png")}
    return sorted(p.stem for p in (folder / "images").glob("*.png") if p.stem in masks)


def default_output(checkpoint: str | Path, corrections: str | Path) -> Path:
    """A new run folder ``<finetune_dir(slide)>/<checkpoint stem>-ft-<time>`` (not created here).

    The slide is the one named in ``corrections.json``; a folder without a manifest
    gets ``<data>/finetune/<corrections folder name>/``. The name is made unique.
    """
    from ..userdata import data_dir, finetune_dir

    corrections = Path(corrections)
    slide = None
    manifest = corrections / "corrections.json"
    if manifest.is_file():
        try:
            slide = json.loads(manifest.read_text(encoding="utf-8")).get("slide")
        except (OSError, ValueError):
            slide = None
    parent = finetune_dir(slide) if slide else data_dir() / "finetune" / corrections.name
    base = f"{Path(checkpoint).name.split('.')[0]}-ft-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = parent / base, 1
    while out.exists():
        n += 1
        out = parent / f"{base}-{n}"
    return out


def finetune_recipe(
    checkpoint: str | Path,
    corrections: str | Path,
    *,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 4,
    base_root: str | Path | None = None,
    output: str | Path | None = None,
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
        Run folder (default: :func:`default_output`).
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
            corrections,
            "holds no corrected tiles (images/*.png with masks/*.png).",
            "Paint on the segmentation layer with 'Record corrections' on, then fine-tune.",
        )
    tile = int(card.get("tile_size") or (card.get("config") or {}).get("image_size") or 256)
    mpp = card.get("input_mpp")
    corr = {"path": str(corrections), "mpp": mpp, "mask_format": "index"}
    if base_root is None:
        from .segment_data import split_names

        # one tile: all of it trains, no validation (the engine then keeps the last epoch);
        # two or more: a seeded ~20 % (at least one tile) is held out and picks the best epoch
        _, val = split_names(names, val_fraction=0.2, seed=seed) if len(names) > 1 else (names, [])
        data = {"root": str(corrections), "mask_format": "index", "mpp": mpp, "val_names": val, "extra_dirs": []}
    else:
        data = {"root": str(base_root), "extra_dirs": [{**corr, "repeat": 4}], "mpp": card.get("data_mpp") or mpp}
    data.update(
        classes=list(card.get("classes") or []),
        input_mpp=mpp,
        tile_size=tile,
        init_checkpoint=str(weights),
        samples_per_image=2,
        ignore_index=int(card.get("ignore_index", 255)),
    )
    # the loss the checkpoint was trained with (its card's resolved recipe): a fine-tune of the bundled
    # model keeps its border weights, so corrections do not teach it to merge neighbouring glands again
    trained = (card.get("recipe") or {}).get("loss") or {}
    loss = {k: trained[k] for k in INHERITED_LOSS if trained.get(k) is not None}
    config = {
        "family": "segment",
        "description": f"Fine-tune of {weights.name} on {len(names)} corrected tiles from {corrections}.",
        "seed": int(seed),
        "output": str(output or default_output(weights, corrections)),
        "model": {"name": card["name"]},
        "data": data,
        "loss": loss,
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
    base_root: str | Path | None = None,
    output: str | Path | None = None,
    device: str = "auto",
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    on_event: Callable[[dict], Any] | None = None,
) -> Path:
    """Run :func:`finetune_recipe` through the engine; returns the new checkpoint's ``.safetensors``.

    ``on_event`` receives the engine's training events (the dock keeps them as the run's log).
    A Stop (``cancel``) ends training at the next batch and raises
    :class:`~napari_pathfm.errors.Cancelled`; a stop or any failure removes the run folder
    this call made (a folder that already existed is left alone), so no half-made model stays.
    """
    from .engine import run_recipe

    recipe = finetune_recipe(checkpoint, corrections, epochs=epochs, lr=lr, base_root=base_root, output=output)
    out = Path(recipe.get("output"))
    made = not out.exists()
    try:
        result = run_recipe(recipe, device=device, progress=progress, cancel=cancel, on_event=on_event, resume=False)
        if result.cancelled:
            raise Cancelled("fine-tuning stopped by the user; no new model was kept.")
        if result.checkpoint is None or not Path(result.checkpoint).is_file():
            raise CorrectionError(
                corrections,
                "fine-tuning ended before the first epoch; nothing was saved.",
                "Let it run at least one epoch.",
            )
    except BaseException:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return Path(result.checkpoint)
