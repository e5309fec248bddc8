"""What ``pathfm batch`` runs on one slide, per family: the pipeline call and the outputs it writes.

Each task is ``(slide, out_folder, checkpoints or None, options) -> dict`` (a JSON-friendly
summary for ``done.json``) and runs on a dask worker; its family's spec names it
(``FamilySpec.batch`` in :mod:`napari_pathfm.families`), so :mod:`napari_pathfm.pipelines.batch`
finds it by the task name. ``options`` are keyword arguments of the family's pipeline function.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import PathFMError, UsageError

__all__ = ["classify", "features", "mil", "need_checkpoints", "segment", "translate"]


def features(slide: Path, out: Path, checkpoint: list[str] | None, opts: dict) -> dict:
    """Patch features of one slide (``checkpoint``: optional backbone weights)."""
    from .features_many import features_command

    weights = checkpoint[0] if checkpoint else None
    result = features_command([slide], out, weights=weights, **opts)
    info = next(iter(result["slides"].values()))
    if info["status"] == "failed":
        raise PathFMError(info["error"])
    return {"n_tiles": info["n_tiles"], "path": info["path"], "extractor": result["extractor"]}


def segment(slide: Path, out: Path, checkpoint: list[str] | None, opts: dict) -> dict:
    """Segmentation mask (OME-TIFF) and its GeoJSON outlines of one slide."""
    from .segment import segment_slide

    ckpt = checkpoint[0] if checkpoint else None
    result = segment_slide(slide, ckpt, out=out / "mask.ome.tif", geojson=out / "mask.geojson", **opts)
    return result.summary()


def classify(slide: Path, out: Path, checkpoint: list[str] | None, opts: dict) -> dict:
    """Class map, probabilities and tile table of one slide."""
    from ..io.slide import open_slide
    from .classify import classify_slide, write_classify_outputs

    with open_slide(slide) as s:
        result = classify_slide(s, need_checkpoints(checkpoint, "classify")[0], **opts)
        write_classify_outputs(result, out)
    return result.summary()


def mil(slide: Path, out: Path, checkpoint: list[str] | None, opts: dict) -> dict:
    """Slide prediction (JSON) and patch heatmap of one slide; ``top_k`` patches are listed."""
    from ..io.slide import open_slide
    from .mil import mil_predict, write_mil_outputs

    top_k = int(opts.pop("top_k", 10))
    opts.setdefault("bootstrap", 20)  # the review queue's uncertainty (pipelines/mil_review.py)
    with open_slide(slide) as s:
        pred = mil_predict(need_checkpoints(checkpoint, "mil")[0], slide=s, **opts)
        written = write_mil_outputs(
            pred, heatmap=out / "heatmap.ome.tif", json_path=out / "prediction.json", mpp=s.mpp, top_k=top_k
        )
    info = pred.to_dict(0)
    return {
        **{k: info[k] for k in ("predicted", "probabilities", "n_patches", "level0_tile_size")},
        "written": {k: str(v) for k, v in written.items()},
    }


def translate(stack: Path, out: Path, checkpoint: list[str] | None, opts: dict) -> dict:
    """Predicted channels of one z-stack (one checkpoint per channel)."""
    from .translate import translate_stack, write_translation

    result = translate_stack(stack, need_checkpoints(checkpoint, "translate"), **opts)
    write_translation(result, out)
    return result.summary()


def need_checkpoints(checkpoint: Sequence[str | Path] | None, task: str) -> list[str]:
    """The checkpoints of a task that cannot run without one (its spec's ``needs_checkpoint``)."""
    if not checkpoint:
        from ..families import get_family

        each = get_family(task).checkpoint_each
        raise UsageError(
            f"task '{task}' needs --checkpoint" + (f" (one per {each})." if each else "."),
            f"Give a checkpoint of family '{task}'.",
        )
    return [str(c) for c in checkpoint]
