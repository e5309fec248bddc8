"""Training Path-SAM2's click/box path (SAM's recipe) inside the segment task.

:func:`prompt_step` is one training step's loss: the class-mask loss of the batch (skipped when only
the prompt path trains) plus ``prompt_weight`` x the loss of one prompt per crop simulated from its
mask (:func:`~napari_pathfm.training.prompt_clicks.simulate_prompts`). With ``optim.trainable:
prompt``, :func:`freeze_all_but_prompts` leaves only the prompt encoder and prompt decoder trainable
and :func:`load_init` lets a checkpoint without them start the prompt decoder as a copy of its class
decoder, so a trained model gains prompting while its automatic masks stay bit for bit the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, RecipeError

__all__ = ["freeze_all_but_prompts", "load_init", "prompt_step"]


def freeze_all_but_prompts(model: Any, prompt_weight: float) -> None:
    """Only ``model.prompt_path()`` trains (a :class:`~napari_pathfm.errors.RecipeError` without one)."""
    path = model.prompt_path() if hasattr(model, "prompt_path") else []
    if not path or prompt_weight <= 0:
        raise RecipeError(
            "<recipe>",
            "optim.trainable is 'prompt' but the model has no click/box path or loss.prompt_weight is 0.",
            "Set model.prompts: true and loss.prompt_weight > 0 (e.g. 1.0), or optim.trainable: all.",
        )
    model.requires_grad_(False)
    for module in path:
        module.requires_grad_(True)


def load_init(model: Any, init: Path) -> None:
    """``data.init_checkpoint``'s weights, exactly; only a click/box path the file lacks is new (its decoder
    copied from the class decoder, :meth:`~napari_pathfm.models.pathsam2.PathSAM2.prompt_init`)."""
    from ..models.weights import load_into, load_state_dict_file

    state = load_state_dict_file(init)
    if hasattr(model, "prompt_init") and not any(k.startswith("prompt_decoder.") for k in state):
        state = {**state, **model.prompt_init(state)}  # a new prompt decoder starts as the class decoder
    report = load_into(model, state, source=init, dry_run=True)
    new_path = tuple(getattr(type(model), "prompt_path_keys", ()))
    missing = [k for k in report.missing if not k.startswith(new_path)]
    if missing or report.unexpected or report.mismatched:
        raise CheckpointError(
            init, f"does not fit the model: {report}.", "Use the checkpoint made for this model and config."
        )
    load_into(model, state, source=init)


def prompt_step(task: Any, batch: dict) -> tuple[Any, dict]:
    """``(loss, parts)`` of one batch for ``task`` (a SegmentTask); loss None: nothing to learn, skip."""
    from ..models.pathsam2.loss import prompt_loss
    from .prompt_clicks import simulate_prompts

    model = task.model
    x = model.preprocess(batch["image"])
    if task.prompt_only:  # frozen encoders and class masks: no graph for them, no class loss
        with torch.no_grad():
            encoded = model.encode(x)
        loss, parts = x.new_zeros(()), {}
    else:
        encoded = model.encode(x)
        loss, parts = task.loss(model.decode(x, encoded), batch["mask"], weighted=True)
    masks = batch["mask"]
    p = simulate_prompts(masks.cpu().numpy(), task._prompt_rng, scale=x.shape[-1] / masks.shape[-1])
    if p is None:
        return (None if task.prompt_only else loss), parts  # None: Lightning skips the step
    idx = torch.as_tensor(p["index"], device=x.device)

    def as_t(a):
        return None if a is None else torch.as_tensor(a, device=x.device)

    logits = model.decode_prompt(
        x[idx], {k: v[idx] for k, v in encoded.items()}, as_t(p["points"]), as_t(p["labels"]), as_t(p["boxes"])
    )
    extra = prompt_loss(logits, as_t(p["targets"]).long(), ignore_index=task.ignore_index)
    return loss + task.prompt_weight * extra, {**(parts or {}), "prompt": extra.detach()}
