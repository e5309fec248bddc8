"""``pathfm prompt``: the object under each click or box on a slide or image, as a level-0 labels OME-TIFF.

Each ``--point X,Y`` and each ``--box X0,Y0,X1,Y1`` (level-0 pixels of the input) is one prompt and
one object: the points in the order given are objects 1, 2, …, the boxes follow in their order.
``--negative X,Y`` adds a negative click (not this) to every prompt, e.g. on a neighbouring gland the
object should not reach into. The work is :func:`napari_pathfm.pipelines.prompt.prompt_slide`; the
embedding cache filled by ``pathfm segment`` on the same slide is used, so prompting a segmented
slide encodes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer

from .cli_common import cli_progress, folders, json_text, preflight
from .errors import UsageError

__all__ = ["parse_xy", "prompt_cmd"]


def parse_xy(text: str, n: int, option: str) -> tuple[float, ...]:
    """``"10,20"`` → ``(10.0, 20.0)``; a :class:`~napari_pathfm.errors.UsageError` naming ``option`` otherwise.

    >>> parse_xy("10, 20.5", 2, "--point")
    (10.0, 20.5)
    """
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != n or not all(math.isfinite(v) for v in values):
        shape = "X,Y" if n == 2 else "X0,Y0,X1,Y1"
        raise UsageError(f"{option} {text!r} is not {n} numbers.", f"Write it as {shape} in level-0 pixels.")
    return values


def prompt_cmd(
    input_path: Path = typer.Argument(..., metavar="INPUT", help="Slide or plain image (SVS, OME-TIFF, TIFF, PNG, …)"),
    point: list[str] = typer.Option([], "--point", "-p", help="X,Y: a click on an object (one object each)"),
    box: list[str] = typer.Option([], "--box", "-b", help="X0,Y0,X1,Y1: a box around an object (one object each)"),
    negative: list[str] = typer.Option([], "--negative", "-n", help="X,Y: a negative click added to every prompt"),
    out: Path = typer.Option(..., "--out", "-o", help="Labels OME-TIFF (e.g. objects.ome.tif), input's size"),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Segmentation checkpoint with a prompt path (default: the bundled model)"
    ),
    image_mpp: float | None = typer.Option(
        None, "--image-mpp", min=1e-6, help="µm/px of an input that does not record it (PNG)"
    ),
    mpp: float | None = typer.Option(None, min=1e-6, help="µm/px the model runs at (default: the checkpoint's)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse/store encoder tile embeddings (pathfm cache)"),
) -> None:
    """Segment the object under each click or box (Path-SAM2's prompt path); write one label per prompt."""
    from .io.preflight import Output

    points = [parse_xy(p, 2, "--point") for p in point]
    boxes = [parse_xy(b, 4, "--box") for b in box]
    negatives = [parse_xy(p, 2, "--negative") for p in negative]
    if not points and not boxes:
        raise UsageError("no prompt given.", "Add --point X,Y or --box X0,Y0,X1,Y1 (level-0 pixels).")
    preflight([Output(out)], [input_path, checkpoint], folders([input_path]))
    from .pipelines.prompt import Prompt, edge_note, prompt_slide

    neg = tuple(negatives)
    try:
        prompts = [Prompt(points=((x, y), *neg), labels=(1,) + (0,) * len(neg)) for x, y in points]
        prompts += [Prompt(points=neg, labels=(0,) * len(neg), box=b) for b in boxes]
        with cli_progress("prompt") as (progress, cancel):
            summary = prompt_slide(
                input_path,
                prompts,
                checkpoint,
                image_mpp=image_mpp,
                mpp=mpp,
                device=device,
                cache=None if cache else False,
                out=out,
                progress=progress,
                cancel=cancel,
            )
    except ValueError as exc:  # a box the wrong way round, a prompt outside the image
        raise UsageError(f"{exc}.", "Give level-0 pixel coordinates inside the image.") from None
    for obj in summary["objects"]:
        if not obj["area_px"]:
            typer.secho(f"prompt {obj['id']}: no object found there.", fg=typer.colors.YELLOW, err=True)
        elif obj["at_tile_edge"]:
            typer.secho(f"object {obj['id']} {edge_note(len(obj['tiles']))}", fg=typer.colors.YELLOW, err=True)
    typer.echo(json_text(summary, indent=2))
