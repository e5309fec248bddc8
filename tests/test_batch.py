"""``pathfm batch`` on a real 2-worker dask LocalCluster over the shared test slides."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_pathfm.errors import Cancelled, PathFMError
from napari_pathfm.pipelines.batch import (
    check_options,
    parse_options,
    read_manifest,
    run_batch,
    slide_out_dir,
)

# cheapest real task: features of a randomly initialised timm resnet10t on a few coarse tiles
OPTIONS = {"backbone": "resnet10t", "mpp": 4.0, "tile": 64, "batch_size": 8, "device": "cpu"}


def test_manifest_and_options(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"")
    m = tmp_path / "m.csv"
    m.write_text("slide,label\na.svs,x\n\n a.svs ,y\n/abs/b.svs,z\n")
    assert read_manifest(m) == [(tmp_path / "a.svs").resolve(), Path("/abs/b.svs").resolve()]
    bad = tmp_path / "bad.csv"
    bad.write_text("path\na.svs\n")
    with pytest.raises(PathFMError, match="no 'slide' column"):
        read_manifest(bad)
    assert parse_options(["batch_size=4", "device=cpu", "mpp=0.5"]) == {"batch_size": 4, "device": "cpu", "mpp": 0.5}
    with pytest.raises(PathFMError, match="KEY=VALUE"):
        parse_options(["batch_size"])
    with pytest.raises(PathFMError, match="unknown task"):
        run_batch(m, "nope", tmp_path / "out")
    with pytest.raises(PathFMError, match=r"--set batchsize: not an option of task 'classify'.*batch_size"):
        run_batch(m, "classify", tmp_path / "out", options={"batchsize": 4})
    # a missing or wrong checkpoint is refused before any slide runs (no cluster, no per-slide failures)
    with pytest.raises(PathFMError, match=r"task 'translate' needs --checkpoint \(one per channel\)"):
        run_batch(m, "translate", tmp_path / "out")
    with pytest.raises(PathFMError, match="nope.safetensors: checkpoint not found"):
        run_batch(m, "mil", tmp_path / "out", checkpoint=tmp_path / "nope.safetensors")
    assert not (tmp_path / "out" / "batch-summary.json").exists()
    for task, ok in [
        ("features", {"backbone": "x", "tile": 64, "min_tissue": 0.1}),
        ("segment", {"overlap": 0.1}),
        ("classify", {"tissue_only": False}),
        ("mil", {"top_k": 3, "device": "cpu"}),
        ("translate", {"stride": 128, "threshold": 0.4}),
    ]:
        check_options(task, ok)
        with pytest.raises(PathFMError, match="not an option"):
            check_options(task, {**ok, "progress": None})  # filled in by the task itself


def test_batch_local_cluster_resumes_and_reports_failures(tmp_path, wsi_dir, cmu_small):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    copy_dir = tmp_path / "copies"
    copy_dir.mkdir()
    copy = copy_dir / cmu_small.name  # same stem as the original: must get its own folder
    shutil.copy(cmu_small, copy)
    slides = [cmu_small, wsi_dir / "boxes.tiff", wsi_dir / "small.svs", wsi_dir / "unreadable.svs", copy]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide\n" + "\n".join(str(s) for s in slides[:-1]) + "\ncopies/" + copy.name + "\n")
    out = tmp_path / "out"
    seen = []

    summary = run_batch(
        manifest, "features", out, n_workers=2, options=OPTIONS, progress=lambda d, t, m="": seen.append((d, t))
    )
    rows = {r["slide"]: r for r in summary.rows}
    assert summary.counts == {"ok": 4, "skipped": 0, "failed": 1}
    bad = rows[str((wsi_dir / "unreadable.svs").resolve())]
    assert bad["status"] == "failed" and "unreadable.svs" in bad["error"] and "Bogus marker" in bad["error"]
    assert seen[-1] == (5, 5)
    folders = {s: slide_out_dir(out, s.resolve()) for s in slides}
    assert folders[cmu_small] != folders[copy]
    for s in slides:
        if s.name == "unreadable.svs":
            assert not (folders[s] / "done.json").exists()
            continue
        done = json.loads((folders[s] / "done.json").read_text())
        assert done["task"] == "features" and done["options"] == OPTIONS
        assert list(folders[s].glob("*.features.zarr")), f"no feature file for {s}"
    assert done["result"]["n_tiles"] > 0  # the copy of CMU-1 has tissue tiles
    with open(out / "batch-summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["status"] for r in table] == ["ok", "ok", "ok", "failed", "ok"]
    assert json.loads((out / "batch-summary.json").read_text())["counts"]["failed"] == 1

    # second run: complete slides are skipped (no work), the failed one is retried and fails again
    again = run_batch(manifest, "features", out, n_workers=2, options=OPTIONS)
    assert again.counts == {"ok": 0, "skipped": 4, "failed": 1}

    # a deleted done.json makes that slide run again; through the CLI (exit 1: a slide failed)
    (folders[copy] / "done.json").unlink()
    sets = [f"--set={k}={v}" for k, v in OPTIONS.items()]
    result = CliRunner().invoke(
        app, ["batch", str(manifest), "--task", "features", "--out", str(out), "--workers", "1", *sets]
    )
    assert result.exit_code == 1, result.output
    assert "ok 1, skipped 3, failed 1" in result.output
    assert (folders[copy] / "done.json").exists()


def test_batch_cancel_stops_pending_slides_and_writes_the_summary(tmp_path, cmu_small):
    import threading

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide\n{cmu_small}\n")
    cancel = threading.Event()
    with pytest.raises(Cancelled, match="1 slides not run"):
        # the first progress call (before any slide finished) asks to stop
        run_batch(
            manifest,
            "features",
            tmp_path / "out",
            n_workers=1,
            options=OPTIONS,
            progress=lambda *a: cancel.set(),
            cancel=cancel,
        )
    assert json.loads((tmp_path / "out" / "batch-summary.json").read_text())["slides"] == []
    assert not (slide_out_dir(tmp_path / "out", cmu_small.resolve()) / "done.json").exists()


def test_run_slide_classify_task_and_reported_mistakes(tmp_path, cmu_small):
    """The worker function on its own (no cluster): the classify task writes the classify outputs + done.json."""
    from napari_pathfm.models import create_model, save_checkpoint
    from napari_pathfm.pipelines.batch import _key, run_slide
    from napari_pathfm.pipelines.batch_done import is_complete

    model = create_model("timm_classifier", backbone="resnet10t", num_classes=2)
    ckpt = save_checkpoint(model, tmp_path / "cls", {"classes": ["a", "b"], "tile_size": 64, "input_mpp": 4.0})
    out = tmp_path / "one"
    row = run_slide(str(cmu_small), "classify", str(out), [str(ckpt)], {"device": "cpu", "batch_size": 16})
    assert row["status"] == "ok", row["error"]
    assert {"class-map.ome.tif", "probabilities.ome.tif", "tiles.csv", "summary.json", "done.json"} <= {
        p.name for p in out.iterdir()
    }
    done = json.loads((out / "done.json").read_text())
    assert done["result"]["tiles"] > 0 and done["checkpoint"] == [str(ckpt)]
    key = {k: done[k] for k in ("task", "checkpoint", "checkpoint_files", "options")}
    assert is_complete(out, key) and key["checkpoint_files"][0]["size"] == ckpt.stat().st_size
    assert not is_complete(out, {**key, "options": {"device": "cpu"}})
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))  # checkpoint replaced in place
    assert not is_complete(out, _key("classify", [str(ckpt)], {"device": "cpu", "batch_size": 16}))

    no_ckpt = run_slide(str(cmu_small), "mil", str(tmp_path / "two"), None, {})
    assert no_ckpt["status"] == "failed" and "needs --checkpoint" in no_ckpt["error"]
    typo = run_slide(str(cmu_small), "classify", str(tmp_path / "three"), [str(ckpt)], {"batchsize": 4})
    assert typo["status"] == "failed" and "batchsize" in typo["error"]
    assert not (tmp_path / "three" / "done.json").exists()


# --- segment, mil and translate through run_batch / `pathfm batch` on one shared 2-worker LocalCluster ---

UNREADABLE = {"unreadable.svs", "unopenable.tiff"}  # shared test files no reader can decode
SHARED_SLIDES = ["CMU-1-Small-Region.svs", "boxes.tiff", "boxes_0.dcm", "small.svs", *sorted(UNREADABLE)]


@pytest.fixture(scope="module")
def scheduler():
    """Address of one 2-worker LocalCluster (one thread each) that the task tests below share."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def _manifest(tmp_path: Path, slides: list[Path]) -> Path:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide\n" + "\n".join(str(s) for s in slides) + "\n")
    return manifest


def _statuses(out: Path) -> list[str]:
    with open(out / "batch-summary.csv", newline="") as fh:
        return [r["status"] for r in csv.DictReader(fh)]


def test_batch_segment_shared_slides_bundled_model(tmp_path, wsi_dir, cmu_small, scheduler):
    """Bundled Path-SAM2 over every shared slide + a renamed CMU-1 copy; unreadable slides fail alone; rerun skips."""
    import tifffile
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.io.slide import open_slide
    from napari_pathfm.pipelines.segment import default_segment_checkpoint

    copy = tmp_path / "case-007.svs"
    shutil.copy(cmu_small, copy)
    slides = [wsi_dir / n for n in SHARED_SLIDES if (wsi_dir / n).exists()] + [copy]
    manifest, out = _manifest(tmp_path, slides), tmp_path / "masks"
    summary = run_batch(manifest, "segment", out, scheduler=scheduler, options={"device": "cpu"})

    n_bad = sum(s.name in UNREADABLE for s in slides)
    assert summary.counts == {"ok": len(slides) - n_bad, "skipped": 0, "failed": n_bad}
    assert _statuses(out) == ["failed" if s.name in UNREADABLE else "ok" for s in slides]
    masks = {}
    for s, row in zip(slides, summary.rows):
        folder = slide_out_dir(out, s.resolve())
        assert row["slide"] == str(s.resolve()) and row["output"] == str(folder)
        if s.name in UNREADABLE:
            assert row["error"].startswith("SlideError: ") and s.name in row["error"]
            assert not (folder / "done.json").exists() and not (folder / "mask.ome.tif").exists()
            continue
        done = json.loads((folder / "done.json").read_text())
        # the default model is resolved by the driver, so done.json names the model that ran
        assert done["checkpoint"] == [str(default_segment_checkpoint().resolve())]
        assert done["result"]["classes"] == ["background", "gland"]
        masks[s] = tifffile.imread(folder / "mask.ome.tif")
        with open_slide(s) as sl:
            assert masks[s].shape == sl.pyramid[0].shape[:2], s  # level-0 class map
        assert set(np.unique(masks[s])) <= {0, 1}
        assert (folder / "mask.geojson").is_file()
    assert json.loads((slide_out_dir(out, cmu_small.resolve()) / "done.json").read_text())["result"]["tiles"] > 0
    assert masks[cmu_small].any(), "glands found on CMU-1"
    np.testing.assert_array_equal(masks[copy], masks[cmu_small])  # same pixels, same model: same mask

    # rerun through the CLI on the same cluster: complete slides skipped untouched, unreadable ones retried
    stamp = (slide_out_dir(out, copy) / "mask.ome.tif").stat().st_mtime_ns
    result = CliRunner().invoke(
        app,
        [
            "batch",
            str(manifest),
            "--task",
            "segment",
            "--out",
            str(out),
            "--scheduler",
            scheduler,
            "--set",
            "device=cpu",
        ],
    )
    assert result.exit_code == 1, result.output  # a slide failed
    assert f"ok 0, skipped {len(slides) - n_bad}, failed {n_bad}" in result.output
    assert (slide_out_dir(out, copy) / "mask.ome.tif").stat().st_mtime_ns == stamp
    assert _statuses(out) == ["failed" if s.name in UNREADABLE else "skipped" for s in slides]


def test_batch_mil_bundled_demo_model(tmp_path, wsi_dir, cmu_small, scheduler):
    """The bundled S4 MIL demo model (its feature extractor ships beside it) per slide: prediction + heatmap."""
    import tifffile

    from napari_pathfm.demo import demo_mil_checkpoint

    copy = tmp_path / "copy" / "CMU-1-Small-Region.svs"
    copy.parent.mkdir()
    shutil.copy(cmu_small, copy)
    slides = [cmu_small, copy, wsi_dir / "small.svs"]
    out = tmp_path / "mil"
    summary = run_batch(
        _manifest(tmp_path, slides),
        "mil",
        out,
        scheduler=scheduler,
        checkpoint=demo_mil_checkpoint(),
        options={"device": "cpu", "top_k": 3},
    )
    # small.svs (a tiny test slide) has no tile with enough tissue for the extractor the model records
    assert [r["status"] for r in summary.rows] == ["ok", "ok", "failed"]
    assert "FeatureError" in summary.rows[2]["error"] and "small.svs" in summary.rows[2]["error"]
    preds = []
    for s in slides[:2]:
        folder = slide_out_dir(out, s.resolve())
        pred = json.loads((folder / "prediction.json").read_text())
        assert pred["predicted"] in pred["classes"] and len(pred["top_patches"]) == 3 and pred["n_patches"] > 3
        assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        heat = tifffile.imread(folder / "heatmap.ome.tif")
        assert heat.dtype == np.float32 and heat.size >= pred["n_patches"] and 0 <= heat.min() <= heat.max() <= 1
        done = json.loads((folder / "done.json").read_text())
        assert done["options"] == {"device": "cpu", "top_k": 3}
        assert {k: done["result"][k] for k in ("predicted", "probabilities", "n_patches")} == {
            k: pred[k] for k in ("predicted", "probabilities", "n_patches")
        }
        preds.append(pred["probabilities"])
    assert preds[0] == pytest.approx(preds[1])  # a copy of the slide gets the same prediction


def test_batch_translate_zstacks_bundled_dapi_model(tmp_path, scheduler):
    """Manifest rows are z-stacks: the bundled ISL crop and a copy, translated by the bundled DAPI model."""
    import tifffile

    from napari_pathfm.checkpoints import BUNDLED_MODELS
    from napari_pathfm.demo import demo_zstack_paths

    stack = demo_zstack_paths()[0]
    copy = tmp_path / "well-B02.ome.tif"
    shutil.copy(stack, copy)
    out = tmp_path / "tr"
    ckpt = BUNDLED_MODELS / "haste-isl-dapi.safetensors"
    summary = run_batch(
        _manifest(tmp_path, [stack, copy]),
        "translate",
        out,
        scheduler=scheduler,
        checkpoint=ckpt,
        options={"device": "cpu", "threshold": 0.3},
    )
    assert summary.counts == {"ok": 2, "skipped": 0, "failed": 0}, summary.rows
    plane = tifffile.imread(stack)
    for s in (stack, copy):
        folder = slide_out_dir(out, s.resolve())
        assert folder.name.startswith(s.name.split(".")[0] + "-")  # "isl-blue-crop-<hash8>", no ".ome"
        dapi = tifffile.imread(folder / "DAPI.ome.tif")
        assert dapi.dtype == np.uint16 and dapi.shape[-2:] == plane.shape[-2:] and dapi.std() > 0
        assert tifffile.imread(folder / "nuclei-mask.ome.tif").shape[-2:] == plane.shape[-2:]
        done = json.loads((folder / "done.json").read_text())
        assert done["checkpoint"] == [str(ckpt.resolve())] and done["result"]["channels"]["DAPI"]["role"] == "nuclei"
        assert done["result"]["threshold"] == 0.3 and done["result"]["nuclei"] > 0
        assert json.loads((folder / "summary.json").read_text())["channels"] == done["result"]["channels"]
    assert (
        run_batch(
            _manifest(tmp_path, [stack, copy]),
            "translate",
            out,
            checkpoint=ckpt,
            options={"device": "cpu", "threshold": 0.3},
        ).counts["skipped"]
        == 2
    )  # no cluster needed
