"""HASTE translation commands: ``pathfm zstats`` (normalisation table of z-stacks), ``translate``
(z-stack → fluorescence channels) and ``evaluate-translation`` (predicted against real stain).
Registered on the ``pathfm`` app by :mod:`napari_pathfm.cli`; the work is
:mod:`napari_pathfm.pipelines.translate` and :mod:`napari_pathfm.pipelines.translate_eval`."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import cli_progress, fail, folders, json_text, preflight
from .errors import UsageError

__all__ = ["evaluate_translation_cmd", "translate", "zstats"]


def zstats(
    stacks: list[Path] = typer.Argument(..., help="Z-stacks: folders of plane files (every site), plane files, TIFFs"),
    out: Path = typer.Option(..., "--out", "-o", help="Stats table CSV to write"),
    magnification: str = typer.Option("", help="Value of the magnification column (20x, 40x, 60x)"),
    percentiles: tuple[float, float] = typer.Option((1.0, 99.8), help="Two percentiles, stored as p<q> columns"),
    rows: tuple[int, int] | None = typer.Option(None, help="Only rows START STOP (ISL training rows: 0 768)"),
    channel: str | None = typer.Option(None, help="Input channel of the planes (default: C04 / the z channel)"),
    append: bool = typer.Option(False, help="Add the rows to an existing table (another magnification)"),
) -> None:
    """Per channel/plane min, max and percentiles of z-stacks (pooled over all of them) as a CSV stats table."""
    preflight([out], stacks, folders(stacks))
    from .io.atomic import atomic_path
    from .io.normalize import StatsTable
    from .training.translate_stats import zstack_stats

    try:
        with cli_progress("zstats") as (progress, cancel):
            table = zstack_stats(
                stacks,
                magnification=magnification,
                percentiles=percentiles,
                rows=rows,
                channel=channel,
                progress=progress,
                cancel=cancel,
            )
        if append and out.is_file():
            old = StatsTable.read_csv(out)
            keys = {(r["magnification"], r["channel"], r["plane"]) for r in table.rows}
            table = StatsTable(
                [r for r in old.rows if (r["magnification"], r["channel"], r["plane"]) not in keys] + table.rows
            )
        with atomic_path(out) as tmp:
            table.to_csv(tmp)
    except ValueError as exc:  # the pipelines' checks of option values
        fail(UsageError(f"{exc}"))
    typer.echo(f"{len(table)} rows ({sorted({r['channel'] for r in table.rows})}) written to {out}")


def translate(
    stack: Path = typer.Argument(..., help="Z-stack: folder of plane files, one plane file, multipage/OME-TIFF"),
    checkpoint: list[Path] = typer.Option(
        ..., "--checkpoint", "-c", help="Translation checkpoint (repeat per channel)"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one OME-TIFF per channel + nuclei mask"),
    tile: int = typer.Option(512, min=16, help="Tile side in pixels (multiple of 16)"),
    stride: int = typer.Option(256, min=1, help="Step between tiles in pixels"),
    batch_size: int = typer.Option(4, min=1, help="Tiles per forward pass"),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="Nuclei confidence threshold (LUPI checkpoints)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    flips: bool | None = typer.Option(
        None,
        "--flips/--no-flips",
        help="Average each tile over its four flips, 4x the compute (default: as the card says)",
    ),
) -> None:
    """Brightfield z-stack → fluorescence channels (HASTE), nuclei mask and confidence, as OME-TIFFs."""
    from .io.preflight import Output

    preflight([Output(out, folder=True)], [stack, *checkpoint], folders([stack]))
    from .pipelines.translate import translate_stack, write_translation

    try:
        with cli_progress("translate") as (progress, cancel):
            result = translate_stack(
                stack,
                list(checkpoint),
                tile=tile,
                stride=stride,
                batch_size=batch_size,
                threshold=threshold,
                device=device,
                flips=flips,
                progress=progress,
                cancel=cancel,
            )
            write_translation(result, out, progress=progress, cancel=cancel)
    except ValueError as exc:  # the pipelines' checks of option values
        fail(UsageError(f"{exc}"))
    for message in result.messages:
        typer.secho(message, fg=typer.colors.YELLOW, err=True)
    typer.echo(json_text(result.summary(), indent=2, default=str))


def evaluate_translation_cmd(
    sources: list[Path] = typer.Argument(..., help="Translation checkpoints (.safetensors) and/or predicted images"),
    stack: Path | None = typer.Option(None, "--stack", "-s", help="Z-stack the checkpoints translate"),
    target: str | None = typer.Option(
        None, "--target", "-t", help="Real channel: a target of the stack (DAPI) or an image file"
    ),
    channel: str | None = typer.Option(None, help="Predicted channel to compare (default: the nuclei one)"),
    rows: str | None = typer.Option(None, help="Rows to evaluate, START:STOP (ISL validation: 768:1024)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the table as CSV"),
    tile: int = typer.Option(512, help="Tile side for checkpoints"),
    stride: int = typer.Option(256, help="Tile step for checkpoints"),
    batch_size: int = typer.Option(4, min=1, help="Tiles per forward pass"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    flips: bool | None = typer.Option(
        None, "--flips/--no-flips", help="Checkpoints average each tile over its four flips (default: as the card says)"
    ),
) -> None:
    """Compare predicted stains with the real one: MAE/median, PSNR, SSIM, nuclei count/area/intensity/texture."""
    preflight([out], [*sources, stack, target if target and Path(target).exists() else None], folders([stack]))
    from .pipelines.translate_eval import evaluate_translation, format_table, parse_span, write_table

    try:
        with cli_progress("evaluate-translation") as (progress, cancel):
            table = evaluate_translation(
                sources,
                stack=stack,
                target=target,
                channel=channel,
                rows=parse_span(rows),
                tile=tile,
                stride=stride,
                batch_size=batch_size,
                device=device,
                flips=flips,
                progress=progress,
                cancel=cancel,
            )
        if out is not None:
            write_table(table, out)
    except ValueError as exc:  # the pipelines' checks of option values
        fail(UsageError(f"{exc}"))
    typer.echo(format_table(table))
    typer.echo("*_rel = (predicted - real) / real over nuclei segmented by Otsu + watershed; 0 is perfect")
    if out is not None:
        typer.echo(f"table: {out}")
