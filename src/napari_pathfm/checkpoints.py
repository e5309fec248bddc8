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
