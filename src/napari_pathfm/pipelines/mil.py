"""Slide-level MIL prediction and the patch heatmap that explains it.

``mil_predict`` takes a trained MIL checkpoint and either a feature file (from
``pathfm features``) or a slide (features are then extracted with the extractor
named in the checkpoint's card), and returns class probabilities plus per-patch
evidence. ``heatmap_grid`` lays that evidence on the tile grid so that napari can
overlay it on the slide with level-0 scale/translate; ``write_mil_outputs`` writes
the heatmap as OME-TIFF and the prediction as JSON, atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, FeatureError
from ..progress import check_cancel, report


@dataclass
class MILPrediction:
    """What a MIL model says about one slide.

    Attributes
    ----------
    classes : list of str
    probabilities : ndarray (C,)
        Softmax of the slide logits.
    patch_scores : ndarray (N, C)
        Per-patch evidence in [0, 1] for each class (see ``models.mil.heatmap_scores``).
    coords : ndarray (N, 2)
        Level-0 (y, x) top-left of each patch, in the feature file's patch order.
    level0_tile_size : float
        Level-0 extent of one patch (the heatmap's cell size).
    notes : list of str
        What the model is and how far the slide is from its training domain
        (:func:`~napari_pathfm.pipelines.notes.model_notes`); in the prediction JSON and heatmap metadata.
    messages : list of str
        Things the user should know (``notes`` first).
    uncertainty : dict or None
        The patch bootstrap's ``{"n", "interval", "flip_rate"}`` (:mod:`.mil_uncertainty`), when asked for.
    """

    classes: list[str]
    probabilities: np.ndarray
    patch_scores: np.ndarray
    coords: np.ndarray
    level0_tile_size: float
    source: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    uncertainty: dict | None = None

    @property
    def predicted(self) -> str:
        return self.classes[int(np.argmax(self.probabilities))]

    def top_patches(self, k: int = 10, cls: int | None = None) -> list[dict]:
        """The ``k`` patches with the most evidence for ``cls`` (default: the predicted class)."""
        c = int(np.argmax(self.probabilities)) if cls is None else int(cls)
        scores = self.patch_scores[:, c]
        order = np.argsort(-scores, kind="stable")[:k]
        return [
            {"index": int(i), "y": int(self.coords[i, 0]), "x": int(self.coords[i, 1]), "score": float(scores[i])}
            for i in order
        ]

    def to_dict(self, k: int = 10) -> dict:
        return {
            "classes": self.classes,
            "probabilities": {c: float(p) for c, p in zip(self.classes, self.probabilities)},
            "predicted": self.predicted,
            "n_patches": len(self.coords),
            "level0_tile_size": self.level0_tile_size,
            "top_patches": self.top_patches(k),
            "notes": list(self.notes),
            **({"uncertainty": self.uncertainty} if self.uncertainty else {}),
            **self.source,
        }


def load_mil_model(checkpoint, device: str = "cpu"):
    """``(model, card)`` from a checkpoint path (family ``mil``, checked) or a ``(model, card)`` pair."""
    from ..models.checkpoint import load_family_checkpoint

    if isinstance(checkpoint, tuple):
        return checkpoint
    return load_family_checkpoint(checkpoint, "mil", device=device)


def _model_dims(model, card: dict, checkpoint) -> tuple[int, list[str]]:
    config = card.get("config") or {}
    in_dim = config.get("in_dim")
    n_classes = config.get("n_classes") or len(card.get("classes") or []) or 2
    if in_dim is None:
        raise CheckpointError(
            checkpoint,
            "has no `in_dim` in its model card; it is not a MIL checkpoint.",
            "Pick a checkpoint trained with the `mil` family.",
        )
    classes = [str(c) for c in (card.get("classes") or [f"class {i}" for i in range(n_classes)])]
    return int(in_dim), classes


def _extractor_weights(fx: dict, checkpoint_dir: Path | None) -> str | None:
    """The extractor weights file the card names: as recorded, else the same name beside the checkpoint;
    None for a foundation model (``hf-hub:ORG/NAME``) whose recorded file is not here: it is then found by
    name on this machine (:mod:`napari_pathfm.models.hub_cache`).

    Bundled and shared models keep their extractor weights next to the card, so the
    pair can be copied anywhere; the sha256 check that follows proves it is the same file.
    """
    from ..models.hub_cache import is_foundation_name

    recorded = Path(fx["weights"])
    if recorded.is_file():
        return str(recorded)
    if checkpoint_dir is not None and (Path(checkpoint_dir) / recorded.name).is_file():
        return str(Path(checkpoint_dir) / recorded.name)
    if is_foundation_name(fx.get("backbone") or ""):
        return None
    raise FeatureError(
        recorded,
        "is the feature-extractor weights file this MIL model was trained with, and it is missing.",
        "Copy it to that path or next to the checkpoint, or extract features yourself with "
        "`pathfm features --weights <file>` and pass --features.",
    )


def check_extractor_weights(fx: dict, sha256: str | None, source: Any) -> None:
    """Refuse features or an extractor made with other weights than the MIL model was trained on.

    ``fx`` is the card's ``feature_extractor``; ``sha256`` what the features or the extractor at hand
    were made with (None: not recorded, nothing to compare). Features of other weights look just as
    valid and give silently wrong predictions, so a mismatch is an error, not a warning.
    """
    expected = fx.get("weights_sha256")
    if expected and sha256 and sha256 != expected:
        raise FeatureError(
            source or fx.get("backbone") or "the features",
            f"were made with feature-extractor weights of sha256 {sha256[:12]}…, but this MIL model was trained "
            f"on features of {fx.get('backbone')} with weights of sha256 {expected[:12]}… (a different file).",
            "Extract the features again with the weights the model was trained with (`pathfm models verify` "
            "checks which local weights match), or choose a model trained on these weights.",
        )


def features_for_slide(
    slide,
    card: dict,
    *,
    device: str = "auto",
    progress=None,
    cancel=None,
    cache_dir: Path | None = None,
    checkpoint_dir: Path | None = None,
    cache: Any = None,
):
    """Extract features from ``slide`` with the extractor recorded in the checkpoint's card.

    Tiles, µm/px, tissue threshold, input size and normalisation all come from the
    card, so the features match the ones the model was trained on. ``cache`` is the tile-embedding
    cache (:func:`~napari_pathfm.pipelines.features.extract_features`): a second prediction on the same
    slide reads the features from it instead of running the extractor.
    """
    from ..io.scratch import scratch_dir
    from ..models.registry import create_model
    from .features import extract_features, read_features

    fx = card.get("feature_extractor") or {}
    if not fx.get("extractor"):
        raise CheckpointError(
            card.get("weights_file", "checkpoint"),
            "does not record which feature extractor it was trained with.",
            "Extract features with `pathfm features` (same settings as training) and pass them with --features.",
        )
    # A recorded input_size of None means the trunk saw tiles at their own size (0 for create_model).
    kwargs = {"backbone": fx.get("backbone"), "input_size": fx.get("input_size") or 0}
    if fx.get("weights"):
        kwargs["weights"] = _extractor_weights(fx, checkpoint_dir)
    if fx["extractor"] == "timm_features":
        kwargs.update(mean=fx.get("mean"), std=fx.get("std"))
    extractor = create_model(fx["extractor"], **{k: v for k, v in kwargs.items() if v is not None})
    check_extractor_weights(fx, extractor.weights_sha256, extractor.weights)
    with scratch_dir("features") as tmp:
        out_dir = Path(cache_dir or tmp)
        path = extract_features(
            slide,
            extractor,
            out_dir / f"{Path(slide.path).name.split('.')[0]}.features.zarr",
            mpp=fx.get("target_mpp") or 0.5,
            tile_size=fx.get("tile_size") or 256,
            min_tissue=fx.get("min_tissue") if fx.get("min_tissue") is not None else 0.25,
            tissue_mpp=fx.get("tissue_mpp") or 8.0,
            device=device,
            progress=progress,
            cancel=cancel,
            cache=cache,
        )
        bag = read_features(path)  # in memory: the temporary file can go
    if cache_dir is None:
        bag.path = None
    return bag


def mil_predict(
    checkpoint,
    *,
    features=None,
    slide=None,
    image_mpp: float | None = None,
    device: str = "auto",
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
    cache: Any = None,
    bootstrap: int = 0,
) -> MILPrediction:
    """Predict a slide's class and per-patch evidence with a MIL checkpoint.

    Parameters
    ----------
    checkpoint : path or (model, card)
    features : path or FeatureBag, optional
        A feature zarr from ``pathfm features``. Give this or ``slide``.
    slide : Slide, optional
        Features are extracted first, with the extractor recorded in the card.
    image_mpp : float, optional
        µm per pixel of ``slide``'s level 0, for slides whose file does not record it (or records it
        wrongly); it replaces the file's value for this run, as in
        :func:`~napari_pathfm.pipelines.segment.segment_slide`. Ignored with ``features``.
    cache : None, False, path or EmbeddingCache
        Tile-embedding cache used when features are extracted from ``slide`` (None = the default).
    bootstrap : int
        Predict the slide again on this many bags resampled from its patches and record the interval
        of each class probability and the share of flipped decisions (``MILPrediction.uncertainty``).

    Returns
    -------
    MILPrediction
        ``notes`` say when the model is a bundled demonstration or the slide is far from its
        training domain (µm/px, tile size).
    """
    import torch

    from ..device import resolve_device
    from ..models.mil import heatmap_scores
    from .features import check_feature_dim, read_features
    from .notes import model_notes

    model, card = load_mil_model(checkpoint)
    in_dim, classes = _model_dims(model, card, checkpoint)
    if features is None and slide is None:
        raise FeatureError(str(checkpoint), "needs features or a slide to predict on.", "Pass --features or --slide.")
    if image_mpp is not None and not image_mpp > 0:
        raise ValueError(f"image_mpp must be positive, got {image_mpp}")
    report(progress, 0, 3, "features")
    if features is None:
        where = None if isinstance(checkpoint, tuple) else Path(checkpoint).parent
        own = not hasattr(slide, "read")
        if own:
            from ..io.slide import open_slide

            slide = open_slide(slide)
        saved_mpp = slide.mpp
        try:
            if image_mpp is not None:
                slide.mpp = float(image_mpp)
            bag = features_for_slide(
                slide, card, device=device, progress=progress, cancel=cancel, checkpoint_dir=where, cache=cache
            )
        finally:
            slide.mpp = saved_mpp
            if own:
                slide.close()
    else:
        bag = read_features(features) if isinstance(features, (str, Path)) else features
        check_extractor_weights(card.get("feature_extractor") or {}, bag.attrs.get("weights_sha256"), bag.path)
    check_feature_dim(bag, in_dim, str(checkpoint) if not isinstance(checkpoint, tuple) else "the model")
    check_cancel(cancel, "MIL prediction")
    report(progress, 1, 3, f"MIL model on {len(bag.features)} patches")
    dev = resolve_device(device)
    model = model.to(dev).eval()
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32))[None].to(dev)
        out = model(x)
        probs = torch.softmax(out["logits"].float(), dim=-1)[0].cpu().numpy()
        scores = np.stack([heatmap_scores(out, c)[0].float().cpu().numpy() for c in range(len(classes))], axis=1)
    uncertainty = None
    if bootstrap:
        from .mil_uncertainty import bootstrap_probabilities, summarize

        report(progress, 2, 3, f"bootstrap: {int(bootstrap)} resampled bags")
        uncertainty = summarize(probs, bootstrap_probabilities(model, x, int(bootstrap), cancel=cancel), classes)
    report(progress, 3, 3, "done")
    fx = card.get("feature_extractor") or {}
    notes_card = {
        **card,
        "tile_size": card.get("tile_size") or fx.get("tile_size"),
        "input_mpp": card.get("input_mpp") or fx.get("target_mpp"),
    }
    slide_name = Path(str(bag.attrs.get("slide") or "the slide")).name
    notes = model_notes(
        notes_card,
        None if isinstance(checkpoint, tuple) else str(checkpoint),
        slide_mpp=bag.attrs.get("slide_mpp"),
        run_mpp=bag.attrs.get("mpp"),
        slide_name=slide_name,
        run_tile=bag.attrs.get("tile_size"),
        stain=bag.attrs.get("stain"),
    )
    return MILPrediction(
        classes=classes,
        probabilities=probs,
        patch_scores=scores.astype(np.float32),
        coords=np.asarray(bag.coords, dtype=np.int64),
        level0_tile_size=float(bag.attrs.get("level0_tile_size") or bag.attrs.get("tile_size") or 1.0),
        source={
            "features": str(bag.path) if getattr(bag, "path", None) else None,
            "slide": bag.attrs.get("slide"),
            "slide_mpp": bag.attrs.get("slide_mpp"),
        },
        notes=notes,
        messages=list(notes),
        uncertainty=uncertainty,
    )


def heatmap_grid(pred: MILPrediction, cls: int | None = None) -> tuple[np.ndarray, float]:
    """Patch evidence for ``cls`` on the tile grid: (rows, cols) float32, NaN where no patch.

    Returns the grid and its cell size in level-0 pixels; cell (r, c) covers level-0
    ``[r*cell, (r+1)*cell) x [c*cell, (c+1)*cell)``, so ``coords.layer_transform(mpp, cell)``
    places it over the slide.
    """
    c = int(np.argmax(pred.probabilities)) if cls is None else int(cls)
    cell = pred.level0_tile_size
    if len(pred.coords) == 0:
        return np.full((1, 1), np.nan, np.float32), cell
    rc = np.round(pred.coords / cell).astype(np.int64)
    rows, cols = int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1
    grid = np.full((rows, cols), np.nan, np.float32)
    grid[rc[:, 0], rc[:, 1]] = pred.patch_scores[:, c]
    return grid, cell


def write_mil_outputs(
    pred: MILPrediction, *, heatmap: Path | None, json_path: Path | None, mpp: float | None, top_k: int = 10
) -> dict[str, Path]:
    """Write the heatmap (OME-TIFF float32, cell-sized pixels) and the prediction JSON atomically."""
    from ..io.atomic import atomic_path
    from ..io.ome_tiff import write_ome_tiff

    written: dict[str, Path] = {}
    if heatmap is not None:
        grid, cell = heatmap_grid(pred)
        write_ome_tiff(
            heatmap,
            np.nan_to_num(grid, nan=0.0),
            mpp=(mpp * cell) if mpp else None,
            metadata={"kind": "mil-heatmap", "class": pred.predicted, "downsample": cell, **pred.to_dict(top_k)},
        )
        written["heatmap"] = Path(heatmap)
    if json_path is not None:
        with atomic_path(json_path) as tmp:
            from ..io.jsonsafe import dumps as strict_dumps  # undefined scores -> null, with a warning

            Path(tmp).write_text(strict_dumps(pred.to_dict(top_k), where=str(json_path), indent=2, default=str))
        written["json"] = Path(json_path)
    return written
