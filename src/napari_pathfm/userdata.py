"""Where the files a user makes in the GUI live: one per-user data folder, never beside the slide.

Slides often sit on read-only archives or shared folders, and the current directory of a napari
session is arbitrary, so painted corrections, fine-tuned models and training runs go to the
per-user data folder of the platform (``platformdirs``: ``~/.local/share/napari-pathfm`` on
Linux, ``~/Library/Application Support/napari-pathfm`` on macOS, ``%LOCALAPPDATA%`` on Windows),
or ``$PATHFM_DATA_DIR`` when set (tests, clusters)::

    <data>/corrections/<slide stem>-<key>/   painted corrections of one slide (tiles + manifest)
    <data>/finetune/<slide stem>-<key>/      models fine-tuned on those corrections
    <data>/runs/<name>/                      training runs started from the panel

``<key>`` identifies the slide file by its resolved path (a copy elsewhere is another slide):
reopening the same slide finds its corrections again.

>>> corrections_dir("/archive/CMU-1.svs").parent.name    # doctest: +SKIP
'corrections'
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = ["corrections_dir", "data_dir", "finetune_dir", "runs_dir", "slide_key"]

APP = "napari-pathfm"


def data_dir() -> Path:
    """The per-user data folder (``$PATHFM_DATA_DIR`` or the platform's user data folder)."""
    env = os.environ.get("PATHFM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def slide_key(slide_path: str | os.PathLike) -> str:
    """``<stem>-<8 hex>`` naming one slide file: its stem (readable) and a hash of its resolved path."""
    p = Path(slide_path).expanduser().resolve()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", p.name.split(".")[0] or "slide")[:60]
    return f"{stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def corrections_dir(slide_path: str | os.PathLike) -> Path:
    """Folder of the painted corrections of ``slide_path`` (not created here)."""
    return data_dir() / "corrections" / slide_key(slide_path)


def finetune_dir(slide_path: str | os.PathLike) -> Path:
    """Folder of the models fine-tuned on the corrections of ``slide_path`` (not created here)."""
    return data_dir() / "finetune" / slide_key(slide_path)


def runs_dir() -> Path:
    """Default parent folder of training runs started from the panel (not created here)."""
    return data_dir() / "runs"
