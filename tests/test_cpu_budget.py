"""trainer.cpu_budget_minutes: a run stops after that much CPU time of its own process, with the cosine
schedule spread over the budget; the plain U-Net baseline trains through the same task and runs in
`pathfm segment`."""

from __future__ import annotations

import itertools
import json

import pytest

from napari_pathfm.training.budget import budget_lr_factor

torch = pytest.importorskip("torch")


def test_cosine_factor_over_the_budget():
    assert budget_lr_factor(0.0) == 1.0 and budget_lr_factor(1.0) == 0.0
    assert budget_lr_factor(0.25) == pytest.approx(0.8535533906)
    assert budget_lr_factor(2.0) == 0.0 and budget_lr_factor(-1) == 1.0


def test_warmup_rises_linearly_then_the_cosine_runs_over_the_rest():
    assert budget_lr_factor(0.0, warmup=0.1) == pytest.approx(1e-3)
    assert budget_lr_factor(0.05, warmup=0.1) == pytest.approx(0.5)
    assert budget_lr_factor(0.1, warmup=0.1) == 1.0
    assert budget_lr_factor(0.55, warmup=0.1) == pytest.approx(0.5)  # half-way through the cosine part
    assert budget_lr_factor(1.0, warmup=0.1) == 0.0


def test_unet_baseline_trains_for_its_budget_and_segments(shared_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.pipelines.segment import segment_slide

    if not (shared_data / "glas" / "train").is_dir():
        pytest.skip("GlaS not found")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "unet"
    sets = [
        "trainer.step_budget=null",  # the recipe's step budget would win over the minutes
        "trainer.cpu_budget_minutes=0.15",  # 9 CPU-seconds: a few steps
        "data.tile_size=64",
        "model.image_size=64",
        "data.samples_per_image=1",
        "trainer.batch_size=4",
        "data.input_mpp=2.48",
    ]
    args = ["train", "pathsam2/glas_unet_baseline", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "batch"]
    assert 0 < len(steps) < 100, "the budget, not max_epochs (200), ended the run"
    batches = [e for e in events if e["event"] == "batch"]
    assert batches[-1]["total"] < 3 * len(steps) < 200, "progress: the total is the budget's, not 200 epochs'"
    assert "CPU-minutes" in batches[-1]["message"] and "/200" not in batches[-1]["message"]
    # the cosine ran over the budget: the learning rate logged last is far below the start (1e-3)
    card = json.loads((out / "model.json").read_text())
    assert card["name"] == "resnet_unet" and card["objects"]["split_um"] == 35
    image = shared_data / "glas" / "train" / "images" / "train_1.png"
    res = segment_slide(image, out / "model.safetensors", image_mpp=0.62, cache=False, device="cpu")
    assert res.labels.shape == (522, 775) and res.object_classes is not None


def test_budget_lowers_the_learning_rate_step_by_step():
    import lightning as L

    from napari_pathfm.training.budget import CPUBudget

    class Burn(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(64, 64))
            self.lrs = []

        def training_step(self, batch, _i):
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            x = batch[0]
            for _ in range(20):  # some real CPU work per step
                x = torch.tanh(x @ self.w)
            return x.pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(torch.randn(4096, 64))
            return torch.utils.data.DataLoader(data, batch_size=256)

    model = Burn()
    trainer = L.Trainer(
        max_epochs=10_000,
        callbacks=[CPUBudget(0.02, cosine=True)],  # 1.2 CPU-seconds
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    assert trainer.current_epoch < 10_000 - 1, "stopped by the budget"
    lrs = model.lrs
    assert lrs[0] == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.05 and all(a >= b for a, b in itertools.pairwise(lrs))


def test_step_budget_stops_at_its_step_and_runs_the_cosine_over_the_steps():
    import lightning as L

    from napari_pathfm.training.budget import StepBudget

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(8))
            self.lrs = []

        def training_step(self, batch, _i):
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
            return (batch[0] * self.w).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 8)), batch_size=8)

    model = Tiny()
    trainer = L.Trainer(
        max_epochs=100,
        callbacks=[StepBudget(37, cosine=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    assert trainer.global_step == 37 and len(model.lrs) == 37, "exactly the budgeted steps, mid-epoch"
    # step k runs at base * budget_lr_factor(k / 37): the schedule depends on the step, not on the clock
    assert model.lrs == pytest.approx([0.1 * budget_lr_factor(k / 37) for k in range(37)])
    with pytest.raises(ValueError, match="positive whole number"):
        StepBudget(0)


def test_a_card_records_its_steps_and_step_budget_repeats_them(shared_data, tmp_path, monkeypatch):
    """`pathfm train ... --set trainer.step_budget=N` stops at step N, and the card says how many steps
    the run made: the number that repeats a CPU-budget run on another machine."""
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    if not (shared_data / "crc-tiles" / "kather2016").is_dir():
        pytest.skip("the Kather 2016 CRC tiles are not in the shared data")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "steps"
    sets = ["trainer.step_budget=5", "trainer.max_epochs=50", "trainer.limit_val_batches=0"]
    args = ["train", "classify/crc_tiny", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    batches = [e for e in events if e["event"] == "batch"]
    assert len(batches) == 5 and "of 5 steps" in batches[-1]["message"]
    card = json.loads((out / "model.json").read_text())
    assert card["steps"] == 5 and card["recipe"]["trainer"]["step_budget"] == 5
