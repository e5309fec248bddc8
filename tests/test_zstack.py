"""Z-stack reading and normalisation, on the real ISL sample wherever possible.

The HASTE (Yokogawa) naming has no real data here, so those tests write tiny
synthetic TIFFs; multipage/OME-TIFF tests are written from cropped real ISL planes.
"""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_pathfm.errors import Cancelled, ZStackError
from napari_pathfm.io import zstack as zmod
from napari_pathfm.io.normalize import (
    StatsTable,
    compute_stats,
    denormalize,
    example_stats_path,
    normalize_minmax,
    normalize_percentile,
)
from napari_pathfm.io.zstack import looks_like_zstack, open_zstack
from napari_pathfm.io.zstack_layers import get_zstack_reader, zstack_layer_data
from napari_pathfm.io.zstack_naming import parse_plane_name

HASTE_PREFIX = "AssayPlate_Greiner_#655090"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def isl_dir(shared_data: Path) -> Path:
    d = shared_data / "isl-blue-sample"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    return d


def isl_plane(isl_dir: Path, z: int) -> Path:
    (f,) = isl_dir.glob(f"*,z_depth-{z},channel-PHASE_CONTRAST,*.png")
    return f


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def isl_stack(isl_dir):
    return open_zstack(isl_dir)


@pytest.fixture(scope="module")
def isl_array(isl_stack) -> np.ndarray:
    return isl_stack.data.compute()


@pytest.fixture(scope="module")
def isl_crops(isl_dir) -> np.ndarray:
    """Five real planes (z_depth-0..4) cropped to 96x128 for writing TIFFs."""
    return np.stack([read_png(isl_plane(isl_dir, z))[200:296, 300:428] for z in range(5)])


def link_planes(isl_dir: Path, dest: Path, zs, targets: bool = False) -> Path:
    dest.mkdir(exist_ok=True)
    files = [isl_plane(isl_dir, z) for z in zs]
    if targets:
        files += list(isl_dir.glob("*depth_computation-MAXPROJECT*"))
    for f in files:
        os.symlink(f, dest / f.name)
    return dest


def haste_name(well="D04", field=6, action=4, z=1, channel=4, suffix=".tif") -> str:
    return f"{HASTE_PREFIX}_{well}_T0001F{field:03d}L01A{action:02d}Z{z:02d}C{channel:02d}{suffix}"


def write_haste(folder: Path, well="D04", field=6, nz=11, shape=(8, 10), targets=True) -> Path:
    """Brightfield planes filled with their z index, targets filled with 100 + channel."""
    folder.mkdir(exist_ok=True)
    for z in range(1, nz + 1):
        tifffile.imwrite(folder / haste_name(well, field, 4, z, 4), np.full(shape, z, np.uint16))
    if targets:
        for c in (1, 2, 3):
            tifffile.imwrite(folder / haste_name(well, field, c, 1, c), np.full(shape, 100 + c, np.uint16))
    return folder


# --------------------------------------------------------------------------- ISL folder (real data)


def test_isl_folder_opens_sorted_uint16(isl_stack, isl_dir):
    zs = isl_stack
    assert isinstance(zs.data, da.Array)
    assert zs.shape == (13, 1024, 1024) and zs.dtype == np.uint16
    assert zs.plane_names == [f"z_depth-{i}" for i in range(13)]  # z_depth-10 after z_depth-9
    assert zs.plane_files == [isl_plane(isl_dir, i) for i in range(13)]
    assert zs.channel_name == "PHASE_CONTRAST"
    assert sorted(zs.targets) == ["DAPI", "MAP2", "NFH"]
    assert all(t.shape == (1024, 1024) and t.dtype == np.uint16 for t in zs.targets.values())
    assert zs.metadata["format"] == "zdepth-folder" and zs.metadata["well"] == "A4"


def test_isl_is_lazy_and_planes_match_files(isl_dir, monkeypatch):
    calls = []
    real = zmod._read_plane

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(zmod, "_read_plane", counting)
    zs = open_zstack(isl_dir)
    assert calls == []  # opening reads headers only
    plane = zs.data[10].compute()
    assert len(calls) == 1 and "z_depth-10," in calls[0]
    expected = read_png(isl_plane(isl_dir, 10))
    assert expected.dtype == np.uint16 and plane.dtype == np.uint16
    np.testing.assert_array_equal(plane, expected)


def test_isl_targets_match_files(isl_stack, isl_dir):
    (dapi,) = isl_dir.glob("*channel-DAPI_CONFOCAL*")
    np.testing.assert_array_equal(isl_stack.targets["DAPI"].compute(), read_png(dapi))


def test_one_plane_file_opens_whole_stack(isl_dir):
    zs = open_zstack(isl_plane(isl_dir, 7))
    assert zs.n_planes == 13 and zs.path == isl_plane(isl_dir, 7)
    assert zs.plane_names[-1] == "z_depth-12" and sorted(zs.targets) == ["DAPI", "MAP2", "NFH"]


def test_isl_missing_plane_is_named(isl_dir, tmp_path):
    folder = link_planes(isl_dir, tmp_path / "gap", [0, 1, 3, 4])
    with pytest.raises(ZStackError) as err:
        open_zstack(folder)
    msg = str(err.value)
    assert "gap" in msg and "z_depth-2" in msg and "missing" in msg


def test_isl_mismatched_shape_and_dtype(isl_dir, tmp_path):
    folder = link_planes(isl_dir, tmp_path / "shape", [0, 1, 2])
    bad = folder / isl_plane(isl_dir, 3).name
    Image.fromarray(read_png(isl_plane(isl_dir, 3))[:512]).save(bad)  # 16-bit PNG, half height
    with pytest.raises(ZStackError) as err:
        open_zstack(folder)
    assert bad.name in str(err.value) and "(512, 1024)" in str(err.value)

    bad.unlink()
    Image.fromarray((read_png(isl_plane(isl_dir, 3)) >> 8).astype(np.uint8)).save(bad)
    with pytest.raises(ZStackError, match="uint8"):
        open_zstack(folder)


# --------------------------------------------------------------------------- HASTE naming (synthetic)


def test_parse_haste_name():
    p = parse_plane_name(haste_name(z=7))
    assert (p.scheme, p.well, p.field, p.channel, p.z) == ("haste", "D04", 6, "C04", 7)
    assert parse_plane_name(haste_name(channel=1)).target_name == "nuclei"
    assert parse_plane_name("random.png") is None and parse_plane_name("x.txt") is None


def test_haste_folder_order_and_targets(tmp_path):
    folder = write_haste(tmp_path / "haste")
    zs = open_zstack(folder)
    assert zs.plane_names == [f"Z{z:02d}" for z in range(1, 12)]  # Z10, Z11 after Z09
    np.testing.assert_array_equal(zs.data[:, 0, 0].compute(), np.arange(1, 12))
    assert zs.channel_name == "C04" and zs.dtype == np.uint16
    values = {k: int(v[0, 0].compute()) for k, v in zs.targets.items()}
    assert values == {"nuclei": 101, "lipids": 102, "cytoplasm": 103}


def test_haste_several_stacks(tmp_path):
    folder = write_haste(tmp_path / "multi", field=6, nz=3)
    write_haste(folder, well="E05", field=7, nz=4)
    with pytest.raises(ZStackError) as err:
        open_zstack(folder)
    msg = str(err.value)
    assert "2 z-stacks" in msg and "D04" in msg and "E05" in msg and "well=" in msg and "plane file" in msg
    assert open_zstack(folder, well="E05").n_planes == 4
    assert open_zstack(folder, field=6).n_planes == 3
    zs = open_zstack(folder / haste_name("E05", 7, z=2))
    assert zs.n_planes == 4 and zs.metadata["well"] == "E05"


def test_haste_missing_and_duplicate(tmp_path):
    folder = write_haste(tmp_path / "h", nz=5, targets=False)
    (folder / haste_name(z=3)).unlink()
    with pytest.raises(ZStackError, match="Z03"):
        open_zstack(folder)
    tifffile.imwrite(folder / haste_name(z=3), np.zeros((8, 10), np.uint16))
    Image.fromarray(np.zeros((8, 10), np.uint16)).save(folder / haste_name(z=3, suffix=".png"))
    with pytest.raises(ZStackError, match="two files for plane Z03"):
        open_zstack(folder)


def test_haste_channel_selection(tmp_path):
    folder = write_haste(tmp_path / "c", nz=3)
    zs = open_zstack(folder / haste_name(channel=2, action=2))  # a target file: its site, default channel
    assert zs.channel_name == "C04"
    with pytest.raises(ZStackError, match="no planes of channel"):
        open_zstack(folder, channel="C09")


# --------------------------------------------------------------------------- TIFF stacks (real crops)


@pytest.mark.parametrize("kind", ["shaped", "pages"])
def test_multipage_tiff(isl_crops, tmp_path, kind):
    path = tmp_path / "stack.tif"
    if kind == "shaped":
        tifffile.imwrite(path, isl_crops)
    else:
        with tifffile.TiffWriter(path) as tw:
            for plane in isl_crops:
                tw.write(plane, metadata=None)
    assert looks_like_zstack(path)
    zs = open_zstack(path)
    assert zs.shape == (5, 96, 128) and zs.dtype == np.uint16 and zs.plane_files == [path] * 5
    np.testing.assert_array_equal(zs.data.compute(), isl_crops)
    np.testing.assert_array_equal(zs.data[3].compute(), isl_crops[3])


def test_ome_tiff_z_axis(isl_crops, tmp_path):
    path = tmp_path / "stack.ome.tif"
    tifffile.imwrite(
        path, isl_crops, metadata={"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0}
    )
    assert looks_like_zstack(path)
    zs = open_zstack(path)
    assert zs.metadata["format"] == "ome-tiff" and zs.metadata["PhysicalSizeZ"] == 2.0
    np.testing.assert_array_equal(zs.data.compute(), isl_crops)
    layers = zstack_layer_data(path)
    assert layers[0][1]["name"] == "stack z-stack" and layers[0][1]["scale"] == (2.0, 0.5, 0.5)


def test_ome_tiff_with_channels(isl_crops, tmp_path):
    path = tmp_path / "czyx.ome.tif"
    data = np.stack([isl_crops, isl_crops // 2], axis=1)  # Z C Y X
    tifffile.imwrite(path, data, metadata={"axes": "ZCYX", "Channel": {"Name": ["BF", "DAPI"]}})
    assert not looks_like_zstack(path)  # multi-channel: not claimed by the reader
    with pytest.raises(ZStackError, match="channel="):
        open_zstack(path)
    np.testing.assert_array_equal(open_zstack(path, channel="DAPI").data.compute(), isl_crops // 2)
    np.testing.assert_array_equal(open_zstack(path, channel=0).data.compute(), isl_crops)


def test_multipage_mismatched_page(isl_crops, tmp_path):
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tw:
        for i, plane in enumerate(isl_crops):
            tw.write(plane[:50] if i == 3 else plane, metadata=None)
    assert not looks_like_zstack(path)
    with pytest.raises(ZStackError, match=r"mixed.tif: page 3"):
        open_zstack(path)


# --------------------------------------------------------------------------- napari reader helpers


def test_looks_like_zstack(isl_dir, shared_data, tmp_path):
    assert looks_like_zstack(isl_dir) and looks_like_zstack(isl_plane(isl_dir, 0))
    for name in ["boxes.tiff", "CMU-1-Small-Region.svs", "small.svs", "unopenable.tiff", "unreadable.svs"]:
        assert not looks_like_zstack(shared_data / "wsi" / name), name
    glas = next((shared_data / "glas" / "train" / "images").glob("*.png"))
    assert not looks_like_zstack(glas) and not looks_like_zstack(glas.parent)
    tifffile.imwrite(tmp_path / "single.tif", np.zeros((8, 8), np.uint16))
    (tmp_path / "notes.txt").write_text("hello")
    assert not looks_like_zstack(tmp_path / "single.tif")
    assert not looks_like_zstack(tmp_path / "notes.txt") and not looks_like_zstack(tmp_path / "nope")
    assert get_zstack_reader(str(isl_dir)) is zstack_layer_data
    assert get_zstack_reader(str(shared_data / "wsi" / "boxes.tiff")) is None
    assert get_zstack_reader([str(isl_dir), str(isl_dir)]) is None


def test_zstack_layer_data(isl_dir):
    layers = zstack_layer_data(isl_dir)
    data, kwargs, kind = layers[0]
    assert kind == "image" and isinstance(data, da.Array) and data.shape == (13, 1024, 1024)
    assert kwargs["name"] == "isl-blue-sample z-stack"
    assert kwargs["metadata"]["plane_names"][10] == "z_depth-10"
    lo, hi = kwargs["contrast_limits"]
    assert 0 <= lo < hi <= 65535
    targets = {kw["name"].split()[-1]: kw for _, kw, _ in layers[1:]}
    assert set(targets) == {"DAPI", "MAP2", "NFH"}
    assert targets["DAPI"]["colormap"] == "blue" and targets["MAP2"]["colormap"] == "magenta"
    assert all(kw["blending"] == "additive" for kw in targets.values())


# --------------------------------------------------------------------------- normalisation


def test_compute_stats_equals_numpy(isl_stack, isl_array):
    calls = []
    table = compute_stats(
        isl_stack, percentiles=(1, 50, 99.8), magnification="20x", progress=lambda d, t, m: calls.append((d, t))
    )
    assert len(table) == 16 and calls[-1] == (16, 16)
    for row in table.rows[:13]:
        plane = isl_array[row["plane"]]
        assert row["channel"] == "PHASE_CONTRAST"
        assert (row["min"], row["max"]) == (plane.min(), plane.max())
        np.testing.assert_allclose(
            [row["p1"], row["p50"], row["p99.8"]], np.percentile(plane, [1, 50, 99.8]), rtol=0, atol=1e-6
        )
    dapi = isl_stack.targets["DAPI"].compute()
    (row,) = [r for r in table.rows if r["channel"] == "DAPI"]
    assert row["max"] == dapi.max() and row["p99.8"] == pytest.approx(np.percentile(dapi, 99.8))


def test_compute_stats_float_and_cancel():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(3, 40, 50)).astype(np.float32)
    table = compute_stats(da.from_array(arr, chunks=(1, 20, 25)), percentiles=(5,))
    np.testing.assert_allclose([r["p5"] for r in table.rows], np.percentile(arr, 5, axis=(1, 2)), rtol=1e-6)
    with pytest.raises(Cancelled):
        compute_stats(arr, cancel=lambda: True)


def test_normalize_round_trip_real(isl_stack, isl_array):
    table = compute_stats(isl_stack, include_targets=False)
    mins, maxs = table.limits("PHASE_CONTRAST")
    norm = normalize_minmax(isl_stack.data, mins, maxs)
    assert isinstance(norm, da.Array) and norm.dtype == np.float32
    back = denormalize(norm, mins, maxs, np.uint16).compute()
    assert back.dtype == np.uint16
    assert np.abs(back.astype(np.int32) - isl_array).max() <= 1
    n = norm[4].compute()
    assert n.min() == 0.0 and n.max() == 1.0


def test_normalize_percentile_real(isl_array):
    sub = isl_array[:, :256, :256]
    out, (lows, _highs) = normalize_percentile(sub, 1, 99.8, return_limits=True)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(lows, np.percentile(sub, 1, axis=(1, 2)))
    lazy = normalize_percentile(da.from_array(sub, chunks=(1, 128, 128)), 1, 99.8)
    np.testing.assert_allclose(lazy.compute(), out, atol=1e-6)
    glob = normalize_percentile(sub, 1, 99.8, per_plane=False)
    np.testing.assert_allclose(glob, normalize_minmax(sub, *np.percentile(sub, [1, 99.8])), atol=1e-6)


def test_minmax_rules():
    x = np.array([[[0, 5, 10]], [[7, 7, 7]]], np.uint16)
    out = normalize_minmax(x, [0, 7], [10, 7])
    np.testing.assert_allclose(out, [[[0, 0.5, 1]], [[0, 0, 0]]])  # constant plane -> 0
    assert normalize_minmax(x, 2, 8).max() == 1.0 and normalize_minmax(x, 2, 8, clip=False).max() > 1
    with pytest.raises(ValueError, match="one value per plane"):
        normalize_minmax(x, [0, 1, 2], [1, 2, 3])
    np.testing.assert_array_equal(denormalize(np.array([-1.0, 0.5, 2.0]), 0, 255, np.uint8), [0, 128, 255])


def test_stats_table_csv(tmp_path):
    example = StatsTable.read_csv(example_stats_path())
    mins, maxs = example.limits("C04", magnification="20x")
    assert mins.shape == (7,) and (maxs > mins).all()
    assert example.limits("nuclei", "40x")[0].shape == (1,)
    with pytest.raises(ValueError, match="magnification"):
        example.limits("C04")
    table = compute_stats(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), magnification="40x", channel="C04")
    again = StatsTable.read_csv(table.to_csv(tmp_path / "stats.csv"))
    assert again.rows == table.rows
    assert again.columns == ["magnification", "channel", "plane", "min", "max", "p1", "p99.8"]
