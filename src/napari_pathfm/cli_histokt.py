"""HistoKT commands: ``pathfm standardize`` (one µm/px, crops, split), ``distill`` (SVD merge of
checkpoints), ``transfer-matrix`` (train on each data set, transfer to each other) and ``tsne``.
Registered on the ``pathfm`` app by :mod:`napari_pathfm.cli`; the work is
:mod:`napari_pathfm.training.histokt`."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import cli_progress, fail, folders, json_text, preflight
from .errors import PathFMError, UsageError

__all__ = ["distill", "standardize", "transfer_matrix_cmd", "tsne"]


def standardize(
    src: Path = typer.Argument(
        ..., help="Class-folder data set (SRC/<class>/*.png|jpg|tif) or a path,label[,group] CSV"
    ),
    dst: Path = typer.Argument(..., help="New output folder (class folders + split.json + standardize.json)"),
    mpp: float | None = typer.Option(None, help="µm/px of the source images (needed unless the TIFFs record it)"),
    target_mpp: float = typer.Option(1.0, "--target-mpp", min=1e-6, help="µm/px of the crops (HistoKT: 1.0)"),
    crop: int = typer.Option(272, min=1, help="Crop size in pixels (HistoKT: 272)"),
    overlap: bool = typer.Option(False, "--overlap", help="Crops overlap by half (stride crop/2)"),
    fractions: str = typer.Option("0.7,0.15,0.15", help="train,val,test shares (per class, by source image)"),
    seed: int = typer.Option(0, help="Seed of the split"),
    split_by: str = typer.Option("image", help="image (default) or crop (leaky; toy sets with one image per class)"),
) -> None:
    """HistoKT standardisation: rescale to one µm/px, crop (reflection-wrap small images), drop blank crops, split."""
    from .io.preflight import Output

    preflight([Output(dst, folder=True, option="DST")], [src], folders([src]))
    from .training.histokt.standardize import standardize as run

    try:
        shares = [float(x) for x in fractions.split(",")]
        if len(shares) != 3:
            raise UsageError(f"--fractions needs three numbers train,val,test, got {fractions!r}.")
        with cli_progress("standardize") as (progress, cancel):
            info = run(
                src,
                dst,
                mpp=mpp,
                target_mpp=target_mpp,
                crop=crop,
                overlap=overlap,
                fractions=shares,
                seed=seed,
                split_by=split_by,
                progress=progress,
                cancel=cancel,
            )
    except ValueError as exc:  # the pipelines' checks of option values
        fail(UsageError(f"{exc}"))
    typer.echo(
        json_text(
            {k: info[k] for k in ("output", "classes", "classes_without_crops", "totals", "crops_per_split")}, indent=2
        )
    )


def distill(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints of one architecture (.safetensors + .json card)"),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint (X.safetensors + X.json)"),
    drop_head: bool = typer.Option(False, "--drop-head", help="Allow different class counts: keep the first head"),
) -> None:
    """HistoKT weight distillation: merge checkpoints by SVD of their stacked filters (no training)."""
    preflight([out, Path(out).with_suffix(".json")], checkpoints)
    from .training.histokt.distill import distill_checkpoints

    try:
        with cli_progress("distill") as (progress, _cancel):
            written = distill_checkpoints(checkpoints, out, drop_head=drop_head, progress=progress)
    except PathFMError as exc:
        fail(exc)
    typer.echo(f"distilled {len(checkpoints)} checkpoints -> {written}")


def transfer_matrix_cmd(
    datasets: list[Path] = typer.Argument(..., help="Two or more standardised data sets (pathfm standardize)"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: transfer.csv/.json/.png + runs/"),
    mode: str = typer.Option("deeptune", help="deeptune (all layers) or finetune (head only)"),
    epochs: int | None = typer.Option(None, help="Epochs of every run (default: the recipes')"),
    set_: list[str] = typer.Option([], "--set", help="Recipe override for every run (repeatable)"),
    recipes: Path | None = typer.Option(None, help="Folder of the HistoKT recipes (default: the bundled histokt/)"),
    tiny: bool = typer.Option(False, "--tiny", help="CPU smoke recipes (*_tiny.yaml: resnet10t, 64 px)"),
    imagenet: Path | None = typer.Option(None, help="Two-stage: local ImageNet resnet18 weights for the sources"),
    tsne: bool = typer.Option(False, "--tsne", help="Also plot a t-SNE of every source model's features"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
) -> None:
    """HistoKT cross-transfer grid: train on each data set, transfer to each other, table of test accuracy."""
    from .io.preflight import Output

    preflight([Output(out, folder=True)], [*datasets, imagenet, recipes], folders([*datasets, recipes]))
    from .training.histokt.transfer import transfer_matrix

    try:
        with cli_progress("transfer-matrix") as (progress, cancel):
            result = transfer_matrix(
                datasets,
                out,
                mode=mode,
                epochs=epochs,
                overrides=set_,
                recipe_dir=recipes,
                tiny=tiny,
                imagenet_weights=imagenet,
                device=device,
                progress=progress,
                cancel=cancel,
            )
            if tsne:
                from .training.histokt.tsne import tsne_plot

                for name in result.names:
                    ckpt = Path(result.runs[name][name]) / "model.safetensors"
                    tsne_plot(ckpt, datasets, out / f"tsne_{name}.png", device=device, cancel=cancel)
    except ValueError as exc:  # the pipelines' checks of option values
        fail(UsageError(f"{exc}"))
    typer.echo(result.csv.read_text(encoding="utf-8").rstrip())
    typer.echo(f"table: {result.csv}, {result.json}, {result.png}; reused finished runs: {len(result.skipped)}")


def tsne(
    checkpoint: Path = typer.Argument(..., help="Classify checkpoint whose encoder features are embedded"),
    datasets: list[Path] = typer.Argument(..., help="Class-folder data sets (standardised ones have split.json)"),
    out: Path = typer.Option(..., "--out", "-o", help="Scatter plot PNG (points also in <stem>.csv)"),
    split: str = typer.Option("test", help="test, val, train or all"),
    max_per_dataset: int = typer.Option(500, min=2, help="Random subset per data set"),
    perplexity: float = typer.Option(30.0, min=1e-6, help="t-SNE perplexity"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, mps"),
) -> None:
    """t-SNE of a checkpoint's encoder features over data sets (colour = class, marker = data set)."""
    preflight([out, Path(out).with_suffix(".csv")], [checkpoint, *datasets], folders(datasets))
    from .training.histokt.tsne import tsne_plot

    try:
        with cli_progress("tsne") as (progress, cancel):
            written = tsne_plot(
                checkpoint,
                datasets,
                out,
                split=split,
                max_per_dataset=max_per_dataset,
                perplexity=perplexity,
                device=device,
                progress=progress,
                cancel=cancel,
            )
    except PathFMError as exc:
        fail(exc)
    typer.echo(f"t-SNE plot: {written}")
