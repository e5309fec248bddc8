"""Review a batch of MIL slide predictions: the least certain first, verdicts saved as training labels.

After ``pathfm batch --task mil`` every slide's folder holds ``prediction.json`` (class probabilities,
top patches, and the patch bootstrap's interval and flip rate, :mod:`.mil_uncertainty`) and
``heatmap.ome.tif``. :func:`review_queue` lists the slides of a batch output folder with their
prediction, probability and uncertainty, the least certain first (most bootstrap flips, then the
widest interval of the predicted class, then the lowest probability), so a reviewer's time goes where
the model is unsure. :class:`ReviewLog` keeps the reviewer's verdicts — *agree* (the label is the
prediction), *disagree* (the other class of a two-class model) or an explicit label — in
``review.csv`` in the batch folder, one row per slide, rewritten atomically after every verdict.
Its ``slide,label`` columns are what MIL training reads (``data.csv`` of an s4mil recipe, with the
slides' feature files named by stem, as ``pathfm features`` writes them); the other columns
(prediction, probability, verdict, time) are ignored by training and say how the label came about.
No Qt: the MIL dock shows these rows and calls :meth:`ReviewLog.record`.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, UsageError
from ..io.atomic import atomic_path

__all__ = ["REVIEW_CSV", "ReviewItem", "ReviewLog", "review_queue"]

REVIEW_CSV = "review.csv"
FIELDS = ("slide", "label", "predicted", "probability", "verdict", "path", "reviewed")


@dataclass
class ReviewItem:
    """One slide of a MIL batch, as the review list shows it."""

    slide: Path
    folder: Path
    classes: list[str]
    predicted: str
    probability: float
    interval: tuple[float, float] | None = None
    flip_rate: float | None = None
    top_patches: list[dict] = field(default_factory=list)
    level0_tile_size: float = 1.0

    @property
    def name(self) -> str:
        """The slide's stem: its row in ``review.csv`` and its feature file ``<name>.features.zarr``."""
        return self.slide.name.split(".")[0]

    @property
    def heatmap(self) -> Path | None:
        p = self.folder / "heatmap.ome.tif"
        return p if p.is_file() else None

    def uncertainty_key(self) -> tuple:
        """Sort key, least certain first."""
        width = (self.interval[1] - self.interval[0]) if self.interval else 0.0
        return (-(self.flip_rate or 0.0), -width, self.probability, self.name)

    def describe(self) -> str:
        """``tumour 0.62 [0.41–0.80], flips 30%``."""
        text = f"{self.predicted} {self.probability:.2f}"
        if self.interval:
            text += f" [{self.interval[0]:.2f}–{self.interval[1]:.2f}]"
        if self.flip_rate is not None:
            text += f", flips {self.flip_rate:.0%}"
        return text


def _item(slide: Path, folder: Path) -> ReviewItem | None:
    path = folder / "prediction.json"
    if not path.is_file():
        return None
    try:
        pred = json.loads(path.read_text(encoding="utf-8"))
        probs = pred["probabilities"]
        predicted = str(pred["predicted"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"is not a MIL prediction ({exc}).", "Run pathfm batch --task mil again.") from exc
    boot = pred.get("uncertainty") or {}
    interval = (boot.get("interval") or {}).get(predicted)
    return ReviewItem(
        slide=slide,
        folder=folder,
        classes=[str(c) for c in pred.get("classes") or list(probs)],
        predicted=predicted,
        probability=float(probs[predicted]),
        interval=tuple(float(v) for v in interval) if interval else None,
        flip_rate=boot.get("flip_rate"),
        top_patches=list(pred.get("top_patches") or []),
        level0_tile_size=float(pred.get("level0_tile_size") or 1.0),
    )


def review_queue(batch_dir: str | Path) -> list[ReviewItem]:
    """The slides of a ``pathfm batch --task mil`` output folder that have a prediction, least certain first.

    Raises
    ------
    InputError
        The folder has no ``batch-summary.json`` of a MIL batch (the message says what to run).
    """
    batch_dir = Path(batch_dir)
    summary_path = batch_dir / "batch-summary.json"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(
            batch_dir, "has no readable batch-summary.json.", "Choose the --out folder of `pathfm batch --task mil`."
        ) from exc
    if summary.get("task") != "mil":
        raise InputError(
            batch_dir, f"is a batch of task {summary.get('task')!r}, not mil.", "Choose a MIL batch folder."
        )
    items = []
    for row in summary.get("slides") or []:
        if row.get("status") not in ("ok", "skipped", "redone") or not row.get("output"):
            continue
        folder = Path(row["output"])
        folder = folder if folder.is_absolute() else batch_dir / folder
        item = _item(Path(row["slide"]), folder)
        if item is not None:
            items.append(item)
    return sorted(items, key=ReviewItem.uncertainty_key)


class ReviewLog:
    """The verdicts of a batch review, kept in ``<batch_dir>/review.csv`` (one row per slide)."""

    def __init__(self, batch_dir: str | Path):
        self.path = Path(batch_dir) / REVIEW_CSV
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                self.rows = {r["slide"]: r for r in csv.DictReader(fh) if r.get("slide")}

    def label_of(self, item: ReviewItem) -> str | None:
        row = self.rows.get(item.name)
        return row["label"] if row else None

    def record(self, item: ReviewItem, verdict: str, label: str | None = None) -> dict:
        """Save a verdict (``agree``, ``disagree`` or ``label``) for ``item``; returns its row.

        ``disagree`` needs ``label`` unless the model has two classes (then it is the other one).
        """
        if verdict == "agree":
            label = item.predicted
        elif verdict == "disagree" and label is None:
            others = [c for c in item.classes if c != item.predicted]
            if len(others) != 1:
                raise UsageError(f"{item.name}: pick the right class among {others} to disagree with {item.predicted}.")
            label = others[0]
        if label not in item.classes:
            raise UsageError(f"{item.name}: label {label!r} is not one of the model's classes {item.classes}.")
        if verdict == "label":
            verdict = "agree" if label == item.predicted else "disagree"
        row = {
            "slide": item.name,
            "label": label,
            "predicted": item.predicted,
            "probability": f"{item.probability:.4f}",
            "verdict": verdict,
            "path": str(item.slide),
            "reviewed": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.rows[item.name] = row
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(self.rows.values())
        with atomic_path(self.path) as tmp:
            Path(tmp).write_text(buf.getvalue(), encoding="utf-8")
        return row
