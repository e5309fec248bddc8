"""Tissue mask + tile grid of a slide, written as files a pathologist's tools understand.

This is what ``pathfm tiles`` and the demo run: the mask as a pyramidal OME-TIFF
with physical pixel size and as GeoJSON (QuPath imports it), the grid as CSV and
JSON, and an overview PNG with the tissue outline and the kept tiles drawn on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import check_cancel, report

TISSUE_CLASSES = {0: "Background", 1: "Tissue"}
TISSUE_COLOURS = {1: (0, 170, 90)}


@dataclass
class TissueTiles:
    """Result of :func:`compute_tissue_tiles`: the mask and the grid of kept tiles."""

    slide: Any
    tissue: Any  # tiles.TissueMask
    grid: Any  # tiles.TileGrid


def compute_tissue_tiles(
    slide,
    *,
    tile_size: int = 256,
    mpp: float | None = 0.5,
    level: int | None = None,
    overlap: int = 0,
    min_tissue: float = 0.25,
    mask_mpp: float = 8.0,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> TissueTiles:
    """Tissue mask at ``mask_mpp`` and the tile grid at ``mpp`` (or ``level``) keeping tissue tiles.

    Without a known slide µm/px, the grid falls back to level 0 and the mask to a
    fixed downsample, so plain images work too.
    """
    from ..tiles import tile_grid, tissue_mask

    report(progress, 0, 2, "tissue mask")
    if slide.mpp is None:
        tissue = tissue_mask(slide, downsample=max(1.0, max(slide.shape) / 2048), cancel=cancel)
        mpp, level = None, (level or 0)
    else:
        tissue = tissue_mask(slide, mpp=mask_mpp, cancel=cancel)
    check_cancel(cancel, "tissue detection")
    report(progress, 1, 2, "tile grid")
    grid = tile_grid(
        slide,
        tile_size,
        mpp=None if level is not None else mpp,
        level=level,
        overlap=overlap,
        tissue=tissue,
        min_tissue=min_tissue,
    )
    report(progress, 2, 2, f"{len(grid.tiles)} tissue tiles")
    return TissueTiles(slide, tissue, grid)


def overview_png(result: TissueTiles, path: Path, max_size: int = 1600) -> Path:
    """Thumbnail with the tissue outline (green) and kept tiles (blue boxes), written atomically."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    from ..io.atomic import atomic_path

    thumb = result.slide.thumbnail(max_size)
    h0, _w0 = result.slide.shape
    f = thumb.shape[0] / h0
    tissue = result.tissue
    mask = (
        np.asarray(
            Image.fromarray(tissue.mask.astype(np.uint8) * 255).resize(
                (
                    max(1, round(tissue.mask.shape[1] * tissue.downsample * f)),
                    max(1, round(tissue.mask.shape[0] * tissue.downsample * f)),
                ),
                Image.Resampling.NEAREST,
            )
        )[: thumb.shape[0], : thumb.shape[1]]
        > 0
    )
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    img = thumb.copy()
    img[: edge.shape[0], : edge.shape[1]][edge] = (0, 170, 90)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    side = result.grid.level0_size * f
    for y, x in result.grid.tiles:
        draw.rectangle([x * f, y * f, x * f + side, y * f + side], outline=(40, 90, 220))
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path


def write_tissue_tiles(result: TissueTiles, out_dir: Path) -> dict[str, Path]:
    """Write mask (OME-TIFF + GeoJSON), grid (CSV + JSON) and overview PNG into ``out_dir``."""
    from ..io.atomic import atomic_path
    from ..io.geojson import write_geojson
    from ..io.ome_tiff import write_ome_tiff

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(result.slide.path).name.split(".")[0]
    tissue = result.tissue
    written = {
        "tissue_mask": write_ome_tiff(
            out_dir / f"{stem}.tissue.ome.tif",
            tissue.mask.astype(np.uint8),
            mpp=tissue.mpp,
            is_labels=True,
            class_names=TISSUE_CLASSES,
            metadata={"slide": str(result.slide.path), "downsample": tissue.downsample},
        ),
        "tissue_geojson": write_geojson(
            out_dir / f"{stem}.tissue.geojson",
            tissue.mask.astype(np.uint8),
            {1: "Tissue"},
            downsample=tissue.downsample,
            colors=TISSUE_COLOURS,
        ),
    }
    csv_path, json_path = out_dir / f"{stem}.tiles.csv", out_dir / f"{stem}.tiles.json"
    with atomic_path(csv_path) as tmp:
        result.grid.to_csv(tmp)
    with atomic_path(json_path) as tmp:
        result.grid.to_json(tmp)
    written["tiles_csv"], written["tiles_json"] = csv_path, json_path
    written["overview_png"] = overview_png(result, out_dir / f"{stem}.overview.png")
    return {k: Path(v) for k, v in written.items()}


def tissue_and_grid(slide_path, out_dir, *, progress=None, cancel=None, **params) -> dict[str, Path]:
    """Open ``slide_path``, compute tissue + grid (``params`` as :func:`compute_tissue_tiles`), write files."""
    from ..io.slide import open_slide

    with open_slide(slide_path) as slide:
        result = compute_tissue_tiles(slide, progress=progress, cancel=cancel, **params)
        return write_tissue_tiles(result, Path(out_dir))
