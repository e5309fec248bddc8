"""Integrity of the tile-embedding cache: real damage on disk, real runs, real zarr stores.

A cache is filled once by segmenting a private copy of CMU-1-Small-Region with the bundled Path-SAM2
model; each test damages a copy of it on disk (flipped bytes, truncated or deleted chunks, garbage
metadata) and runs again. The mask must be bit-identical to a run without the cache, the damage must
be named in one warning line, and afterwards the entry must verify healthy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_pathfm.tiles.cache_entry import LOCK
from napari_pathfm.tiles.embedding_cache import EmbeddingCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WARNING = "embedding cache for cmu-integrity.svs"


@pytest.fixture(scope="module")
def segmenter():
    from napari_pathfm.pipelines.segment import load_segmentation_model

    model, card, _ = load_segmentation_model(None, device="cpu")
    return model, card


@pytest.fixture(scope="module")
def slide(cmu_small, tmp_path_factory):
    p = tmp_path_factory.mktemp("slide") / "cmu-integrity.svs"
    shutil.copy(cmu_small, p)
    return p


def _segment(slide, segmenter, cache):
    from napari_pathfm.pipelines.segment import segment_slide

    return segment_slide(slide, segmenter, device="cpu", cache=cache)


@pytest.fixture(scope="module")
def reference(slide, segmenter):
    """The mask without any cache."""
    return np.asarray(_segment(slide, segmenter, False).labels)


@pytest.fixture(scope="module")
def filled(slide, segmenter, tmp_path_factory):
    """A cache holding every tile of the slide (copied for each test, never damaged itself)."""
    root = tmp_path_factory.mktemp("filled") / "cache"
    res = _segment(slide, segmenter, EmbeddingCache(root, always_store=True))
    assert res.cache["tiles_encoded"] == res.n_tiles > 0
    return root, res.n_tiles


@pytest.fixture()
def cache(filled, tmp_path):
    """A private copy of the filled cache and the path of its one entry."""
    root = tmp_path / "cache"
    shutil.copytree(filled[0], root)
    c = EmbeddingCache(root, always_store=True)
    (entry,) = c.entries()
    return c, entry.path


def _flip(path: Path, at: float = 0.5) -> None:
    """Flip one byte of ``path`` in place (size unchanged)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_one_row(entry: Path) -> None:
    """Overwrite the data row of one tile through zarr (the chunk checksum stays valid): only the row
    checksum can tell, as with a row whose write never finished."""
    import zarr

    index = zarr.open_array(str(entry / "index"), mode="r")[...]
    row = int(index[index >= 0][0])
    data = zarr.open_array(str(entry / "data"), mode="r+")
    data[row] = np.zeros(data.shape[1], np.uint8)


DAMAGE = {
    # name: (how, tiles recomputed: "all", "chunk 0" (the tiles stored in the first data chunk) or a number)
    "flipped data chunk": (lambda e: _flip(e / "data/c/0/0"), "chunk 0"),
    "truncated data chunk": (lambda e: _truncate(e / "data/c/0/0"), "chunk 0"),
    "missing data chunk": (lambda e: (e / "data/c/0/0").unlink(), "chunk 0"),
    "one row zeroed": (_zero_one_row, 1),
    "flipped index chunk": (lambda e: _flip(e / "index/c/0/0", 0.3), 0),
    "truncated index chunk": (lambda e: _truncate(e / "index/c/0/0"), 0),
    "garbage index zarr.json": (lambda e: (e / "index/zarr.json").write_text("{not json"), 0),
    "flipped row-table chunk": (lambda e: _flip(e / "rows/c/0/0", 0.001), "all"),
    "missing row-table chunk": (lambda e: (e / "rows/c/0/0").unlink(), "all"),
    "garbage data zarr.json": (lambda e: (e / "data/zarr.json").write_text("{"), "all"),
    "garbage entry zarr.json": (lambda e: (e / "zarr.json").write_text("\x00\x01"), "all"),
}


def _tiles_in_first_chunk(entry: Path) -> int:
    """How many stored tiles live in data chunk 0 (all of them when the embeddings are small)."""
    import zarr

    index = zarr.open_array(str(entry / "index"), mode="r")[...]
    per_chunk = zarr.open_array(str(entry / "data"), mode="r").chunks[0]
    return int(np.count_nonzero((index >= 0) & (index < per_chunk)))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and WARNING in r.getMessage()]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_recomputed_bit_identically_and_repaired(damage, cache, filled, slide, segmenter, reference, caplog):
    store, entry = cache
    how, recomputed = DAMAGE[damage]
    if recomputed == "chunk 0":
        recomputed = _tiles_in_first_chunk(entry)
        assert recomputed > 0
    how(entry)
    caplog.set_level(logging.WARNING)
    res = _segment(slide, segmenter, store)
    np.testing.assert_array_equal(np.asarray(res.labels), reference)
    n = filled[1] if recomputed == "all" else recomputed
    assert res.cache["tiles_encoded"] == n and res.cache["tiles_from_cache"] == filled[1] - n
    (line,) = _warnings(caplog)
    assert res.cache["damage"] == line
    if recomputed != "all" or "zarr.json" not in damage:
        assert f"{n} damaged tiles recomputed" in line and "repaired" in line
    else:
        assert "unreadable" in line and "rebuilt" in line
    info = store.inspect(entry, full=True)
    assert info.health == "healthy" and info.tiles == filled[1], info.status()
    caplog.clear()
    again = _segment(slide, segmenter, store)  # the repaired entry serves every tile again
    assert again.cache["tiles_encoded"] == 0 and not _warnings(caplog)
    np.testing.assert_array_equal(np.asarray(again.labels), reference)


def _hold_lock(entry: Path) -> None:
    """A live process (this test's parent) holds the entry's write lock: it must not be written."""
    (entry / LOCK).write_text(f"{socket.gethostname()} {os.getppid()}\n")


def test_damage_that_cannot_be_repaired_is_still_recomputed(cache, filled, slide, segmenter, reference, caplog):
    store, entry = cache
    damaged = _tiles_in_first_chunk(entry)
    _flip(entry / "data/c/0/0")
    _hold_lock(entry)
    caplog.set_level(logging.WARNING)
    res = _segment(slide, segmenter, store)
    np.testing.assert_array_equal(np.asarray(res.labels), reference)
    (line,) = _warnings(caplog)
    assert f"{damaged} damaged tiles recomputed" in line and "could not be repaired" in line
    assert store.inspect(entry, full=True).health == "damaged"


def test_unreadable_entry_that_cannot_be_removed_is_bypassed(cache, slide, segmenter, reference, caplog):
    store, entry = cache
    (entry / "zarr.json").write_text("{")
    _hold_lock(entry)
    caplog.set_level(logging.WARNING)
    res = _segment(slide, segmenter, store)
    np.testing.assert_array_equal(np.asarray(res.labels), reference)
    (line,) = _warnings(caplog)
    assert "unreadable" in line and "without it" in line
    assert (entry / "zarr.json").read_text() == "{", "an entry locked by another process is left alone"


def _cli(*args):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    return CliRunner().invoke(app, ["cache", *args])


def test_cache_verify_and_repair_from_the_command_line(cache, filled):
    store, entry = cache
    out = _cli("verify", "--dir", str(store.root), "--json")
    assert out.exit_code == 0, out.output
    assert [e["health"] for e in json.loads(out.stdout)["entries"]] == ["healthy"]
    _zero_one_row(entry)
    listed = _cli("list", "--dir", str(store.root), "--json")
    assert json.loads(listed.stdout)["entries"][0]["health"] == "unverified", "list reads no data"
    out = _cli("verify", "--dir", str(store.root))
    assert out.exit_code == 1 and "damaged (1 tiles)" in out.stdout, out.output
    out = _cli("verify", "--dir", str(store.root), "--repair", "--json")
    assert out.exit_code == 0, out.output
    (e,) = json.loads(out.stdout)["entries"]
    assert e["health"] == "repaired" and e["damaged"] == 1 and e["tiles"] == filled[1] - 1
    out = _cli("verify", "--dir", str(store.root), "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["entries"][0]["health"] == "partial"


def test_cache_list_shows_structural_damage_and_old_or_unreadable_entries(cache, filled):
    store, entry = cache
    damaged = _tiles_in_first_chunk(entry)
    _truncate(entry / "data/c/0/0")
    old = store.root / "old-slide-0123456789abcdef" / "enc-0123456789abcdef.zarr"
    old.mkdir(parents=True)
    (old / "zarr.json").write_text(
        json.dumps(
            {
                "zarr_format": 3,
                "node_type": "group",
                "attributes": {"key": {"format": "pathfm-tile-embeddings/1", "slide": {"path": "/gone.svs"}}},
            }
        )
    )
    junk = store.root / "junk-0123456789abcdef" / "enc-fedcba9876543210.zarr"
    junk.mkdir(parents=True)
    (junk / "zarr.json").write_text("not json")
    out = _cli("list", "--dir", str(store.root), "--json")
    assert out.exit_code == 0, out.output
    health = {Path(e["path"]).name: (e["health"], e["damaged"]) for e in json.loads(out.stdout)["entries"]}
    assert health == {entry.name: ("damaged", damaged), old.name: ("old format", 0), junk.name: ("unreadable", 0)}
    text = _cli("list", "--dir", str(store.root)).stdout
    assert f"damaged ({damaged} tiles)" in text and "old format" in text and "unreadable" in text
    out = _cli("verify", "--dir", str(store.root), "--repair")
    assert out.exit_code == 0, out.output
    assert not old.exists() and not junk.exists()
    assert store.inspect(entry, full=True).health == "partial"


def test_mil_prediction_with_a_damaged_extractor_entry_is_unchanged(slide, tmp_path, caplog):
    """MIL prediction reads the feature extractor's outputs from the cache: a damaged chunk there must not
    change the slide's probabilities (the issue's "different score with exit 0")."""
    from napari_pathfm.demo import demo_mil_checkpoint
    from napari_pathfm.io import open_slide
    from napari_pathfm.pipelines.mil import mil_predict

    ckpt = demo_mil_checkpoint()
    cache = EmbeddingCache(tmp_path / "mil-cache", always_store=True)
    with open_slide(slide) as s:
        reference = mil_predict(ckpt, slide=s, device="cpu", cache=False)
        mil_predict(ckpt, slide=s, device="cpu", cache=cache)
    (entry,) = cache.entries()
    chunk = min(p for p in (entry.path / "data" / "c").rglob("*") if p.is_file())
    _flip(chunk, 0.3)
    caplog.clear()
    with caplog.at_level(logging.WARNING), open_slide(slide) as s:
        again = mil_predict(ckpt, slide=s, device="cpu", cache=cache)
    np.testing.assert_array_equal(again.probabilities, reference.probabilities)
    assert len(_warnings(caplog)) == 1, caplog.text
    with caplog.at_level(logging.WARNING), open_slide(slide) as s:
        third = mil_predict(ckpt, slide=s, device="cpu", cache=cache)
    np.testing.assert_array_equal(third.probabilities, reference.probabilities)
    assert len(_warnings(caplog)) == 1, "repaired: the third run finds nothing to warn about"
