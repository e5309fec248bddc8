"""What :func:`~napari_pathfm.pipelines.segment.segment_slide` returns: a slide's class map and where it sits.

The class map (in memory, or a temporary zarr array for large slides that :meth:`SegmentationResult.close`
deletes), its classes and µm/px, the tiles that were run, the objects when glands were split, and
the arguments that put it on a napari Labels layer over the slide. Importing this module does not
import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SegmentationResult"]


@dataclass
class SegmentationResult:
    """A slide's class map and where it sits.

    Attributes
    ----------
    labels : ndarray (H, W) uint8, or a zarr/dask array for large slides
        Class per level-0 pixel of the input; 0 = background (and everything outside tissue).
    classes : list of str
        Class names indexed by label value (``classes[0]`` is the background).
    mpp : float or None
        µm per pixel of ``labels`` (the input's level 0), None when the input does not say.
    model_mpp : float or None
        µm per pixel the model actually saw.
    grid : TileGrid
        The tiles that were run (model-resolution geometry, level-0 positions).
    tissue : TissueMask or None
        The tissue mask used to choose tiles (None with ``tissue_only=False``).
    messages : list of str
        Things the user should know (no tissue found, resolution fallback, ...), ``notes`` first.
    notes : list of str
        What the model is and how far the run is from its training domain
        (:func:`~napari_pathfm.pipelines.notes.model_notes`): a bundled demonstration model, µm/px
        far from or unknown to the card's. Also in the written files' metadata.
    written : dict of str to Path
        Files written (``"mask"``, ``"geojson"``).
    instances : ndarray (H, W) int32 or None
        One id per object (gland) at level 0 when objects were split (:mod:`napari_pathfm.instances`;
        ``labels`` then has a background line wherever two objects touch); None otherwise.
    object_classes : ndarray (N + 1,) uint8 or None
        Class of each object id (``object_classes[0] == 0``).
    flips : bool
        Whether each tile's logits were averaged over its mirror images (test-time flips).
    cache : dict
        What the tile-embedding cache did: its entry, tiles encoded, tiles read from it.
    """

    labels: Any
    classes: list[str]
    mpp: float | None
    model_mpp: float | None
    grid: Any
    tissue: Any = None
    source: str | None = None
    checkpoint: str | None = None
    messages: list[str] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    instances: Any = None
    object_classes: Any = None
    flips: bool = False
    _tmp: Any = field(default=None, repr=False)

    @property
    def n_tiles(self) -> int:
        return len(self.grid)

    @property
    def empty(self) -> bool:
        """True when no tile was run (no tissue found): the class map is all background."""
        return self.n_tiles == 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.labels.shape[:2])  # type: ignore[return-value]

    def class_names(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    def layer_kwargs(self) -> dict:
        """Keyword arguments for ``viewer.add_labels(result.labels, **kw)``: scale, translate, units
        and metadata (class names, downsample 1) so the mask overlays the slide layer."""
        from ..coords import layer_transform, layer_units

        scale, translate = layer_transform(self.mpp, 1.0)
        return {
            "name": "segmentation",
            "scale": scale,
            "translate": translate,
            "units": layer_units(self.mpp),
            "metadata": {
                "pathfm_kind": "segment",
                "classes": self.class_names(),
                "downsample": 1.0,
                "source": self.source,
                "checkpoint": self.checkpoint,
                "model_mpp": self.model_mpp,
                "pathfm_notes": list(self.notes),
            },
        }

    def summary(self) -> dict:
        return {
            "input": self.source,
            "checkpoint": self.checkpoint,
            "notes": self.notes,
            "shape": list(self.shape),
            "mpp": self.mpp,
            "model_mpp": self.model_mpp,
            "classes": self.classes,
            "tiles": self.n_tiles,
            "messages": self.messages,
            "written": {k: str(v) for k, v in self.written.items()},
            "cache": self.cache,
            "objects": None if self.object_classes is None else int(len(self.object_classes) - 1),
            "flips": self.flips,
        }

    def close(self) -> None:
        """Delete the temporary store of a large class map (a no-op for in-memory results)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
