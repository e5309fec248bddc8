"""SIGTERM to a real ``pathfm train`` subprocess: graceful stop (last.ckpt, export) with exit code 143.

Cluster schedulers send SIGTERM before they kill a job. Lightning's own SIGTERM handler would abort
the run with exit status 0 and nothing exported; ``GracefulStop`` makes it a graceful stop like the
panel's SIGINT, and a second signal stops the process at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "training" / "classify" / "crc_tiny.yaml"


def _env(shared_data: Path, tmp_path: Path) -> dict:
    if not (shared_data / "crc-tiles" / "kather2016").is_dir():
        pytest.skip(f"Kather 2016 tiles not found under {shared_data}/crc-tiles (see ../shared/data/README)")
    return {
        **os.environ,
        "PATHFM_SHARED_DATA": str(shared_data),
        "PATHFM_MODELS": str(tmp_path / "no-models"),
        "OMP_NUM_THREADS": "1",
    }


def _start(out: Path, env: dict, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "napari_pathfm.cli",
        "train",
        str(RECIPE),
        "--out",
        str(out),
        "--json-progress",
        "--set",
        "trainer.max_epochs=50",
        *extra,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent)


def _until_first_batch(proc: subprocess.Popen) -> list[dict]:
    """Read JSON events until the first ``batch`` event (training is running, Lightning's handlers installed)."""
    events = []
    for line in proc.stdout:
        event = json.loads(line) if line.startswith("{") else None
        if event:
            events.append(event)
            if event.get("event") == "batch":
                return events
    raise AssertionError(f"no batch event; exit {proc.wait()}: {proc.stderr.read()[-2000:]}")


def test_sigterm_stops_gracefully_with_143_and_the_run_resumes(shared_data, tmp_path):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    out = tmp_path / "run"
    out.mkdir()
    proc = _start(out, _env(shared_data, tmp_path), "--no-resume")
    events = _until_first_batch(proc)
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=180)
    events += [json.loads(line) for line in rest.splitlines() if line.startswith("{")]
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: stopping after this batch (saving last.ckpt, exporting the model)" in err
    kinds = [e["event"] for e in events]
    assert "error" not in kinds and kinds[-2:] == ["done", "summary"], kinds
    summary = events[-1]
    assert summary["cancelled"] is True and summary["epochs_run"] <= 1
    assert (out / "last.ckpt").is_file(), "the state to resume from"
    assert (out / "model.safetensors").is_file() and json.loads((out / "model.json").read_text())[
        "family"
    ] == "classify"
    stopped_at = next(e for e in events if e["event"] == "done")["epoch"]
    assert stopped_at < 50

    # resume from last.ckpt up to one more epoch than the stop reached: only the remaining epoch runs
    args = ["train", str(RECIPE), "--out", str(out), "--json-progress", "--set", f"trainer.max_epochs={stopped_at + 1}"]
    env = _env(shared_data, tmp_path)
    result = CliRunner().invoke(app, args, env={k: env[k] for k in ("PATHFM_SHARED_DATA", "PATHFM_MODELS")})
    assert result.exit_code == 0, result.output[-3000:]
    resumed = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [e["epoch"] for e in resumed if e["event"] == "epoch"] == [stopped_at]
    assert resumed[-1]["event"] == "summary" and resumed[-1]["cancelled"] is False and resumed[-1]["epochs_run"] == 1


def test_second_sigterm_stops_at_once(shared_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = _start(out, _env(shared_data, tmp_path), "--no-resume")
    _until_first_batch(proc)
    proc.send_signal(signal.SIGTERM)
    # two signals sent back to back reach the Python handler once: wait until the first was handled
    for line in proc.stderr:
        if line.startswith("SIGTERM: stopping after this batch"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, "killed by the second SIGTERM (a shell reports 143)"
    assert '"event": "summary"' not in rest
