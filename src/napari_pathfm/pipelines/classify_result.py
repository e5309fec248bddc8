"""The result of tile classification and its files: per-tile classes and probabilities on the tile grid.

:class:`ClassifyResult` holds the softmax probabilities of every classified tile and lays them out
on the tile grid (``class_map``, ``prob_maps``) so that napari overlays them on the slide;
:func:`write_classify_outputs` writes the class map and probabilities (OME-TIFF), a per-tile CSV,
a GeoJSON of the classified tiles and a JSON summary, all or nothing. Made by
:func:`~napari_pathfm.pipelines.classify.classify_slide`. Importing this module does not import torch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import check_cancel, report

__all__ = ["BACKGROUND", "ClassifyResult", "write_classify_outputs"]

PathLike = str | Path
#: Name of label 0 of the class map (grid cells without a tissue tile).
BACKGROUND = "background"


@dataclass
class ClassifyResult:
    """Per-tile classes and probabilities of one slide, and where they sit.

    Attributes
    ----------
    classes : list of str
        Class names of the model, in logit order.
    probabilities : ndarray float32 (N, C)
        Softmax probabilities of each classified tile (rows sum to 1).
    grid : TileGrid
        The classified tiles (row-major); ``grid.tiles`` are their level-0 (y, x).
    mpp : float or None
        µm/px of the slide's level 0 (None: the slide does not say; layers are then in pixels).
    model_mpp : float or None
        µm/px of the tiles the model saw.
    source, checkpoint : str or None
        The slide and checkpoint paths.
    messages : list of str
        Things the user should know (no tissue found, resolution fallback), ``notes`` first.
    notes : list of str
        What the model is and how far the run is from its training domain
        (:func:`~napari_pathfm.pipelines.notes.model_notes`); also in summary.json and the OME-TIFFs.
    cache : dict
        What the tile-embedding cache did (entry, tiles encoded, tiles read from it).
    """

    classes: list[str]
    probabilities: np.ndarray
    grid: Any
    mpp: float | None
    model_mpp: float | None
    source: str | None = None
    checkpoint: str | None = None
    messages: list[str] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_tiles(self) -> int:
        return len(self.grid)

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) level-0 (y, x) of each tile's top-left corner."""
        return self.grid.tiles

    @property
    def predicted(self) -> np.ndarray:
        """(N,) int64 index of the most probable class of each tile (ties: the first)."""
        return np.argmax(self.probabilities, axis=1) if self.n_tiles else np.zeros(0, np.int64)

    @property
    def cell(self) -> float:
        """Level-0 pixels per grid cell (the tile side)."""
        return float(self.grid.level0_size)

    @property
    def map_shape(self) -> tuple[int, int]:
        return tuple(self.grid.grid_shape)  # type: ignore[return-value]

    @property
    def class_map(self) -> np.ndarray:
        """(rows, cols) labels: 0 = background (no tile), class ``k`` → ``k + 1``."""
        dtype = np.uint8 if len(self.classes) < 255 else np.uint16
        out = np.zeros(self.map_shape, dtype)
        r, c = self.grid.tile_index.T
        out[r, c] = self.predicted + 1
        return out

    @property
    def prob_maps(self) -> np.ndarray:
        """(C, rows, cols) float32 probability of each class; 0 where there is no tile."""
        out = np.zeros((len(self.classes), *self.map_shape), np.float32)
        r, c = self.grid.tile_index.T
        out[:, r, c] = self.probabilities.T
        return out

    def label_names(self) -> dict[int, str]:
        """``{label value: name}`` of the class map: 0 is background, ``k + 1`` is ``classes[k]``."""
        return {0: BACKGROUND, **{k + 1: name for k, name in enumerate(self.classes)}}

    @property
    def scale(self) -> tuple[float, float]:
        return self.transform()[0]

    @property
    def translate(self) -> tuple[float, float]:
        return self.transform()[1]

    def transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``(scale, translate)`` of the grid maps over the slide layer."""
        from ..coords import layer_transform

        return layer_transform(self.mpp, self.cell)

    def tile_at(self, y0: float, x0: float) -> int | None:
        """Index of the classified tile holding level-0 pixel ``(y0, x0)``, or None."""
        if y0 < 0 or x0 < 0:
            return None
        r, c = int(y0 // self.cell), int(x0 // self.cell)
        hit = np.nonzero((self.grid.tile_index[:, 0] == r) & (self.grid.tile_index[:, 1] == c))[0]
        return int(hit[0]) if hit.size else None

    def tiles_in_box(self, y0: float, x0: float, y1: float, x1: float) -> np.ndarray:
        """Indices of tiles that overlap the level-0 box ``[y0, y1) x [x0, x1)``, in grid order."""
        t = self.grid.tiles
        s = self.cell
        keep = (t[:, 0] < y1) & (t[:, 0] + s > y0) & (t[:, 1] < x1) & (t[:, 1] + s > x0)
        return np.nonzero(keep)[0]

    def class_fractions(self) -> dict[str, float]:
        """Share of the classified tiles predicted as each class."""
        n = max(1, self.n_tiles)
        counts = np.bincount(self.predicted, minlength=len(self.classes))
        return {name: float(counts[k] / n) for k, name in enumerate(self.classes)}

    def layer_kwargs(self) -> dict:
        """Common napari keyword arguments (scale, translate, units, metadata) of the result's layers."""
        from ..coords import layer_units

        scale, translate = self.transform()
        return {
            "scale": scale,
            "translate": translate,
            "units": layer_units(self.mpp),
            "metadata": {
                "pathfm_kind": "classify",
                "classes": self.label_names(),
                "downsample": self.cell,
                "source": self.source,
                "checkpoint": self.checkpoint,
                "model_mpp": self.model_mpp,
                "pathfm_notes": list(self.notes),
            },
        }

    def summary(self) -> dict:
        counts = np.bincount(self.predicted, minlength=len(self.classes))
        return {
            "input": self.source,
            "checkpoint": self.checkpoint,
            "notes": self.notes,
            "classes": self.classes,
            "tiles": self.n_tiles,
            "grid_shape": list(self.map_shape),
            "tile_size": int(self.grid.tile_size),
            "level0_tile_size": self.cell,
            "mpp": self.mpp,
            "model_mpp": self.model_mpp,
            "class_counts": {name: int(counts[k]) for k, name in enumerate(self.classes)},
            "class_fractions": self.class_fractions(),
            "mean_probabilities": {
                name: float(self.probabilities[:, k].mean()) if self.n_tiles else 0.0
                for k, name in enumerate(self.classes)
            },
            "label_values": {str(k): v for k, v in self.label_names().items()},
            "messages": self.messages,
            "written": {k: str(v) for k, v in self.written.items()},
            "cache": self.cache,
        }


def _write_csv(result: ClassifyResult, path: Path) -> Path:
    pred = result.predicted
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "row", "col", "y0", "x0", "size0", "class", "label", *[f"p_{c}" for c in result.classes]])
        size0 = f"{result.cell:.6g}"
        for i, ((y, x), (r, c)) in enumerate(zip(result.grid.tiles, result.grid.tile_index)):
            k = int(pred[i])
            probs = [f"{v:.6f}" for v in result.probabilities[i]]
            w.writerow([i, int(r), int(c), int(y), int(x), size0, result.classes[k], k + 1, *probs])
    return path


def write_classify_outputs(
    result: ClassifyResult,
    out_dir: PathLike,
    *,
    geojson: bool = True,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> dict[str, Path]:
    """Write the result into ``out_dir``, all files or none.

    Files: ``class-map.ome.tif`` (labels, one pixel per tile, class names in the metadata, pixel
    size = tile side in µm), ``probabilities.ome.tif`` (float32 CYX, one channel per class, named),
    ``tiles.csv`` (one row per tile: level-0 position, class, probabilities), ``tiles.geojson``
    (classified tile regions as QuPath polygons in level-0 pixels; with ``geojson``) and
    ``summary.json`` (counts and fractions per class, geometry, the files written).

    Everything is written into a hidden temporary folder inside ``out_dir`` and moved into place
    (``os.replace``, ``summary.json`` last) only when all files are complete: a cancel or an error
    leaves earlier outputs untouched and no new ones.
    """
    from ..io.geojson import write_geojson
    from ..io.ome_tiff import write_ome_tiff
    from ..io.scratch import scratch_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cell_mpp = result.mpp * result.cell if result.mpp else None
    meta = {
        "kind": "classify",
        "slide": result.source,
        "checkpoint": result.checkpoint,
        "downsample": result.cell,
        "model_mpp": result.model_mpp,
        "classes": result.classes,
        "tile_size": int(result.grid.tile_size),
        "notes": result.notes,
    }
    names = {
        "class_map": "class-map.ome.tif",
        "probabilities": "probabilities.ome.tif",
        "tiles_csv": "tiles.csv",
        **({"geojson": "tiles.geojson"} if geojson else {}),
        "summary": "summary.json",
    }
    steps = len(names)
    with scratch_dir("classify", dir=out) as tmp_dir:
        tmp = {k: Path(tmp_dir) / v for k, v in names.items()}
        report(progress, 0, steps, "writing class map")
        write_ome_tiff(
            tmp["class_map"],
            result.class_map,
            mpp=cell_mpp,
            is_labels=True,
            class_names=result.label_names(),
            metadata=meta,
            cancel=cancel,
        )
        report(progress, 1, steps, "writing probabilities")
        write_ome_tiff(
            tmp["probabilities"],
            result.prob_maps,
            mpp=cell_mpp,
            axes="CYX",
            channel_names=result.classes,
            metadata=meta,
            cancel=cancel,
        )
        check_cancel(cancel, "writing")
        report(progress, 2, steps, "writing tiles.csv")
        _write_csv(result, tmp["tiles_csv"])
        if geojson:
            write_geojson(tmp["geojson"], result.class_map, result.label_names(), downsample=result.cell)
        check_cancel(cancel, "writing")
        result.written = {**result.written, **{k: out / v for k, v in names.items()}}
        from ..io.jsonsafe import dumps as strict_dumps  # undefined metrics -> null, with a warning

        text = strict_dumps(result.summary(), where=str(out / "summary.json"), indent=2, default=str)
        tmp["summary"].write_text(text, encoding="utf-8")
        for key, name in names.items():  # summary.json last: its presence means the set is complete
            os.replace(tmp[key], out / name)
    report(progress, steps, steps, "written")
    return dict(result.written)
