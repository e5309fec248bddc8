"""Build the bundled z-stack sample of ``pathfm demo`` from the ISL well in ../shared/data/isl-blue-sample.

Writes ``src/napari_pathfm/data/isl-blue-crop.ome.tif`` (the 13 phase-contrast planes, ZYX uint16) and
``src/napari_pathfm/data/isl-blue-crop-targets.ome.tif`` (the confocal DAPI / MAP2 / NFH max-projections, CYX
uint16) of one 256 x 256 crop of the validation rows (768:1024, never used to train the bundled haste-isl-*
models), zlib-compressed. The crop is the 256-px window of those rows with the most DAPI signal (nuclei), so the
demo has cells to show. The ISL data (Christiansen et al., Cell 2018) is Apache-2.0.

    .venv/bin/python benchmarks/demo_data/make_isl_crop.py [ISL_FOLDER]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "src" / "napari_pathfm" / "data"
ROWS = (768, 1024)
SIZE = 256


def _write(path: Path, data: np.ndarray, axes: str, names: list[str] | None = None) -> None:
    import tifffile

    from napari_pathfm.io.atomic import atomic_path

    meta: dict = {"axes": axes}
    if names:
        meta["Channel"] = {"Name": names}
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            data,
            ome=True,
            photometric="minisblack",
            compression="zlib",
            compressionargs={"level": 9},
            metadata=meta,
        )


def main(folder: Path) -> None:
    from napari_pathfm.io.zstack import open_zstack

    zs = open_zstack(folder)
    stack = np.asarray(zs.data[:, ROWS[0] : ROWS[1]])
    dapi = np.asarray(zs.targets["DAPI"]).astype(np.float64)[ROWS[0] : ROWS[1]]
    # the column window with the most nuclei signal above the median, on a 64-px step
    score = [(dapi[:, x : x + SIZE] - np.median(dapi)).clip(0).sum() for x in range(0, dapi.shape[1] - SIZE + 1, 64)]
    x0 = 64 * int(np.argmax(score))
    crop = np.ascontiguousarray(stack[:, :, x0 : x0 + SIZE])
    names = ["DAPI", "MAP2", "NFH"]
    targets = np.stack([np.asarray(zs.targets[n])[ROWS[0] : ROWS[1], x0 : x0 + SIZE] for n in names])
    _write(OUT / "isl-blue-crop.ome.tif", crop, "ZYX")
    _write(OUT / "isl-blue-crop-targets.ome.tif", np.ascontiguousarray(targets), "CYX", names)
    print(
        f"crop rows {ROWS[0]}:{ROWS[1]} cols {x0}:{x0 + SIZE}; stack {crop.shape} {crop.dtype}, targets "
        f"{targets.shape}; sizes {[(OUT / f).stat().st_size for f in ('isl-blue-crop.ome.tif', 'isl-blue-crop-targets.ome.tif')]}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "shared" / "data" / "isl-blue-sample")
