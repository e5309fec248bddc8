"""What is reused across runs is verified first: batch outputs behind done.json, feature files, manifests.

Damage is done to real files written by real runs (truncate, delete, flip a byte); the next run must
redo exactly the damaged slide, recompute the damaged feature file, or refuse with a clear error.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_pathfm.errors import FeatureError, ManifestError
from napari_pathfm.io.features import read_features, write_features
from napari_pathfm.pipelines.batch import read_manifest, run_batch, slide_out_dir
from napari_pathfm.pipelines.features_many import extract_features_many

DATA = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "data"
SLIDE = DATA / "CMU-1-Small-Region.svs"
# cheapest real feature extraction: a randomly initialised timm resnet10t on a few coarse tiles
# (the embedding cache is off: these tests are about the batch outputs and feature files themselves)
OPTIONS = {"backbone": "resnet10t", "mpp": 4.0, "tile": 64, "batch_size": 8, "device": "cpu", "cache": False}


def _flip_byte(path: Path, at: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _chunk(store: Path) -> Path:
    return next(p for p in sorted((store / "features" / "c").rglob("*")) if p.is_file())


# --- manifests ---------------------------------------------------------------------------------------


def test_latin1_manifest_is_refused_naming_the_line(tmp_path):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    m = tmp_path / "cohort.csv"
    m.write_bytes("slide,label\ncase-001.svs,a\ncas\u00e9-002.svs,b\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"cohort\.csv: is not UTF-8 text: line 3 .*0xe9.*Save it as UTF-8"):
        read_manifest(m)
    result = CliRunner().invoke(app, ["batch", str(m), "--task", "segment", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "line 3" in result.output and "UTF-8" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "batch-summary.json").exists()

    # the same manifest saved as UTF-8 with a byte-order mark (Excel's "CSV UTF-8") reads fine
    m.write_bytes("slide,label\ncase-001.svs,a\ncas\u00e9-002.svs,b\n".encode("utf-8-sig"))
    assert [p.name for p in read_manifest(m)] == ["case-001.svs", "cas\u00e9-002.svs"]


# --- feature files -------------------------------------------------------------------------------------


def test_damaged_feature_file_is_refused_by_name(tmp_path):
    path = write_features(
        tmp_path / "bag.features.zarr",
        np.random.default_rng(0).normal(size=(3000, 512)),
        np.zeros((3000, 2)),
        {"backbone": "toy"},
    )
    assert len(read_features(path)) == 3000
    chunk = _chunk(path)
    _flip_byte(chunk)
    with pytest.raises(FeatureError, match=r"bag\.features\.zarr: is damaged: features/c/0/0 has changed"):
        read_features(path)
    chunk.unlink()  # a missing chunk would otherwise read as zeros
    with pytest.raises(FeatureError, match="features/c/0/0 is missing"):
        read_features(path)


def test_mil_predict_on_a_damaged_feature_file_is_a_clear_error(tmp_path):
    """`pathfm mil predict --features` on a damaged file: exit 2, the file named, no traceback."""
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.demo import demo_mil_checkpoint
    from napari_pathfm.models.checkpoint import read_card

    ckpt = demo_mil_checkpoint()
    card = read_card(ckpt)
    dim = int(card.get("in_dim") or card.get("model_kwargs", {}).get("in_dim") or 1024)
    path = write_features(
        tmp_path / "case.features.zarr", np.ones((40, dim)), np.stack([np.arange(40) * 256, np.zeros(40)], 1)
    )
    _flip_byte(next(p for p in sorted((path / "coords" / "c").rglob("*")) if p.is_file()))
    result = CliRunner().invoke(
        app,
        ["mil", "predict", "--checkpoint", str(ckpt), "--features", str(path), "--json", str(tmp_path / "pred.json")],
    )
    assert result.exit_code == 2, result.output
    assert "case.features.zarr" in result.output and "damaged" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "pred.json").exists()


@pytest.mark.skipif(not SLIDE.is_file(), reason="bundled sample slide missing")
def test_damaged_features_are_recomputed_not_reused(tmp_path, caplog):
    from napari_pathfm.models import create_model

    out = tmp_path / "feats"
    extractor = create_model("timm_features", backbone="resnet10t")  # one (random) network for every run
    kw = dict(extractor=extractor, mpp=4.0, tile_size=64, batch_size=8, device="cpu", cache=False)
    path = extract_features_many([SLIDE], out, **kw)[str(SLIDE)]
    good = read_features(path).features
    stamp = (path / "zarr.json").stat().st_mtime_ns
    assert extract_features_many([SLIDE], out, **kw)[str(SLIDE)] == path
    assert (path / "zarr.json").stat().st_mtime_ns == stamp  # intact: reused as is

    chunk = _chunk(path)
    chunk.write_bytes(chunk.read_bytes()[:-7])  # truncated chunk
    with caplog.at_level(logging.WARNING, logger="napari_pathfm.pipelines.features"):
        assert extract_features_many([SLIDE], out, **kw)[str(SLIDE)] == path
    assert "CMU-1-Small-Region.svs" in caplog.text and "recomputing" in caplog.text
    assert (path / "zarr.json").stat().st_mtime_ns != stamp  # rewritten, not reused
    np.testing.assert_array_equal(read_features(path).features, good)


# --- batch done markers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scheduler():
    """One 1-worker LocalCluster (one thread) shared by the batch tests below."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "batch-summary.csv", newline="") as fh:
        return {Path(r["slide"]).name: r for r in csv.DictReader(fh)}


@pytest.mark.skipif(not SLIDE.is_file(), reason="bundled sample slide missing")
def test_batch_redoes_exactly_the_slides_whose_outputs_are_damaged(tmp_path, scheduler):
    slides = []
    for name in ("case-a.svs", "case-b.svs", "case-c.svs"):
        shutil.copy(SLIDE, tmp_path / name)
        slides.append((tmp_path / name).resolve())
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide\n" + "\n".join(s.name for s in slides) + "\n")
    out = tmp_path / "out"
    first = run_batch(manifest, "features", out, scheduler=scheduler, options=OPTIONS)
    assert first.counts == {"ok": 3, "skipped": 0, "failed": 0}
    folders = {s.name: slide_out_dir(out, s) for s in slides}
    stores = {n: folders[n] / (n.split(".")[0] + ".features.zarr") for n in folders}
    done = json.loads((folders["case-a.svs"] / "done.json").read_text())
    recorded = {o["path"] for o in done["outputs"]}
    assert "case-a.features.zarr/zarr.json" in recorded and all(len(o["crc32"]) == 8 for o in done["outputs"])
    good = read_features(stores["case-b.svs"]).features

    # b: one chunk truncated; c: one byte flipped (same size); a: untouched
    chunk_b = _chunk(stores["case-b.svs"])
    chunk_b.write_bytes(chunk_b.read_bytes()[:-3])
    _flip_byte(_chunk(stores["case-c.svs"]))
    second = run_batch(manifest, "features", out, scheduler=scheduler, options=OPTIONS)
    assert second.counts == {"ok": 0, "redone": 2, "skipped": 1, "failed": 0}, second.rows
    rows = _rows(out)
    assert rows["case-a.svs"]["status"] == "skipped" and rows["case-a.svs"]["note"] == ""
    assert rows["case-b.svs"]["status"] == "redone" and "bytes" in rows["case-b.svs"]["note"]
    assert rows["case-c.svs"]["status"] == "redone" and "checksum differs" in rows["case-c.svs"]["note"]
    # recomputed (each run builds its own randomly initialised backbone, so only the layout can be compared)
    assert read_features(stores["case-b.svs"]).features.shape == good.shape
    assert read_features(stores["case-c.svs"]).features.shape == good.shape

    # a deleted output, and a marker of an older version without an output record
    shutil.rmtree(stores["case-a.svs"])
    older = json.loads((folders["case-b.svs"] / "done.json").read_text())
    del older["outputs"]
    (folders["case-b.svs"] / "done.json").write_text(json.dumps(older))
    third = run_batch(manifest, "features", out, scheduler=scheduler, options=OPTIONS)
    assert third.counts == {"ok": 0, "redone": 2, "skipped": 1, "failed": 0}, third.rows
    rows = _rows(out)
    assert "case-a.features.zarr/" in rows["case-a.svs"]["note"] and "is missing" in rows["case-a.svs"]["note"]
    assert "no output record" in rows["case-b.svs"]["note"] and rows["case-c.svs"]["status"] == "skipped"
    assert read_features(stores["case-a.svs"]).features.shape == good.shape

    # everything intact now: all skipped, nothing runs
    assert run_batch(manifest, "features", out, options=OPTIONS).counts == {"ok": 0, "skipped": 3, "failed": 0}
