"""``pathfm segment``: a slide or image → class map (OME-TIFF, GeoJSON) with a segmentation model.

Registered on the ``pathfm`` app by :mod:`napari_pathfm.cli`; the work is
:func:`napari_pathfm.pipelines.segment.segment_slide`."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import cli_progress, fail, folders, json_text, preflight
from .errors import UsageError

__all__ = ["segment"]


def segment(
    input_path: Path = typer.Argument(
        ..., metavar="INPUT", help="Slide or plain image (SVS, NDPI, OME-TIFF, TIFF, PNG, …)"
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Mask OME-TIFF (e.g. mask.ome.tif), input's size, 0 = background"
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Segmentation checkpoint (default: the bundled model)"
    ),
    geojson: Path | None = typer.Option(None, "--geojson", help="Also write QuPath GeoJSON polygons"),
    mpp: float | None = typer.Option(None, min=1e-6, help="µm/px the model runs at (default: the checkpoint's)"),
    image_mpp: float | None = typer.Option(
        None, "--image-mpp", min=1e-6, help="µm/px of an input that does not record it (PNG)"
    ),
    overlap: float = typer.Option(0.25, min=0.0, max=0.9, help="Tile overlap as a fraction of the tile side"),
    tissue_only: bool = typer.Option(True, "--tissue-only/--all-tiles", help="Run only tiles that touch tissue"),
    batch_size: int = typer.Option(8, min=1, help="Tiles per forward pass"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse/store encoder tile embeddings (pathfm cache)"),
    objects: bool | None = typer.Option(
        None,
        "--objects/--no-objects",
        help="One region per gland: fill holes, drop crumbs, split touching glands [default: when the "
        "model's card has object settings, as the bundled GlaS model does]; --no-objects: the raw class map",
        show_default=False,
    ),
    flips: bool | None = typer.Option(
        None,
        "--flips/--no-flips",
        help="Average each tile over its four flips, 4x the compute and no embedding cache "
        "[default: as the model's card says]",
        show_default=False,
    ),
) -> None:
    """Segment a slide or image into classes (Path-SAM2); write the mask as OME-TIFF (+ GeoJSON)."""
    from .io.preflight import Output

    preflight(
        [Output(out), Output(geojson, option="--geojson") if geojson else None],
        [input_path, checkpoint],
        folders([input_path]),
    )
    from .pipelines.segment import segment_slide

    try:
        with cli_progress("segment") as (progress, cancel):
            result = segment_slide(
                input_path,
                checkpoint,
                mpp=mpp,
                image_mpp=image_mpp,
                overlap=overlap,
                tissue_only=tissue_only,
                batch_size=batch_size,
                device=device,
                progress=progress,
                cancel=cancel,
                out=out,
                geojson=geojson,
                cache=None if cache else False,
                objects=objects,
                flips=flips,
            )
    except ValueError as exc:  # the pipelines' checks of option values
        fail(UsageError(f"{exc}"))
    for message in result.messages:
        typer.secho(message, fg=typer.colors.YELLOW, err=True)
    typer.echo(json_text(result.summary(), indent=2, default=str))
