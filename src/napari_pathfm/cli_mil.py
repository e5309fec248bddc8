"""``pathfm mil``: slide prediction with a MIL model (patch heatmap over the slide) and k-fold
cross-validation of a MIL recipe. The work is :mod:`napari_pathfm.pipelines.mil` and
:mod:`napari_pathfm.training.crossval`."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import cli_progress, fail, folders, json_text, preflight, preflight_recipe
from .errors import PathFMError, UsageError

__all__ = ["mil_app"]


mil_app = typer.Typer(help="Multiple-instance learning: slide prediction with patch heatmaps.", no_args_is_help=True)


@mil_app.command("predict")
def mil_predict_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="MIL checkpoint (.safetensors + .json card)"),
    slide: Path | None = typer.Option(None, help="Slide to predict (features are extracted first)"),
    features_path: Path | None = typer.Option(None, "--features", help="Feature file (.zarr) from `pathfm features`"),
    out: Path | None = typer.Option(None, "--out", help="Heatmap OME-TIFF (e.g. heatmap.ome.tif)"),
    json_out: Path | None = typer.Option(None, "--json", help="Prediction JSON (probabilities, top patches)"),
    top_k: int = typer.Option(10, min=0, help="How many top patches to list"),
    image_mpp: float | None = typer.Option(
        None, "--image-mpp", min=1e-6, help="µm/px of a --slide that does not record it (PNG)"
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse/store encoder tile embeddings (pathfm cache)"),
    bootstrap: int = typer.Option(0, min=0, help="Resampled bags for an uncertainty interval (e.g. 20; 0: none)"),
) -> None:
    """Predict a slide's class with a MIL model and write the patch heatmap over the slide."""
    from .pipelines.mil import mil_predict, write_mil_outputs

    if (slide is None) == (features_path is None):
        fail(UsageError("give exactly one of --slide or --features."))
    from .io.preflight import Output

    preflight(
        [out, Output(json_out, option="--json") if json_out else None],
        [checkpoint, slide, features_path],
        folders([features_path]),
    )
    try:
        with cli_progress("mil predict") as (progress, cancel):
            if slide is not None:
                from .io.slide import open_slide

                with open_slide(slide) as s:
                    mpp = image_mpp or s.mpp
                    pred = mil_predict(
                        checkpoint,
                        slide=s,
                        device=device,
                        progress=progress,
                        cancel=cancel,
                        cache=None if cache else False,
                        image_mpp=image_mpp,
                        bootstrap=bootstrap,
                    )
            else:
                pred = mil_predict(
                    checkpoint,
                    features=features_path,
                    device=device,
                    progress=progress,
                    cancel=cancel,
                    bootstrap=bootstrap,
                )
                mpp = pred.source.get("slide_mpp")
            written = write_mil_outputs(pred, heatmap=out, json_path=json_out, mpp=mpp, top_k=top_k)
    except PathFMError as exc:
        fail(exc)
    for message in getattr(pred, "messages", []):
        typer.secho(message, fg=typer.colors.YELLOW, err=True)
    typer.echo(
        json_text(
            {
                "predicted": pred.predicted,
                "probabilities": pred.to_dict(top_k)["probabilities"],
                **({"uncertainty": pred.uncertainty} if pred.uncertainty else {}),
                "written": {k: str(v) for k, v in written.items()},
            },
            indent=2,
        )
    )


@mil_app.command("cv")
def mil_cv_cmd(
    recipe: Path = typer.Argument(..., help="MIL recipe file or bundled name (e.g. s4mil/glas_bags)"),
    k: int | None = typer.Option(None, min=2, help="Folds (default: the CSV's fold column, else 5)"),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value (repeatable)"),
    out: Path | None = typer.Option(None, "--out", help="Output folder (one subfolder per fold)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
    resume: bool = typer.Option(True, help="Skip folds that already finished; resume interrupted ones"),
) -> None:
    """k-fold cross-validation of a MIL recipe; writes cv_summary.json (mean ± std of accuracy and AUROC)."""
    if out is not None:
        preflight_recipe(recipe, set_, out)
    from .training.crossval import cv_command

    try:
        with cli_progress("mil cv") as (progress, cancel):
            summary = cv_command(
                recipe, k=k, set_=set_, out=out, device=device, resume=resume, progress=progress, cancel=cancel
            )
    except PathFMError as exc:
        fail(exc)
    typer.echo(json_text(summary, indent=2, default=str))
