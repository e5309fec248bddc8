"""Where widgets and the CLI look for checkpoints, without importing torch.

Checkpoints are found in, in order: the package's bundled models, the user's model
folder (``$PATHFM_MODELS`` or ``~/.napari-pathfm/models``), the training panel's runs
folder (``<per-user data folder>/runs``), and any extra folders
registered at run time (e.g. a training run's output), so a freshly trained
model shows up in every inference widget's list.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_MODELS = Path(__file__).parent / "data" / "models"
_EXTRA: list[Path] = []


def user_models_dir() -> Path:
    return Path(os.environ.get("PATHFM_MODELS", Path.home() / ".napari-pathfm" / "models"))


def add_search_folder(folder: str | Path) -> None:
    """Make checkpoints in ``folder`` (and its immediate subfolders) visible to every widget."""
    p = Path(folder).resolve()
    if p not in _EXTRA:
        _EXTRA.append(p)


def search_folders() -> list[Path]:
    """Bundled models, the user's model folder, the training panel's runs folder, then registered folders.

    The runs folder (``userdata.runs_dir()``, one sub-folder per run) is always searched, so a
    model trained from the panel is listed in every inference widget, in this session and later ones.
    """
    from .userdata import runs_dir

    return [BUNDLED_MODELS, user_models_dir(), runs_dir().resolve(), *_EXTRA]


def find_checkpoints(family: str | None = None) -> list[tuple[Path, dict]]:
    """``(weights path, card)`` of every readable checkpoint in the search folders, optionally one family."""
    from .models.checkpoint import list_checkpoints

    seen: set[Path] = set()
    found = []
    for folder in search_folders():
        if not folder.is_dir():
            continue
        for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
            for weights, card in list_checkpoints(sub):
                if weights in seen or (family and card.get("family") != family):
                    continue
                seen.add(weights)
                found.append((weights, card))
    return found


def describe_checkpoint(weights: Path, card: dict) -> dict:
    """What a user needs to judge a checkpoint, from its card: where it is, what it was trained on, how,
    how good it is measured and against what, its licence and intended use (missing entries are None).

    ``evaluation`` is the card's ``evaluation.summary`` (the bundled models' cross-validated numbers
    with their baselines), else its best validation metrics, labelled as such.
    """
    where = "bundled" if weights.parent.resolve() == BUNDLED_MODELS.resolve() else str(weights.parent)
    evaluation = (card.get("evaluation") or {}).get("summary")
    if evaluation is None:
        best = ((card.get("metrics") or {}).get("best")) or {}
        shown = {k: round(v, 3) for k, v in best.items() if k.startswith("val_") and isinstance(v, float)}
        evaluation = f"validation split only: {shown}" if shown else None
    recipe = card.get("recipe") or {}
    return {
        "name": weights.stem,
        "family": card.get("family"),
        "model": card.get("name"),
        "where": where,
        "description": card.get("description"),
        "training_data": card.get("training_data"),
        "training_budget": card.get("training_time"),
        "command": card.get("command") or (f"pathfm train {card['recipe_file']}" if card.get("recipe_file") else None),
        "evaluation": evaluation,
        "licence": card.get("licence") or card.get("data_license") or (recipe.get("licence") if recipe else None),
        "intended_use": card.get("intended_use"),
    }
