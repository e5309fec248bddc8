"""Z-stack translation inference (HASTE): brightfield planes → fluorescence channels + nuclei.

:func:`translate_stack` runs one or more ``translate`` checkpoints (``dense_unet``,
``lupi_unet``, ``unet`` ... built from their model cards) over a z-stack of any size:

1. The planes the checkpoint takes are min–max normalised with the card's
   ``normalization.input_min/input_max`` (the training statistics), per plane.
2. The field is cut into ``tile`` x ``tile`` tiles (512) every ``stride`` (256) pixels; the
   last row/column of tiles is aligned with the far edge, and a field smaller than a tile
   runs as one tile of the next multiple of 16, mirror-padded. Planes are read in
   horizontal bands one tile tall, so a lazy (zarr/dask) stack is never loaded whole.
3. Batches of tiles go through the model; outputs of overlapping tiles are blended with
   pyramidal weights (:class:`~napari_pathfm.tiles.blend.TileBlender`): no seams.
4. Channels are de-normalised with ``target_min/target_max`` into ``target_dtype``
   (uint16 as the real stains), via :func:`~napari_pathfm.io.normalize.denormalize`.
5. A LUPI checkpoint (its output has ``mask_logits``) also gives the nuclei confidence map
   (sigmoid of the segmentation decoder, blended the same way) and a nuclei mask: the
   pixels above ``threshold`` split into instances (:func:`~.nuclei.label_nuclei`). A
   plain nuclei checkpoint gets its mask from the predicted channel (Otsu + watershed).

Canvases above :data:`IN_MEMORY_PIXELS` (or with ``store=``) keep their accumulators and
results in a zarr directory, so memory stays at a band of input plus one batch. Progress
and cancel follow the package protocol; a cancel removes every file the run created.
:func:`write_translation` writes one OME-TIFF per channel, the nuclei mask and the
confidence map, all or nothing. What a checkpoint takes from the stack (planes, normalisation,
input checks) lives in :mod:`.translate_inputs`, the tiling, model call and blending canvases in
:mod:`.translate_tiles`. Importing this module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..io.scratch import scratch_dir
from ..progress import check_cancel, report
from .translate_channels import channel_role
from .translate_inputs import StackPlanes, check_input, limits, plane_indices, sample_planes, stack_array
from .translate_tiles import (
    BlendRun,
    CanvasStore,
    Forward,
    TileOptions,
    blockwise,
    pad_to,
    tile_bands,
    tile_positions,
    used_planes,
)

__all__ = [
    "IN_MEMORY_PIXELS",
    "TranslationResult",
    "load_translation_model",
    "translate_stack",
    "write_translation",
]

#: Canvases with more pixels than this blend in a zarr directory instead of memory.
IN_MEMORY_PIXELS = 2048 * 2048

PathLike = str | Path


# --------------------------------------------------------------------------- result


@dataclass
class TranslationResult:
    """Translated channels of one z-stack.

    Attributes
    ----------
    channels : dict of str to array (Y, X)
        De-normalised predictions in the card's ``target_dtype``, by channel name, in the
        order of the checkpoints and their channels (numpy, or zarr for large canvases).
    roles : dict of str to str
        Role per channel (``nuclei``, ``lipids``, ``cytoplasm`` or the name).
    confidence : array (Y, X) float32 in [0, 1] or None
        Nuclei confidence of a LUPI checkpoint.
    nuclei_labels : ndarray (Y, X) int32 or None
        Nuclei instances: confidence > ``threshold`` (LUPI) or Otsu of the nuclei channel.
    threshold : float
        Confidence threshold used for ``nuclei_labels``.
    notes : list of str
        What the models are and how the stack differs from what they were trained on (plane count,
        dtype, pixel size; :func:`~napari_pathfm.pipelines.notes.translate_notes`). Also at the start of
        ``messages``, in summary.json and in the written OME-TIFFs' metadata.
    """

    channels: dict[str, Any]
    roles: dict[str, str]
    confidence: Any = None
    nuclei_labels: np.ndarray | None = None
    threshold: float = 0.5
    source: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    cards: list[dict] = field(default_factory=list)
    pixel_size: float | None = None
    n_tiles: int = 0
    messages: list[str] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _tmp: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        first = next(iter(self.channels.values()))
        return int(first.shape[0]), int(first.shape[1])

    def nuclei_mask(self, threshold: float | None = None, *, min_distance: int = 5, min_size: int = 16) -> np.ndarray:
        """Nuclei instances of the confidence map at ``threshold`` (no re-inference).

        Only pixels whose confidence exceeds the threshold are kept, so raising it keeps
        only the nuclei the model is sure of. Needs a LUPI checkpoint.
        """
        from .nuclei import label_nuclei

        if self.confidence is None:
            raise ValueError("this result has no nuclei confidence map (no LUPI checkpoint was run)")
        t = self.threshold if threshold is None else float(threshold)
        return label_nuclei(np.asarray(self.confidence) > t, min_distance=min_distance, min_size=min_size)

    def summary(self) -> dict:
        return {
            "input": self.source,
            "checkpoints": self.checkpoints,
            "shape": list(self.shape),
            "channels": {k: {"role": self.roles[k], "dtype": str(v.dtype)} for k, v in self.channels.items()},
            "confidence": self.confidence is not None,
            "threshold": self.threshold,
            "nuclei": int(self.nuclei_labels.max()) if self.nuclei_labels is not None else None,
            "tiles": self.n_tiles,
            "pixel_size_um": self.pixel_size,
            "notes": self.notes,
            "messages": self.messages,
            "written": {k: str(v) for k, v in self.written.items()},
        }


# --------------------------------------------------------------------------- model + card


def load_translation_model(checkpoint: Any, device: str = "cpu") -> tuple[Any, dict, str]:
    """``(model in eval mode, card, label)`` from a checkpoint path or a ``(module, card)`` pair."""
    from ..models.checkpoint import load_family_checkpoint

    if isinstance(checkpoint, (tuple, list)) and len(checkpoint) == 2 and not isinstance(checkpoint[0], (str, Path)):
        model, card = checkpoint
        return model.to(device).eval(), dict(card), str(card.get("name", type(model).__name__))
    model, card = load_family_checkpoint(checkpoint, "translate", device=device)
    return model, card, str(checkpoint)


def translate_stack(
    stack: Any,
    checkpoint: Any,
    *,
    tile: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    device: str = "auto",
    threshold: float = 0.5,
    nuclei_mask: bool = True,
    flips: bool | None = None,
    store: PathLike | None = None,
    progress: Callable[..., Any] | None = None,
    cancel: Any = None,
) -> TranslationResult:
    """Predict fluorescence channels (and nuclei) from a brightfield z-stack, tile by tile.

    Parameters
    ----------
    stack : ZStack, path, or array (Z, Y, X)
        The planes (numpy, dask or zarr; lazy arrays are read one band of tiles at a time).
    checkpoint : path, (module, card), or a list of them
        ``translate`` checkpoints; each gives the channels its card names (``channels``).
        Several checkpoints (nuclei, lipids, cytoplasm models) run one after the other.
    tile, stride : int
        Tile side (a multiple of 16; the model has 4 pooling levels) and step (default half
        a tile). HASTE: 512/256.
    batch_size : int
        Tiles per forward pass.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``mps`` (mixed precision on CUDA).
    threshold : float
        Confidence above which a pixel belongs to a nucleus (LUPI checkpoints).
    nuclei_mask : bool
        Label nuclei instances (confidence map or predicted nuclei channel).
    flips : bool, optional
        Average each tile over its four flips (4x the compute); default: as each card says (``flips``).
    store : path, optional
        Zarr directory for the blending canvases and the results (created, atomically:
        a cancel leaves nothing). Default: memory, or a temporary directory for canvases
        above :data:`IN_MEMORY_PIXELS`.
    progress, cancel
        ``progress(done, total, message)`` per batch; ``cancel`` checked per batch, raises
        :class:`~napari_pathfm.errors.Cancelled`.

    Returns
    -------
    TranslationResult
        ``notes`` say when a model is a bundled demonstration or the stack differs from its card
        (plane count, dtype, pixel size).

    Raises
    ------
    ZStackError
        Plane count different from the checkpoint's ``input_planes``, an 8-bit stack for a
        checkpoint trained on 16-bit ranges, constant or NaN planes.
    CheckpointError
        A checkpoint that is not a translation model or whose card is inconsistent.

    Examples
    --------
    >>> res = translate_stack("isl-blue-sample", "haste-isl-dapi.safetensors")   # doctest: +SKIP
    >>> res.channels["DAPI"].dtype, res.nuclei_labels.max()                      # doctest: +SKIP
    (dtype('uint16'), 85)
    """
    from ..device import resolve_device

    o = TileOptions(tile, stride, batch_size, flips)
    planes = stack_array(stack)
    checkpoints = list(checkpoint) if isinstance(checkpoint, list) else [checkpoint]
    dev = resolve_device(device)
    H, W = int(planes.data.shape[1]), int(planes.data.shape[2])
    large = store is not None or H * W > IN_MEMORY_PIXELS
    with CanvasStore(store, large) as root:
        result = _translate(planes, checkpoints, dev, root, o, progress=progress, cancel=cancel)
        result.pixel_size, result.threshold = planes.pixel_size, float(threshold)
        _add_notes(result, planes.data)
        if nuclei_mask:
            _label(result, cancel)
        if root is not None and store is None:
            result._tmp = root.keep()
    if store is not None:  # the arrays were written under the temporary name: open them where they are now
        _reopen(result, Path(store))
    return result


def _add_notes(result: TranslationResult, data: Any) -> None:
    """Fill ``result.notes`` from each checkpoint's card and put them first in ``result.messages``."""
    from .notes import join_demonstration_notes, merge_notes, translate_notes

    notes: list[str] = []
    for label, card in zip(result.checkpoints, result.cards):
        for note in translate_notes(
            card, label, planes=int(data.shape[0]), dtype=data.dtype, pixel_size=result.pixel_size
        ):
            if note not in notes:
                notes.append(note)
    result.notes = join_demonstration_notes(notes)
    result.messages = merge_notes(result.notes, result.messages)


def _reopen(result: TranslationResult, root: Path) -> None:
    import zarr

    def again(arr: Any) -> Any:
        return zarr.open_array(store=str(root), path=arr.path, mode="r") if arr is not None else None

    result.channels = {k: again(v) for k, v in result.channels.items()}
    result.confidence = again(result.confidence)


def _translate(
    stack: StackPlanes,
    checkpoints: list,
    dev: str,
    root: CanvasStore | None,
    o: TileOptions,
    *,
    progress: Any,
    cancel: Any,
) -> TranslationResult:
    """Run every checkpoint over the tiles of ``stack``; the channels (and confidence) of all of them."""
    from ..io.normalize import denormalize, normalize_minmax

    data, name, plane_names, plane_files, _ = stack
    tile, stride, batch_size = o.tile, o.stride, o.batch_size
    H, W = int(data.shape[1]), int(data.shape[2])
    ys, th = tile_positions(H, tile, stride)
    xs, tw = tile_positions(W, tile, stride)
    per_model = len(ys) * len(xs)
    total = per_model * len(checkpoints)
    result = TranslationResult(channels={}, roles={}, source=name, n_tiles=total)
    done = 0
    for k, ckpt in enumerate(checkpoints):
        check_cancel(cancel, "translation")
        model, card, label = load_translation_model(ckpt, dev)
        result.checkpoints.append(label)
        result.cards.append(card)
        planes = plane_indices(card, int(data.shape[0]), name, label)
        lims = limits(card, "input_min", "input_max", len(planes), label)
        used = used_planes(data, planes)  # numpy (Z', Y, X) when cheap, else the lazy stack
        in_memory = isinstance(used, np.ndarray)
        sample = sample_planes(used, list(range(len(planes)))) if in_memory else sample_planes(data, planes)
        check_input(
            sample,
            data.dtype,
            card,
            lims,
            [plane_names[p] for p in planes],
            [plane_files[p] for p in planes],
            label,
            result.messages,
        )
        if lims is None:
            lims = (sample.min(axis=(1, 2)).astype(np.float64), sample.max(axis=(1, 2)).astype(np.float64))
            result.messages.append(
                f"checkpoint {label} has no input normalisation; each plane was scaled by its own min/max"
            )
        group = root.group(f"canvas{k}") if root is not None else None
        run = BlendRun(Forward(model, dev, o.flips_for(card)), (H, W), (th, tw), group)
        report(progress, done, total, f"{label}: reading planes")
        for y, band in tile_bands(used, planes, ys, th, cancel):
            for x in xs:  # normalised per tile: a float32 band would be 2x the band's size, several times over
                run.batch.append(pad_to(normalize_minmax(band[:, :, x : x + tw], lims[0], lims[1]), th, tw))
                run.where.append((y, x))
                if len(run.batch) == batch_size:
                    done += run.flush()
                    report(progress, done, total, f"{label}: tile {done - k * per_model}/{per_model}")
                    check_cancel(cancel, "translation")
        if run.batch:
            done += run.flush()
            report(progress, done, total, f"{label}: tile {done - k * per_model}/{per_model}")
        forward, blender = run.forward, run.blender
        canvas = blender.result()
        n_img = canvas.shape[2] - (1 if forward.has_mask else 0)
        names = [str(c) for c in (card.get("channels") or [])] or [f"{Path(label).stem}-{i}" for i in range(n_img)]
        if len(names) != n_img:
            raise CheckpointError(
                label,
                f"the card names {len(names)} channels {names} but the model outputs {n_img}.",
                "Fix 'channels' in the model card.",
            )
        roles = list(card.get("channel_roles") or [None] * n_img)
        tlims = limits(card, "target_min", "target_max", n_img, label)
        tdtype = np.dtype((card.get("normalization") or {}).get("target_dtype") or ("uint16" if tlims else "float32"))
        for c, cname in enumerate(names):
            key = cname if cname not in result.channels else f"{cname} ({Path(label).stem})"
            lo, hi = (tlims[0][c], tlims[1][c]) if tlims is not None else (0.0, 1.0)
            result.channels[key] = blockwise(
                canvas,
                c,
                partial(denormalize, mins=lo, maxs=hi, dtype=tdtype),
                tdtype,
                root,
                f"canvas{k}",
                f"channel{c}",
            )
            result.roles[key] = channel_role(cname, roles[c] if c < len(roles) else None)
        if forward.has_mask and result.confidence is None:
            result.confidence = blockwise(
                canvas, n_img, lambda v: v.clip(0, 1), np.float32, root, f"canvas{k}", "confidence"
            )
        del model, run, forward
    return result


def _label(result: TranslationResult, cancel: Any) -> None:
    """Nuclei instances: confidence > threshold (LUPI), else Otsu + watershed of the nuclei channel."""
    from .nuclei import segment_nuclei

    check_cancel(cancel, "nuclei")
    if result.confidence is not None:
        result.nuclei_labels = result.nuclei_mask()
        return
    nuclei = [k for k, r in result.roles.items() if r == "nuclei"]
    if nuclei:
        result.nuclei_labels, _ = segment_nuclei(np.asarray(result.channels[nuclei[0]]))


# --------------------------------------------------------------------------- writing


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_translation(
    result: TranslationResult, out_dir: PathLike, *, progress: Callable[..., Any] | None = None, cancel: Any = None
) -> dict[str, Path]:
    """Write the result into ``out_dir``, all files or none.

    Files: ``<channel>.ome.tif`` per channel (its dtype, e.g. uint16), ``nuclei-mask.ome.tif``
    (int32 labels), ``nuclei-confidence.ome.tif`` (float32, LUPI only) and ``summary.json``
    (checkpoints, channels and roles, nucleus count, notes, messages). Files go to a hidden
    temporary folder in ``out_dir`` and are moved into place only when all are complete
    (``summary.json`` last): a cancel or an error adds nothing to ``out_dir``.
    """
    from ..io.ome_tiff import write_ome_tiff

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "translate", "input": result.source, "checkpoints": result.checkpoints, "notes": result.notes}
    jobs: list[tuple[str, str, Any, dict]] = []
    for cname, arr in result.channels.items():
        jobs.append(
            (
                f"channel:{cname}",
                f"{_safe(cname)}.ome.tif",
                arr,
                {"channel_names": [cname], "metadata": {**meta, "channel": cname, "role": result.roles[cname]}},
            )
        )
    if result.nuclei_labels is not None:
        jobs.append(
            (
                "nuclei_mask",
                "nuclei-mask.ome.tif",
                result.nuclei_labels,
                {"is_labels": True, "metadata": {**meta, "threshold": result.threshold}},
            )
        )
    if result.confidence is not None:
        jobs.append(
            (
                "nuclei_confidence",
                "nuclei-confidence.ome.tif",
                result.confidence,
                {"channel_names": ["nuclei confidence"], "metadata": meta},
            )
        )
    steps = len(jobs) + 1
    with scratch_dir("translate", dir=out) as tmp_dir:
        tmp = Path(tmp_dir)
        for i, (_key, fname, arr, kw) in enumerate(jobs):
            report(progress, i, steps, f"writing {fname}")
            check_cancel(cancel, "writing")
            write_ome_tiff(tmp / fname, arr, mpp=result.pixel_size, cancel=cancel, **kw)
        check_cancel(cancel, "writing")
        written = {key: out / fname for key, fname, _a, _k in jobs}
        result.written = {**written, "summary": out / "summary.json"}
        from ..io.jsonsafe import dumps as strict_dumps  # undefined metrics -> null, with a warning

        text = strict_dumps(result.summary(), where=str(out / "summary.json"), indent=2, default=str)
        (tmp / "summary.json").write_text(text, encoding="utf-8")
        for _key, fname, _a, _k in jobs:
            os.replace(tmp / fname, out / fname)
        os.replace(tmp / "summary.json", out / "summary.json")  # last: its presence means the set is complete
    report(progress, steps, steps, "written")
    return dict(result.written)
