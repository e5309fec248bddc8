"""Nuclei confidence of LUPI nuclei checkpoints on the bundled demo z-stack crop, against the real DAPI nuclei.

Usage (from the repository root; one or more ``translate`` LUPI checkpoints)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/translate_training/demo_confidence.py \\
        src/napari_pathfm/data/models/haste-isl-dapi.safetensors runs/translate/<run>/model.safetensors

For each checkpoint it runs :func:`~napari_pathfm.pipelines.translate.translate_stack` on
``data/isl-blue-crop.ome.tif`` exactly as ``pathfm demo`` does (256 px tiles, CPU) and prints one JSON
line: the maximum confidence, the 99th percentile, the median confidence inside the real nuclei, and for
thresholds 0.3 and 0.5 the number of nuclei, the relative count difference and the foreground IoU
against the real nuclei (Otsu + watershed of the crop's real DAPI channel via
:func:`~napari_pathfm.pipelines.nuclei.segment_nuclei`). The demo's ``DEMO_NUCLEI_THRESHOLD`` should be a
threshold at which the bundled model finds about the real number of nuclei.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))


def evaluate(checkpoint, thresholds: tuple[float, ...] = (0.3, 0.5), label: str | None = None) -> dict:
    """Confidence statistics and nuclei agreement of one LUPI checkpoint on the demo crop.

    ``checkpoint``: a ``.safetensors`` path or a ``(module, card)`` pair (what ``translate_stack`` accepts).
    """
    import numpy as np
    import tifffile

    from napari_pathfm.demo import demo_zstack_paths
    from napari_pathfm.io.zstack import open_zstack
    from napari_pathfm.pipelines.nuclei import label_nuclei, segment_nuclei
    from napari_pathfm.pipelines.translate import translate_stack

    stack_path, targets_path = demo_zstack_paths()
    res = translate_stack(open_zstack(stack_path), [checkpoint], tile=256, device="cpu", threshold=0.5)
    if res.confidence is None:
        raise SystemExit(f"{label or checkpoint}: no nuclei confidence map (not a LUPI checkpoint)")
    conf = np.asarray(res.confidence, np.float32)
    real_labels, _ = segment_nuclei(tifffile.imread(targets_path)[0])
    real = real_labels > 0
    n_real = int(real_labels.max())
    out = {
        "checkpoint": label or str(checkpoint),
        "real_nuclei": n_real,
        "max_confidence": round(float(conf.max()), 4),
        "p99_confidence": round(float(np.percentile(conf, 99)), 4),
        "median_confidence_in_real_nuclei": round(float(np.median(conf[real])), 4) if real.any() else None,
    }
    for t in thresholds:
        fg = conf > t
        n = int(label_nuclei(fg).max())
        union = int((fg | real).sum())
        out[f"at_{t}"] = {
            "nuclei": n,
            "count_rel_diff": round((n - n_real) / n_real, 3) if n_real else None,
            "foreground_iou": round(int((fg & real).sum()) / union, 3) if union else 1.0,
        }
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: demo_confidence.py CHECKPOINT [CHECKPOINT ...]")
    for path in sys.argv[1:]:
        print(json.dumps(evaluate(Path(path))), flush=True)
