"""Segmentation's part of the tile run: each batch's logits blended into a banded canvas.

:func:`~napari_pathfm.pipelines.segment.segment_slide` builds the tissue grid, the level-0 class map
and its outputs; :class:`SegmentTiles` is the :class:`~napari_pathfm.pipelines.tile_run.TileTask` it
hands to the tile-run frame: the model call per batch (:func:`~.segment_model.tile_logits`) and the
blending into :class:`~napari_pathfm.tiles.canvas.BandedCanvas`, which turns finished bands into
level-0 labels. Importing this module does not import torch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..progress import check_cancel
from .segment_model import tile_logits
from .segment_outputs import SegmentOutputs
from .tile_run import TileTask, autocast

__all__ = ["SegmentTiles"]


class SegmentTiles:
    """Segmentation's part of the tile run: the logits of a batch, blended into a banded canvas.

    Reader threads decode tiles ahead while the caller's thread runs the model and blends on its
    device; the canvas tells ``outputs`` when level-0 rows are final, and ``outputs.poll()`` runs
    per batch (a failed background writer stops the run). On the CPU, blending a batch (numpy,
    releases the GIL) runs in one helper thread while the model runs the next batch; one thread
    keeps the adds in order, so the result is the same as blending inline. ``flips`` averages each
    tile's logits over its mirror images (:func:`~.segment_model.tile_logits`).
    """

    def __init__(
        self,
        model: Any,
        grid: Any,
        dev: str,
        k: int | None,
        store: Any,
        *,
        weights: str,
        source: Any,
        outputs: SegmentOutputs,
        encoder: Any,
        cancel: Any,
        flips: bool = False,
    ):
        model.to(dev).eval()
        self.model, self.grid, self.dev, self.k, self.store = model, grid, dev, k, store
        self.weights, self.source, self.outputs, self.encoder, self.cancel = weights, source, outputs, encoder, cancel
        self.flips, self.autocast = flips, autocast(dev)
        self.coords = grid.output_coords.tolist()
        self.canvas: Any = None
        self.blender = ThreadPoolExecutor(1, thread_name_prefix="pathfm-blend") if dev == "cpu" else None
        self.pending: list = []

    def task(self) -> TileTask:
        return TileTask("segmentation", "segmenting", self.infer, self.collect, self.finish, self.close)

    def infer(self, batch: Any) -> Any:
        """``(B, K, T, T)`` logits: numpy on the CPU, torch on an accelerator."""
        self.outputs.poll()
        with self.autocast:
            logits = tile_logits(
                self.model, batch, self.dev, self.grid.tile_size, self.k, self.source, self.encoder, self.flips
            )
        return logits.numpy() if self.dev == "cpu" else logits

    def collect(self, batch: Any, logits: Any) -> None:
        from ..tiles.canvas import BandedCanvas

        if self.canvas is None:
            self.k = logits.shape[1]
            self.canvas = BandedCanvas(
                self.grid,
                self.k,
                self.store,
                None if self.dev == "cpu" else self.dev,
                weights=self.weights,
                on_rows=self.outputs.rows_done,
            )
        if self.blender is None:
            self._blend(batch.indices.tolist(), logits)
            return
        self.pending.append(self.blender.submit(self._blend, batch.indices.tolist(), logits))
        while len(self.pending) > 2:  # bounded: at most two batches of logits wait
            self.pending.pop(0).result()

    def _blend(self, indices: list[int], logits: Any) -> None:
        for i, idx in enumerate(indices):
            self.canvas.add(*self.coords[idx], logits[i])

    def finish(self) -> None:
        for future in self.pending:
            future.result()
        self.pending.clear()
        check_cancel(self.cancel, "segmentation")
        self.canvas.finish()

    def close(self) -> None:
        if self.blender is not None:
            for future in self.pending:
                future.cancel()
            self.blender.shutdown(wait=True)
        if self.canvas is not None:
            self.canvas.close()
