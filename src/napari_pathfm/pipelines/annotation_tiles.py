"""Tiles of a slide labelled by the annotations over them: a tile-classification data set from QuPath/ASAP.

A pathologist who outlined tumour, stroma and necrosis regions in QuPath has a training set for a
tile classifier (SLCA, or the timm classifier) once every tile inside an outline is cut out and
filed under its class. :func:`export_annotation_tiles` lays the slide's tile grid at the chosen
µm/px (:func:`napari_pathfm.tiles.tile_grid`), samples the annotations' classes on an 8 x 8 grid
of points in every tile, keeps the tiles where one class covers at least ``min_cover`` of the points,
and writes each as ``<out>/<class>/<slide>_x<x>_y<y>.png`` (level-0 corner in the name, atomically)
— the folder-per-class layout the ``classify`` recipes read (``data.root``) — plus
``<slide>.tiles.csv`` (class, level-0 corner, cover) for provenance. Several slides can go into one
folder; tiles already written are kept.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..io.annotations import annotations_to_labels, read_annotations
from ..io.atomic import atomic_path
from ..progress import check_cancel, report

__all__ = ["SAMPLES", "export_annotation_tiles"]

#: Points per tile side at which the annotations' classes are sampled.
SAMPLES = 8


def _folder_name(name: str) -> str:
    """A class name as a folder name (path separators and other odd characters replaced)."""
    return re.sub(r"[^\w\- .]+", "_", name).strip() or "unnamed"


def export_annotation_tiles(
    slide_path: str | Path,
    annotations_path: str | Path,
    out_dir: str | Path,
    *,
    mpp: float = 0.5,
    size: int = 224,
    min_cover: float = 0.5,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> dict:
    """Write the annotated tiles of a slide into class folders; returns ``{class: count, ...}`` and paths.

    Parameters
    ----------
    slide_path, annotations_path : path
        The slide and its QuPath GeoJSON / ASAP XML annotations (level-0 pixels).
    out_dir : path
        Gets ``<class>/`` folders of PNG tiles and ``<slide>.tiles.csv``.
    mpp : float
        µm per pixel of the tiles (the slide's pyramid level nearest to it, resampled).
    size : int
        Tile side in pixels.
    min_cover : float
        Share of a tile's sample points its class must cover (0–1).
    """
    from PIL import Image

    from ..io.slide import open_slide
    from ..tiles import tile_grid
    from ..tiles.loader import read_tile

    if not 0 < min_cover <= 1:
        raise ValueError(f"min_cover must be in (0, 1], got {min_cover}")
    found = read_annotations(annotations_path)
    out_dir = Path(out_dir)
    stem = Path(slide_path).name.split(".")[0]
    rows, counts = [], {}
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, int(size), mpp=mpp)
        step = grid.level0_size / SAMPLES  # level-0 pixels between sample points
        h0, w0 = grid.level0_shape
        shape = (int(np.ceil(h0 / step)), int(np.ceil(w0 / step)))
        labels, classes, _ = annotations_to_labels(found, shape, downsample=step)
        names = np.array(["", *[classes[k] for k in sorted(classes)]], dtype=object)
        report(progress, 0, len(grid.tiles), "annotated tiles")
        for i, (y, x) in enumerate(grid.tiles):
            check_cancel(cancel, "annotation tiles")
            r, c = int(round(y / step)), int(round(x / step))
            window = names[labels[r : r + SAMPLES, c : c + SAMPLES]].ravel()
            window = window[window != ""]
            if window.size:
                values, n = np.unique(window, return_counts=True)
                best = int(np.argmax(n))
                cover = float(n[best]) / SAMPLES**2
                if cover >= min_cover:
                    cls = str(values[best])
                    target = out_dir / _folder_name(cls) / f"{stem}_x{int(x)}_y{int(y)}.png"
                    if not target.is_file():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_path(target) as tmp:
                            Image.fromarray(read_tile(slide, grid, i)).save(tmp, format="PNG")
                    rows.append({"class": cls, "x": int(x), "y": int(y), "cover": round(cover, 3), "file": target.name})
                    counts[cls] = counts.get(cls, 0) + 1
            report(progress, i + 1, len(grid.tiles), "annotated tiles")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class", "x", "y", "cover", "file"])
    writer.writeheader()
    writer.writerows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"{stem}.tiles.csv"
    with atomic_path(table) as tmp:
        Path(tmp).write_text(buf.getvalue(), encoding="utf-8")
    return {"counts": counts, "tiles": len(rows), "mpp": grid.mpp, "csv": str(table)}
