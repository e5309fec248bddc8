"""Multi-process training: the tiny classify recipe under Lightning DDP (2 CPU ranks, gloo).

The run goes through the ``pathfm train`` CLI in a subprocess. The CLI is started from a
small script that adds one observer callback recording the indices each rank's
DistributedSampler hands out; Lightning's DDP launcher re-runs that same script for rank 1,
so both ranks record theirs. Nothing in the engine is replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys
from pathlib import Path

import lightning as L

from napari_pathfm.training import engine

_callbacks = engine._callbacks


class RecordSamples(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        name = f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json"
        (Path(os.environ["PATHFM_TEST_SAMPLES"]) / name).write_text(json.dumps({
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "sampler": type(sampler).__name__, "indices": [int(i) for i in sampler]}))


def with_recorder(recipe, data, events):
    callbacks, ckpt, stopper = _callbacks(recipe, data, events)
    return [*callbacks, RecordSamples()], ckpt, stopper


engine._callbacks = with_recorder

if __name__ == "__main__":
    from napari_pathfm.cli import main

    main()
"""


def test_ddp_two_cpu_ranks_split_the_data_and_save_once(tmp_path, shared_data):
    script = tmp_path / "pathfm_with_recorder.py"
    script.write_text(SCRIPT)
    samples = tmp_path / "samples"
    samples.mkdir()
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PATHFM_SHARED_DATA": str(shared_data),
        "PATHFM_TEST_SAMPLES": str(samples),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        str(script),
        "train",
        str(REPO / "training/classify/crc_tiny.yaml"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--set",
        "trainer.devices=2",
        "--set",
        "trainer.strategy=ddp",
        "--set",
        "trainer.max_epochs=1",
        "--json-progress",
    ]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sum(e.get("event") == "summary" for e in lines) == 1  # rank 1 does not print a second summary

    ranks = [json.loads(p.read_text()) for p in sorted(samples.glob("rank*-epoch0.json"))]
    assert [r["rank"] for r in ranks] == [0, 1], f"expected two ranks, got {ranks}"
    assert all(r["world_size"] == 2 and r["sampler"] == "DistributedSampler" for r in ranks)
    a, b = (set(r["indices"]) for r in ranks)
    assert a and b and not a & b, f"ranks saw overlapping samples: {sorted(a & b)}"
    n_train = len(json.loads((out / "split.json").read_text())["train"])
    assert len(a | b) == n_train  # together the ranks cover the training set once

    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert len(list(out.glob("best-*.ckpt"))) == 1
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    assert sum(e.get("event") == "done" for e in events) == 1  # only rank 0 exported the weights
    from napari_pathfm.models import load_checkpoint

    _model, card = load_checkpoint(out / "model.safetensors")
    assert card["recipe"]["trainer"]["devices"] == 2 and card["recipe"]["trainer"]["strategy"] == "ddp"
