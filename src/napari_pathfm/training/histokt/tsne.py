"""t-SNE of a checkpoint's encoder features over one or more data sets (HistoKT's feature-space figure).

:func:`tsne_plot` loads a classify checkpoint, takes the features that enter its classifier head (captured
with a forward hook on ``model.get_classifier()``, so the pooled encoder output of any timm model or SLCA
model), embeds them in 2-D with scikit-learn's t-SNE and writes a scatter PNG: colour = class, marker = data
set. The 2-D points go to a CSV beside the PNG (``<png stem>.csv``) so the figure can be redrawn.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import CheckpointError, RecipeError
from ...io.atomic import atomic_path
from ...progress import check_cancel, report

__all__ = ["encoder_features", "tsne_plot"]

_MARKERS = "os^Dv<>pPX*h"


def _items(root: Path, split: str, limit: int | None, seed: int) -> list[tuple[Path, str]]:
    """``(file, class name)`` of a data set's ``split`` part (``all``: every image), at most ``limit``."""
    import json

    from ..datasets import find_class_files

    classes, items = find_class_files(root)
    split_file = root / "split.json"
    if split != "all":
        if not split_file.is_file():
            raise RecipeError(root, f"has no split.json to take the {split!r} part from.", "Use --split all.")
        wanted = set(json.loads(split_file.read_text(encoding="utf-8")).get(split, []))
        items = [(f, y) for f, y in items if str(f.relative_to(root)) in wanted]
    if limit and len(items) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))
        items = [items[i] for i in keep]
    return [(f, classes[y]) for f, y in items]


def encoder_features(
    model, files: Sequence[Path], card: dict, *, device: str = "cpu", batch_size: int = 32, progress=None, cancel=None
) -> np.ndarray:
    """Features entering ``model``'s classifier head for each image file, ``(N, D)`` float32.

    Images are resized to the card's ``tile_size`` and normalised with its mean/std, as in training.
    """
    import torch
    from PIL import Image

    from ..datasets import classify_transforms

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Module):
        raise CheckpointError(
            card.get("name", "model"),
            "has no classifier head (get_classifier()).",
            "Use a classify checkpoint (timm_classifier or slca).",
        )
    norm = card.get("normalization") or {}
    tf = classify_transforms(
        int(card.get("tile_size") or 224),
        False,
        norm.get("mean", [0.485, 0.456, 0.406]),
        norm.get("std", [0.229, 0.224, 0.225]),
    )
    captured: list = []
    hook = head.register_forward_hook(lambda m, args, out: captured.append(args[0].detach().flatten(1).float().cpu()))
    try:
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(files), batch_size):
                check_cancel(cancel, "t-SNE features")
                batch = []
                for f in files[start : start + batch_size]:
                    with Image.open(f) as im:
                        batch.append(tf(im.convert("RGB")))
                model(torch.stack(batch).to(device))
                report(progress, min(start + batch_size, len(files)), len(files), "encoder features")
    finally:
        hook.remove()
    return torch.cat(captured).numpy()


def tsne_plot(
    checkpoint: str | Path,
    datasets: Sequence[str | Path],
    out: str | Path,
    *,
    split: str = "test",
    max_per_dataset: int | None = 500,
    perplexity: float = 30.0,
    seed: int = 0,
    device: str = "auto",
    progress=None,
    cancel=None,
) -> Path:
    """Embed the encoder features of ``datasets`` with t-SNE and save the scatter plot.

    Parameters
    ----------
    checkpoint : path
        A classify checkpoint (``.safetensors`` + card).
    datasets : sequence of path
        Class-folder data sets (standardised ones have ``split.json``).
    out : str or Path
        PNG to write; the points also go to ``<stem>.csv``.
    split : {"test", "val", "train", "all"}
        Which part of each data set to embed.
    max_per_dataset : int, optional
        Random (seeded) subset size per data set, to keep t-SNE fast.
    perplexity : float
        t-SNE perplexity (lowered automatically for very few points).
    seed : int
        Seed of the subset and of t-SNE.
    device : str
        Torch device for the feature pass.

    Returns
    -------
    Path
        The PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from ...device import resolve_device
    from ...models.checkpoint import load_checkpoint

    device = resolve_device(device)
    model, card = load_checkpoint(checkpoint, device=device)
    rows: list[tuple[Path, str, str]] = []
    for d in datasets:
        d = Path(d)
        rows += [(f, c, d.name) for f, c in _items(d, split, max_per_dataset, seed)]
    if len(rows) < 3:
        raise RecipeError(
            datasets[0],
            f"gives only {len(rows)} images in the {split!r} part; t-SNE needs 3 or more.",
            "Use --split all or more data.",
        )
    feats = encoder_features(model, [r[0] for r in rows], card, device=device, progress=progress, cancel=cancel)
    perp = float(min(perplexity, max(1.0, (len(rows) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(feats)
    out = Path(out)
    classes = sorted({r[1] for r in rows})
    names = list(dict.fromkeys(r[2] for r in rows))
    colours = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for di, name in enumerate(names):
        for ci, c in enumerate(classes):
            sel = [i for i, r in enumerate(rows) if r[1] == c and r[2] == name]
            if sel:
                ax.scatter(
                    xy[sel, 0],
                    xy[sel, 1],
                    s=18,
                    marker=_MARKERS[di % len(_MARKERS)],
                    color=colours(ci % colours.N),
                    label=f"{name}: {c}",
                    alpha=0.8,
                )
    where = f"{Path(checkpoint).parent.name}/{Path(checkpoint).name}"
    ax.set_title(f"t-SNE of encoder features: {where} ({split}, perplexity {perp:.3g})", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    with atomic_path(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "dataset", "class", "file"])
        for (file, c, name), (x, y) in zip(rows, xy):
            w.writerow([f"{x:.4f}", f"{y:.4f}", name, c, str(file)])
    return out
