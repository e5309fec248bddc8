"""kill -9 mid-run, then run again: the rerun succeeds and nothing a killed run left stays behind.

The runs are real ``pathfm`` subprocesses on the bundled CMU-1-Small-Region slide, killed with SIGKILL
as soon as their hidden temporary output appears (polled, so the kill lands mid-write every time),
with a per-test embedding cache (``PATHFM_CACHE_DIR``). The sweep itself is tested against a real
dead process id (a short subprocess, spawned and reaped).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_pathfm.io.atomic import atomic_path
from napari_pathfm.io.scratch import host_id, pid_alive, scratch_dir, sweep

DATA = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "data"
SLIDE = DATA / "CMU-1-Small-Region.svs"
PATHFM = Path(sys.executable).with_name("pathfm")


def _dead_pid() -> int:
    """The id of a process that ran on this host and is gone (spawned and reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporaries and scratch folders anywhere under ``folder``."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if ".tmp-" in p.name or ".old-" in p.name or p.name.startswith((".pathfm-", "pathfm-"))
    )


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PATHFM_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def _kill_when(cmd: list[str], env: dict, seen, timeout: float = 120.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``seen()`` is true (polled every 20 ms); fail if it never is."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while not seen():
            if proc.poll() is not None:
                pytest.fail(f"{cmd[1]} finished (exit {proc.returncode}) before the kill point was reached")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"{cmd[1]}: kill point not reached within {timeout} s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


# --- the sweep, on real dead and live process ids -------------------------------------------------


def test_sweep_removes_only_dead_owners_of_this_host(tmp_path):
    dead, me, host = _dead_pid(), os.getpid(), host_id()
    stale = [
        f".mask.tmp-{host}-{dead}-0123abcd.ome.tif",
        f".mask.tmp-{host}-{dead}-0123abcd.ome.tif.k2j4_x9q",
        f".pathfm-segment-{host}-{dead}-a1b2c3d4",
    ]
    kept = [
        f".mask.tmp-{host}-{me}-0123abcd.ome.tif",  # a live process (this one) is writing it
        f".mask.tmp-ffffffff-{dead}-0123abcd.ome.tif",  # another host's (shared folder): never ours to judge
        ".pathfm-translate-deadbeef-1-zzzz",
        ".notes.txt",
        "mask.ome.tif",
    ]
    for name in stale + kept:
        (tmp_path / name).mkdir() if "pathfm-" in name or name.endswith("x9q") else (tmp_path / name).write_text("x")
    (tmp_path / stale[1] / "level1_plane0.zarr").mkdir()  # a scratch store inside
    removed = sweep(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


def test_sweep_legacy_names_by_age_and_restores_a_backup(tmp_path):
    dead, host = _dead_pid(), host_id()
    old, new = tmp_path / ".mask.tmp-0123abcd.ome.tif", tmp_path / ".labels.tmp-89abcdef.geojson"
    old_scratch = tmp_path / "pathfm-segment-k2j4_x9q"
    for p in (old, new):
        p.write_text("x")
    old_scratch.mkdir()
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (day_ago, day_ago))
    os.utime(old_scratch, (day_ago, day_ago))
    # a directory replace killed between its two renames: the previous output sits in the backup
    backup = tmp_path / f".slide.old-{host}-{dead}-0123abcd.features.zarr"
    backup.mkdir()
    (backup / "zarr.json").write_text("{}")
    # a backup whose final path was already replaced is just removed
    (tmp_path / "other.features.zarr").mkdir()
    (tmp_path / f".other.old-{host}-{dead}-0123abcd.features.zarr").mkdir()
    sweep(tmp_path)
    names = sorted(os.listdir(tmp_path))
    assert names == [new.name, "other.features.zarr", "slide.features.zarr"]
    assert (tmp_path / "slide.features.zarr" / "zarr.json").read_text() == "{}"


def test_atomic_write_sweeps_the_folder_and_names_its_owner(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".mask.tmp-{host_id()}-{dead}-0123abcd.ome.tif"
    stale.write_bytes(b"half a tiff")
    with atomic_path(tmp_path / "mask.ome.tif") as tmp:
        assert tmp.name.startswith(f".mask.tmp-{host_id()}-{os.getpid()}-") and tmp.name.endswith(".ome.tif")
        assert not stale.exists()  # swept when the write started
        tmp.write_bytes(b"done")
    assert os.listdir(tmp_path) == ["mask.ome.tif"]

    with scratch_dir("segment", dir=tmp_path) as d:
        assert Path(d).name.startswith(f".pathfm-segment-{host_id()}-{os.getpid()}-")


def test_cleanup_failure_does_not_mask_the_original_error(tmp_path, caplog):
    """The writer fails, and removing its temporary fails too: the writer's error is the one raised."""
    folder = tmp_path / "out"
    with pytest.raises(ValueError, match="the writer's own error") as info, atomic_path(folder / "mask.ome.tif") as tmp:
        tmp.write_bytes(b"half")
        shutil.rmtree(folder)
        folder.write_text("a file now sits where the output folder was")  # unlink(tmp): NotADirectoryError
        raise ValueError("the writer's own error")
    assert info.value.__context__ is None  # nothing was raised over it
    assert "could not remove the temporary" in caplog.text


# --- kill -9 of real pathfm subprocesses, then the same command again --------------------------------


@pytest.mark.skipif(not SLIDE.is_file(), reason="bundled sample slide missing")
def test_segment_killed_mid_write_then_rerun(tmp_path):
    import tifffile

    out = tmp_path / "out"
    cmd = [
        str(PATHFM),
        "segment",
        str(SLIDE),
        "--out",
        str(out / "mask.ome.tif"),
        "--geojson",
        str(out / "mask.geojson"),
        "--device",
        "cpu",
        "--mpp",
        "1.24",  # a quarter of the bundled model's tiles at 0.62: the test is about the kill, not the mask
    ]
    env = _env(tmp_path)
    _kill_when(cmd, env, lambda: out.is_dir() and any(".tmp-" in n for n in os.listdir(out)))
    assert _leftovers(out), "the kill landed while a temporary output existed"
    assert not (out / "mask.ome.tif").exists()

    _run(cmd, env)
    assert _leftovers(out) == [] and _leftovers(tmp_path / "cache") == []
    assert sorted(os.listdir(out)) == ["mask.geojson", "mask.ome.tif"]
    mask = tifffile.imread(out / "mask.ome.tif")
    assert mask.shape == (2967, 2220) and set(np.unique(mask)) <= {0, 1} and mask.any()
    assert json.loads((out / "mask.geojson").read_text())["features"]


@pytest.mark.skipif(not SLIDE.is_file(), reason="bundled sample slide missing")
def test_features_killed_mid_extraction_then_rerun(tmp_path):
    from napari_pathfm.pipelines.features import read_features

    out = tmp_path / "feats"
    cmd = [
        str(PATHFM),
        "features",
        str(SLIDE),
        "--out",
        str(out),
        "--backbone",
        "resnet10t",
        "--mpp",
        "1",
        "--tile",
        "64",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    env = _env(tmp_path)

    def features_being_written() -> bool:  # the temporary feature store exists: the tiles are being encoded
        return out.is_dir() and any((p / "zarr.json").exists() for p in out.glob(".*.tmp-*"))

    _kill_when(cmd, env, features_being_written)
    assert _leftovers(out) and not (out / "CMU-1-Small-Region.features.zarr").exists()

    _run(cmd, env)
    assert _leftovers(out) == [] and _leftovers(tmp_path / "cache") == []
    assert os.listdir(out) == ["CMU-1-Small-Region.features.zarr"]
    bag = read_features(out / "CMU-1-Small-Region.features.zarr")
    assert len(bag) > 10 and bag.dim == 512 and np.isfinite(bag.features).all()


@pytest.mark.skipif(not SLIDE.is_file(), reason="bundled sample slide missing")
def test_batch_killed_mid_slide_then_rerun(tmp_path):
    """`pathfm batch --task segment` killed while its second slide is being written (workers die with it)."""
    import tifffile

    for name in ("a.svs", "b.svs"):
        os.link(SLIDE, tmp_path / name) if SLIDE.stat().st_dev == tmp_path.stat().st_dev else shutil.copy(
            SLIDE, tmp_path / name
        )
    (tmp_path / "m.csv").write_text("slide\na.svs\nb.svs\n")
    out = tmp_path / "out"
    cmd = [
        str(PATHFM),
        "batch",
        str(tmp_path / "m.csv"),
        "--task",
        "segment",
        "--out",
        str(out),
        "--workers",
        "1",
        "--set",
        "device=cpu",
        "--set",
        "cache=false",
        "--set",
        "mpp=1.24",  # a quarter of the bundled model's tiles at 0.62 µm/px
    ]
    env = _env(tmp_path)

    def second_slide_being_written() -> bool:
        folders = [f for f in out.iterdir() if f.is_dir()] if out.is_dir() else []
        done = [f for f in folders if (f / "done.json").exists()]
        return len(done) == 1 and any(".tmp-" in n for f in folders if f not in done for n in os.listdir(f))

    _kill_when(cmd, env, second_slide_being_written)
    assert _leftovers(out)
    time.sleep(0.5)  # the worker process notices its parent is gone and exits

    result = _run(cmd, env)
    assert "ok 1, skipped 1, failed 0" in result.stdout
    assert _leftovers(out) == []
    masks = [tifffile.imread(f / "mask.ome.tif") for f in sorted(out.iterdir()) if f.is_dir()]
    assert len(masks) == 2 and masks[0].shape == (2967, 2220)
    np.testing.assert_array_equal(masks[0], masks[1])  # same pixels, same model: same mask
    rows = json.loads((out / "batch-summary.json").read_text())["slides"]
    assert sorted(r["status"] for r in rows) == ["ok", "skipped"]
