"""Contract 6 at run time: starting the plugin or the ``pathfm`` command group does not import torch.

The layer, GUI and cycle contracts are static and live in ``[tool.importlinter]`` of pyproject.toml
(``lint-imports``, run by ``make test``). import-linter sees every import statement, lazy ones inside
functions included, so it cannot tell "imports torch when a model runs" (allowed) from "imports torch
when napari starts the plugin" (not allowed). This test does what napari does: in a fresh process it
imports the package and every module the manifest names (reader, writer, sample data, each dock),
plus the modules the docks import while they are opened and the CLI, and looks at ``sys.modules``.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files

import yaml

HEAVY = ("torch", "torchvision", "timm", "lightning")

# Imported by the docks before any model loads (painting corrections, the Train panel's finetune
# entry, checkpoint lists), and the subpackages whose __init__ resolves names lazily.
ALSO = [
    "napari_pathfm.cli",
    "napari_pathfm.checkpoints",
    "napari_pathfm.pipelines.segment",
    "napari_pathfm.pipelines.corrections",
    "napari_pathfm.pipelines.mil",
    "napari_pathfm.training.finetune",
    "napari_pathfm.io",
    "napari_pathfm.tiles",
    "napari_pathfm.models",
    "napari_pathfm.training",
]


def manifest_modules() -> list[str]:
    """The modules of every ``python_name`` in the shipped napari.yaml, in manifest order."""
    manifest = yaml.safe_load(files("napari_pathfm").joinpath("napari.yaml").read_text(encoding="utf-8"))
    names = [c["python_name"].partition(":")[0] for c in manifest["contributions"]["commands"]]
    return list(dict.fromkeys(names))


def test_manifest_names_the_reader_writer_sample_and_docks():
    modules = manifest_modules()
    for expected in ("napari_pathfm._reader", "napari_pathfm._writer", "napari_pathfm._sample_data"):
        assert expected in modules
    assert sum(m.startswith("napari_pathfm.widgets.") for m in modules) >= 6, modules


def test_starting_the_plugin_does_not_import_torch():
    modules = ["napari_pathfm", *manifest_modules(), *ALSO]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing {modules} imported {out.stdout.strip()}"
