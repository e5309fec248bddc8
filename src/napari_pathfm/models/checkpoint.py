"""Our checkpoint format: ``X.safetensors`` weights beside an ``X.json`` model card.

The card says everything needed to use the weights without the training code:
registry name + config (to rebuild the module), classes, normalisation, input
µm/px, tile size, training data, metrics, package version, creation time and the
sha256 of the weights file. Both files are written atomically
(:func:`napari_pathfm.io.atomic.atomic_path`: temporary file in the same folder,
then ``os.replace``) so an interrupted save never leaves a
half-written checkpoint over a good one. :func:`read_card` needs only ``json``, so
widgets can list checkpoints without importing torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..io import jsonsafe
from ..io.atomic import atomic_path

__all__ = [
    "CARD_FORMAT",
    "card_family",
    "check_family",
    "checkpoint_paths",
    "list_checkpoints",
    "load_any",
    "load_checkpoint",
    "load_family_checkpoint",
    "read_card",
    "refuse_pickle",
    "save_checkpoint",
]

CARD_FORMAT = "napari-pathfm-checkpoint/1"


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, card)`` paths for ``X``, ``X.safetensors`` or ``X.json``."""
    path = Path(path)
    if path.suffix.lower() in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.parent / (path.name + ".safetensors"), path.parent / (path.name + ".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"model card value of type {type(obj).__name__} is not JSON serialisable")


def _cpu_tensors(model) -> dict:
    """State dict as contiguous CPU tensors; tensors sharing memory are cloned (safetensors needs that)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def save_checkpoint(model, path: str | Path, card: dict | None = None) -> Path:
    """Write ``model``'s weights to ``X.safetensors`` and its card to ``X.json``.

    Parameters
    ----------
    model : torch.nn.Module
        Built by :func:`~napari_pathfm.models.create_model` (so it carries
        ``pathfm_config``), or ``card`` must give ``name`` and ``config``.
    path : str or Path
        ``X``, ``X.safetensors`` or ``X.json``.
    card : dict, optional
        Extra card fields: ``classes``, ``normalization`` (``{"mean", "std"}``),
        ``input_mpp``, ``tile_size``, ``training_data``, ``metrics``, ... They
        override the defaults; version, time and sha256 are always filled in.

    Returns
    -------
    Path
        The ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    from .. import __version__
    from .registry import model_info

    weights_path, card_path = checkpoint_paths(path)
    card = dict(card or {})
    recorded = dict(getattr(model, "pathfm_config", None) or {})
    name = card.get("name") or recorded.pop("name", None)
    recorded.pop("name", None)
    config = card.get("config", recorded)
    if not name:
        raise ValueError("save_checkpoint needs a model built by create_model or card['name'] and card['config']")
    try:
        family = model_info(name)["family"]
    except KeyError:
        family = ""
    full = {
        "format": CARD_FORMAT,
        "family": family,
        "classes": None,
        "normalization": None,
        "input_mpp": None,
        "tile_size": None,
        "training_data": None,
        "metrics": {},
        **card,
        "name": name,
        "config": config,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_file": weights_path.name,
    }
    if getattr(model, "pathfm_foundation", None) and "foundation_weights" not in full:
        full["foundation_weights"] = model.pathfm_foundation  # name + sha256 of the foundation weights it started from
    tensors = _cpu_tensors(model)
    full["num_parameters"] = int(sum(p.numel() for p in model.parameters()))

    json.dumps(full, default=_jsonable)  # fail on a bad card before touching any file
    with atomic_path(weights_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "pathfm_name": name})
        full["sha256"] = _sha256(tmp)
    text = jsonsafe.dumps(full, where=f"{card_path} (model card)", default=_jsonable, indent=2)  # NaN -> null
    with atomic_path(card_path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return weights_path


_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")  # models.weights.PICKLE_SUFFIXES, without importing torch


def refuse_pickle(path: str | Path) -> None:
    """Refuse a ``.pt/.pth/.ckpt/.bin`` file given where a pathfm checkpoint is expected, saying what it is.

    The file is identified by searching its bytes (never unpickled): a Lightning
    training checkpoint or a plain ``torch.save`` pickle. The message says that
    pathfm checkpoints are ``.safetensors`` + ``.json`` card and how to get one.

    Raises
    ------
    CheckpointError
        ``path`` has a PyTorch pickle suffix.
    """
    path = Path(path)
    if path.suffix.lower() not in _PICKLE_SUFFIXES:
        return
    from .weights import describe_pickle

    what = describe_pickle(path) if path.is_file() else "a PyTorch pickle name (the file does not exist)"
    raise CheckpointError(
        path,
        f"is {what}; napari-pathfm loads models only from a .safetensors weights file with its .json "
        "model card, and never unpickles checkpoints.",
        "From a pathfm training run, use the run folder's exported model.safetensors (with model.json), not "
        "last.ckpt. Foreign weights (timm, torchvision, SAM, UNI) go in as backbone weights instead "
        "(model.weights / model.backbone_weights / --weights), which read tensors only, with "
        "torch.load(weights_only=True).",
    )


def read_card(path: str | Path) -> dict:
    """Read the JSON model card of checkpoint ``path`` (no torch import).

    Raises
    ------
    CheckpointError
        ``path`` is a PyTorch pickle (:func:`refuse_pickle`), or the card is
        missing or is not a valid card.
    """
    refuse_pickle(path)
    weights_path, card_path = checkpoint_paths(path)
    if not card_path.is_file():
        raise CheckpointError(
            card_path,
            f"model card not found (expected next to {weights_path.name}).",
            "Checkpoints are a .safetensors file plus a .json card; export both with save_checkpoint, "
            "or load bare foreign weights with napari_pathfm.models.weights.load_state_dict_file.",
        )
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            card_path, f"is not a readable JSON model card ({exc}).", "Re-export the checkpoint."
        ) from exc
    if not isinstance(card, dict) or not card.get("name") or not isinstance(card.get("config", {}), dict):
        raise CheckpointError(
            card_path, "is not a model card: it lacks 'name' or 'config'.", "Re-export the checkpoint."
        )
    return card


def list_checkpoints(folder: str | Path) -> list[tuple[Path, dict]]:
    """``(weights path, card)`` of every readable checkpoint directly in ``folder``, by name."""
    found = []
    for card_path in sorted(Path(folder).glob("*.json")):
        weights_path, _ = checkpoint_paths(card_path)
        if not weights_path.is_file():
            continue
        try:
            found.append((weights_path, read_card(card_path)))
        except CheckpointError:
            continue
    return found


def load_checkpoint(path: str | Path, device: str = "cpu", *, verify: bool = True):
    """Rebuild the model described by the card of ``path`` and load its weights strictly.

    Parameters
    ----------
    path : str or Path
        ``X``, ``X.safetensors`` or ``X.json``.
    device : str
        Torch device for the returned model (``"auto"`` allowed).
    verify : bool
        Check the weights file against the card's sha256.

    Returns
    -------
    (torch.nn.Module, dict)
        The model in eval mode and its card.

    Raises
    ------
    CheckpointError
        A PyTorch pickle instead of a checkpoint, missing card or weights, unknown
        model name, corrupt or altered weights file, NaN/Inf tensors (named, even
        when the sha256 matches: a diverged run writes a valid card), or tensors
        that do not fit the model (named in plain words).
    """
    from ..device import resolve_device
    from .registry import create_model, list_models
    from .weights import load_into, load_state_dict_file

    refuse_pickle(path)
    weights_path, card_path = checkpoint_paths(path)
    card = read_card(card_path)
    if not weights_path.is_file():
        raise CheckpointError(
            weights_path, "weights file not found next to its model card.", "Copy both files together."
        )
    name = card["name"]
    if name not in list_models():
        raise CheckpointError(
            card_path,
            f"names model {name!r}, which this version of napari-pathfm does not know "
            f"(known: {', '.join(list_models())}).",
            "Update napari-pathfm or install the plugin that registers this model.",
        )
    if verify and card.get("sha256") and _sha256(weights_path) != card["sha256"]:
        raise CheckpointError(
            weights_path,
            "does not match the sha256 in its model card; the file was changed or only partly copied.",
            "Copy the checkpoint again, or pass verify=False if you changed it on purpose.",
        )
    state = load_state_dict_file(weights_path)
    try:
        model = create_model(name, **card.get("config", {}))
    except TypeError as exc:
        raise CheckpointError(
            card_path, f"has a config that model {name!r} does not accept ({exc}).", "Re-export the checkpoint."
        ) from exc
    load_into(model, state, strict=True, source=weights_path)
    return model.to(resolve_device(device)).eval(), card


def card_family(card: dict) -> str | None:
    """The family of a model card: its ``family`` key, else the family its model name is registered under."""
    if card.get("family"):
        return str(card["family"])
    from .registry import model_info

    try:
        return model_info(str(card.get("name")))["family"] or None
    except KeyError:
        return None


def _card_value(card: dict, dotted: str) -> Any:
    node: Any = card
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def check_family(card: dict, family: str, source: str | Path) -> None:
    """Refuse a card of another family, or one without the keys ``family``'s spec requires (no torch import).

    The messages come from the family specs (:mod:`napari_pathfm.families`): what a checkpoint of
    ``family`` is and which models make one, and where the given checkpoint can be used instead.

    Raises
    ------
    CheckpointError
        The card's family is another one, or a required card key (``FamilySpec.card_keys``) is missing.
    """
    from ..families import get_family

    spec = get_family(family)
    pick = f"Pick a checkpoint of family {family!r}" + (f" ({spec.examples})" if spec.examples else "")
    found = card_family(card)
    if found and found != family:
        try:
            use = get_family(found).use
        except KeyError:
            use = ""
        raise CheckpointError(
            source,
            f"is a {found!r} checkpoint (model {card.get('name')!r}), not {spec.noun}.",
            pick + (f"; use this one with {use}." if use else "."),
        )
    for key in spec.card_keys:
        if _card_value(card, key) is None:
            raise CheckpointError(source, f"has no `{key}` in its model card; it is not {spec.noun}.", pick + ".")


def load_family_checkpoint(path: str | Path, family: str, device: str = "cpu", *, verify: bool = True):
    """:func:`load_checkpoint` of a checkpoint that must be of ``family``, checked (:func:`check_family`) first.

    This is the core every family's loader (``FamilySpec.loader``) shares; a wrong family is
    refused from the card alone, before any weights are read.

    Returns
    -------
    (torch.nn.Module, dict)
        The model in eval mode and its card.
    """
    check_family(read_card(path), family, path)
    return load_checkpoint(path, device=device, verify=verify)


def load_any(path: str | Path, device: str = "cpu", *, family: str | None = None) -> tuple:
    """Load a checkpoint with its family's one loader (``FamilySpec.loader``): ``(model, card, ...)``.

    ``family`` defaults to the family the card names; a family without its own loader gets
    :func:`load_family_checkpoint`. Loaders of the built-in families also take a ``(model, card)``
    pair and check what only their pipeline knows (e.g. classes against the model's outputs).

    Raises
    ------
    CheckpointError
        The card names no family this version knows (a plugin family not installed), or the
        checkpoint is not of ``family``.
    """
    from ..families import get_family

    family = family or card_family(read_card(path))
    try:
        spec = get_family(family or "")
    except KeyError as exc:
        raise CheckpointError(
            path,
            f"is of family {family!r}, which this version of napari-pathfm does not know ({exc.args[0]}).",
            "Install the plugin that registers this family (entry point group napari_pathfm.families, "
            "or a module named in PATHFM_PLUGINS).",
        ) from None
    if spec.loader:
        return spec.part("loader")(path, device=device)
    return load_family_checkpoint(path, spec.name, device=device)
