"""The ``pathfm`` command line: a thin front end over the pipelines and the training engine.

Every command reports progress through the same ``progress(done, total, message)``
callback the napari widgets use; Ctrl-C cancels cleanly between tiles/batches.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import typer
from typer.core import TyperGroup

from .cli_common import cli_progress
from .cli_common import fail as _fail
from .cli_common import folders as _folders
from .cli_common import json_text as _json
from .cli_common import preflight as _preflight
from .cli_common import preflight_recipe as _preflight_recipe
from .cli_histokt import distill, standardize, transfer_matrix_cmd, tsne
from .cli_mil import mil_app
from .cli_prompt import prompt_cmd
from .cli_recipes import recipes_cmd
from .cli_segment import segment
from .cli_translate import evaluate_translation_cmd, translate, zstats
from .errors import PathFMError, UsageError


class BoundaryGroup(TyperGroup):
    """The command group with the one error boundary: whatever a command raises becomes one plain
    message on stderr and an exit code (:func:`napari_pathfm.error_boundary.describe`), never a
    traceback unless asked for with ``--debug`` / ``PATHFM_DEBUG=1``."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException, SystemExit):
            raise  # exit codes and usage errors that typer prints itself
        except BaseException as exc:  # noqa: BLE001 - the boundary: every failure gets one message
            _fail(exc)


app = typer.Typer(
    name="pathfm",
    help="Computational pathology foundation models: slides, tiles, training, inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=BoundaryGroup,
)


@app.callback()
def _main_options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (or PATHFM_DEBUG=1)"),
) -> None:
    """Computational pathology foundation models: slides, tiles, training, inference."""
    if debug:
        import os

        os.environ["PATHFM_DEBUG"] = "1"


@app.command()
def info() -> None:
    """Print versions, available devices and registered models."""
    from .info import collect_info

    typer.echo(_json(collect_info(), indent=2))


@app.command()
def models(
    action: str | None = typer.Argument(
        None, metavar="[list|verify]", help="list: also the foundation models found offline; verify: check weights"
    ),
    paths: list[Path] | None = typer.Argument(
        None, help="verify: feature files (.features.zarr) or model cards/checkpoints to check (default: all found)"
    ),
    folder: list[Path] | None = typer.Option(None, "--folder", help="Also look for foundation models in this folder"),
    family: str | None = typer.Option(None, help="Only this family (e.g. classify)"),
    checkpoints: bool = typer.Option(
        False,
        "--checkpoints",
        help="List the trained checkpoints instead (bundled, user folder, runs) with their cards",
    ),
    as_json: bool = typer.Option(False, "--json", help="With --checkpoints, list or verify: JSON output"),
) -> None:
    """List registered models: name, family and what each is (--checkpoints: the trained ones and their cards;
    `list`: also the foundation models found offline; `verify`: check local weights against recorded sha256s)."""
    from .models import list_models, model_info

    if action is not None:
        from .cli_models import models_command

        raise typer.Exit(models_command(action, paths or [], folder or [], as_json))

    if checkpoints:
        from .checkpoints import describe_checkpoint, find_checkpoints

        found = [describe_checkpoint(w, c) for w, c in find_checkpoints(family)]
        if as_json:
            typer.echo(_json(found, indent=2, default=str))
            return
        for d in found:
            typer.echo(f"{d['name']}  [{d['family']}, {d['where']}]")
            for key in ("description", "training_data", "training_budget", "command", "evaluation", "licence"):
                if d[key]:
                    typer.echo(f"    {key.replace('_', ' ')}: {d[key]}")
            typer.echo(f"    intended use: {d['intended_use'] or 'not stated'}")
        return
    for name in list_models(family):
        info = model_info(name)
        typer.echo(f"{name:<24} {info['family']:<10} {info['description']}")


@app.command("open")
def open_cmd(slide: Path = typer.Argument(..., help="Slide file (SVS, NDPI, MRXS, DICOM, OME-TIFF, …)")) -> None:
    """Print a slide's metadata (levels, µm/px, vendor properties, associated images) as JSON."""
    from .io.slide import open_slide

    try:
        with open_slide(slide) as s:
            typer.echo(_json(s.metadata(), indent=2, default=str))
    except PathFMError as exc:
        _fail(exc)


@app.command()
def tiles(
    slide: Path = typer.Argument(..., help="Slide file"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder"),
    mpp: float | None = typer.Option(0.5, min=1e-6, help="Tile resolution in µm/px (ignored when --level is given)"),
    level: int | None = typer.Option(None, min=0, help="Pyramid level to tile instead of a µm/px target"),
    size: int = typer.Option(256, min=1, help="Tile size in output pixels"),
    overlap: int = typer.Option(0, min=0, help="Overlap between neighbouring tiles in output pixels"),
    min_tissue: float = typer.Option(0.25, min=0.0, max=1.0, help="Keep tiles with at least this tissue fraction"),
    mask_mpp: float = typer.Option(8.0, min=1e-6, help="Resolution of the tissue mask in µm/px"),
) -> None:
    """Compute the tissue mask and the tile grid of a slide; write mask, grid and an overview PNG."""
    from .io.preflight import Output

    _preflight([Output(out, folder=True)], [slide])
    from .pipelines.tissue_tiles import tissue_and_grid

    try:
        with cli_progress("tiles") as (progress, cancel):
            written = tissue_and_grid(
                slide,
                out,
                tile_size=size,
                mpp=None if level is not None else mpp,
                level=level,
                overlap=overlap,
                min_tissue=min_tissue,
                mask_mpp=mask_mpp,
                progress=progress,
                cancel=cancel,
            )
    except PathFMError as exc:
        _fail(exc)
    for name, path in written.items():
        typer.echo(f"{name}: {path}")


@app.command("annotation-tiles")
def annotation_tiles(
    slide: Path = typer.Argument(..., help="Slide file"),
    annotations: Path = typer.Argument(..., help="Its QuPath GeoJSON (.geojson/.json) or ASAP XML annotations"),
    out: Path = typer.Option(..., "--out", "-o", help="Data set folder: one sub-folder of PNG tiles per class"),
    mpp: float = typer.Option(0.5, min=1e-6, help="Tile resolution in µm/px"),
    size: int = typer.Option(224, min=8, help="Tile size in pixels"),
    min_cover: float = typer.Option(0.5, min=0.01, max=1.0, help="Share of a tile its class must cover"),
) -> None:
    """Cut the annotated tiles of a slide into class folders: a tile-classification data set (docs/annotations.md)."""
    from .io.preflight import Output

    _preflight([Output(out, folder=True)], [slide, annotations])
    from .pipelines.annotation_tiles import export_annotation_tiles

    try:
        with cli_progress("annotation tiles") as (progress, cancel):
            info = export_annotation_tiles(
                slide, annotations, out, mpp=mpp, size=size, min_cover=min_cover, progress=progress, cancel=cancel
            )
    except PathFMError as exc:
        _fail(exc)
    typer.echo(_json(info, indent=2))


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML, or a bundled recipe name (see `pathfm recipes`)"),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: --set optim.lr=1e-4 (repeatable)"),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: the recipe's `output`)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps"),
    resume: bool = typer.Option(True, help="Continue from the output folder's last checkpoint when present"),
    json_progress: bool = typer.Option(False, "--json-progress", help="Stream progress as JSON lines on stdout"),
) -> None:
    """Train a model from a recipe (file or bundled name) with Lightning (checkpoints, resume, early stopping, logs)."""
    _preflight_recipe(recipe, set_, out)
    from .training.engine import run_recipe
    from .training.signals import GracefulStop

    cancel = threading.Event()
    # SIGINT (the panel's Stop, Ctrl-C) and SIGTERM (what schedulers send before they kill) stop gracefully:
    # finish the batch, save last.ckpt, export, emit "done"; a second signal stops at once. The callback puts
    # our handler back after Lightning installs its own SIGTERM handler (which would abort without exporting).
    stop = GracefulStop(cancel)
    kwargs = dict(resume=resume, device=device, output=out, cancel=cancel, callbacks=[stop])
    try:
        with stop:
            if json_progress:

                def on_event(event: dict) -> None:
                    typer.echo(_json(event, default=str))
                    sys.stdout.flush()

                result = run_recipe(recipe, set_, on_event=on_event, **kwargs)
            else:
                with cli_progress("train") as (progress, _):
                    result = run_recipe(recipe, set_, progress=progress, **kwargs)
    except PathFMError as exc:
        _fail(exc)
    # stopped by a signal: exit 128 + signal (SIGTERM 143), so schedulers and scripts can tell; the panel's
    # Stop (SIGINT with --json-progress) is a normal end of its run: 0
    code = 0 if json_progress and stop.received == signal.SIGINT else stop.exit_code()
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:  # DDP: the other ranks ran the same command; rank 0 reports
        raise typer.Exit(code)
    summary = {
        "checkpoint": str(result.checkpoint),
        "best_metrics": result.best_metrics,
        "last_metrics": result.last_metrics,
        "test_metrics": result.test_metrics,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "cancelled": result.cancelled,
        "log_dir": str(result.log_dir),
    }
    if json_progress:
        typer.echo(_json({"event": "summary", **summary}, default=str))
    else:
        typer.echo(_json(summary, indent=2, default=str))
    if code:
        raise typer.Exit(code)


app.command("recipes")(recipes_cmd)
app.command("prompt")(prompt_cmd)


@app.command()
def features(
    inputs: list[Path] = typer.Argument(..., help="Slides, plain images, or folders of them"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one <slide>.zarr per slide"),
    backbone: str = typer.Option(
        "resnet50_trunc",
        help="resnet50_trunc (ResNet50 to layer3, 1024-d), any timm model name, or a foundation model found "
        "offline: hf-hub:ORG/NAME from the local Hugging Face cache, or a model folder (pathfm models list)",
    ),
    weights: Path | None = typer.Option(None, help="Local weights file for the backbone (no downloads)"),
    mpp: float = typer.Option(0.5, min=1e-6, help="Tile resolution in µm/px"),
    tile: int = typer.Option(256, min=16, help="Tile size in pixels"),
    batch_size: int = typer.Option(32, min=1, help="Tiles per forward pass"),
    min_tissue: float = typer.Option(0.25, min=0.0, max=1.0, help="Keep tiles with at least this tissue fraction"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse/store encoder tile embeddings (pathfm cache)"),
    partial_weights: bool = typer.Option(
        False, "--partial-weights", help="Load only the --weights tensors that fit the backbone (others stay random)"
    ),
) -> None:
    """Extract patch features of tissue tiles (resumable: finished slides are skipped)."""
    from .io.preflight import Output

    _preflight([Output(out, folder=True)], [*inputs, weights])
    from .pipelines.features_many import features_command

    try:
        with cli_progress("features") as (progress, cancel):
            results = features_command(
                inputs,
                out,
                backbone=backbone,
                weights=weights,
                mpp=mpp,
                tile=tile,
                batch_size=batch_size,
                device=device,
                min_tissue=min_tissue,
                progress=progress,
                cancel=cancel,
                cache=None if cache else False,
                partial_weights=partial_weights,
            )
    except PathFMError as exc:
        _fail(exc)
    for slide, info in results["slides"].items():
        status = info.get("status")
        detail = info.get("error") if status == "failed" else f"{info.get('n_tiles')} tiles -> {info.get('path')}"
        typer.echo(f"{status:<8} {detail}" if status == "failed" else f"{status:<8} {slide}: {detail}")
    counts = results["counts"]
    typer.echo(", ".join(f"{k} {v}" for k, v in counts.items()))
    if counts.get("failed"):
        raise typer.Exit(1)


app.command()(segment)


@app.command()
def classify(
    slide: Path = typer.Argument(..., help="Slide or image (SVS, NDPI, OME-TIFF, TIFF, PNG, …)"),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Tile classifier checkpoint (family 'classify')"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (class map, probabilities, tiles.csv, summary)"),
    batch_size: int = typer.Option(32, min=1, help="Tiles per forward pass"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    mpp: float | None = typer.Option(None, min=1e-6, help="µm/px the model runs at (default: the checkpoint's)"),
    tissue_only: bool = typer.Option(True, "--tissue-only/--all-tiles", help="Classify only tissue tiles"),
    image_mpp: float | None = typer.Option(
        None, "--image-mpp", min=1e-6, help="µm/px of an input that does not record it (PNG)"
    ),
    gradcam: int = typer.Option(
        0, "--gradcam", min=0, help="Also write Grad-CAM PNGs of the top N tiles of each class"
    ),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse/store encoder tile embeddings (pathfm cache)"),
) -> None:
    """Classify the tiles of a slide: class map + per-class probabilities over the slide (OME-TIFF), CSV, JSON."""
    from .io.preflight import Output

    _preflight([Output(out, folder=True)], [slide, checkpoint], _folders([slide]))
    from .io.slide import open_slide
    from .pipelines.classify import classify_slide, write_classify_outputs

    try:
        with cli_progress("classify") as (progress, cancel), open_slide(slide) as s:
            result = classify_slide(
                s,
                checkpoint,
                mpp=mpp,
                batch_size=batch_size,
                device=device,
                tissue_only=tissue_only,
                progress=progress,
                cancel=cancel,
                cache=None if cache else False,
                image_mpp=image_mpp,
            )
            if gradcam > 0:
                from .pipelines.gradcam import write_top_gradcam

                pngs = write_top_gradcam(
                    s, result, checkpoint, out / "gradcam", gradcam, device=device, progress=progress, cancel=cancel
                )
                if pngs:
                    result.written["gradcam"] = out / "gradcam"
            write_classify_outputs(result, out, progress=progress, cancel=cancel)
    except ValueError as exc:  # the pipelines' checks of option values
        _fail(UsageError(f"{exc}"))
    for message in result.messages:
        typer.secho(message, fg=typer.colors.YELLOW, err=True)
    typer.echo(_json(result.summary(), indent=2, default=str))


@app.command()
def batch(
    manifest: Path = typer.Argument(..., help="CSV with a 'slide' column (relative paths: from the CSV's folder)"),
    task: str = typer.Option(..., "--task", help="Family: segment, classify, features, mil, translate, ..."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one folder per slide + batch-summary.json/.csv"),
    scheduler: str | None = typer.Option(None, help="dask scheduler address (tcp://host:8786); default: local"),
    workers: int = typer.Option(2, min=1, help="Worker processes of the local cluster (one thread each)"),
    checkpoint: list[Path] = typer.Option(
        [], "--checkpoint", "-c", help="The task's checkpoint (repeat for translate)"
    ),
    set_: list[str] = typer.Option([], "--set", help="Option of the task's pipeline: --set batch_size=4 (repeatable)"),
) -> None:
    """Run a task over many slides on dask.distributed (resumable; failures reported in the summary)."""
    from .io.preflight import Output

    _preflight([Output(out, folder=True)], [manifest, *checkpoint])
    from .pipelines.batch import parse_options, run_batch

    try:
        with cli_progress(f"batch {task}") as (progress, cancel):
            summary = run_batch(
                manifest,
                task,
                out,
                scheduler=scheduler,
                n_workers=workers,
                checkpoint=list(checkpoint) or None,
                options=parse_options(set_),
                progress=progress,
                cancel=cancel,
            )
    except PathFMError as exc:
        _fail(exc)
    for row in summary.rows:
        typer.echo(f"{row['status']:<8} {row['slide']}" + (f": {row['error']}" if row["error"] else ""))
    typer.echo(", ".join(f"{k} {v}" for k, v in summary.counts.items()) + f"; summary: {summary.written['json']}")
    if summary.counts["failed"]:
        raise typer.Exit(1)


app.add_typer(mil_app, name="mil")
app.command()(standardize)
app.command()(distill)
app.command("transfer-matrix")(transfer_matrix_cmd)
app.command()(tsne)
app.command()(zstats)
app.command()(translate)
app.command("evaluate-translation")(evaluate_translation_cmd)


@app.command()
def demo(
    out: Path = typer.Option(Path("pathfm-demo"), "--out", "-o", help="Where to write the demo outputs"),
    slide: Path | None = typer.Option(None, help="Slide to use (default: the bundled CMU-1 small region)"),
    show: bool | None = typer.Option(None, help="Open napari with the results (default: when a display is available)"),
) -> None:
    """Run every family on the bundled samples: tissue/tiles, MIL, segment, classify, translate, canvas PNGs."""
    from .io.preflight import Output

    _preflight([Output(out, folder=True)], [slide])
    from .demo import run_demo

    try:
        with cli_progress("demo") as (progress, cancel):
            written = run_demo(out, slide=slide, show=False, progress=progress, cancel=cancel)
    except PathFMError as exc:
        _fail(exc)
    typer.echo(f"napari-pathfm demo wrote {len(written)} files to {out.resolve()}:")
    for name, path in written.items():
        typer.echo(f"  {name}: {path}")
    from .demo import display_available, show_in_napari

    if show if show is not None else display_available():
        show_in_napari(out, slide=slide)


def _add_cache_commands() -> None:
    from .cli_cache import cache_app

    app.add_typer(cache_app, name="cache")


_add_cache_commands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
