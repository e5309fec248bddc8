"""Whole-slide prompting: clicks and boxes on a slide → the object under them, one label per prompt.

A click (positive or negative) or a box in level-0 pixels picks the tile of the segmentation grid
whose centre is nearest to it — the grid ``pathfm segment`` runs, so the tile's encoder outputs
are the ones the embedding cache already holds after a segment run, and are encoded (and stored)
only when they are not. Path-SAM2's prompt path
(:meth:`~napari_pathfm.models.pathsam2.PathSAM2.decode_prompt`) turns them and the prompt into the
object's logits on that tile, resized to level 0. For a box, where the object reaches pixels that a
neighbouring tile of the box sees better (nearer its centre), that tile is prompted too, with the box
clipped to it and a click inside the object found so far (:mod:`.prompt_tiles`), and the tiles'
logits are joined, each pixel from its nearest tile, as ``pathfm segment`` stitches; clicks alone
are answered on their one tile. The result is cut to the connected part under the positive clicks
(or the largest part in the box), its holes filled when the model's card fills them, and returned
with its level-0 offset. An object larger than the tiles its prompt was answered on is cut at their
edge (:attr:`PromptedObject.at_edge` says so).

:class:`PromptSession` keeps the model, the grid and the last tiles' encoder outputs, so the second
click on a tile costs only the decoder; :func:`prompt_slide` is the CLI's path (all prompts of a
slide, then one labels image, earlier prompts first where objects overlap, drawn by
:mod:`.prompt_labels`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ResourceError
from ..progress import check_cancel, report

log = logging.getLogger(__name__)

__all__ = ["Prompt", "PromptSession", "PromptedObject", "edge_note", "prompt_slide"]


@dataclass(frozen=True)
class Prompt:
    """One prompt in level-0 pixels: clicks ``(x, y)`` with labels (1 positive, 0 negative) and/or a box.

    >>> Prompt(points=((10, 20),)).center()
    (10.0, 20.0)
    """

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] | None = None  # None: every click positive
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1

    def __post_init__(self) -> None:
        points = tuple((float(x), float(y)) for x, y in self.points)
        labels = tuple(int(v) for v in self.labels) if self.labels is not None else (1,) * len(points)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "labels", labels)
        if len(labels) != len(points):
            raise ValueError(f"{len(points)} clicks but {len(labels)} labels")
        if any(v not in (0, 1) for v in labels):
            raise ValueError("click labels are 1 (positive) or 0 (negative)")
        if self.box is not None:
            x0, y0, x1, y1 = (float(v) for v in self.box)
            if not (x1 > x0 and y1 > y0):
                raise ValueError(f"a box is x0,y0,x1,y1 with x1 > x0 and y1 > y0, got {self.box}")
            object.__setattr__(self, "box", (x0, y0, x1, y1))
        if self.box is None and 1 not in labels:
            raise ValueError("a prompt needs a positive click or a box")

    def center(self) -> tuple[float, float]:
        """``(x, y)`` the tile is chosen around: the box's centre, else the positive clicks' mean."""
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            return (x0 + x1) / 2, (y0 + y1) / 2
        pos = np.array([p for p, v in zip(self.points, self.labels, strict=True) if v == 1])
        return float(pos[:, 0].mean()), float(pos[:, 1].mean())


@dataclass
class PromptedObject:
    """A prompted object: ``mask`` (bool) placed at level-0 ``(y0, x0)``; ``tile`` is its grid tile."""

    y0: int
    x0: int
    mask: np.ndarray
    tile: int
    from_cache: bool = False  # every tile it was answered on came from the embedding cache
    at_edge: bool = False  # touches the edge of the tiles it was answered on, inside the slide: may be cut
    tiles: tuple[int, ...] = ()  # the tiles it was answered on, ``tile`` first
    notes: list[str] = field(default_factory=list)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


class PromptSession:
    """The model, tile grid and recent tile embeddings of one slide, for prompt after prompt.

    Parameters
    ----------
    slide
        An open slide (:func:`napari_pathfm.io.open_slide`).
    model_or_checkpoint
        A segmentation checkpoint with a prompt path (``model.prompts``), a ``(model, card)`` pair,
        or None for the bundled model.
    device : str
    mpp : float, optional
        µm/px the model runs at (default: the card's), as for ``pathfm segment``.
    overlap : float
        Tile overlap of the segment run whose cached embeddings to use (its default, 0.25).
    cache
        The embedding cache (``None`` default, ``False`` none, a folder or an ``EmbeddingCache``).
    keep : int
        Tiles whose encoder outputs stay in memory.
    max_tiles : int
        Most tiles one prompt's object is answered on (:meth:`segment`).
    """

    def __init__(
        self,
        slide: Any,
        model_or_checkpoint: Any = None,
        *,
        device: str = "auto",
        mpp: float | None = None,
        overlap: float = 0.25,
        cache: Any = None,
        keep: int = 16,
        max_tiles: int = 9,
    ):
        from ..device import resolve_device
        from ..errors import CheckpointError
        from ..tiles import tile_grid
        from .segment_model import encoder_preprocess, load_segmentation_model, tile_geometry
        from .tile_run import run_mpp

        self.slide, self.dev = slide, resolve_device(device)
        self.model, self.card, self.source = load_segmentation_model(model_or_checkpoint, device=self.dev)
        if getattr(self.model, "prompt_encoder", None) is None:
            raise CheckpointError(
                self.source or "the model",
                "has no click/box prompt path, so it cannot segment the object under a prompt.",
                "Use the bundled model, or add prompting to yours: "
                "pathfm train pathsam2/glas_cpu_prompts --set data.init_checkpoint=YOUR_MODEL.",
            )
        self.model.to(self.dev).eval()
        t, ov = tile_geometry(self.model, self.card, None, overlap)
        self.grid = tile_grid(slide, t, mpp=run_mpp(slide, mpp, self.card, "prompted", "prompt"), overlap=ov)
        self.preprocess = encoder_preprocess(self.model)
        self.cache, self.keep, self.max_tiles = cache, int(keep), max(1, int(max_tiles))
        self._memory: OrderedDict[int, dict] = OrderedDict()
        self._encoder: Any = None
        self.fill_holes = bool((self.card.get("objects") or {}).get("fill_holes", False))

    # -- tiles ----------------------------------------------------------------------------------
    def tile_for(self, prompt: Prompt) -> int:
        """Index of the grid tile whose centre is nearest (Chebyshev, level 0) to the prompt's centre."""
        cx, cy = prompt.center()
        half = self.grid.level0_size / 2
        centres = self.grid.tiles[:, ::-1] + half  # (x, y)
        d = np.abs(centres - np.array([cx, cy])).max(1)
        return int(np.argmin(d))

    def _encoder_for_grid(self) -> Any:
        if self._encoder is None:
            from .tile_run import tile_encoder

            self._encoder = tile_encoder(
                self.model, self.slide, self.grid, self.dev, cache=self.cache, preprocess=self.preprocess
            )
        return self._encoder

    def _pixels(self, i: int) -> Any:
        """Tile ``i`` read from the slide and preprocessed for the encoder, ``(1, 3, S, S)``."""
        import torch

        from ..tiles.loader import read_tile

        tile = np.array(read_tile(self.slide, self.grid, i)[None])  # writable copy for torch
        return self.model.preprocess(torch.from_numpy(tile).to(self.dev))

    def embedding(self, i: int) -> tuple[dict, bool]:
        """Encoder outputs of tile ``i`` (batch of one) and whether they came from a cache."""
        import torch

        if i in self._memory:
            self._memory.move_to_end(i)
            return self._memory[i], True
        enc = self._encoder_for_grid()
        idx = np.array([i])
        stored = enc.rows is not None and enc.rows[i] >= 0
        x = None
        with torch.inference_mode():
            if not stored or not enc.active:
                x = self._pixels(i)
            try:
                out = enc(idx, x, self.dev) if enc.active else self.model.encode(x)
            except ResourceError:  # the stored row failed its checks (and was dropped): from pixels instead
                if x is not None:
                    raise
                x, stored = self._pixels(i), False
                out = enc(idx, x, self.dev)
        self._memory[i] = out
        while len(self._memory) > self.keep:
            self._memory.popitem(last=False)
        return out, bool(stored)

    # -- prompts --------------------------------------------------------------------------------
    def segment(self, prompt: Prompt, *, max_tiles: int | None = None, grow_clicks: bool = False) -> PromptedObject:
        """The object under ``prompt`` (an empty mask when the model finds none).

        Answered first on the tile nearest to the prompt. A prompt with a box goes on across tiles:
        where the object reaches pixels that another tile inside the box decides (the tile whose centre
        is nearest to them, as ``pathfm segment`` stitches), that tile is prompted too
        (:func:`~napari_pathfm.pipelines.prompt_tiles.carried_prompt`) and decides them, until every
        pixel of the object is decided by its own tile or ``max_tiles`` tiles (the session's by
        default) were asked. Clicks alone are answered on the nearest tile: grown the same way
        (``grow_clicks=True``, for measuring), their objects merged with neighbouring glands more
        often than they gained (docs/prompting.md).
        """
        from .prompt_tiles import carried_prompt, reaches_uncovered, stitch_logits, tiles_needed, tiles_within

        limit = self.max_tiles if max_tiles is None else max(1, int(max_tiles))
        if prompt.box is not None:
            reach = tiles_within(self.grid, prompt.box)
        else:
            reach = set(range(len(self.grid.tiles))) if grow_clicks else set()
        first = self.tile_for(prompt)
        logits: dict[int, np.ndarray] = {}
        asked, todo, cached = {first}, [(first, prompt)], True
        while todo:
            for i, p in todo:
                logits[i], was_cached = self._logits(i, p)
                cached = cached and was_cached
            stitched, covered, y0, x0 = stitch_logits(self.grid, logits)
            mask = self._object(prompt, (stitched > 0) & covered, y0, x0)
            todo = []
            for j in sorted((tiles_needed(self.grid, mask, y0, x0) & reach) - asked):
                if len(asked) >= limit:
                    break
                asked.add(j)  # asked once: a tile with too little of the object gets no prompt
                carried = carried_prompt(prompt, self.grid, j, mask, y0, x0)
                if carried is not None:
                    todo.append((j, carried))
        at_edge = reaches_uncovered(mask, covered, y0, x0, self.grid.level0_shape)
        ys, xs = np.nonzero(mask)
        if not len(ys):
            return PromptedObject(y0, x0, np.zeros((0, 0), bool), first, cached, False, tiles=tuple(logits))
        crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        return PromptedObject(y0 + int(ys.min()), x0 + int(xs.min()), crop, first, cached, at_edge, tiles=tuple(logits))

    def _logits(self, i: int, prompt: Prompt) -> tuple[np.ndarray, bool]:
        """Tile ``i``'s logits for ``prompt``, resized to level 0 and clipped to the slide; from its cache?"""
        import torch
        from PIL import Image

        encoded, cached = self.embedding(i)
        g = self.grid
        ty, tx = (float(v) for v in g.tiles[i])
        s = self.model.input_size / (g.tile_size * g.scale)  # model input px per level-0 px
        boxes = None
        if prompt.points:
            pts = (np.array(prompt.points, np.float32) - [tx, ty]) * s
            points = torch.as_tensor(pts[None], device=self.dev)
            labels = torch.as_tensor(np.array(prompt.labels, np.int64)[None], device=self.dev)
        else:  # a box alone: two padding clicks, as the prompt path trained on it
            points = torch.zeros((1, 2, 2), device=self.dev)
            labels = torch.full((1, 2), -1, dtype=torch.int64, device=self.dev)
        if prompt.box is not None:
            b = (np.array(prompt.box, np.float32) - [tx, ty, tx, ty]) * s
            boxes = torch.as_tensor(b[None], device=self.dev)
        with torch.inference_mode():
            logits = self.model.decode_prompt(None, encoded, points, labels, boxes)[0, 0].float().cpu().numpy()
        h0, w0 = g.level0_shape
        side = int(round(g.level0_size))
        big = np.asarray(Image.fromarray(logits.astype(np.float32)).resize((side, side), Image.Resampling.BILINEAR))
        return big[: min(h0, int(ty) + side) - int(ty), : min(w0, int(tx) + side) - int(tx)], cached

    def _object(self, prompt: Prompt, fg: np.ndarray, y0: int, x0: int) -> np.ndarray:
        """The prompted object in a level-0 foreground ``fg`` placed at ``(y0, x0)``: holes filled when the
        card fills them, then the connected part under the positive clicks (or the nearest part within
        1/16 of a tile), else the largest part inside the box."""
        from scipy import ndimage

        if self.fill_holes:  # first: a click in a gland's lumen is a click on that gland
            fg = ndimage.binary_fill_holes(fg)
        parts, n = ndimage.label(fg)
        keep = np.zeros(n + 1, bool)
        clicks = [(int(y) - y0, int(x) - x0) for (x, y), v in zip(prompt.points, prompt.labels, strict=True) if v]
        clicks = [(y, x) for y, x in clicks if 0 <= y < fg.shape[0] and 0 <= x < fg.shape[1]]
        if clicks and n:
            dist, (iy, ix) = ndimage.distance_transform_edt(parts == 0, return_indices=True)
            for y, x in clicks:
                if dist[y, x] <= self.grid.level0_size / 16:
                    keep[parts[iy[y, x], ix[y, x]]] = True
        keep[0] = False
        if not keep.any() and n and prompt.box is not None:
            bx0, by0, bx1, by1 = (int(round(v)) for v in prompt.box)
            region = parts[max(0, by0 - y0) : max(0, by1 - y0), max(0, bx0 - x0) : max(0, bx1 - x0)]
            sizes = np.bincount(region.ravel(), minlength=n + 1)
            sizes[0] = 0
            if sizes.any():
                keep[int(np.argmax(sizes))] = True
        return keep[parts]

    def release(self) -> None:
        """Let go of the cache entry (others may store to it again); the model and memory stay."""
        if self._encoder is not None:
            self._encoder.close()
            self._encoder = None

    def close(self) -> None:
        self.release()
        self._memory.clear()

    def __enter__(self) -> PromptSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def edge_note(tiles: int) -> str:
    """The words for an object that reaches the edge of the ``tiles`` tiles it was answered on (CLI and dock)."""
    if tiles == 1:
        return (
            "reaches the edge of the tile it was answered on and may be cut there "
            "(a click is answered on one tile: draw a box around a large object)."
        )
    return f"reaches the edge of the {tiles} tiles it was answered on and may be cut there."


def prompt_slide(
    slide_or_path: Any,
    prompts: list[Prompt],
    model_or_checkpoint: Any = None,
    *,
    image_mpp: float | None = None,
    mpp: float | None = None,
    device: str = "auto",
    cache: Any = None,
    out: Any = None,
    progress: Any = None,
    cancel: Any = None,
) -> dict:
    """Every prompt's object on one slide; with ``out``, a level-0 labels OME-TIFF (object ``k`` = prompt ``k``).

    Returns a summary: ``objects`` (per prompt: id, level-0 bbox, area in px, first tile, from cache,
    at the edge of its tiles, the tiles used), ``shape``, ``mpp``, ``tile_side`` (level-0 px) and
    ``out``. A prompt outside the image is a ``ValueError``, raised before the model loads.
    """
    from .tile_run import opened_slide

    with opened_slide(slide_or_path, image_mpp) as slide:
        h0, w0 = (int(v) for v in slide.level_shapes[0])
        for n, p in enumerate(prompts):
            for x, y in p.points + ((p.box[:2], p.box[2:]) if p.box else ()):
                if not (0 <= x <= w0 and 0 <= y <= h0):
                    raise ValueError(f"prompt {n + 1} at ({x:g}, {y:g}) is outside the image ({w0} x {h0} px)")
        with PromptSession(slide, model_or_checkpoint, device=device, mpp=mpp, cache=cache) as session:
            objects = []
            for n, p in enumerate(prompts):
                check_cancel(cancel, "prompting")
                objects.append(session.segment(p))
                report(progress, n + 1, len(prompts), "prompting")
            summary = {
                "source": str(getattr(slide, "path", "")),
                "checkpoint": session.source,
                "shape": [h0, w0],
                "mpp": slide.mpp,
                "tile_side": int(round(session.grid.level0_size)),
                "objects": [_describe(k + 1, o) for k, o in enumerate(objects)],
                "out": None,
            }
        if out is not None:
            from ..io.ome_tiff import write_ome_tiff
            from .prompt_labels import objects_image

            write_ome_tiff(
                out,
                objects_image(objects, (h0, w0)),
                axes="YX",
                is_labels=True,
                mpp=slide.mpp,
                metadata={"prompts": [_prompt_dict(p) for p in prompts], "checkpoint": summary["checkpoint"]},
                progress=progress,
                cancel=cancel,
            )
            summary["out"] = str(out)
    return summary


def _describe(k: int, o: PromptedObject) -> dict:
    h, w = o.mask.shape
    return {
        "id": k,
        "area_px": o.area,
        "bbox": [o.x0, o.y0, o.x0 + w, o.y0 + h] if o.area else None,
        "tile": o.tile,
        "from_cache": bool(o.from_cache),
        "at_tile_edge": bool(o.at_edge),
        "tiles": [int(t) for t in o.tiles],
    }


def _prompt_dict(p: Prompt) -> dict:
    return {"points": [list(v) for v in p.points], "labels": list(p.labels), "box": list(p.box) if p.box else None}
