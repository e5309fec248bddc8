"""Per-prompt latency of whole-slide prompting on a cached slide, and of the model part alone.

Issue 18's target: p95 ≤ 200 ms per prompt on a cached slide on 2 CPU cores. ``slide`` times what a
click in the Segment dock costs once the slide has been segmented (its tile embeddings are in the
embedding cache): :meth:`napari_pathfm.pipelines.prompt.PromptSession.segment` (pick the tile, read and
check its cached encoder outputs, prompt encoder + decoder, mask to level 0, connected part, holes
filled) plus drawing the object into a level-0 labels array (:func:`~napari_pathfm.pipelines.prompt_labels.paint_objects`). Every prompt is
on a tile that is not in the session's memory (``keep=0``), so each one reads the disk cache; the
``uncached`` row is the same prompts with no cache at all (an encoder pass per prompt), for the ratio.
``model`` times :meth:`~napari_pathfm.models.pathsam2.PathSAM2.decode_prompt` alone on one embedding.

Prompts: a positive click at a random tissue pixel, every third with a negative click 40 px away,
every other one a box of 120 px around the click instead (a box's object grows across the tiles the box
reaches: ``tiles_per_prompt``). The model is ``--checkpoint`` (default: the
bundled one); one without a prompt path is replaced by its architecture with ``prompts`` and random
weights (speed does not depend on the weights).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_prompt.py [--prompts 100] [--threads 2] [--slide S]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "src" / "napari_pathfm" / "data" / "CMU-1-Small-Region.svs"


def _model(checkpoint):
    from napari_pathfm.models.checkpoint import load_family_checkpoint
    from napari_pathfm.models.registry import create_model
    from napari_pathfm.pipelines.segment_model import default_segment_checkpoint

    model, card = load_family_checkpoint(checkpoint or default_segment_checkpoint(), "segment")
    if model.prompt_encoder is None:
        model = create_model("pathsam2", **{**card["config"], "prompts": True})
    return model.eval(), card


def _prompts(slide, n: int, rng) -> list:
    from napari_pathfm.pipelines.prompt import Prompt

    h, w = slide.level_shapes[0]
    thumb = np.asarray(slide.read(slide.level_count - 1, 0, 0, *slide.level_shapes[-1]))[..., :3]
    ys, xs = np.nonzero(thumb.mean(-1) < 200)  # tissue
    ds = slide.level_downsamples[-1]
    out = []
    for i in range(n):
        k = int(rng.integers(len(ys)))
        x, y = min(w - 61, max(60, xs[k] * ds)), min(h - 61, max(60, ys[k] * ds))
        if i % 2:
            out.append(Prompt(box=(x - 60, y - 60, x + 60, y + 60)))
        elif i % 3 == 0:
            out.append(Prompt(points=((x, y), (min(w - 1, x + 40), y)), labels=(1, 0)))
        else:
            out.append(Prompt(points=((x, y),)))
    return out


def _time(session, prompts, labels) -> tuple[np.ndarray, list[int]]:
    from napari_pathfm.pipelines.prompt_labels import paint_objects

    times, tiles = [], []
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        obj = session.segment(p)
        paint_objects(labels, [obj], i + 1)
        times.append(time.perf_counter() - t0)
        tiles.append(len(obj.tiles))
    return np.array(times[3:]) * 1000, tiles[3:]  # the first 3 warm up


def _row(timed: tuple[np.ndarray, list[int]] | np.ndarray) -> dict:
    ms, tiles = timed if isinstance(timed, tuple) else (timed, None)
    row = {"p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1)}
    if tiles:
        row["tiles_per_prompt"] = round(float(np.mean(tiles)), 2)
    return row


def main(argv=None) -> dict:
    import torch

    from napari_pathfm.io.slide import open_slide
    from napari_pathfm.pipelines.prompt import PromptSession
    from napari_pathfm.pipelines.segment import segment_slide
    from napari_pathfm.tiles.embedding_cache import EmbeddingCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slide", type=Path, default=SLIDE)
    ap.add_argument("--checkpoint", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, card = _model(args.checkpoint)
    result: dict = {
        "threads": args.threads,
        "prompts": args.prompts,
        "slide_file": args.slide.name,
        "target_p95_ms": 200,
    }
    with tempfile.TemporaryDirectory() as tmp, open_slide(args.slide) as slide:
        cache = EmbeddingCache(tmp, always_store=True)
        t0 = time.perf_counter()
        seg = segment_slide(slide, (model, card), cache=cache, device="cpu")
        result["segment_s"] = round(time.perf_counter() - t0, 1)
        result["tiles_cached"] = seg.cache["tiles_encoded"]
        prompts = _prompts(slide, args.prompts + 3, np.random.default_rng(0))
        labels = np.zeros(slide.level_shapes[0], np.uint32)
        with torch.inference_mode():
            with PromptSession(slide, (model, card), device="cpu", cache=cache, keep=0) as s:
                result["slide"] = {"from_cache": True, **_row(_time(s, prompts, labels))}
                result["slide"]["tiles_read_from_cache"] = s._encoder.reused if s._encoder else 0
            labels[:] = 0
            with PromptSession(slide, (model, card), device="cpu", cache=False, keep=0) as s:
                result["uncached"] = {"from_cache": False, **_row(_time(s, prompts, labels))}
            encoded = model.encode(torch.rand(1, 3, model.input_size, model.input_size))
            times = []
            for _ in range(args.prompts):
                t0 = time.perf_counter()
                model.decode_prompt(None, encoded, torch.tensor([[[100.0, 120.0]]]), torch.tensor([[1]]))
                times.append(time.perf_counter() - t0)
            result["model"] = _row(np.array(times) * 1000)
    result["cached_over_uncached_p50"] = round(result["slide"]["p50_ms"] / result["uncached"]["p50_ms"], 3)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
