"""Bundled recipes' data defaults sit in the per-user data folder, never next to (or inside) the package."""

import re

import pytest

from napari_pathfm.recipe_files import recipes_dir

# ${VAR:-default}: the default of a variable, as the recipes write it
DEFAULT = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^$}]*)")


def test_no_recipe_default_is_a_relative_path():
    """A relative default resolves against the recipe's folder, which is inside the installed package."""
    relative = []
    for path in sorted(recipes_dir().rglob("*.yaml")):
        for fallback in DEFAULT.findall(path.read_text(encoding="utf-8")):
            if fallback.startswith(("./", "../")):
                relative.append(f"{path.relative_to(recipes_dir())}: {fallback}")
    assert not relative, relative


@pytest.mark.parametrize(
    ("recipe", "key", "variable", "under"),
    [
        ("slca/glas_cpu", "data.root", "PATHFM_GLAS_TILES", "glas_tiles"),
        ("slca/glas_cpu_noslca", "data.split_file", "PATHFM_GLAS_TILES", "glas_tiles/split.json"),
        ("slca/glas_demo_cpu", "data.root", "PATHFM_GLAS_TILES", "glas_tiles"),
        ("s4mil/glas_bags_tiny", "data.csv", "GLAS_MIL_TINY", "glas-mil-tiny/bags.csv"),
    ],
)
def test_data_defaults_follow_the_user_data_folder(recipe, key, variable, under, monkeypatch, tmp_path):
    """Unset, the data variable falls back to ${PATHFM_DATA_DIR}/...; set, it wins; PATHFM_DATA_DIR itself is
    the per-user folder (userdata.data_dir) even when the environment does not name it."""
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.userdata import data_dir

    monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATHFM_DATA_DIR", str(tmp_path / "user"))
    assert load_recipe(recipe).get(key) == str(tmp_path / "user" / under)
    monkeypatch.delenv("PATHFM_DATA_DIR")
    assert load_recipe(recipe).get(key) == str(data_dir() / under)
    monkeypatch.setenv(variable, str(tmp_path / "mine"))
    rest = under.partition("/")[2]  # what the recipe writes after the variable
    assert load_recipe(recipe).get(key) == str(tmp_path / "mine") + (f"/{rest}" if rest else "")


def test_nested_default_expands_only_when_used(monkeypatch):
    """``${A:-${B}/x}`` is A when A is set (B may be unset), else B's value + /x."""
    from napari_pathfm.errors import RecipeError
    from napari_pathfm.training.recipes import load_recipe

    monkeypatch.setenv("PATHFM_TEST_A", "/a")
    monkeypatch.delenv("PATHFM_TEST_B", raising=False)
    raw = {
        "family": "classify",
        "model": {"name": "timm_classifier"},
        "data": {"root": "${PATHFM_TEST_A:-${PATHFM_TEST_B}/x}"},
    }
    recipe = load_recipe(raw)
    assert recipe.get("data.root") == "/a"
    monkeypatch.delenv("PATHFM_TEST_A")
    with pytest.raises(RecipeError, match="PATHFM_TEST_B"):
        load_recipe(raw)
    monkeypatch.setenv("PATHFM_TEST_B", "/b")
    assert load_recipe(raw).get("data.root") == "/b/x"
