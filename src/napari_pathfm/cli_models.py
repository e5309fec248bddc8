"""``pathfm models list|verify``: the models available on this machine, and whether their weights are the ones used.

``list`` shows the registered model families (as plain ``pathfm models`` does) and the foundation
models found offline (:mod:`napari_pathfm.models.hub_cache`: the local Hugging Face cache and
``--folder`` model folders) with their licence. ``verify`` hashes local weights and compares them
with what outputs recorded: feature files (``.features.zarr``) and model cards (``weights_sha256``
of the feature extractor), or, without paths, the cached models against the sha256 the hub named
their files by and the cards of the trained checkpoints found. Neither imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import UsageError

__all__ = ["models_command", "models_list", "models_verify", "recorded_weights"]


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "-"


def _foundation_rows(folders) -> list[dict]:
    """One dict per foundation model found locally, with its table entry's licence when known."""
    from .models.foundation import foundation_spec
    from .models.hub_cache import find_local_models

    rows = []
    for m in find_local_models(folders):
        spec = foundation_spec(m.repo_id or "")
        rows.append(
            {
                **m.as_dict(),
                "title": spec.title if spec else None,
                "licence": spec.licence if spec else (m.config.get("pretrained_cfg") or {}).get("license"),
                "embedding": spec.embed_dim if spec else m.config.get("num_features"),
                "builds_with": spec.framework if spec else "timm",
            }
        )
    return rows


def models_list(folders: list[Path], as_json: bool) -> None:
    """Print the registered models and the foundation models found offline (``pathfm models list``)."""
    from .models import list_models, model_info
    from .models.foundation import FOUNDATION_MODELS
    from .models.hub_cache import hub_cache_dir

    registered = [{"name": n, **{k: model_info(n)[k] for k in ("family", "description")}} for n in list_models()]
    found = _foundation_rows(folders)
    if as_json:
        listing = {"registered": registered, "hub_cache": str(hub_cache_dir()), "foundation": found}
        typer.echo(json.dumps(listing, indent=2))
        return
    for r in registered:
        typer.echo(f"{r['name']:<24} {r['family']:<10} {r['description']}")
    typer.echo(f"\nfoundation models found offline (hub cache {hub_cache_dir()}):")
    for r in found:
        what = f"{r['title'] or r['architecture'] or '?'}, {r['embedding'] or '?'}-d"
        typer.echo(f"  {r['name']:<36} {what:<44} licence {r['licence'] or 'not stated'}  {r['bytes'] / 1e9:.2f} GB")
        if r["builds_with"] != "timm":
            typer.echo(f"      not usable as a backbone here: built with {r['builds_with']} (see docs)")
    if not found:
        typer.echo("  none")
    have = {(r["repo_id"] or "").lower() for r in found}
    missing = [m.repo_id for key, m in FOUNDATION_MODELS.items() if key not in have]
    typer.echo(f"known but not on this machine: {', '.join(missing) or 'none'}", err=True)
    typer.echo("use one with `pathfm features SLIDE --out DIR --backbone hf-hub:ORG/NAME`", err=True)


def _card_records(card: dict) -> list[dict]:
    """The weights a model card recorded: its feature extractor's (MIL) and its foundation backbones'."""
    keys = ("backbone", "weights", "weights_sha256")
    found = [card.get("feature_extractor") or {}, *(card.get("foundation_weights") or {}).values()]
    if "weights_sha256" in card:  # a bare extractor record
        found.append(card)
    return [{k: r.get(k) for k in keys} for r in found if r.get("weights_sha256") or r.get("backbone")]


def recorded_weights(path: Path) -> list[dict]:
    """``[{"backbone", "weights", "weights_sha256"}]`` a feature file or model card recorded of the weights it
    was made with (a feature file: its extractor; a card: its feature extractor and foundation backbones)."""
    from .io.features import read_feature_attrs

    if path.is_dir():
        attrs = read_feature_attrs(path)
        if attrs is None:
            raise UsageError(f"{path} is not a complete feature file.", "Give a .features.zarr folder or a card.")
        return [{k: attrs.get(k) for k in ("backbone", "weights", "weights_sha256")}]
    if path.suffix.lower() == ".json":
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path} is not a readable JSON card ({exc}).") from exc
    else:
        from .models.checkpoint import read_card

        card = read_card(path)
    return _card_records(card)


class _Hasher:
    """sha256 of local files, each read once per command."""

    def __init__(self):
        self.done: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        from .models.checkpoint import _sha256

        key = Path(path).resolve()
        if key not in self.done:
            self.done[key] = _sha256(key)
        return self.done[key]


def _local_weights(record: dict, beside: Path | None = None) -> Path | None:
    """The weights file on this machine that ``record`` names: its recorded path, the same name ``beside`` the
    card (bundled and shared models keep their extractor there), else its foundation model by name."""
    from .errors import InputError
    from .models.hub_cache import is_foundation_name, resolve_local_model

    recorded = Path(record["weights"]) if record.get("weights") else None
    for candidate in (recorded, beside / recorded.name if recorded and beside else None):
        if candidate is not None and candidate.is_file():
            return candidate
    if record.get("backbone") and is_foundation_name(record["backbone"]):
        try:
            return resolve_local_model(record["backbone"]).weights
        except InputError:
            return None
    return None


def _check_record(source: Path, record: dict, sha256: _Hasher) -> dict:
    expected = record.get("weights_sha256")
    row = {"source": str(source), "backbone": record.get("backbone"), "recorded": expected, "weights": None}
    if not expected:
        return {**row, "status": "unrecorded", "detail": "no weights sha256 recorded (randomly initialised backbone)"}
    local = _local_weights(record, Path(source).parent)
    if local is None:
        detail = f"the weights it was made with ({record.get('weights') or record.get('backbone')}) are not here"
        return {**row, "status": "missing", "detail": detail}
    actual = sha256(local)
    row.update(weights=str(local), actual=actual)
    if actual == expected:
        return {**row, "status": "ok", "detail": f"{local} sha256 {_short(actual)}"}
    detail = (
        f"made with weights sha256 {_short(expected)}, but {local} now has {_short(actual)}: the weights changed. "
        "Restore the original weights, or recompute (pathfm features --overwrite; retrain a model on new features)."
    )
    return {**row, "status": "changed", "detail": detail}


def _check_cached(sha256: _Hasher, folders) -> list[dict]:
    """Each local foundation model's weights against the sha256 its hub cache blob is named by."""
    from .models.hub_cache import blob_sha256, find_local_models

    rows = []
    for m in find_local_models(folders):
        expected = blob_sha256(m.weights)
        row = {"source": m.name, "backbone": m.name, "recorded": expected, "weights": str(m.weights)}
        if expected is None:
            rows.append({**row, "status": "unrecorded", "detail": "no hub sha256 to compare with (not a cache blob)"})
            continue
        actual = sha256(m.weights)
        ok = actual == expected
        detail = (
            f"matches the hub's sha256 {_short(expected)}"
            if ok
            else (f"sha256 {_short(actual)} differs from the hub's {_short(expected)}: damaged; download it again")
        )
        rows.append({**row, "actual": actual, "status": "ok" if ok else "changed", "detail": detail})
    return rows


def models_verify(paths: list[Path], folders: list[Path], as_json: bool) -> int:
    """Check local weights against recorded sha256s (``pathfm models verify``); returns the exit code.

    0 when everything checked matches; 1 when weights changed or are missing.
    """
    sha256 = _Hasher()
    if paths:
        rows = [_check_record(Path(p), r, sha256) for p in paths for r in recorded_weights(Path(p))]
    else:
        from .checkpoints import find_checkpoints

        rows = _check_cached(sha256, folders)
        for weights, card in find_checkpoints():
            rows += [_check_record(Path(weights), r, sha256) for r in _card_records(card) if r["weights_sha256"]]
    bad = [r for r in rows if r["status"] in ("changed", "missing")]
    if as_json:
        typer.echo(json.dumps({"ok": not bad, "checked": rows}, indent=2))
    else:
        for r in rows:
            typer.secho(
                f"{r['status']:<10} {r['source']}: {r['detail']}",
                fg=typer.colors.RED if r in bad else None,
            )
        typer.echo(f"{len(rows)} checked, {len(bad)} with changed or missing weights")
    return 1 if bad else 0


def models_command(action: str, paths: list[Path], folders: list[Path], as_json: bool) -> int:
    """``pathfm models ACTION``: run ``list`` or ``verify``; returns the exit code."""
    if action == "list":
        if paths:
            raise UsageError("`pathfm models list` takes no paths.", "Use --folder FOLDER to look in a model folder.")
        models_list(folders, as_json)
        return 0
    if action == "verify":
        return models_verify(paths, folders, as_json)
    raise UsageError(
        f"unknown action {action!r} of `pathfm models`.", "Use `pathfm models list` or `pathfm models verify`."
    )
