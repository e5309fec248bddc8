"""Run one pipeline over many slides on dask.distributed (``pathfm batch``).

A manifest CSV lists the slides (a ``slide`` column; relative paths resolve against the
CSV's folder). Each slide becomes one dask future that runs the same pipeline function the
single-slide CLI command runs and writes into its own folder ``OUT/<stem>-<hash8>/`` (the
hash of the resolved path keeps slides with the same file name apart). The pipelines write
each output atomically; ``done.json`` is written last, with the task, checkpoint and options
used and a record of every output file (path, size, CRC-32). On the next run a slide is skipped
only when its ``done.json`` matches and every recorded output is still there with the same size
and checksum; a slide whose outputs are missing or damaged (or whose marker predates the record)
is run again and reported as ``redone``, with the reason. A slide that fails is caught on the worker and reported in
``batch-summary.json``/``batch-summary.csv`` (slide, status, error, seconds) without stopping
the batch.

By default a ``LocalCluster`` of ``n_workers`` single-threaded processes runs the slides;
give ``scheduler="tcp://host:8786"`` to use a running cluster (``dask scheduler`` +
``dask worker``, or dask-jobqueue; see ``docs/batch.md``). Workers need this package
installed and must see the slide and checkpoint paths.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Cancelled, CheckpointError, ManifestError, SlideError, UsageError
from ..families import get_family, list_families
from ..io.jsonsafe import dumps as safe_dumps
from ..io.text import read_utf8
from ..progress import is_cancelled, report
from .batch_done import DONE, check_done, record_outputs
from .batch_tasks import need_checkpoints

log = logging.getLogger(__name__)

PathLike = str | Path
SUMMARY_FIELDS = ("slide", "status", "error", "seconds", "output", "note")


def batch_task(task: str) -> Callable[[Path, Path, list[str] | None, dict], dict]:
    """The batch task of family ``task`` (its spec's ``batch``), or a UsageError listing the tasks."""
    tasks = list_families("batch")
    if task not in tasks:
        raise UsageError(f"unknown task '{task}'.", f"Use one of: {', '.join(tasks)}.")
    return get_family(task).part("batch")


def check_options(task: str, options: dict) -> None:
    """Refuse ``--set`` keys the task's pipeline function does not take, before any slide runs."""
    import inspect

    spec = get_family(task)
    entry = spec.part("pipeline")  # pipelines/<task>.py: segment_slide, classify_slide, ...
    allowed = (set(inspect.signature(entry).parameters) | spec.batch_options) - spec.batch_fills
    unknown = sorted(set(options) - allowed)
    if unknown:
        where = spec.pipeline.replace(":", ".")
        raise UsageError(
            f"--set {', '.join(unknown)}: not an option of task '{task}' ({where}).",
            f"Use one of: {', '.join(sorted(allowed))}.",
        )


@dataclass
class BatchSummary:
    """What a batch did: one row per slide plus where the summary files are."""

    out_dir: Path
    task: str
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    written: dict[str, Path] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Number of slides per status (``ok``, ``skipped``, ``failed``; ``redone`` too when any was)."""
        counts = {k: sum(r["status"] == k for r in self.rows) for k in ("ok", "redone", "skipped", "failed")}
        if not counts["redone"]:
            del counts["redone"]
        return counts

    def to_dict(self) -> dict:
        """JSON-friendly form written to ``batch-summary.json``."""
        return {
            "task": self.task,
            "out_dir": str(self.out_dir),
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "slides": self.rows,
        }


def read_manifest(manifest_csv: PathLike) -> list[Path]:
    """Slide paths of a manifest CSV (``slide`` column), resolved against the CSV's folder, duplicates dropped.

    The CSV must be UTF-8 (a byte-order mark is accepted); any other encoding is refused with a
    :class:`~napari_pathfm.errors.ManifestError` naming the line of the first undecodable byte.
    """
    path = Path(manifest_csv)
    if not path.is_file():
        raise ManifestError(path, "manifest not found.", "Give a CSV file with a 'slide' column.")
    text = read_utf8(
        path, ManifestError, "Save it as UTF-8 (e.g. 'CSV UTF-8' in Excel, or iconv -f latin1 -t utf-8) and run again."
    )
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "slide" not in [c.strip() for c in reader.fieldnames]:
        raise ManifestError(
            path,
            f"no 'slide' column (columns: {reader.fieldnames}).",
            "Add a header line with a 'slide' column of slide paths.",
        )
    key = next(c for c in reader.fieldnames if c.strip() == "slide")
    slides: list[Path] = []
    for row in reader:
        value = (row.get(key) or "").strip()
        if not value:
            continue
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else path.parent / p).resolve()
        if p not in slides:
            slides.append(p)
    if not slides:
        raise ManifestError(path, "the manifest lists no slides.", "Add one slide path per row.")
    return slides


def slide_out_dir(out_dir: PathLike, slide: Path) -> Path:
    """``OUT/<stem>-<first 8 hex of sha1(resolved path)>``: one folder per slide, no stem clashes.

    The stem drops ``.ome`` too (``stack.ome.tif`` -> ``stack-1a2b3c4d``).
    """
    digest = hashlib.sha1(str(Path(slide).resolve()).encode()).hexdigest()[:8]
    stem = Path(slide).stem
    stem = stem[:-4] if stem.lower().endswith(".ome") and len(stem) > 4 else stem
    return Path(out_dir) / f"{stem}-{digest}"


def _key(task: str, checkpoint: list[str] | None, options: dict) -> dict:
    """What makes an output complete: task, options and the checkpoints by path, size and mtime.

    A checkpoint retrained in place (same path, new file) therefore reruns the slides.
    """
    files = []
    for c in checkpoint or ():
        st = Path(c).stat() if Path(c).exists() else None
        files.append({"path": c, "size": st.st_size if st else None, "mtime_ns": st.st_mtime_ns if st else None})
    return {"task": task, "checkpoint": checkpoint, "checkpoint_files": files, "options": options}


def run_slide(slide: str, task: str, out: str, checkpoint: list[str] | None, options: dict) -> dict:
    """Run ``task`` on one slide into ``out`` and write ``done.json`` last; never raises.

    This is what each dask worker runs. Errors are caught and returned as a ``failed`` row
    (``"<ExceptionType>: <message>"``) so that one bad slide does not stop the batch.
    """
    from ..io.atomic import atomic_path

    t0 = time.perf_counter()
    folder = Path(out)
    row = {"slide": slide, "status": "ok", "error": "", "seconds": 0.0, "output": str(folder), "note": ""}
    try:
        if not Path(slide).exists():
            raise SlideError(slide, "file not found.", "Fix the path in the manifest.")
        folder.mkdir(parents=True, exist_ok=True)
        info = batch_task(task)(Path(slide), folder, checkpoint, dict(options))
        row["seconds"] = round(time.perf_counter() - t0, 3)
        done = {
            **_key(task, checkpoint, options),
            "slide": slide,
            "seconds": row["seconds"],
            "result": info,
            "outputs": record_outputs(folder),
        }
        with atomic_path(folder / DONE) as tmp:
            tmp.write_text(safe_dumps(done, where=str(folder / DONE), indent=2, default=str))
    except Exception as exc:  # noqa: BLE001 - reported per slide, the batch goes on
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}", seconds=round(time.perf_counter() - t0, 3))
    return row


def _write_summary(summary: BatchSummary) -> None:
    from ..io.atomic import atomic_path

    out = Path(summary.out_dir)
    with atomic_path(out / "batch-summary.json") as tmp:
        tmp.write_text(safe_dumps(summary.to_dict(), where=str(out / "batch-summary.json"), indent=2, default=str))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    writer.writerows({k: r.get(k, "") for k in SUMMARY_FIELDS} for r in summary.rows)
    with atomic_path(out / "batch-summary.csv") as tmp:
        tmp.write_text(buf.getvalue())
    summary.written = {"json": out / "batch-summary.json", "csv": out / "batch-summary.csv"}


def _client(scheduler: str | None, n_workers: int):
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster), cluster


def run_batch(
    manifest_csv: PathLike,
    task: str,
    out: PathLike,
    *,
    scheduler: str | None = None,
    n_workers: int = 2,
    checkpoint: None | PathLike | Sequence[PathLike] = None,
    options: dict | None = None,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> BatchSummary:
    """Run ``task`` over every slide of a manifest on dask.distributed.

    Parameters
    ----------
    manifest_csv : path
        CSV with a ``slide`` column; relative paths resolve against the CSV's folder.
    task : str
        A family with a batch task (:func:`napari_pathfm.families.list_families` ``("batch")``):
        ``segment``, ``classify``, ``features``, ``mil``, ``translate`` or a plugin family.
    out : path
        Output folder: one ``<stem>-<hash8>/`` folder per slide plus ``batch-summary.{json,csv}``.
    scheduler : str, optional
        Address of a running dask scheduler (``tcp://host:8786``); default: a LocalCluster.
    n_workers : int
        Worker processes of the LocalCluster (one thread each).
    checkpoint : path or list of paths, optional
        The task's checkpoint (``features``: backbone weights; ``translate``: one per channel).
    options : dict, optional
        Keyword arguments of the task's pipeline function (e.g. ``batch_size``, ``device``,
        ``mpp``; ``features``: ``backbone``, ``tile``, ``min_tissue``; ``mil``: ``top_k``).
    progress, cancel
        ``progress(done, total, message)`` after each slide; cancel cancels the pending
        futures (set before any slide started, none is started), writes the summary so far and
        raises :class:`~napari_pathfm.errors.Cancelled`.

    Returns
    -------
    BatchSummary
        One row per slide with status ``ok``, ``skipped`` (``done.json`` matches and its outputs verify),
        ``redone`` (finished before, but its outputs were missing or damaged: run again; ``note`` says
        why) or ``failed``.
    """
    from distributed import wait

    batch_task(task)
    options = dict(options or {})
    check_options(task, options)
    ckpts = _checkpoints(task, checkpoint)
    slides = read_manifest(manifest_csv)
    out = Path(out).expanduser().resolve()  # workers may run in another folder
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = BatchSummary(out, task)
    key = _key(task, ckpts, options)
    todo, notes = _plan(slides, out, key, summary)
    total = len(slides)
    report(progress, len(summary.rows), total, f"{len(summary.rows)} complete slides skipped")
    if todo and is_cancelled(cancel):  # asked to stop before any slide started: start none
        summary.seconds = time.perf_counter() - t0
        _write_summary(summary)
        raise Cancelled(f"batch {task} cancelled by the user ({len(todo)} slides not run)")
    if todo:
        client, cluster = _client(scheduler, n_workers)
        try:
            futures = {
                client.submit(
                    run_slide, str(s), task, str(f), ckpts, options, key=f"pathfm-{task}-{f.name}", pure=False
                ): (s, f)
                for s, f in todo
            }
            pending = set(futures)
            try:
                while pending:
                    if is_cancelled(cancel):
                        raise Cancelled(f"batch {task} cancelled by the user ({len(pending)} slides not run)")
                    done, pending = _wait_some(wait, pending)
                    for fut in done:
                        row = _noted(_row(fut, *futures[fut]), notes)
                        summary.rows.append(row)
                        report(progress, len(summary.rows), total, f"{Path(row['slide']).name}: {row['status']}")
            except (Cancelled, KeyboardInterrupt):
                client.cancel(list(pending))
                summary.seconds = time.perf_counter() - t0
                _write_summary(summary)
                raise
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    order = {str(s): i for i, s in enumerate(slides)}
    summary.rows.sort(key=lambda r: order.get(r["slide"], len(order)))
    summary.seconds = time.perf_counter() - t0
    _write_summary(summary)
    return summary


def _plan(slides: list[Path], out: Path, key: dict, summary: BatchSummary) -> tuple[list, dict[str, str]]:
    """Split slides into verified complete ones (``skipped`` rows added) and those to run.

    Returns the ``(slide, folder)`` pairs to run and, for slides whose finished outputs failed their
    check, the reason by folder; their stale ``done.json`` is removed first, so the folder never claims
    to be complete while it is redone.
    """
    todo: list[tuple[Path, Path]] = []
    notes: dict[str, str] = {}
    for slide in slides:
        folder = slide_out_dir(out, slide)
        complete, reason = check_done(folder, key)
        if complete:
            summary.rows.append(
                {
                    "slide": str(slide),
                    "status": "skipped",
                    "error": "",
                    "seconds": 0.0,
                    "output": str(folder),
                    "note": "",
                }
            )
            continue
        if reason:
            log.warning("%s: %s; running it again", slide, reason)
            notes[str(folder)] = reason
            (folder / DONE).unlink(missing_ok=True)
        todo.append((slide, folder))
    return todo, notes


def _noted(row: dict, notes: dict[str, str]) -> dict:
    """A worker's row, marked ``redone`` with the reason when the slide was rerun over damaged outputs."""
    reason = notes.get(row.get("output", ""), "")
    row.setdefault("note", "")
    if reason:
        row["note"] = f"redone: {reason}"
        if row["status"] == "ok":
            row["status"] = "redone"
    return row


def _checkpoints(task: str, checkpoint: None | PathLike | Sequence[PathLike]) -> list[str] | None:
    """The task's checkpoints as resolved paths, checked before any slide runs.

    A family with a default checkpoint (``FamilySpec.default_checkpoint``; ``segment``:
    :func:`~napari_pathfm.pipelines.segment.default_segment_checkpoint`, as ``pathfm segment`` does)
    gets it when none is given, resolved here so that ``done.json`` names the model that ran and
    a changed default model reruns the slides. Tasks that need a checkpoint and files that do not
    exist are refused at once instead of failing every slide.
    """
    spec = get_family(task)
    if checkpoint is not None and not isinstance(checkpoint, (list, tuple)):
        checkpoint = [checkpoint]
    if not checkpoint and spec.default_checkpoint:
        checkpoint = [spec.part("default_checkpoint")()]
    if not checkpoint:
        if spec.needs_checkpoint:
            need_checkpoints(None, task)
        return None
    ckpts = [Path(c).expanduser().resolve() for c in checkpoint]
    for c in ckpts:
        if not c.is_file():
            raise CheckpointError(c, "checkpoint not found.", "Fix the --checkpoint path (workers must see it too).")
    return [str(c) for c in ckpts]


def _row(fut: Any, slide: Path, folder: Path) -> dict:
    """The summary row of a finished future; a future that errored means its worker died (KilledWorker)."""
    if fut.status == "finished":
        return fut.result()
    exc = fut.exception()
    return {
        "slide": str(slide),
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "seconds": 0.0,
        "output": str(folder),
        "note": "",
    }


def _wait_some(wait: Callable[..., Any], pending: set) -> tuple[set, set]:
    """Wait up to 0.5 s for at least one future; returns ``(done, still pending)``."""
    try:
        result = wait(list(pending), timeout=0.5, return_when="FIRST_COMPLETED")
    except TimeoutError:
        return set(), pending
    done = set(result.done)
    return done, pending - done


def parse_options(pairs: Sequence[str]) -> dict:
    """``["batch_size=4", "device=cpu"]`` -> ``{"batch_size": 4, "device": "cpu"}`` (values parsed as YAML)."""
    import yaml

    options: dict = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k.strip():
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE.", "Write it as --set batch_size=4.")
        try:
            options[k.strip()] = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).strip()
            raise UsageError(
                f"--set {pair!r}: the value is not valid YAML ({problem}).", "Quote it, e.g. --set 'key=\"a: b\"'."
            ) from None
    return options
