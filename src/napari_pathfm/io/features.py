"""The patch-feature file: one zarr v3 group per slide, its checked reader, and the extractor card.

Training (``training/mil_data.py``, the MIL task) and prediction (``pipelines/``) both read and write
these files, so the format lives in ``io/``, below both (docs/architecture.md, "Layers").

Layout of ``<slide>.features.zarr``::

    features   (N, D) float32   one row per tissue tile, chunked by rows (~4 MB chunks)
    coords     (N, 2) int64     level-0 (y, x) of each tile's top-left corner
    attrs      format, format_version, slide, slide_signature, slide_bytes, slide_mpp,
               level0_shape, grid_shape, tile_size, mpp (obtained; None when the slide has no
               pixel size), target_mpp, level, read_size, level0_tile_size, min_tissue,
               tissue_mpp, extractor, backbone, input_size, mean, std, weights, weights_sha256,
               feature_dim, n_tiles, patch_order, created, pathfm_version, complete,
               checksums ({file under the group: [size, crc32 hex]}, format_version >= 2)

Row ``i`` of ``features`` belongs to row ``i`` of ``coords``. Rows follow
:data:`PATCH_ORDER`; S4 MIL reads a bag as a sequence, so the order is part of the
format. ``complete: true`` is set only after the last row is written, and the group
is built in a temporary folder renamed into place, so a file without it is the
remnant of an interrupted run.

Integrity (format version 2): every chunk carries a CRC32C (``zarr.codecs.Crc32cCodec`` after the
compressor), so a changed chunk fails to decode; and the last write records the size and CRC-32 of
every file of the two arrays in ``checksums``, so a missing or truncated chunk (which zarr would
otherwise read as zeros) is seen too. :func:`verify_feature_store` checks that record; a file that
fails it is never reused by ``pathfm features`` (the slide is recomputed, with a warning) and is
refused by :func:`read_features` with a :class:`~napari_pathfm.errors.FeatureError`. Files of format
version 1 carry no record: they are read as before but recomputed rather than reused.
Nothing here imports torch.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FeatureError
from .checksums import file_crc32

__all__ = [
    "EXTRACTOR_KEYS",
    "FORMAT",
    "PATCH_ORDER",
    "FeatureBag",
    "RowWriter",
    "check_feature_dim",
    "create_feature_store",
    "extractor_card",
    "feature_path",
    "feature_paths",
    "read_feature_attrs",
    "read_features",
    "write_features",
]

FORMAT = "pathfm-features"
FORMAT_VERSION = 2  # 2: CRC32C per chunk + checksum record of the arrays' files
PATCH_ORDER = "row-major over tissue tiles: top-to-bottom, then left-to-right, level-0 (y, x)"
_CHUNK_BYTES = 1 << 22
_RERUN = "Run pathfm features again (finished slides are skipped)."
SUFFIX = ".features.zarr"


@dataclass
class FeatureBag:
    """The patches of one slide: features, where they are, and how they were made.

    Attributes
    ----------
    features : ndarray float32 (N, D)
    coords : ndarray int64 (N, 2)
        Level-0 (y, x) top-left corner of each patch, in :data:`PATCH_ORDER`.
    attrs : dict
        The file's attributes (see the module docstring).
    path : Path or None
        The file it came from.
    """

    features: np.ndarray
    coords: np.ndarray
    attrs: dict = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature length ``D``."""
        return int(self.features.shape[1])

    @property
    def level0_tile_size(self) -> float | None:
        """Side of one patch in level-0 pixels (to draw heatmaps over the slide)."""
        v = self.attrs.get("level0_tile_size")
        return None if v is None else float(v)


def feature_path(out_dir: str | Path, slide_path: str | Path) -> Path:
    """``out_dir / "<slide stem>.features.zarr"`` (``a.ome.tif`` → ``a.features.zarr``)."""
    from .atomic import split_suffix

    return Path(out_dir) / (split_suffix(Path(slide_path).name)[0] + SUFFIX)


def feature_paths(out_dir: str | Path, slides: list[Path]) -> list[Path]:
    """:func:`feature_path` of each slide; slides sharing a stem keep their suffix (``a.svs.features.zarr``)."""
    paths = [feature_path(out_dir, s) for s in slides]
    return [Path(out_dir) / (Path(s).name + SUFFIX) if paths.count(p) > 1 else p for s, p in zip(slides, paths)]


def _version() -> str:
    from .. import __version__

    return __version__


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (np.ndarray, tuple)):
        return [_jsonable(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def chunk_rows(dim: int) -> int:
    """Rows per ``features`` chunk: about 4 MB of float32 per chunk."""
    return max(1, _CHUNK_BYTES // (4 * max(1, int(dim))))


def create_feature_store(path: str | Path, n: int, dim: int, attrs: dict):
    """Create an empty feature group at ``path`` (normally a temporary folder).

    ``features`` and ``coords`` are created with ``n`` rows; ``attrs`` get the
    format fields, ``feature_dim``, ``n_tiles``, ``patch_order`` and the package
    version, but not ``complete`` (:func:`finish_feature_store` sets it).

    Returns
    -------
    zarr.Group
    """
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array(
        "features",
        shape=(n, dim),
        dtype="float32",
        chunks=(max(1, min(n, chunk_rows(dim))), dim),
        compressors=_compressors(),
    )
    group.create_array(
        "coords", shape=(n, 2), dtype="int64", chunks=(max(1, min(n, 1 << 16)), 2), compressors=_compressors()
    )
    full = {
        "patch_order": PATCH_ORDER,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in attrs.items() if k != "complete"},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "feature_dim": int(dim),
        "n_tiles": int(n),
        "pathfm_version": _version(),
    }
    group.attrs.update(_jsonable(full))
    return group


def _compressors() -> list:
    """Zstandard (zarr's default) followed by a CRC32C of each compressed chunk."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()]


def _array_files(root: Path) -> list[Path]:
    """The files of the ``features`` and ``coords`` arrays (metadata and chunks), sorted."""
    return sorted(p for name in ("features", "coords") for p in (root / name).rglob("*") if p.is_file())


def _checksums(root: Path) -> dict[str, list]:
    return {p.relative_to(root).as_posix(): [p.stat().st_size, file_crc32(p)] for p in _array_files(root)}


def finish_feature_store(group, path: str | Path | None = None) -> None:
    """Record the checksums of the arrays' files and mark the group complete (the last write of a feature file).

    ``path`` is the group's folder (default: the root of its local store).
    """
    root = Path(path) if path is not None else Path(group.store.root)
    group.attrs.update({"checksums": _checksums(root), "complete": True})


def verify_feature_store(path: str | Path, attrs: dict) -> str:
    """``""`` when every file the ``checksums`` record lists is there with its size and CRC-32, else the problem.

    A file without the record (format version 1) gives ``"no checksum record"``: it cannot be verified.
    """
    path = Path(path)
    record = attrs.get("checksums")
    if not isinstance(record, dict) or not record:
        return "no checksum record (written by an older version)"
    on_disk = {p.relative_to(path).as_posix() for p in _array_files(path)}
    for rel, expected in record.items():
        f = path / rel
        try:
            if not f.is_file():
                return f"{rel} is missing"
            if [f.stat().st_size, file_crc32(f)] != list(expected):
                return f"{rel} has changed since it was written (size or checksum differs)"
        except (OSError, TypeError, ValueError) as exc:
            return f"{rel} cannot be checked ({exc})"
    extra = sorted(on_disk - set(record))
    return f"{extra[0]} was added after it was written" if extra else ""


class RowWriter:
    """Append feature rows to a zarr array in whole chunks.

    Rows are buffered until a chunk is full, so every chunk is compressed and
    written once; at most one chunk of features is held in memory.
    """

    def __init__(self, array):
        self.array = array
        self.rows = int(array.chunks[0])
        self.start = 0
        self._buf: list[np.ndarray] = []
        self._held = 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, np.float32).reshape(-1, self.array.shape[1])
        self._buf.append(rows)
        self._held += rows.shape[0]
        if self._held >= self.rows:
            block = np.concatenate(self._buf)
            cut = (block.shape[0] // self.rows) * self.rows
            self._write(block[:cut])
            self._buf, self._held = [block[cut:]], block.shape[0] - cut

    def _write(self, block: np.ndarray) -> None:
        end = self.start + block.shape[0]
        if end > self.array.shape[0]:
            raise ValueError(f"more feature rows ({end}) than tiles ({self.array.shape[0]})")
        if block.shape[0]:
            self.array[self.start : end] = block
        self.start = end

    def close(self) -> None:
        """Write the remaining rows; raise if the array is not exactly filled."""
        if self._held:
            self._write(np.concatenate(self._buf))
        self._buf, self._held = [], 0
        if self.start != self.array.shape[0]:
            raise ValueError(f"wrote {self.start} feature rows for {self.array.shape[0]} tiles")


def write_features(path: str | Path, features: Any, coords: Any, attrs: dict | None = None) -> Path:
    """Write a complete feature file in one go, atomically (e.g. synthetic bags for benchmarks).

    Parameters
    ----------
    path : str or Path
        Target folder, conventionally ``<name>.features.zarr``; replaced only once
        the new file is complete.
    features : array (N, D)
        Finite values; stored as float32.
    coords : array (N, 2)
        Level-0 (y, x) of each patch, in :data:`PATCH_ORDER`.
    attrs : dict, optional
        Extra attributes (``slide``, ``backbone``, ``level0_tile_size`` ...).

    Examples
    --------
    >>> p = write_features(tmp / "bag.features.zarr", np.ones((3, 4)), [[0, 0], [0, 8], [8, 0]])  # doctest: +SKIP
    >>> read_features(p).features.shape  # doctest: +SKIP
    (3, 4)
    """
    from .atomic import atomic_path

    path = Path(path)
    features = np.asarray(features, np.float32)
    coords = np.asarray(coords, np.int64)
    if features.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
        raise FeatureError(
            path,
            f"cannot be written: features {features.shape} and coords {coords.shape} do not match.",
            "Give features (N, D) and coords (N, 2) with the same N.",
        )
    _check_finite(path, features)
    with atomic_path(path, directory=True) as tmp:
        group = create_feature_store(tmp, features.shape[0], features.shape[1], dict(attrs or {}))
        if features.shape[0]:
            group["features"][:] = features
            group["coords"][:] = coords
        finish_feature_store(group)
    return path


def _open(path: Path):
    import zarr

    if not path.exists():
        raise FeatureError(path, "does not exist.", "Check the path, or extract features first with pathfm features.")
    try:
        group = zarr.open_group(str(path), mode="r")
        names = set(group.array_keys())
    except Exception as exc:
        raise FeatureError(
            path,
            f"is not a patch-feature file ({type(exc).__name__}: {exc}).",
            "Point at a <slide>.features.zarr folder written by pathfm features.",
        ) from exc
    if not {"features", "coords"} <= names:
        raise FeatureError(
            path,
            "is not a patch-feature file: it has no 'features' and 'coords' arrays.",
            "Point at a <slide>.features.zarr folder written by pathfm features.",
        )
    return group


def _check_finite(path: Path, features: np.ndarray) -> None:
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise FeatureError(
            path,
            f"has NaN or infinite features in {int(bad.sum())} of {len(bad)} patches (first: row {first}).",
            "Delete it and run pathfm features again (with --device cpu if it repeats: "
            "fp16 overflow on a GPU or a broken weights file cause this).",
        )


def _check_layout(path: Path, group) -> dict:
    attrs = dict(group.attrs)
    feats, coords = group["features"], group["coords"]
    if not attrs.get("complete"):
        raise FeatureError(path, "is incomplete: the extraction that wrote it was interrupted.", _RERUN)
    if len(feats.shape) != 2 or len(coords.shape) != 2 or coords.shape[1] != 2:
        raise FeatureError(
            path,
            f"has features of shape {feats.shape} and coords {coords.shape}; expected (N, D) and (N, 2).",
            "Delete it and run pathfm features again.",
        )
    if feats.shape[0] != coords.shape[0]:
        raise FeatureError(
            path,
            f"has {feats.shape[0]} feature rows but {coords.shape[0]} coordinates; they must match.",
            "The file was changed after writing; delete it and run pathfm features again.",
        )
    return attrs


def read_feature_attrs(path: str | Path) -> dict | None:
    """Attributes of a complete, consistent feature file, or None (cheap: no data read).

    Only the layout is checked here; :func:`reusable_feature_attrs` also verifies the checksums.
    """
    try:
        group = _open(Path(path))
        return _check_layout(Path(path), group)
    except FeatureError:
        return None


def reusable_feature_attrs(path: str | Path) -> tuple[dict | None, str]:
    """``(attrs, "")`` when a feature file is complete and passes :func:`verify_feature_store`.

    Otherwise ``(None, why)``: used to decide whether a slide's features may be reused; ``why`` is
    ``""`` when there is simply no file, else what is wrong with the one there (to warn about it).
    """
    path = Path(path)
    if not path.exists():
        return None, ""
    try:
        attrs = _check_layout(path, _open(path))
    except FeatureError as exc:
        return None, exc.problem
    problem = verify_feature_store(path, attrs)
    return (None, problem) if problem else (attrs, "")


def read_features(path: str | Path) -> FeatureBag:
    """Read and check a feature file written by ``pathfm features`` or :func:`write_features`.

    Raises
    ------
    FeatureError
        Naming the file, when it is missing, not a feature file, incomplete
        (interrupted extraction), damaged (a chunk missing, truncated or changed), has features/coords of different lengths, holds
        NaN/inf features, or has no patches (no tissue found on the slide).
    """
    path = Path(path)
    group = _open(path)
    attrs = _check_layout(path, group)
    problem = verify_feature_store(path, attrs) if "checksums" in attrs else ""
    if problem:
        raise FeatureError(path, f"is damaged: {problem}.", "Delete it and run pathfm features again.")
    try:
        features = np.asarray(group["features"][:], np.float32)
        coords = np.asarray(group["coords"][:], np.int64)
    except Exception as exc:  # a chunk that fails its CRC32C or does not decode
        raise FeatureError(
            path,
            f"is damaged: a chunk cannot be read ({type(exc).__name__}: {exc}).",
            "Delete it and run pathfm features again.",
        ) from exc
    if features.shape[0] == 0:
        raise FeatureError(
            path,
            f"has no patches: no tissue tiles were found on {attrs.get('slide', 'the slide')} "
            f"(min_tissue={attrs.get('min_tissue', '?')}).",
            "Run pathfm features again with a lower --min-tissue, or check that the slide shows tissue.",
        )
    _check_finite(path, features)
    return FeatureBag(features, coords, attrs, path)


def check_feature_dim(bag: FeatureBag, expected_dim: int, checkpoint_path: str | Path) -> None:
    """Raise a :class:`FeatureError` naming both files when ``bag`` does not fit a model.

    Parameters
    ----------
    bag : FeatureBag
    expected_dim : int
        Input feature length of the model (``in_dim`` of its card).
    checkpoint_path : str or Path
        The checkpoint the model came from, named in the message.
    """
    if bag.dim == int(expected_dim):
        return
    made_by = bag.attrs.get("backbone") or "an unknown backbone"
    raise FeatureError(
        bag.path or "feature bag",
        f"has {bag.dim}-d features (from {made_by}), but the checkpoint {checkpoint_path} expects "
        f"{int(expected_dim)}-d features.",
        "Extract features with the backbone the checkpoint was trained on, or choose a checkpoint "
        f"trained on {made_by} features.",
    )


#: Feature-file attributes that say how features were extracted (:func:`extractor_card`).
EXTRACTOR_KEYS = (
    "extractor",
    "backbone",
    "weights",
    "weights_sha256",
    "input_size",
    "mean",
    "std",
    "feature_dim",
    "target_mpp",
    "tile_size",
    "min_tissue",
    "tissue_mpp",
)


def extractor_card(feature_attrs: dict) -> dict:
    """The part of a feature file's attributes that a MIL model card keeps, so that
    prediction on a new slide extracts features exactly as training did."""
    return {k: feature_attrs.get(k) for k in EXTRACTOR_KEYS}
