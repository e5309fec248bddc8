"""The family rows (napari_pathfm.families) agree with the code they name, the recipes and the manifest."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from napari_pathfm.errors import CheckpointError
from napari_pathfm.families import FamilySpec, get_family, list_families, register_family
from napari_pathfm.models.checkpoint import check_family
from napari_pathfm.models.registry import list_models, model_info
from napari_pathfm.recipe_files import recipe_family, recipes_dir

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ["classify", "mil", "segment", "translate", "features"]
PARTS = ("loader", "pipeline", "training", "recipe_fields", "batch", "default_checkpoint", "dock")


@pytest.mark.parametrize("name", BUILTIN)
def test_every_part_a_row_names_exists(name):
    spec = get_family(name)
    for field in PARTS:
        if getattr(spec, field):
            assert spec.part(field) is not None, (name, field)
    if spec.training:
        assert callable(spec.part("training").build)
    if spec.pipeline:  # what the batch task fills in are real parameters of the pipeline entry
        assert spec.batch_fills <= set(inspect.signature(spec.part("pipeline")).parameters), name


def test_models_recipes_and_docks_belong_to_known_rows():
    assert list_families() == BUILTIN and list_families("training") == BUILTIN[:4]
    assert {model_info(m)["family"] for m in list_models()} <= set(list_families())
    recipes = sorted(recipes_dir().glob("*/*.yaml"))
    assert len(recipes) > 40
    for path in recipes:
        assert path.parent.name in get_family(recipe_family(path)).recipe_folders, path
    manifest = yaml.safe_load((ROOT / "napari.yaml").read_text())
    widgets = {c["python_name"] for c in manifest["contributions"]["commands"]}
    assert {get_family(n).dock for n in BUILTIN if get_family(n).dock} <= widgets


def test_wrong_family_is_refused_in_words_from_the_rows():
    with pytest.raises(
        CheckpointError,
        match=r"x\.json: is a 'mil' checkpoint \(model 's4mil'\), not a tile "
        r"classifier\. Pick a checkpoint of family 'classify' \(timm_classifier or slca.*\); use this "
        r"one with pathfm mil predict / the MIL widget\.",
    ):
        check_family({"family": "mil", "name": "s4mil", "config": {"in_dim": 8}}, "classify", "x.json")
    # no family on the card: the registry's family of its model counts
    with pytest.raises(CheckpointError, match="is a 'classify' checkpoint .*not a segmentation model"):
        check_family({"name": "timm_classifier", "config": {}}, "segment", "x.json")
    with pytest.raises(CheckpointError, match="has no `config.in_dim` in its model card; it is not a MIL model"):
        check_family({"family": "mil", "name": "s4mil", "config": {}}, "mil", "x.json")
    check_family({"family": "mil", "name": "s4mil", "config": {"in_dim": 8}}, "mil", "x.json")


def test_registering_and_looking_up():
    with pytest.raises(KeyError, match="unknown family 'nosuch'; known families: classify, mil"):
        get_family("nosuch")
    spec = get_family("segment")
    assert register_family(spec) is spec  # the same row again: no-op
    with pytest.raises(ValueError, match="family 'segment' is already registered"):
        register_family(FamilySpec(name="segment", title="Other", noun="another model"))
    with pytest.raises(LookupError, match="family 'features' has no training"):
        get_family("features").part("training")


def test_looking_up_families_and_recipe_keys_does_not_import_torch():
    code = (
        "import sys\n"
        "from napari_pathfm.families import list_families\n"
        "from napari_pathfm.training.recipes import schema\n"
        "from napari_pathfm.training.recipe_labels import field_label\n"
        "assert list_families() and schema('segment') and field_label('trainer.batch_size', 'mil')[1] == 'slides'\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
