"""Copy a finished ISL translate run into the package's bundled models, with provenance on the card.

Usage (from the repository root, after ``pathfm train training/translate/<recipe>.yaml --out runs/translate/<recipe>``
was run under ``/usr/bin/time -v`` with its stderr in ``runs/translate/<recipe>/stderr.log``)::

    .venv/bin/python benchmarks/translate_training/bundle.py runs/translate/isl_dapi_lupi_cpu haste-isl-dapi

The weights are copied byte for byte (the card's sha256 stays valid); the card gets ``weights_file``,
``data_license``, ``command``, ``training_time`` (wall and CPU seconds from ``/usr/bin/time -v``) and
paths under the shared data folder rewritten as ``${PATHFM_SHARED_DATA}``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
# the data beside the checkout unless PATHFM_SHARED_DATA is set (the package's own default is a per-user folder)
os.environ.setdefault("PATHFM_SHARED_DATA", str(REPO.parent / "shared" / "data"))

from napari_pathfm.io.atomic import atomic_path
from napari_pathfm.training.recipes import default_shared_data

BUNDLED = REPO / "src" / "napari_pathfm" / "data" / "models"
ISL_LICENSE = "Apache-2.0: in-silico labeling test data (Christiansen et al., Cell 2018), one well"


def time_v(log: Path) -> dict:
    """Wall, user and system seconds from the ``/usr/bin/time -v`` report at the end of ``log``."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    out = {}
    for key, pattern in (
        ("user_s", r"User time \(seconds\): ([\d.]+)"),
        ("system_s", r"System time \(seconds\): ([\d.]+)"),
    ):
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        out["wall_s"] = sum(v * 60**i for i, v in enumerate(reversed(parts)))
    m = re.search(r"Percent of CPU this job got: (\d+)%", text)
    if m:
        out["cpu_percent"] = int(m.group(1))
    return out


def _portable(obj, shared: str):
    if isinstance(obj, dict):
        return {k: _portable(v, shared) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_portable(v, shared) for v in obj]
    if isinstance(obj, str):
        return obj.replace(shared, "${PATHFM_SHARED_DATA}").replace(str(REPO) + "/", "")
    return obj


def bundle(run: Path, name: str) -> Path:
    card = json.loads((run / "model.json").read_text(encoding="utf-8"))
    recipe = Path(card.get("recipe_file") or "")
    card = _portable(card, str(default_shared_data().resolve()))
    card["weights_file"] = f"{name}.safetensors"
    card["data_license"] = ISL_LICENSE
    card["command"] = (
        f"OMP_NUM_THREADS=1 pathfm train {card.get('recipe_file') or recipe} --out runs/translate/{recipe.stem} --device cpu"
    )
    card["training_time"] = {
        **time_v(run / "stderr.log"),
        "machine": "2 CPU cores shared with other jobs (see docs/translate.md)",
    }
    BUNDLED.mkdir(parents=True, exist_ok=True)
    weights = BUNDLED / f"{name}.safetensors"
    with atomic_path(weights) as tmp:
        shutil.copyfile(run / "model.safetensors", tmp)
    with atomic_path(BUNDLED / f"{name}.json") as tmp:
        Path(tmp).write_text(json.dumps(card, indent=2, default=str), encoding="utf-8")
    return weights


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: bundle.py RUN_FOLDER NAME")
    print(bundle(Path(sys.argv[1]).resolve(), sys.argv[2]))
