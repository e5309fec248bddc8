"""Per-prompt latency of Path-SAM2's click/box path on a cached tile embedding, against the encoder's cost.

Interactive prompting on a slide whose tiles are in the embedding cache costs one prompt-encoder +
decoder pass per click (:meth:`napari_pathfm.models.pathsam2.model.PathSAM2.decode_prompt` on
:meth:`encode`'s stored outputs); a tile that is not cached costs an encoder pass first. This measures
both for the bundled model's architecture (``small``: Hiera micro, 256 px, decoder 128-d, high-res
features; random weights: speed does not depend on them) on the threads given, and reports the p50
and p95 of ``--prompts`` prompts (one positive click, every third with a negative click, every
other with a box), the encoder's median, and their ratio. Issue 18's target is p95 ≤ 200 ms per
prompt on a cached slide on 2 CPU cores. It times the model only: reading the cached tile from the
cache and drawing the mask into the slide's labels are not in it.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_prompt.py [--prompts 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from bench_pathsam2_model import CONFIGS  # the script's folder is on sys.path

SMALL = {**CONFIGS["small"], "high_res": True, "prompts": True}  # the bundled model's architecture


def main(argv=None) -> dict:
    import torch

    from napari_pathfm.models.registry import create_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("pathsam2", num_classes=2, **SMALL).eval()
    x = torch.rand(1, 3, 256, 256)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        encode_times = []
        for _ in range(10):
            t0 = time.perf_counter()
            encoded = model.encode(x)
            encode_times.append(time.perf_counter() - t0)
        times = []
        for i in range(args.prompts + 3):  # the first 3 warm up
            xy = rng.uniform(0, 256, (1, 2, 2)).astype(np.float32)
            labels = np.array([[1, 0 if i % 3 == 0 else -1]])
            box = None
            if i % 2:
                x0, y0 = rng.uniform(0, 160, 2)
                box = torch.tensor([[x0, y0, x0 + 80, y0 + 80]], dtype=torch.float32)
            t0 = time.perf_counter()
            model.decode_prompt(x, encoded, torch.from_numpy(xy), torch.from_numpy(labels), box)
            times.append(time.perf_counter() - t0)
    ms = np.array(times[3:]) * 1000
    result = {
        "threads": args.threads,
        "prompts": args.prompts,
        "prompt_ms_p50": round(float(np.percentile(ms, 50)), 1),
        "prompt_ms_p95": round(float(np.percentile(ms, 95)), 1),
        "encode_ms_median": round(float(np.median(encode_times[2:]) * 1000), 1),
        "target_p95_ms": 200,
    }
    result["prompt_over_encode"] = round(result["prompt_ms_p50"] / result["encode_ms_median"], 3)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
