"""Held-out quality of click and box prompting on GlaS, beside picking an object from automatic masks.

For every gland of the images a fold held out (the fold-0 models of ``cv.py`` never saw them; the
prompt path was trained on the same fold's training images with ``pathsam2/glas_cpu_prompts``), a
user-like prompt is made from the true mask — one positive click at the gland's innermost pixel (the
maximum of its distance to the edge), or the gland's bounding box — and the object it returns is
compared with that gland (Dice, IoU). Each image is prompted through
:class:`napari_pathfm.pipelines.prompt.PromptSession` as a 0.62 µm/px image, exactly as ``pathfm
prompt`` and the Segment dock do. Baselines in the same run: the object under the same click in the
automatic segmentation (``pathfm segment``'s default objects) of the same Path-SAM2 fold model and of
the plain U-Net fold model — what a user gets by clicking an already segmented gland. Also in the same
run: the box answered on its nearest tile alone (``box_one_tile``, what boxes did before they grew
across tiles) and clicks grown across tiles the way boxes are (``click_grown``, not the default).

Glands are the connected components of the binary masks (GlaS keeps gaps between glands) of at least
``--min-area`` px. Reported per method: mean Dice and IoU over glands with a 95% bootstrap interval
(2000 resamples of glands), the share of glands found (IoU > 0.5), how many objects reach the edge of
the tiles they were answered on (may be cut there) and the tiles per prompt.

    .venv/bin/python benchmarks/segment_glas/prompt_eval.py [--fold 0] [--json runs/prompt/eval.json]

The fold's prompt model is trained with the bundled prompt recipe on the fold model of ``cv.py``, the
fold's held-out images kept out (``data.val_names``, as in that fold's ``recipe.yaml``):

    pathfm train pathsam2/glas_cpu_prompts --set data.init_checkpoint=runs/segment_cv/pathsam2/fold_0/model \\
        --set "data.val_names=[train_10, train_15, ...]" --out runs/prompt/fold_0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GLAS_MPP = 0.62


def glands(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Boolean masks of the true glands: connected components of at least ``min_area`` px."""
    parts, n = ndimage.label(mask > 0)
    sizes = np.bincount(parts.ravel())
    return [parts == k for k in range(1, n + 1) if sizes[k] >= min_area]


def click_of(gland: np.ndarray) -> tuple[int, int]:
    """``(x, y)``: the gland's innermost pixel (a user clicks the middle of a gland)."""
    d = ndimage.distance_transform_edt(np.pad(gland, 1))[1:-1, 1:-1]  # the image's edge is an edge too
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(x), int(y)


def box_of(gland: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(gland)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(dice, iou)`` of two boolean masks."""
    inter = float((pred & truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    return (2 * inter / total if total else 1.0), (inter / union if union else 1.0)


def as_image(obj, shape: tuple[int, int]) -> np.ndarray:
    """A :class:`~napari_pathfm.pipelines.prompt.PromptedObject` drawn into a boolean image of ``shape``."""
    out = np.zeros(shape, bool)
    if obj.area:
        h, w = obj.mask.shape
        out[obj.y0 : obj.y0 + h, obj.x0 : obj.x0 + w] = obj.mask[: shape[0] - obj.y0, : shape[1] - obj.x0]
    return out


def under_click(binary: np.ndarray, xy: tuple[int, int]) -> np.ndarray:
    """The connected component of an automatic mask under a click (empty when the click misses it)."""
    parts, _ = ndimage.label(binary > 0)
    k = parts[xy[1], xy[0]]
    return parts == k if k else np.zeros_like(binary, bool)


def summarise(rows: list[dict], seed: int = 0) -> dict:
    """Mean Dice/IoU with 95% bootstrap intervals over glands, share found (IoU > 0.5)."""
    rng = np.random.default_rng(seed)
    out = {"glands": len(rows)}
    for key in ("dice", "iou"):
        v = np.array([r[key] for r in rows])
        boots = v[rng.integers(0, len(v), (2000, len(v)))].mean(1)
        out[key] = {
            "mean": float(v.mean()),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        }
    out["found"] = float(np.mean([r["iou"] > 0.5 for r in rows]))
    if "at_edge" in rows[0]:
        out["cut_at_tile_edge"] = int(sum(r["at_edge"] for r in rows))
        out["tiles_per_prompt"] = float(np.mean([r["tiles"] for r in rows]))
    return out


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (the report names no machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv=None) -> dict:
    from napari_pathfm.models.checkpoint import load_family_checkpoint, read_card
    from napari_pathfm.pipelines.prompt import Prompt, PromptSession
    from napari_pathfm.pipelines.segment import segment_slide
    from napari_pathfm.pipelines.tile_run import opened_slide
    from napari_pathfm.training.segment_data import read_mask

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--prompt-model", type=Path, default=None, help="default: runs/prompt/fold_<k>/model")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "segment_cv", help="cv.py's fold models")
    ap.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("PATHFM_SHARED_DATA", REPO.parent / "shared" / "data")) / "glas" / "train",
    )
    ap.add_argument("--min-area", type=int, default=500, help="smallest gland counted, px at 0.62 µm/px")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    prompt_model = args.prompt_model or REPO / "runs" / "prompt" / f"fold_{args.fold}" / "model"
    card = read_card(Path(str(prompt_model) + ".json"))
    held = card["split"]["val"]
    pair = load_family_checkpoint(prompt_model, "segment")
    auto = {m: args.runs / m / f"fold_{args.fold}" / "model.safetensors" for m in ("pathsam2", "unet")}
    kinds = ("click", "box", "click_grown", "box_one_tile")
    rows: dict[str, list] = {k: [] for k in (*kinds, "pathsam2_auto_click", "unet_auto_click")}
    for name in held:
        image = args.root / "images" / f"{name}.png"
        truth = read_mask(args.root / "masks" / f"{name}.png")
        truth = truth if truth.ndim == 2 else truth[..., 0]
        autos = {
            m: np.asarray(segment_slide(image, str(p), image_mpp=GLAS_MPP, cache=False, device="cpu").labels) > 0
            for m, p in auto.items()
        }
        with opened_slide(image, GLAS_MPP) as slide, PromptSession(slide, pair, device="cpu", cache=False) as s:
            for g in glands(truth, args.min_area):
                xy = click_of(g)
                for kind in kinds:
                    prompt = Prompt(points=(xy,)) if kind.startswith("click") else Prompt(box=box_of(g))
                    obj = s.segment(
                        prompt, max_tiles=1 if kind.endswith("one_tile") else None, grow_clicks=kind == "click_grown"
                    )
                    d, i = overlap(as_image(obj, g.shape), g)
                    rows[kind].append(
                        {"image": name, "dice": d, "iou": i, "at_edge": obj.at_edge, "tiles": len(obj.tiles)}
                    )
                for m, binary in autos.items():
                    d, i = overlap(under_click(binary, xy), g)
                    rows[f"{m}_auto_click"].append({"image": name, "dice": d, "iou": i})
    report = {
        "fold": args.fold,
        "held_out_images": len(held),
        "prompt_model": _rel(prompt_model),
        "prompt_model_steps": card.get("steps"),
        "auto_models": {m: _rel(p) for m, p in auto.items()},
        "results": {k: summarise(v) for k, v in rows.items()},
        "command": " ".join(["benchmarks/segment_glas/prompt_eval.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(json.dumps(report["results"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
