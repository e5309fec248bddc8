"""A family added from outside the package runs through `pathfm train`, `pathfm batch` and checkpoint loading.

The test writes a toy family (a one-layer classifier of rows of numbers) as two small modules in a
temporary folder, exactly what "Add a family" in docs/architecture.md walks through:

- ``toy_family.py``: the model factory (``@register_model(family="toy")``), the family's recipe
  keys, its pipeline entry, its batch task and the :class:`~napari_pathfm.families.FamilySpec`;
- ``toy_family_train.py``: the training task, ``build(recipe) -> (LightningModule, LightningDataModule, card)``.

The ``pathfm`` subprocesses find it through ``PATHFM_PLUGINS=toy_family`` (and ``PYTHONPATH``);
nothing in the package is touched.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from napari_pathfm import families
from napari_pathfm.errors import CheckpointError
from napari_pathfm.models import registry

FAMILY_MODULE = '''
    """Toy family: a linear classifier of rows of numbers (a "slide" is a .npy file of rows)."""
    import json
    from pathlib import Path

    from napari_pathfm.families import FamilySpec, register_family
    from napari_pathfm.models.registry import register_model
    from napari_pathfm.training.recipe_fields import Field


    @register_model(family="toy")
    def toy_linear(in_dim=4, num_classes=2):
        """Toy: one linear layer over rows of in_dim numbers."""
        import torch

        return torch.nn.Linear(in_dim, num_classes)


    RECIPE_FIELDS = {
        "data.rows": Field((int,), 64, "Rows of random numbers to train on (class: is the first one > 0)."),
        "data.val_fraction": Field((float,), 0.25, "Share of the rows held out for validation."),
        "trainer.batch_size": Field((int,), 16, "Rows per batch."),
    }


    def predict(rows_file, checkpoint, device="cpu", progress=None, cancel=None):
        """Class probabilities of every row of a .npy file."""
        import numpy as np
        import torch

        from napari_pathfm.models.checkpoint import load_any

        model, card = load_any(checkpoint, device, family="toy")[:2]
        with torch.no_grad():
            probs = model(torch.as_tensor(np.load(rows_file), dtype=torch.float32)).softmax(1).numpy()
        return {"classes": card["classes"], "probabilities": probs.tolist()}


    def batch(slide, out, checkpoint, options):
        """`pathfm batch --task toy`: predictions of one file into out/prediction.json."""
        result = predict(slide, checkpoint[0], **options)
        (Path(out) / "prediction.json").write_text(json.dumps(result))
        return {"rows": len(result["probabilities"])}


    register_family(FamilySpec(
        name="toy", title="Toy", noun="a toy model", examples="toy_linear", use="pathfm batch --task toy",
        card_keys=("classes",), pipeline="toy_family:predict", training="toy_family_train",
        recipe_fields="toy_family:RECIPE_FIELDS", batch="toy_family:batch",
        batch_fills=frozenset({"rows_file", "checkpoint", "progress", "cancel"}), needs_checkpoint=True,
        batch_unit="rows",
    ))
'''

TRAIN_MODULE = '''
    """Toy family's training task."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from napari_pathfm.models import create_model


    class ToyTask(L.LightningModule):
        def __init__(self, model, lr):
            super().__init__()
            self.model, self.lr = model, lr

        def _loss(self, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def training_step(self, batch, _):
            loss = self._loss(batch)
            self.log("loss", loss)
            return loss

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=self.lr)


    class ToyData(L.LightningDataModule):
        def __init__(self, rows, in_dim, val_fraction, batch_size, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(rows, in_dim, generator=g)
            n_val = max(1, int(rows * val_fraction))
            data = TensorDataset(x, (x[:, 0] > 0).long())
            self.train, self.val = torch.utils.data.random_split(data, [rows - n_val, n_val], generator=g)
            self.batch_size = batch_size

        def train_dataloader(self):
            return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

        def val_dataloader(self):
            return DataLoader(self.val, batch_size=self.batch_size)


    def build(recipe):
        cfg = {k: v for k, v in recipe.get("model").items() if k != "name"}
        model = create_model(recipe.get("model.name"), **cfg)
        data = ToyData(recipe.get("data.rows"), model.in_features, recipe.get("data.val_fraction"),
                       recipe.get("trainer.batch_size"), recipe.get("seed"))
        return ToyTask(model, recipe.get("optim.lr")), data, {"classes": ["first <= 0", "first > 0"]}
'''

RECIPE = """\
family: toy
description: Toy family, two epochs on random rows.
model:
  name: toy_linear
  in_dim: 4
data:
  rows: 64
optim:
  lr: 0.5
trainer:
  max_epochs: 2
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy family's modules in a folder on sys.path and PYTHONPATH, registered here; removed afterwards."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "toy_family.py").write_text(textwrap.dedent(FAMILY_MODULE))
    (plugin_dir / "toy_family_train.py").write_text(textwrap.dedent(TRAIN_MODULE))
    saved = dict(families._FAMILIES), dict(registry._RUNTIME), dict(registry._ENTRYPOINTS)
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(families.PLUGINS_ENV, "toy_family")
    importlib.import_module("toy_family")
    yield plugin_dir
    for module in ("toy_family", "toy_family_train"):
        sys.modules.pop(module, None)
    for live, old in zip((families._FAMILIES, registry._RUNTIME, registry._ENTRYPOINTS), saved):
        live.clear()
        live.update(old)


def _pathfm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "napari_pathfm.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_toy_family_trains_batches_and_loads(toy, tmp_path):
    assert "toy" in families.list_families("training") and "toy" in families.list_families("batch")
    assert registry.model_info("toy_linear")["family"] == "toy"

    # pathfm train: the recipe's keys come from the toy spec, the task from its training module
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    run = _pathfm(
        "train", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu", "--json-progress", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    summary = next(e for e in events if e.get("event") == "summary")
    ckpt = Path(summary["checkpoint"])
    card = json.loads(ckpt.with_suffix(".json").read_text())
    assert card["family"] == "toy" and card["name"] == "toy_linear" and card["classes"][1] == "first > 0"
    assert summary["epochs_run"] == 2 and "val_loss" in summary["best_metrics"]

    # checkpoint loading: by the card's family, and refused (from the card alone) where another family is expected
    from napari_pathfm.models.checkpoint import load_any, load_family_checkpoint

    model, loaded = load_any(ckpt)
    assert loaded["family"] == "toy" and model.in_features == 4 and not model.training
    refused = r"is a 'toy' checkpoint .*not a tile classifier.*use this one with pathfm batch --task toy"
    with pytest.raises(CheckpointError, match=refused):
        load_family_checkpoint(ckpt, "classify")
    card_path = ckpt.with_suffix(".json")
    card_path.write_text(json.dumps({k: v for k, v in card.items() if k != "classes"}))
    with pytest.raises(CheckpointError, match="has no `classes` in its model card; it is not a toy model"):
        load_any(ckpt)
    card_path.write_text(json.dumps(card))

    # pathfm batch: the toy batch task on a dask worker, options checked against the toy pipeline entry
    rows = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    np.save(tmp_path / "a.npy", rows)
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([["slide"], ["a.npy"]])
    from napari_pathfm.errors import UsageError
    from napari_pathfm.pipelines.batch import check_options

    with pytest.raises(UsageError, match=r"not an option of task 'toy' \(toy_family.predict\)\. Use one of: device"):
        check_options("toy", {"tile": 3})
    run = _pathfm(
        "batch",
        str(manifest),
        "--task",
        "toy",
        "--out",
        str(tmp_path / "b"),
        "-c",
        str(ckpt),
        "--workers",
        "1",
        "--set",
        "device=cpu",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = json.loads((tmp_path / "b" / "batch-summary.json").read_text())
    assert out["counts"] == {"ok": 1, "skipped": 0, "failed": 0}
    prediction = json.loads((Path(out["slides"][0]["output"]) / "prediction.json").read_text())
    expected = model(__import__("torch").as_tensor(rows)).softmax(1).detach().numpy()
    np.testing.assert_allclose(prediction["probabilities"], expected, rtol=1e-5, atol=1e-6)


def test_unknown_family_is_named(tmp_path):
    """A checkpoint of a family nobody registered says what is missing (no plugin), not a KeyError."""
    from napari_pathfm.models import create_model, save_checkpoint
    from napari_pathfm.models.checkpoint import load_any

    ckpt = save_checkpoint(
        create_model("meanpool", in_dim=4, n_classes=2, d_model=4), tmp_path / "m", {"family": "nosuch"}
    )
    with pytest.raises(CheckpointError, match="family 'nosuch', which this version of napari-pathfm does not know"):
        load_any(ckpt)
