"""The per-slide completion marker of ``pathfm batch``: ``done.json`` and the check of its outputs.

A slide's folder is complete when its ``done.json`` (written last) records the same task,
checkpoints and options as this run and every output it lists is still there with the same size
and CRC-32 (contract 8: reused outputs are verified); otherwise the slide runs again, and when a
matching marker's outputs were missing or damaged the reason is reported.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.checksums import file_crc32

__all__ = ["DONE", "check_done", "is_complete", "record_outputs", "verify_outputs"]

DONE = "done.json"


def is_complete(folder: Path, key: dict) -> bool:
    """True when ``folder/done.json`` records the same task, checkpoint and options and its outputs verify."""
    return check_done(folder, key) == (True, "")


def check_done(folder: Path, key: dict) -> tuple[bool, str]:
    """Whether a slide's folder holds a finished run for ``key``, and if not, why it must be redone.

    Returns ``(True, "")`` when ``done.json`` matches ``key`` and every output it records is there with
    the same size and CRC-32; ``(False, "")`` when there is no matching marker (a new slide or changed
    options); ``(False, reason)`` when a matching marker's outputs are missing or damaged, or the
    marker has no output record (written by an older version: its outputs cannot be checked).
    """
    try:
        done = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return False, ""
    if not isinstance(done, dict) or {k: done.get(k) for k in key} != json.loads(json.dumps(key)):
        return False, ""
    if not isinstance(done.get("outputs"), list):
        return False, "no output record in done.json (older version): outputs cannot be checked"
    problem = verify_outputs(folder, done["outputs"])
    return (False, f"output damaged: {problem}") if problem else (True, "")


def _is_temporary(rel: Path) -> bool:
    name = rel.parts[0]
    return name == DONE or ".tmp-" in name or ".old-" in name or name.startswith(".pathfm-")


def record_outputs(folder: Path) -> list[dict]:
    """Every file under a slide's folder (``done.json`` and temporaries aside): relative path, size, CRC-32.

    Zarr / OME-Zarr outputs are folders: each of their files is listed, so a lost or changed chunk is seen.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _is_temporary(p.relative_to(folder)))
    return [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "crc32": file_crc32(p)} for p in files]


def verify_outputs(folder: Path, record: list[dict]) -> str:
    """``""`` when every recorded output exists with its size and CRC-32, else what is wrong (first problem)."""
    if not record:
        return "done.json records no outputs"
    for item in record:
        try:
            path = folder / item["path"]
            if not path.is_file():
                return f"{item['path']} is missing"
            if path.stat().st_size != item["size"]:
                return f"{item['path']} has {path.stat().st_size} bytes, {item['size']} when written"
            if file_crc32(path) != item["crc32"]:
                return f"{item['path']} has changed since it was written (checksum differs)"
        except (OSError, KeyError, TypeError) as exc:
            return f"{item.get('path', '?') if isinstance(item, dict) else '?'} cannot be checked ({exc})"
    return ""
