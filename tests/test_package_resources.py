"""Recipes ship inside the package: found through importlib.resources, listed by `pathfm recipes`,
run by name with `pathfm train NAME`, from a checkout and from a wheel installed somewhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from _cli_helpers import cli_refuses, runner

from napari_pathfm.cli import app

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
NAMES = {f"{p.parent.name}/{p.stem}" for p in TRAINING.glob("*/*.yaml")}


def test_bundled_recipes_are_the_training_folder():
    from napari_pathfm.recipe_files import bundled_recipes, recipe_family

    found = bundled_recipes()
    assert {r.name for r in found} == NAMES and len(NAMES) > 40
    for r in found:
        assert r.path.read_bytes() == (TRAINING / f"{r.name}.yaml").read_bytes()
        assert r.family == recipe_family(TRAINING / f"{r.name}.yaml") and r.description, r.name
    assert [r.name for r in bundled_recipes("segment")] == sorted(n for n in NAMES if n.startswith("pathsam2/"))


def test_a_name_resolves_and_an_existing_path_wins(tmp_path, monkeypatch):
    from napari_pathfm.recipe_files import recipes_dir, resolve_recipe

    assert resolve_recipe("pathsam2/glas_cpu") == recipes_dir() / "pathsam2" / "glas_cpu.yaml"
    assert resolve_recipe("pathsam2/glas_cpu.yaml") == resolve_recipe("pathsam2/glas_cpu")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pathsam2").mkdir()
    (tmp_path / "pathsam2" / "glas_cpu.yaml").write_text("family: segment\n")
    assert resolve_recipe("pathsam2/glas_cpu.yaml") == Path("pathsam2/glas_cpu.yaml")


def test_unknown_names_and_folders_are_refused_with_close_names(tmp_path):
    from napari_pathfm.errors import RecipeError
    from napari_pathfm.recipe_files import resolve_recipe

    with pytest.raises(RecipeError, match="bundled recipe name") as info:
        resolve_recipe("pathsam2/glas_cup")
    assert "'pathsam2/glas_cpu'" in str(info.value) and "pathfm recipes" in str(info.value)
    assert info.value.exit_code == 2
    assert "'slca/glas_cpu'" in str(pytest.raises(RecipeError, resolve_recipe, "glas_cpu").value)
    with pytest.raises(RecipeError, match="is a folder"):
        resolve_recipe(tmp_path)
    cli_refuses(["train", "pathsam2/glas_cup"], "Did you mean 'pathsam2/glas_cpu'", code=2)
    cli_refuses(["recipes", "--family", "nope"], "Families with recipes: classify", code=2)


def test_recipes_command_lists_names_and_json():
    result = runner.invoke(app, ["recipes", "--family", "translate"])
    assert result.exit_code == 0, result.output
    assert "translate/tiny_lupi" in result.output and "pathsam2/" not in result.output
    listing = json.loads(runner.invoke(app, ["recipes", "--json"]).stdout)
    assert {r["name"] for r in listing["recipes"]} == NAMES
    assert all(Path(r["path"]).is_file() and r["family"] for r in listing["recipes"])


def test_shared_data_defaults_to_the_per_user_folder_and_names_the_variable(tmp_path, monkeypatch):
    from napari_pathfm.errors import RecipeError
    from napari_pathfm.training.recipes import default_shared_data, load_recipe
    from napari_pathfm.userdata import data_dir

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(tmp_path))
    assert default_shared_data() == tmp_path
    monkeypatch.delenv("PATHFM_SHARED_DATA")
    assert default_shared_data() == data_dir() / "shared-data"
    assert REPO not in default_shared_data().parents
    with pytest.raises(RecipeError, match=r"Set PATHFM_SHARED_DATA") as info:
        load_recipe("classify/crc_tiny")
    assert str(data_dir() / "shared-data") in str(info.value)


# -- a wheel installed outside the checkout --------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, str(REPO), "-w", str(folder)], check=True, capture_output=True)
    (found,) = folder.glob("napari_pathfm-*.whl")
    return found


def test_the_wheel_ships_every_recipe_inside_the_package(wheel):
    prefix = "napari_pathfm/recipes/"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        crc_tiny = zf.read(prefix + "classify/crc_tiny.yaml")
    shipped = {n.removeprefix(prefix).removesuffix(".yaml") for n in names if n.startswith(prefix)}
    assert shipped == NAMES
    assert crc_tiny == (TRAINING / "classify" / "crc_tiny.yaml").read_bytes(), "the file itself, not a link"
    assert not any(n.startswith("training/") for n in names)


def test_the_sdist_holds_the_recipes_as_files(tmp_path):
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    built = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    inside = "/src/napari_pathfm/recipes/"  # below the sdist's top folder napari_pathfm-<version>/
    with tarfile.open(tmp_path / built.stdout.strip().splitlines()[-1]) as tar:
        members = {m.name.partition(inside)[2].removesuffix(".yaml"): m for m in tar if inside in m.name}
    assert NAMES <= set(members)
    assert all(members[name].isfile() for name in NAMES), "regular files, not links into training/"


def test_an_installed_wheel_lists_and_trains_a_bundled_recipe_by_name(wheel, shared_data, tmp_path):
    if not (shared_data / "crc-tiles" / "kather2016").is_dir():
        pytest.skip(f"crc-tiles/kather2016 not found in {shared_data}")
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q"]
    subprocess.run([*pip, "--target", str(site), str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site), "PATHFM_SHARED_DATA": str(shared_data)}
    work = tmp_path / "work"  # the current folder: neither the checkout nor the install
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, *args]
        return subprocess.run(command, check=False, cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run("-c", "import napari_pathfm; print(napari_pathfm.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    listing = run("-m", "napari_pathfm.cli", "recipes", "--json")
    assert listing.returncode == 0, listing.stderr
    listing = json.loads(listing.stdout)
    assert Path(listing["folder"]).is_relative_to(site)
    assert {r["name"] for r in listing["recipes"]} == NAMES

    out = tmp_path / "run"
    args = ["--out", str(out), "--device", "cpu", "--set", "trainer.max_epochs=1"]
    train = run("-m", "napari_pathfm.cli", "train", "classify/crc_tiny", *args)
    assert train.returncode == 0, train.stderr[-3000:]
    card = json.loads((out / "model.json").read_text())
    assert Path(card["recipe_file"]).is_relative_to(site), card["recipe_file"]
    assert (out / "model.safetensors").is_file()
