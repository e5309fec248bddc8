"""Foundation-model files on this machine: the local Hugging Face cache and model folders, never the network.

A foundation model is named the way timm names it, ``hf-hub:ORG/NAME`` (optionally ``@REVISION``),
or given as a folder in the same layout (``config.json`` plus ``model.safetensors`` or
``pytorch_model.bin``, as timm's ``push_to_hub``/``save_for_hf`` write them). A hub name is looked
up in the Hugging Face cache only, with ``huggingface_hub.try_to_load_from_cache`` (which reads
``refs/<revision>`` and the ``snapshots/<commit>/`` folder; it never connects). The cache folder
is the one ``huggingface_hub`` uses, computed from the environment *now* (so a changed
``HF_HUB_CACHE`` counts)::

    $HF_HUB_CACHE                       (or the older $HUGGINGFACE_HUB_CACHE)
    $HF_HOME/hub                        (HF_HOME defaults to $XDG_CACHE_HOME/huggingface,
                                         then ~/.cache/huggingface)
        models--ORG--NAME/refs/main                 commit hash of the "main" revision
        models--ORG--NAME/snapshots/<commit>/       config.json, model.safetensors (links into blobs/)
        models--ORG--NAME/blobs/<sha256>            large files are named by their sha256

A name that is not there raises :class:`~napari_pathfm.errors.InputError` (exit code 2) saying
where it looked and how to get the files onto this machine; nothing is ever downloaded and no
randomly initialised network stands in for a missing one. This module does not import torch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = [
    "WEIGHT_FILES",
    "LocalModel",
    "blob_sha256",
    "find_local_models",
    "hub_cache_dir",
    "is_foundation_name",
    "resolve_local_model",
    "split_hub_name",
]

#: Name prefixes of models on the Hugging Face Hub (timm's spelling and its alias) and of local folders.
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
LOCAL_PREFIX = "local-dir:"
#: Weight files of a model folder, in timm's order of preference (``timm.models._hub._PREFERRED_FILES``).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder as ``huggingface_hub`` would choose it from the environment now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def split_hub_name(name: str) -> tuple[str, str | None]:
    """``"hf-hub:ORG/NAME@rev"`` → ``("ORG/NAME", "rev")``; the revision is None when not given."""
    repo = str(name)
    for prefix in HUB_PREFIXES:
        repo = repo.removeprefix(prefix)
    repo, _, revision = repo.partition("@")
    return repo, revision or None


def is_foundation_name(name: object) -> bool:
    """True for ``hf-hub:ORG/NAME``, ``local-dir:FOLDER`` and an existing folder holding ``config.json``."""
    text = str(name)
    if text.startswith(HUB_PREFIXES) or text.startswith(LOCAL_PREFIX):
        return True
    return (Path(text).expanduser() / "config.json").is_file()


@dataclass(frozen=True)
class LocalModel:
    """A foundation model found on this machine.

    Attributes
    ----------
    name : str
        How it is named in outputs and cards: ``"hf-hub:ORG/NAME"`` or the folder.
    repo_id : str or None
        ``"ORG/NAME"`` for models of the hub cache.
    folder : Path
        The snapshot (or model) folder holding ``config.json``.
    config : dict
        ``config.json`` as timm writes it (``architecture``, ``num_classes``, ``model_args``,
        ``pretrained_cfg``); empty when the folder has none.
    weights : Path
        The weights file used (``model.safetensors`` preferred).
    """

    name: str
    repo_id: str | None
    folder: Path
    config: dict
    weights: Path

    @property
    def architecture(self) -> str | None:
        """The timm architecture of ``config.json`` (legacy single-dict configs included)."""
        return self.config.get("architecture") or (self.config.get("pretrained_cfg") or {}).get("architecture")

    def as_dict(self) -> dict:
        """JSON-friendly summary (no hashing: that reads the whole file)."""
        return {
            "name": self.name,
            "repo_id": self.repo_id,
            "folder": str(self.folder),
            "architecture": self.architecture,
            "weights": str(self.weights),
            "bytes": self.weights.stat().st_size,
        }


def _read_config(folder: Path, where: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"is not a readable JSON model config ({exc}).", f"Re-download {where}.") from exc
    if not isinstance(config, dict):
        raise InputError(path, "is not a model config (a JSON object).", f"Re-download {where}.")
    return config


def _weights_in(folder: Path) -> Path | None:
    return next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)


def _not_found(name: str, problem: str) -> InputError:
    repo, _ = split_hub_name(name)
    return InputError(
        name,
        f"{problem} pathfm never downloads models.",
        f"On a machine with internet, run `hf download {repo}` (older huggingface_hub: `huggingface-cli download "
        f"{repo}`; gated models need `hf auth login` and accepted terms first), then copy its cache folder "
        f"models--{repo.replace('/', '--')} into {hub_cache_dir()} here (or point HF_HUB_CACHE / HF_HOME at a "
        "copy), or pass a folder holding config.json and model.safetensors. `pathfm models list` shows what is "
        "found.",
    )


def _cached_spelling(cache: Path, repo: str) -> str:
    """``repo`` as the cache spells it: the hub ignores case (MahmoodLab/uni is MahmoodLab/UNI), folders do not."""
    folder = f"models--{repo.replace('/', '--')}"
    if (cache / folder).is_dir() or not cache.is_dir():
        return repo
    match = next((p.name for p in cache.glob("models--*") if p.name.lower() == folder.lower()), None)
    return match[len("models--") :].replace("--", "/", 1) if match else repo


def _from_hub(name: str) -> LocalModel:
    from huggingface_hub import try_to_load_from_cache

    repo, revision = split_hub_name(name)
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InputError(name, "is not a Hugging Face model name.", "Write it as hf-hub:ORG/NAME.")
    cache = hub_cache_dir()
    repo = _cached_spelling(cache, repo)
    found = try_to_load_from_cache(repo, "config.json", cache_dir=cache, revision=revision)
    if not isinstance(found, str):
        where = cache / f"models--{repo.replace('/', '--')}"
        what = f"revision {revision!r}" if revision else "the main revision"
        raise _not_found(name, f"is not in the local Hugging Face cache ({what} with a config.json under {where}).")
    folder = Path(found).parent
    weights = _weights_in(folder)
    if weights is None:
        raise _not_found(name, f"has a config.json in {folder} but no weights file ({' or '.join(WEIGHT_FILES)}).")
    label = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    return LocalModel(label, repo, folder, _read_config(folder, repo), weights)


def _from_folder(name: str, folder: Path) -> LocalModel:
    if not folder.is_dir():
        raise InputError(folder, "is not a folder.", "Give a model folder holding config.json and model.safetensors.")
    weights = _weights_in(folder)
    if weights is None:
        raise InputError(
            folder, f"holds no weights file ({' or '.join(WEIGHT_FILES)}).", "Copy the model's weights into it."
        )
    config = _read_config(folder, str(folder))
    repo = (config.get("pretrained_cfg") or {}).get("hf_hub_id")
    return LocalModel(str(folder), repo, folder, config, weights)


def resolve_local_model(name: str) -> LocalModel:
    """Find a foundation model on this machine, without any network access.

    Parameters
    ----------
    name : str
        ``"hf-hub:ORG/NAME[@REVISION]"`` (looked up in :func:`hub_cache_dir`),
        ``"local-dir:FOLDER"`` or a folder path.

    Returns
    -------
    LocalModel

    Raises
    ------
    InputError
        Not in the cache, no weights file, or an unreadable ``config.json``: the message says
        where it looked and how to bring the model here.
    """
    text = str(name)
    if text.startswith(HUB_PREFIXES):
        return _from_hub(text)
    folder = Path(text.removeprefix(LOCAL_PREFIX)).expanduser()
    return _from_folder(text, folder)


def find_local_models(folders: list | tuple = ()) -> list[LocalModel]:
    """The models of the hub cache (their main revision) and of ``folders``, skipping incomplete ones.

    A cached model without a ``refs/main`` (downloaded by commit) is listed by its newest snapshot.
    """
    found: list[LocalModel] = []
    cache = hub_cache_dir()
    repos = sorted(cache.glob("models--*--*")) if cache.is_dir() else []
    for repo_dir in repos:
        repo = repo_dir.name[len("models--") :].replace("--", "/", 1)
        try:
            found.append(_from_hub(f"hf-hub:{repo}"))
            continue
        except InputError:
            pass
        snapshots = sorted(repo_dir.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime)
        if snapshots and _weights_in(snapshots[-1].parent):
            folder = snapshots[-1].parent
            found.append(
                LocalModel(
                    f"hf-hub:{repo}@{folder.name}", repo, folder, _read_config(folder, repo), _weights_in(folder)
                )
            )
    for folder in folders:
        try:
            found.append(_from_folder(str(folder), Path(folder)))
        except InputError:
            continue
    return found


def blob_sha256(path: str | Path) -> str | None:
    """The sha256 the Hugging Face cache names a file by, or None (small files, plain folders).

    Large (LFS) files of the cache are links ``snapshots/<commit>/<file> -> ../../blobs/<sha256>``:
    the blob's name is the sha256 the hub computed at upload, so hashing the file proves it intact.
    """
    p = Path(path)
    if not p.is_symlink():
        return None
    name = Path(os.readlink(p)).name
    return name if _SHA256.match(name) else None
