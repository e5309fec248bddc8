"""Contract 6 at run time: starting the plugin or the ``pathfm`` command group does not import torch.

The layer, GUI and cycle contracts are static and live in ``[tool.importlinter]`` of pyproject.toml
(``lint-imports``, run by ``make test``). import-linter sees every import statement, lazy ones inside
functions included, so it cannot tell "imports torch when a model runs" (allowed) from "imports torch
when napari starts the plugin" (not allowed). This test does what napari does: in a fresh process it
imports the package and every module the manifest names (reader, writer, sample data, each dock),
plus the modules the docks import while they are opened and the CLI, and looks at ``sys.modules``.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

import napari_pathfm

HEAVY = ("torch", "torchvision", "timm", "lightning")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: The modules under napari_pathfm that may import Qt/napari (docs/architecture.md, "Layers").
GUI_MODULES = {"widgets", "_reader", "_writer", "_sample_data", "demo"}

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


def test_gui_contract_covers_every_module_but_the_front_ends():
    """import-linter's forbidden contract takes a list of sources, not "all but": this keeps that list whole,
    so a new module is kept free of Qt/napari from its first commit (the layers contract places it)."""
    tomllib = pytest.importorskip("tomllib")
    contracts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    gui = next(c for c in contracts if c["id"] == "gui-only-in-front-ends")
    sources = {m.removeprefix("napari_pathfm.") for m in gui["source_modules"]}
    children = {m.name for m in pkgutil.iter_modules(napari_pathfm.__path__)}
    assert not sources & GUI_MODULES
    assert children - sources == GUI_MODULES, "add the new module to the contract's source_modules"
