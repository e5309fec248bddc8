"""Benchmarks reuse a finished training only when it was trained as the recipe says now (training/runs.reusable_run)."""

from __future__ import annotations

import json

from napari_pathfm.training.runs import reusable_run


def _finished(folder, recipe: dict):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "model.json").write_text(json.dumps({"recipe": recipe}), encoding="utf-8")
    return folder


def _recipe(**optim):
    return {
        "family": "segment",
        "output": "elsewhere",
        "model": {"name": "pathsam2"},
        "optim": {"lr": 1e-4, **optim},
        "trainer": {"cpu_budget_minutes": 12},
    }


def test_a_run_trained_before_a_new_default_key_existed_is_reused(tmp_path):
    old = _recipe()  # the card of a run trained before optim.warmup_fraction existed
    run = _finished(tmp_path / "fold_0", old)
    now = _recipe(warmup_fraction=0.0)  # what load_recipe gives today: the default filled in
    now["output"] = "runs/somewhere"  # where it goes does not matter
    assert reusable_run(run, now)
    assert run.is_dir()


def test_how_the_model_is_run_afterwards_does_not_make_it_stale(tmp_path):
    """objects and flips are read from the recipe when the run is scored: no weight depends on them."""
    run = _finished(tmp_path / "fold_0", {**_recipe(), "objects": {"split_um": 35}})
    assert reusable_run(run, {**_recipe(), "objects": {"split_um": 45}, "flips": True})
    assert run.is_dir()


def test_the_same_held_out_images_named_in_another_order_are_the_same_split(tmp_path):
    run = _finished(tmp_path / "fold_0", {**_recipe(), "data": {"val_names": ["train_10", "train_5"]}})
    assert reusable_run(run, {**_recipe(), "data": {"val_names": ["train_5", "train_10"]}})
    assert not reusable_run(run, {**_recipe(), "data": {"val_names": ["train_5", "train_15"]}})


def test_a_run_trained_otherwise_is_set_aside_not_deleted(tmp_path, capsys):
    run = _finished(tmp_path / "fold_0", _recipe())
    assert not reusable_run(run, _recipe(warmup_fraction=0.1), label="cv")
    assert not run.exists()
    (stale,) = tmp_path.glob("fold_0.stale-*")
    assert (stale / "model.safetensors").read_bytes() == b"weights"
    assert "[cv]" in capsys.readouterr().out


def test_an_unfinished_run_is_left_to_resume(tmp_path):
    run = tmp_path / "fold_0"
    run.mkdir()
    (run / "last.ckpt").write_bytes(b"state")
    assert not reusable_run(run, _recipe())
    assert (run / "last.ckpt").is_file() and not list(tmp_path.glob("*.stale-*"))
