"""Load weight files safely and map them onto our modules with a plain-words report.

Contract 3: ``.safetensors`` load through safetensors; ``.pt/.pth/.bin/.ckpt`` load
only through ``torch.load(weights_only=True)``, so a file that holds arbitrary
Python objects is refused instead of executed. Common containers (``{"model": ...}``,
``{"state_dict": ...}``, DDP ``module.`` and Lightning ``model.`` prefixes) are
unwrapped.

Foreign checkpoints (SAM2, UNI, SAM, ...) get a *key map* in the style of timm's
``checkpoint_filter_fn``: a function ``(state_dict, model) -> state_dict`` defined
next to the model it serves and passed to :func:`load_into`. :func:`rename_keys`
builds the common prefix-renaming kind.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = [
    "KeyMap",
    "LoadReport",
    "check_finite",
    "check_fit",
    "describe_pickle",
    "load_backbone_weights",
    "load_into",
    "load_state_dict_file",
    "rename_keys",
    "unwrap_state_dict",
]

KeyMap = Callable[[dict, Any], dict]

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
_PREFIXES = ("module.", "model.", "_orig_mod.")

_CONVERT_HINT = (
    "If you trust where this file comes from, convert it once to safetensors: "
    'python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('{path}', weights_only=False); sd = sd.get('state_dict', sd); "
    "st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{stem}.safetensors')\" "
    "and load the .safetensors file instead."
)


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def unwrap_state_dict(obj: Any) -> dict:
    """Return the flat ``{name: tensor}`` mapping inside a loaded checkpoint object.

    Descends into the usual container keys (``state_dict``, ``model``, ...), drops
    non-tensor entries (optimizer steps, hyper-parameters) and strips a prefix
    (``module.``, then ``model.``, then ``_orig_mod.``, each at most once) when
    *every* key carries it, e.g. DDP-wrapped or Lightning checkpoints.
    """
    while isinstance(obj, Mapping) and not any(_is_tensor(v) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        return {}
    sd = {str(k): v for k, v in obj.items() if _is_tensor(v)}
    for prefix in _PREFIXES:  # each at most once, in this order
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def check_finite(state_dict: Mapping[str, Any], source: str | Path, limit: int = 5) -> None:
    """Refuse weights holding NaN or Inf, naming the first few such tensors and their count.

    A diverged training run can export such weights with a perfectly valid card and
    sha256; every output made with them would be NaN, so they are stopped at load.
    Only floating-point tensors are checked (``torch.isfinite(t).all()``, one pass).

    Raises
    ------
    CheckpointError
        At least one tensor holds a NaN or Inf value.
    """
    bad = [k for k, t in state_dict.items() if _is_tensor(t) and t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise CheckpointError(
            source,
            f"holds NaN or Inf values in {len(bad)} of {len(state_dict)} tensors ({_names(bad, limit)}); "
            "a model with such weights gives NaN everywhere (typically a training run that diverged).",
            "Use an earlier checkpoint of the run, or retrain with a lower learning rate or gradient clipping.",
        )


def load_state_dict_file(path: str | Path, *, unwrap: bool = True, finite: bool = True) -> dict:
    """Read a weights file into a ``{name: tensor}`` dict on the CPU.

    Parameters
    ----------
    path : str or Path
        ``.safetensors``, or ``.pt/.pth/.bin/.ckpt`` (read with ``weights_only=True``).
    unwrap : bool
        Apply :func:`unwrap_state_dict` to pickled containers.
    finite : bool
        Refuse a (flat) state dict holding NaN/Inf with :func:`check_finite`.

    Raises
    ------
    CheckpointError
        Missing file, unknown suffix, corrupt file, a pickle that holds objects
        other than tensors and plain containers (refused, never unpickled), or
        NaN/Inf tensors.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found.", "Check the path.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(
                path,
                f"is not a readable safetensors file ({exc}).",
                "The file is corrupt or truncated; re-export or re-download it.",
            ) from exc
        if finite:
            check_finite(sd, path)
        return sd
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            path, f"unknown weights format {suffix!r}.", f"Use .safetensors or one of {', '.join(PICKLE_SUFFIXES)}."
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(
            path,
            "refused to unpickle arbitrary objects: the file contains Python objects besides tensors "
            f"({detail.strip()}), and loading them could run code.",
            _CONVERT_HINT.format(path=path, stem=path.with_suffix("")),
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            path,
            f"could not be read as a PyTorch weights file ({type(exc).__name__}: {exc}).",
            "The file is corrupt or not a checkpoint.",
        ) from exc
    if not unwrap:
        return obj
    sd = unwrap_state_dict(obj)
    if not sd:
        raise CheckpointError(path, "contains no tensors.", "Point at the file that holds the model weights.")
    if finite:
        check_finite(sd, path)
    return sd


def describe_pickle(path: str | Path) -> str:
    """Say in words what a ``.pt/.pth/.ckpt/.bin`` file is, *without* unpickling it.

    ``torch.save`` files are zip archives whose ``data.pkl`` names its keys as plain
    strings; those bytes are only searched (never loaded), so this is safe on any file.

    Returns
    -------
    str
        e.g. ``"a PyTorch Lightning training checkpoint (torch.save pickle)"``.
    """
    import zipfile

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                head = zf.read(name)[: 1 << 20] if name else b""
        else:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
    except (OSError, zipfile.BadZipFile):
        return "an unreadable file"
    if b"pytorch-lightning_version" in head:
        return "a PyTorch Lightning training checkpoint (a pickle written by torch.save)"
    if head[:1] == b"\x80" or zipfile.is_zipfile(path):
        return "a PyTorch pickle (written by torch.save)"
    return f"not a PyTorch file either (starts with {head[:8]!r})"


def rename_keys(rules: Mapping[str, str] | None = None, drop: tuple[str, ...] = ()) -> KeyMap:
    """Build a key map that renames key prefixes and drops keys.

    Parameters
    ----------
    rules : mapping
        ``{old_prefix: new_prefix}``; the first matching rule applies.
    drop : tuple of str
        Keys starting with any of these prefixes are removed.

    Examples
    --------
    >>> km = rename_keys({"encoder.": "backbone."}, drop=("head.",))
    >>> sorted(km({"encoder.w": 1, "head.b": 2}, None))
    ['backbone.w']
    """
    rules = dict(rules or {})

    def key_map(state_dict: dict, model: Any = None) -> dict:
        out = {}
        for k, v in state_dict.items():
            if drop and k.startswith(drop):
                continue
            for old, new in rules.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            out[k] = v
        return out

    return key_map


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass
class LoadReport:
    """What :func:`load_into` did: which tensors loaded and which did not fit.

    ``str(report)`` is a plain-words summary such as
    ``"loaded 120 of 122 tensors; missing: head.weight, head.bias"``.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    total: int = 0

    @property
    def ok(self) -> bool:
        """True when every model tensor was loaded and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} of {self.total} tensors"]
        if self.missing:
            parts.append(f"missing (the model has them, the file does not): {_names(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected (in the file, not in the model): {_names(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} (file {list(a)} vs model {list(b)})" for k, a, b in self.mismatched]
            parts.append(f"wrong shape: {_names(shapes)}")
        return "; ".join(parts)

    def table(self, limit: int = 4) -> str:
        """Short table, one line per kind: count and the first ``limit`` tensor names.

        Example::

              matched        0 of 62 model tensors
              missing       62  conv1.0.weight, conv1.1.weight, ... and 58 more
              unexpected     2  encoder.weight, encoder.bias
              wrong shape    0
        """
        shapes = [f"{k} (file {list(a)} vs model {list(b)})" for k, a, b in self.mismatched]
        rows = [("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", shapes)]
        lines = [f"  {'matched':<12}{len(self.loaded):>6} of {self.total} model tensors"]
        lines += [f"  {label:<12}{len(keys):>6}  {_names(keys, limit)}".rstrip() for label, keys in rows]
        return "\n".join(lines)


def load_into(
    model,
    state_dict: dict,
    *,
    key_map: KeyMap | None = None,
    strict: bool = False,
    source: str | Path = "state dict",
    dry_run: bool = False,
) -> LoadReport:
    """Copy matching tensors of ``state_dict`` into ``model`` and report the rest.

    Tensors whose shape differs from the model's are skipped (not an exception
    from deep inside torch), so a backbone can load into a model with a new head.

    Parameters
    ----------
    model : torch.nn.Module
        Target module.
    state_dict : dict
        ``{name: tensor}``, e.g. from :func:`load_state_dict_file`.
    key_map : callable, optional
        ``(state_dict, model) -> state_dict`` applied first (timm-style
        ``checkpoint_filter_fn``), e.g. from :func:`rename_keys`.
    strict : bool
        Raise :class:`CheckpointError` unless every tensor fits exactly.
    source : str or Path
        File name used in error messages.
    dry_run : bool
        Only compare keys and shapes; leave the model untouched.

    Returns
    -------
    LoadReport
    """
    if key_map is not None:
        state_dict = key_map(state_dict, model)
    own = model.state_dict()
    report = LoadReport(total=len(own))
    usable = {}
    for k, ref in own.items():  # model order, so reports read like the architecture
        if k not in state_dict:
            report.missing.append(k)
        elif tuple(state_dict[k].shape) != tuple(ref.shape):
            report.mismatched.append((k, tuple(state_dict[k].shape), tuple(ref.shape)))
        else:
            usable[k] = state_dict[k]
    report.unexpected = [k for k in state_dict if k not in own]
    report.loaded = list(usable)
    if strict and not report.ok:
        raise CheckpointError(
            source, f"does not fit the model: {report}.", "Use the checkpoint made for this model and config."
        )
    if not dry_run:
        model.load_state_dict(usable, strict=False)
    return report


def check_fit(
    report: LoadReport,
    source: str | Path,
    what: str,
    *,
    partial: bool = False,
    ignore: tuple[str, ...] = (),
    allow_unexpected: bool = False,
    partial_hint: str = "pass partial_weights=True",
) -> LoadReport:
    """Refuse weights that do not fit the model, with a table of what matched and what did not.

    Weights that leave part of a model random (or fit nothing at all) give silently
    wrong results, so a mismatch is an error unless the caller asked for a partial
    load explicitly. A file in which *no* tensor fits is always refused: it is
    weights for another model.

    Parameters
    ----------
    report : LoadReport
        From :func:`load_into` (typically ``dry_run=True``).
    source : str or Path
        The weights file, named in the message.
    what : str
        What the weights were meant for, e.g. ``"resnet10t classifier"``.
    partial : bool
        Accept a partial fit (at least one tensor matched).
    ignore : tuple of str
        Key prefixes allowed to differ (e.g. a classifier head of another size).
    allow_unexpected : bool
        Tensors of the file that the model lacks are fine (a backbone file's head).
    partial_hint : str
        How the user asks for a partial load (a recipe key, a CLI flag).

    Raises
    ------
    CheckpointError
        Nothing matched, or something did not fit and ``partial`` is False.
    """
    missing = [k for k in report.missing if not k.startswith(ignore) and not k.endswith("num_batches_tracked")]
    wrong = [k for k, _, _ in report.mismatched if not k.startswith(ignore)]
    extra = [] if allow_unexpected else [k for k in report.unexpected if not k.startswith(ignore)]
    if not report.loaded:
        raise CheckpointError(
            source,
            f"has no tensor that fits the {what} (0 matched); it holds weights for another model:\n{report.table()}\n",
            "Give weights made for this model (same architecture and key names), or leave them out to start "
            "from random weights.",
        )
    if (missing or wrong or extra) and not partial:
        raise CheckpointError(
            source,
            f"does not fit the {what}; loading it would leave part of the model random:\n{report.table()}\n",
            f"Give weights made for this model, or, to load only the tensors that fit on purpose, {partial_hint}.",
        )
    return report


def _unused_summary(keys: list[str]) -> str:
    groups = Counter(k.split(".", 1)[0] for k in keys)
    return ", ".join(f"{g}.* ({n} tensors)" for g, n in groups.items())


def load_backbone_weights(
    module,
    path: str | Path,
    what: str,
    *,
    partial: bool = False,
    ignore: tuple[str, ...] = (),
    partial_hint: str = "pass partial_weights=True (pathfm features --partial-weights)",
    key_map: KeyMap | None = None,
) -> LoadReport:
    """Load a local weights file into a backbone; refuse files that would leave part of it random.

    The file's own head (``fc.*``, ``layer4.*`` of a truncated ResNet, a foundation model's
    classifier) may be unused. A file in which no tensor fits is always refused; one that fits
    only partly is refused unless ``partial`` (features from a partly random network are rarely
    what anyone wants). See :func:`check_fit` for ``ignore`` and ``partial_hint``.

    Returns
    -------
    LoadReport
    """
    path = Path(path)
    state_dict = load_state_dict_file(path)
    if key_map is not None:  # another library's names for the same tensors (timm's checkpoint_filter_fn)
        state_dict = key_map(state_dict, module)
    check_fit(
        load_into(module, state_dict, source=path, dry_run=True),
        path,
        what,
        partial=partial,
        ignore=ignore,
        allow_unexpected=True,
        partial_hint=partial_hint,
    )
    report = load_into(module, state_dict, source=path)
    if report.unexpected:
        log.info("%s: unused by the %s: %s", path, what, _unused_summary(report.unexpected))
    if report.missing or report.mismatched:
        log.warning("%s: partial load into the %s (asked for): %s", path, what, report)
    return report
