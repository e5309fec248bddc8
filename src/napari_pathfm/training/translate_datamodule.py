"""Lightning data module of the ``translate`` family (HASTE): fields of view, normalised and split.

Splits: whole FOVs (``val_stacks`` or ``val_wells``) or rows of every FOV (``val_rows``;
the ISL convention is rows 768–1024 for validation, the rest for training). Training
crops come only from the training rows (:mod:`napari_pathfm.training.translate_crops`);
statistics computed without a table read only the training part
(:func:`~napari_pathfm.training.translate_stats.pooled_stats`).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from ..errors import RecipeError
from ..io.atomic import atomic_path
from .translate_crops import TranslateCropDataset, TranslateTileDataset
from .translate_data import (
    check_dtypes,
    check_planes,
    check_targets,
    fov_limits,
    load_fov,
    open_spec_sites,
    stack_specs,
)
from .translate_stats import pooled_stats

__all__ = ["TranslateDataModule"]


class TranslateDataModule(L.LightningDataModule):
    """Fields of view of a ``translate`` recipe, normalised and split (read eagerly: errors come before training).

    Parameters
    ----------
    data : dict
        The recipe's ``data`` section.
    in_channels : int
        Planes the model takes (checked against ``data.planes`` / the stacks).
    with_mask : bool
        Compute the Otsu nuclei mask of the first target (LUPI privileged information, and
        where ``data.nuclei_centred`` crops are centred).
    batch_size, num_workers : int
    where : str or Path
        The recipe, for messages.
    """

    def __init__(
        self,
        data: dict,
        in_channels: int,
        with_mask: bool,
        batch_size: int = 4,
        num_workers: int = 0,
        where=None,
        base: Path | None = None,
    ):
        super().__init__()
        self.cfg, self.where = dict(data), where or "<recipe>"
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.channels = [str(c) for c in data["channels"]]
        self.magnification = data.get("magnification")
        self.columns = list(data.get("stats_columns") or ["min", "max"])
        if len(self.columns) != 2:
            raise RecipeError(
                self.where,
                f"data.stats_columns is {self.columns}; give two column names.",
                "For example [min, max] or [p1, p99.8].",
            )
        train_specs, val_specs = stack_specs(data.get("stacks"), base), stack_specs(data.get("val_stacks"), base)
        if not train_specs:
            raise RecipeError(self.where, "data.stacks names no z-stack.", "List at least one stack folder.")
        rows = data.get("val_rows")
        self.val_rows = None if rows is None else (int(rows[0]), int(rows[1]))
        val_wells = {str(w).upper() for w in data.get("val_wells") or []}
        opened = [
            (sp, zs, is_val or str(zs.metadata.get("well", "")).upper() in val_wells)
            for specs, is_val in ((train_specs, False), (val_specs, True))
            for sp in specs
            for zs in open_spec_sites(sp)
        ]
        if not any(not v for _, _, v in opened):
            raise RecipeError(
                self.where, f"data.val_wells {sorted(val_wells)} leaves no training site.", "Hold out fewer wells."
            )
        for _, zs, _ in opened:
            check_targets(zs, self.channels)
        opened.sort(key=lambda t: t[2])  # training sites first
        ref = opened[0][1]
        self.planes = check_planes(ref, data.get("planes"), in_channels, self.where)
        for _, zs, _ in opened[1:]:
            check_planes(zs, self.planes, in_channels, self.where)
        self.input_dtype = str(ref.dtype)
        self.target_dtype = str(ref.targets[self.channels[0]].dtype) if self.channels[0] in ref.targets else None
        self.stats, self.stats_source, per_used_plane = self._stats([zs for _, zs, v in opened if not v])
        for _, zs, _ in opened:
            check_dtypes(
                zs,
                self.channels,
                self.stats,
                magnification=self.magnification,
                input_dtype=data.get("input_dtype"),
                target_dtype=data.get("target_dtype"),
            )
        chan = ref.channel_name or "input"
        self.input_limits = fov_limits(
            self.stats,
            chan,
            len(self.planes),
            self.magnification,
            self.columns,
            self.where,
            planes=None if per_used_plane else self.planes,
        )
        lows, highs = [], []
        for c in self.channels:
            lo, hi = fov_limits(self.stats, c, 1, self.magnification, self.columns, self.where)
            lows.append(float(lo[0]))
            highs.append(float(hi[0]))
        self.target_limits = (np.array(lows), np.array(highs))
        self.train_fovs, self.val_fovs = [], []
        for spec, zs, is_val in opened:
            fov = load_fov(
                spec,
                zs,
                self.channels,
                self.planes,
                self.input_limits,
                self.target_limits,
                with_mask=with_mask,
                where=self.where,
            )
            if is_val:
                self.val_fovs.append(fov)
            elif self.val_rows is not None:
                a, b = self.val_rows
                h = fov.shape[0]
                if not (0 <= a < b <= h):
                    raise RecipeError(
                        self.where,
                        f"data.val_rows {list(self.val_rows)} is outside the {h} rows of {spec.label}.",
                        "Give [start, stop] within the image (ISL: [768, 1024]).",
                    )
                self.val_fovs.append(fov.rows(a, b))
                for lo, hi in ((0, a), (b, h)):
                    if hi - lo > 0:
                        self.train_fovs.append(fov.rows(lo, hi))
            else:
                self.train_fovs.append(fov)
        self.plane_names = [ref.plane_names[p] for p in self.planes]
        self.channel_name = chan
        self.crop = int(data.get("crop_size", 512))
        self.val_tile = int(data.get("val_tile") or self.crop)
        self.with_mask = with_mask

    def _stats(self, train) -> tuple:
        """``(table, source, per_used_plane)``: ``data.stats``, or pooled over the training part.

        A computed table has one row per *used* plane (``per_used_plane`` True); a
        ``pathfm zstats`` table has one per plane of the stack and is indexed with ``data.planes``.
        Computed statistics read only training sites and, with ``val_rows``, the rows above them
        (or below when validation starts at row 0).
        """
        from ..io.normalize import StatsTable

        path = self.cfg.get("stats")
        if path:
            p = Path(path)
            if not p.is_file():
                raise RecipeError(
                    self.where,
                    f"data.stats {p} does not exist.",
                    "Compute it with `pathfm zstats STACK... --out stats.csv` or set data.stats: null.",
                )
            return StatsTable.read_csv(p), str(p), False
        rows = None
        if self.val_rows is not None:
            a, b = self.val_rows
            rows = (0, a) if a > 0 else (b, None)
        percentiles = [float(q) for q in self.cfg.get("percentiles") or (1.0, 99.8)]
        table = pooled_stats(
            list(train),
            percentiles=percentiles,
            magnification=self.magnification or "",
            rows=rows,
            planes=self.planes,
            channels=self.channels,
        )
        if self.magnification is None:
            self.magnification = ""
        return table, f"computed on the training part ({'rows ' + str(rows) if rows else 'whole stacks'})", True

    def setup(self, stage=None) -> None:
        ssr = None
        if self.cfg.get("shift_scale_rotate"):
            ssr = (
                float(self.cfg.get("ssr_shift", 0.2)),
                float(self.cfg.get("ssr_scale", 0.1)),
                float(self.cfg.get("ssr_rotate", 180.0)),
            )
        self.train_ds = TranslateCropDataset(
            self.train_fovs,
            self.crop,
            int(self.cfg.get("samples_per_epoch", 64)),
            augment=bool(self.cfg.get("augment", True)),
            nuclei_centred=float(self.cfg.get("nuclei_centred", 0.0)),
            ssr=ssr,
        )
        self.val_ds = TranslateTileDataset(self.val_fovs, self.val_tile) if self.val_fovs else None

    @property
    def val_items(self) -> list:
        return self.val_fovs

    def train_dataloader(self) -> DataLoader:
        if not hasattr(self, "train_ds"):
            self.setup()
        return DataLoader(
            self.train_ds,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=len(self.train_ds) > self.batch_size,
        )

    def val_dataloader(self):
        if not hasattr(self, "train_ds"):
            self.setup()
        if self.val_ds is None:
            return []
        return DataLoader(self.val_ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def normalization(self) -> dict:
        """The card's ``normalization`` (contract): per-plane input and per-channel target limits."""
        return {
            "kind": "minmax",
            "columns": self.columns,
            "input_min": [float(v) for v in self.input_limits[0]],
            "input_max": [float(v) for v in self.input_limits[1]],
            "target_min": [float(v) for v in self.target_limits[0]],
            "target_max": [float(v) for v in self.target_limits[1]],
            "target_dtype": self.target_dtype,
            "stats": self.stats_source,
        }

    def save_split(self, path) -> None:
        """``split.json`` (train/val FOVs and rows) and the stats table used, beside it."""
        _write_json(
            Path(path),
            {
                "train": [f.source for f in self.train_fovs],
                "val": [f.source for f in self.val_fovs],
                "planes": self.planes,
                "channels": self.channels,
            },
        )
        self.stats.to_csv(Path(path).with_name("stats.csv"))

    def describe(self) -> str:
        return (
            f"{len(self.train_fovs)} training / {len(self.val_fovs)} validation part(s): "
            f"{'; '.join(f.source for f in self.train_fovs + self.val_fovs)}; planes {self.plane_names}; "
            f"targets {self.channels}; crops {self.crop} px"
        )


def _write_json(path: Path, doc: dict) -> None:
    """Write ``doc`` as JSON atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
