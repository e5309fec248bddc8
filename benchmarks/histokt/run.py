"""Small real HistoKT run on CPU: standardise three tiny H&E sets, cross-transfer, distil, t-SNE.

Data (from ``../shared/data``, never copied into the repo):

- ``kather2016``: Kather 2016 CRC texture tiles, 8 classes x 3 images, 0.495 um/px, 150 px. At 1.0 um/px they
  are 74 px, so every crop is reflection-wrapped to 272 px; the EMPTY class is all blank and is dropped.
- ``nct-crc-he``: NCT-CRC-HE-100K, one 224 px tile per class (9), 0.5 um/px. With one image per class a split
  by image cannot test anything, so this set uses 64 px crops with overlap (stride 32) and ``--split-by crop``
  (leaky: neighbouring crops of one image in train and test; said in standardize.json).
- ``glas``: GlaS training images cut into 224 px gland / non-gland tiles from the masks
  (:mod:`napari_pathfm.training.glas_tiles`), 0.62 um/px, standardised with the GlaS image as split group.

Then ``transfer_matrix`` with the tiny CPU recipes (resnet10t, 272 px crops resized to 64 px) in deep-tune and
fine-tune mode (the source models are shared), t-SNE of each source model's features on the test crops, and
the weight distillation of the glas source model with its two deep-tunes (glas -> kather2016, glas ->
nct-crc-he: one ancestry, other data), keeping the glas head (``drop_head``) and testing on glas. Far too
small for claims; it proves the pipeline end to end.

Usage::

    nice -n 10 .venv/bin/python benchmarks/histokt/run.py [--out runs/histokt_bench] [--epochs 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

from napari_pathfm.training.recipes import default_shared_data

# the data beside the checkout unless PATHFM_SHARED_DATA is set (the package's own default is a per-user folder)
os.environ.setdefault("PATHFM_SHARED_DATA", str(Path(__file__).resolve().parents[3] / "shared" / "data"))


def build_datasets(data: Path, work: Path) -> list[Path]:
    """The three standardised data sets under ``work`` (reused when already there)."""
    from napari_pathfm.training.glas_tiles import build_glas_tiles
    from napari_pathfm.training.histokt.standardize import standardize

    out = [work / "kather2016", work / "nct-crc-he", work / "glas"]
    if not out[0].exists():
        standardize(data / "crc-tiles/kather2016", out[0], mpp=0.495)
    if not out[1].exists():
        with open(work / "nct.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            for p in sorted((data / "crc-tiles/nct-crc-he").glob("*.tif")):
                w.writerow([p, p.name.split("-")[0]])
        standardize(work / "nct.csv", out[1], mpp=0.5, crop=64, overlap=True, split_by="crop")
    if not out[2].exists():
        info = build_glas_tiles(data / "glas/train", work / "glas_tiles")
        with open(work / "glas.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "group"])
            for r in info["tiles"]:
                w.writerow([work / "glas_tiles" / r["file"], r["label"], r["image"]])
        standardize(work / "glas.csv", out[2], mpp=0.62)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/histokt_bench"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--modes", default="deeptune,finetune")
    args = ap.parse_args()
    from napari_pathfm.training.histokt.distill import distill_checkpoints
    from napari_pathfm.training.histokt.transfer import transfer_matrix
    from napari_pathfm.training.histokt.tsne import tsne_plot

    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    datasets = build_datasets(default_shared_data(), work / "data")
    timings = {"standardize_s": round(time.time() - t0, 1)}
    log = lambda d, t, m: print(f"[{time.strftime('%X')}] {d}/{t} {m}", flush=True)
    results = {}
    for mode in args.modes.split(","):
        t = time.time()
        res = transfer_matrix(datasets, work, mode=mode, tiny=True, epochs=args.epochs, device="cpu", progress=log)
        timings[f"{mode}_s"] = round(time.time() - t, 1)
        results[mode] = res
    t = time.time()
    for name in results[next(iter(results))].names:
        ckpt = work / "runs" / f"{name}__scratch" / "model.safetensors"
        tsne_plot(ckpt, datasets, work / f"tsne_{name}.png", split="test", device="cpu")
    timings["tsne_s"] = round(time.time() - t, 1)
    # Distil models of one ancestry that saw different data: the glas source and its two deep-tunes.
    res = results.get("deeptune")
    summary = {"timings": timings, "epochs": args.epochs}
    if res is not None:
        parents = [work / "runs" / "glas__scratch" / "model.safetensors"]
        for target in ("kather2016", "nct-crc-he"):
            parents.append(work / "runs" / f"glas__to__{target}__deeptune" / "model.safetensors")
        out = distill_checkpoints(parents, work / "distilled_glas", drop_head=True)
        summary["distilled"] = str(out)
        summary["distilled_glas_test_acc"] = _test_acc(out, datasets[2])
        summary["glas_source_test_acc"] = res.accuracy["glas"]["glas"]
    for mode, r in results.items():
        summary[mode] = {"accuracy": r.accuracy, "auroc": r.auroc}
    (work / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))


def _test_acc(checkpoint: Path, root: Path) -> float:
    """Accuracy of a checkpoint on a standardised data set's test split (images resized as in training)."""
    import torch

    from napari_pathfm.models import load_checkpoint
    from napari_pathfm.training.datasets import (
        ClassFolderDataset,
        classify_transforms,
        find_class_files,
    )

    model, card = load_checkpoint(checkpoint)
    test = set(json.loads((root / "split.json").read_text())["test"])
    classes, items = find_class_files(root)
    items = [(f, y) for f, y in items if str(f.relative_to(root)) in test]
    data = ClassFolderDataset(root, classes, classify_transforms(card["tile_size"], False), items=items)
    right = 0
    with torch.no_grad():
        for i in range(0, len(data), 64):
            batch = [data[j] for j in range(i, min(i + 64, len(data)))]
            x, y = torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
            right += int((model(x).argmax(1) == y).sum())
    return right / len(data)


if __name__ == "__main__":
    main()
