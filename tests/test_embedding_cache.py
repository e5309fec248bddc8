"""The shared tile-embedding cache: real slides, the bundled models, real zarr stores.

A second run on the same slide must give the same result without running the encoder (and, for
Path-SAM2 and feature extractors, without reading pixels); the key must change with the slide
file, the encoder weights and the tile geometry; the store must survive cancels, other writers,
damage and its size cap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_pathfm.errors import Cancelled
from napari_pathfm.tiles.embedding_cache import LOCK, EmbeddingCache, resolve_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class EncoderCalls:
    """Counts forward calls of a module (a real forward hook, the module still runs)."""

    def __init__(self, module):
        self.n = 0
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def remove(self):
        self._h.remove()


@pytest.fixture(scope="module")
def segmenter():
    from napari_pathfm.pipelines.segment import load_segmentation_model

    model, card, _ = load_segmentation_model(None, device="cpu")
    return model, card


@pytest.fixture()
def slide_copy(cmu_small, tmp_path):
    """A private copy of CMU-1-Small-Region (its own signature, safe to touch)."""
    p = tmp_path / "cmu-copy.svs"
    shutil.copy(cmu_small, p)
    return p


def _segment(path, model_card, cache, **kw):
    """The bundled model on ``path``, at 1.24 µm/px unless told: these tests are about the cache's keys and
    reuse, not the masks, and twice the model's 0.62 µm/px is a quarter of the tiles."""
    from napari_pathfm.pipelines.segment import segment_slide

    kw.setdefault("mpp", 1.24)
    return segment_slide(path, model_card, device="cpu", cache=cache, **kw)


def test_second_segment_run_skips_encoder_and_pixels_with_identical_mask(slide_copy, segmenter, tmp_path):
    model, card = segmenter
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    reference = _segment(slide_copy, (model, card), False)
    calls = EncoderCalls(model.trunk.patch_embed)
    try:
        first = _segment(slide_copy, (model, card), cache)
        n_first = calls.n
        calls.n = 0
        from napari_pathfm.tiles import loader

        reads = []
        orig = loader.iter_tiles
        loader.iter_tiles = lambda *a, **k: reads.append(1) or orig(*a, **k)
        try:
            second = _segment(slide_copy, (model, card), cache)
        finally:
            loader.iter_tiles = orig
    finally:
        calls.remove()
    n = first.n_tiles
    assert n > 0 and n_first > 0
    assert first.cache["tiles_encoded"] == n and first.cache["tiles_from_cache"] == 0
    assert second.cache["tiles_encoded"] == 0 and second.cache["tiles_from_cache"] == n
    assert calls.n == 0, "the encoder ran on the second run"
    assert reads == [], "the second run read slide pixels"
    np.testing.assert_array_equal(np.asarray(first.labels), np.asarray(reference.labels))
    np.testing.assert_array_equal(np.asarray(second.labels), np.asarray(reference.labels))
    entries = cache.entries()
    assert len(entries) == 1 and entries[0].tiles == n and entries[0].slide == str(slide_copy.resolve())
    assert not (entries[0].path / LOCK).exists()


def test_key_follows_slide_file_and_encoder_weights_but_not_the_decoder(slide_copy, segmenter, tmp_path):
    import copy

    model, card = segmenter
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    n = _segment(slide_copy, (model, card), cache).n_tiles

    retrained_decoder = copy.deepcopy(model)
    with torch.no_grad():
        next(retrained_decoder.decoder.parameters()).add_(0.5)
    res = _segment(slide_copy, (retrained_decoder, card), cache)
    assert res.cache["tiles_from_cache"] == n, "a new decoder on the same encoder shares its embeddings"

    other_encoder = copy.deepcopy(model)
    with torch.no_grad():
        next(other_encoder.trunk.parameters()).mul_(1.01)
    assert _segment(slide_copy, (other_encoder, card), cache).cache["tiles_encoded"] == n
    assert len(cache.entries()) == 2

    st = slide_copy.stat()
    os.utime(slide_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: its signature too
    assert _segment(slide_copy, (model, card), cache).cache["tiles_encoded"] == n
    stale = [e for e in cache.entries() if e.stale]
    assert len(stale) == 2 and len(cache.entries()) == 3
    assert len(cache.clear(stale_only=True)) == 2 and len(cache.entries()) == 1


def test_tile_geometry_is_in_the_key_and_subsets_reuse_stored_tiles(cmu_small, segmenter, tmp_path):
    model, card = segmenter
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    few = _segment(cmu_small, (model, card), cache, min_tissue=0.6)
    full = _segment(cmu_small, (model, card), cache, min_tissue=0.0)
    assert 0 < few.n_tiles < full.n_tiles
    assert full.cache["tiles_from_cache"] == few.n_tiles
    assert full.cache["tiles_encoded"] == full.n_tiles - few.n_tiles
    reference = _segment(cmu_small, (model, card), False, min_tissue=0.0)
    np.testing.assert_array_equal(np.asarray(full.labels), np.asarray(reference.labels))
    other = _segment(cmu_small, (model, card), cache, min_tissue=0.0, overlap=0.5)
    assert other.cache["tiles_encoded"] == other.n_tiles and len(cache.entries()) == 2


def test_cancelled_run_keeps_what_it_stored_and_the_next_run_finishes(slide_copy, segmenter, tmp_path):
    model, card = segmenter
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)

    def stop_after_first_batch(done, total, msg=""):
        if "segmenting" in msg and done >= 8:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        _segment(slide_copy, (model, card), cache, progress=stop_after_first_batch, batch_size=8)
    (entry,) = cache.entries()
    assert 0 < entry.tiles < 21 and not (entry.path / LOCK).exists()
    res = _segment(slide_copy, (model, card), cache, batch_size=8)
    assert res.cache["tiles_from_cache"] == entry.tiles
    assert res.cache["tiles_from_cache"] + res.cache["tiles_encoded"] == res.n_tiles
    np.testing.assert_array_equal(np.asarray(res.labels), np.asarray(_segment(slide_copy, (model, card), False).labels))


def test_entry_locked_by_a_live_process_is_read_not_written_and_dead_locks_are_taken_over(
    slide_copy, segmenter, tmp_path
):
    import socket

    model, card = segmenter
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    first = _segment(slide_copy, (model, card), cache, min_tissue=0.6)
    (entry,) = cache.entries()
    lock = entry.path / LOCK
    lock.write_text(f"{socket.gethostname()} {os.getppid()}\n")  # a live process holds it
    res = _segment(slide_copy, (model, card), cache)
    assert res.cache["tiles_from_cache"] == first.n_tiles and res.cache["tiles_encoded"] == res.n_tiles - first.n_tiles
    assert cache.entries()[0].tiles == first.n_tiles, "a locked entry must not be written"
    assert lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()} {dead.stdout.strip()}\n")  # its writer died
    res = _segment(slide_copy, (model, card), cache)
    assert cache.entries()[0].tiles == res.n_tiles and not lock.exists()


def test_damaged_entry_is_rebuilt(slide_copy, segmenter, tmp_path, caplog):
    model, card = segmenter
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    n = _segment(slide_copy, (model, card), cache).n_tiles
    (entry,) = cache.entries()
    (entry.path / "data" / "zarr.json").write_text("{not json")  # the stored outputs cannot be read at all
    res = _segment(slide_copy, (model, card), cache)
    assert res.cache["tiles_encoded"] == n and "unreadable" in caplog.text
    assert cache.entries()[0].tiles == n
    caplog.clear()
    (entry.path / "index" / "zarr.json").write_text("{not json")  # the index alone is rebuilt from the row table
    res = _segment(slide_copy, (model, card), cache)
    assert res.cache["tiles_encoded"] == 0 and "index" in caplog.text


def test_size_cap_removes_least_recently_used_entries(cmu_small, slide_copy, segmenter, tmp_path):
    model, card = segmenter
    root = tmp_path / "cache"
    _segment(slide_copy, (model, card), EmbeddingCache(root, always_store=True))
    (old,) = EmbeddingCache(root, always_store=True).entries()
    small = EmbeddingCache(root, max_bytes=old.bytes + 1000, always_store=True)  # room for about one entry
    _segment(cmu_small, (model, card), small)
    entries = small.entries()
    assert [e.slide for e in entries] == [str(cmu_small.resolve())]


def test_switching_the_cache_off(slide_copy, segmenter, tmp_path, monkeypatch):
    model, card = segmenter
    monkeypatch.setenv("PATHFM_CACHE_DIR", str(tmp_path / "default"))
    monkeypatch.setenv("PATHFM_CACHE", "0")
    assert resolve_cache(None) is None
    res = _segment(slide_copy, (model, card), None)
    assert res.cache["cache"] is None and not (tmp_path / "default").exists()
    monkeypatch.delenv("PATHFM_CACHE")
    res = _segment(slide_copy, (model, card), None)
    assert str(tmp_path / "default") in res.cache["cache"]


def test_features_and_mil_prediction_reuse_extractor_outputs(cmu_small, tmp_path):
    from napari_pathfm.demo import demo_mil_checkpoint
    from napari_pathfm.io import open_slide
    from napari_pathfm.pipelines.features import extract_features, read_features
    from napari_pathfm.pipelines.mil import mil_predict

    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    ckpt = demo_mil_checkpoint()
    with open_slide(cmu_small) as s:
        first = mil_predict(ckpt, slide=s, device="cpu", cache=cache)
        second = mil_predict(ckpt, slide=s, device="cpu", cache=cache)
    (entry,) = cache.entries()
    assert entry.tiles > 0
    np.testing.assert_allclose(second.probabilities, first.probabilities, rtol=0, atol=0)
    card = json.loads(ckpt.with_suffix(".json").read_text())["feature_extractor"]
    from napari_pathfm.models import create_model

    fx = create_model(
        card["extractor"],
        backbone=card["backbone"],
        input_size=card.get("input_size") or 0,
        weights=str(ckpt.parent / card["weights"].split("/")[-1]),
    )
    kw = dict(
        mpp=card["target_mpp"],
        tile_size=card["tile_size"],
        device="cpu",
        min_tissue=card["min_tissue"] if card.get("min_tissue") is not None else 0.25,
    )  # as mil_predict does
    a = read_features(extract_features(cmu_small, fx, tmp_path / "a.features.zarr", cache=False, **kw))
    b = read_features(extract_features(cmu_small, fx, tmp_path / "b.features.zarr", cache=cache, **kw))
    assert len(cache.entries()) == 1, "pathfm features and MIL prediction share one entry"
    np.testing.assert_array_equal(b.features, a.features)


def test_classify_reuses_the_sam_taps_of_slca(cmu_small, tmp_path):
    from napari_pathfm.demo import demo_classify_checkpoint
    from napari_pathfm.pipelines.classify import classify_slide

    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    ckpt = demo_classify_checkpoint()
    ref = classify_slide(cmu_small, ckpt, device="cpu", cache=False)
    first = classify_slide(cmu_small, ckpt, device="cpu", cache=cache)
    second = classify_slide(cmu_small, ckpt, device="cpu", cache=cache)
    assert first.cache["tiles_encoded"] == ref.n_tiles > 0
    assert second.cache["cache"] == first.cache["cache"] and first.cache["storing"] == "stored (always_store)"
    assert second.cache["tiles_encoded"] == 0 and second.cache["tiles_from_cache"] == ref.n_tiles
    np.testing.assert_array_equal(first.probabilities, ref.probabilities)
    np.testing.assert_allclose(second.probabilities, ref.probabilities, rtol=0, atol=1e-6)
    assert cache.entries()[0].encoder.startswith("sam:")


def test_cache_cli_lists_and_clears(slide_copy, segmenter, tmp_path):
    model, card = segmenter
    root = tmp_path / "cache"
    _segment(slide_copy, (model, card), EmbeddingCache(root, always_store=True))
    run = [sys.executable, "-m", "napari_pathfm.cli", "cache"]
    out = subprocess.run([*run, "list", "--dir", str(root), "--json"], capture_output=True, text=True, check=True)
    listed = json.loads(out.stdout)
    assert [e["slide"] for e in listed["entries"]] == [str(slide_copy.resolve())] and listed["bytes"] > 0
    out = subprocess.run(
        [*run, "clear", "--dir", str(root), "--slide", str(slide_copy)], capture_output=True, text=True, check=True
    )
    assert "removed 1 entries" in out.stdout and EmbeddingCache(root, always_store=True).entries() == []


class BigCheapEncoder(torch.nn.Module):
    """An encoder whose output is cheap to compute but large (1 MB per tile): not worth storing."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def embedding_spec(self):
        return {"name": "big-cheap", "modules": [self], "config": {}}

    def encode(self, x):
        return {"map": self.w * torch.ones(x.shape[0], 256, 32, 32)}

    def decode(self, x, encoded):
        return encoded["map"].mean((1, 2, 3))


def test_outputs_cheaper_to_recompute_than_to_store_are_not_cached(cmu_small, tmp_path):
    from napari_pathfm.io import open_slide
    from napari_pathfm.tiles import tile_grid
    from napari_pathfm.tiles.cached_encoder import CachedEncoder

    cache = EmbeddingCache(tmp_path / "cache")
    with open_slide(cmu_small) as slide:
        grid = tile_grid(slide, 64)
        with CachedEncoder(BigCheapEncoder(), slide, grid, cache=cache, preprocess={}) as enc:
            for i in range(0, 64, 8):
                idx = np.arange(i, i + 8)
                out = enc(idx, torch.zeros(8, 3, 64, 64), "cpu")
                assert out["map"].shape == (8, 256, 32, 32)
    assert enc.decision.startswith("not stored") and enc.computed == 64
    assert [e.tiles for e in cache.entries()] == [0], "only the decision is kept"


def test_a_declined_key_is_remembered(cmu_small, tmp_path):
    from napari_pathfm.io import open_slide
    from napari_pathfm.tiles import tile_grid
    from napari_pathfm.tiles.cached_encoder import CachedEncoder

    cache = EmbeddingCache(tmp_path / "cache")
    model = BigCheapEncoder()
    with open_slide(cmu_small) as slide:
        grid = tile_grid(slide, 64)
        for _ in range(2):
            with CachedEncoder(model, slide, grid, cache=cache, preprocess={}) as enc:
                for i in range(0, 32, 8):
                    enc(np.arange(i, i + 8), torch.zeros(8, 3, 64, 64), "cpu")
        assert enc.decision.startswith("not stored") and enc._batches == 0, "the second run timed nothing"
    (entry,) = cache.entries()
    assert entry.tiles == 0 and entry.bytes < 10_000 and entry.declined.startswith("not stored")
    assert len(cache.clear()) == 1 and cache.entries() == []


def test_widgets_say_when_the_cache_was_used():
    from napari_pathfm.tiles.cached_encoder import cache_note

    assert cache_note({"tiles_from_cache": 21, "tiles_encoded": 0}) == (
        "Encoder outputs of 21 tiles read from the embedding cache."
    )
    assert cache_note({"tiles_from_cache": 0}) == "" and cache_note(None) == ""
