"""Writers for slide-level results: atomic writes, OME-TIFF, OME-Zarr and GeoJSON round trips."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_pathfm.errors import Cancelled, PathFMError
from napari_pathfm.io.atomic import atomic_path, split_suffix
from napari_pathfm.io.geojson import geojson_to_labels, labels_to_geojson, write_geojson
from napari_pathfm.io.ome_tiff import downsample2, pyramid_shapes, read_ome_tiff, write_ome_tiff
from napari_pathfm.io.ome_zarr import read_ome_zarr, write_ome_zarr

da = pytest.importorskip("dask.array")
tifffile = pytest.importorskip("tifffile")


def _blocks_labels(shape, n_classes=4, seed=0):
    """Piecewise-constant labels (regions of random classes) like a real class map."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, n_classes, (shape[0] // 37 + 1, shape[1] // 37 + 1)).astype(np.uint8)
    return np.repeat(np.repeat(coarse, 37, 0), 37, 1)[: shape[0], : shape[1]].copy()


def _glas_masks(shared_data: Path, step: int = 5):
    from PIL import Image

    files = sorted((shared_data / "glas" / "train" / "masks").glob("*.png"))[::step]
    assert files, "no GlaS masks found"
    for f in files:
        m = np.asarray(Image.open(f))
        yield f.name, (m[..., 0] if m.ndim == 3 else m)


# --------------------------------------------------------------------------- atomic


def test_split_suffix():
    assert split_suffix("a.mask.ome.tif") == ("a.mask", ".ome.tif")
    assert split_suffix("x.ome.zarr") == ("x", ".ome.zarr")
    assert split_suffix("g.geojson") == ("g", ".geojson")
    assert split_suffix("noext") == ("noext", "")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, Cancelled])
def test_atomic_failure_keeps_existing_file(tmp_path, exc):
    final = tmp_path / "result.ome.tif"
    final.write_bytes(b"old")
    with pytest.raises(exc), atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".ome.tif")
        tmp.write_bytes(b"half")
        raise exc("boom")
    assert final.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.ome.tif"]


def test_atomic_success_replaces_file_and_directory(tmp_path):
    final = tmp_path / "sub" / "r.geojson"
    with atomic_path(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new"
    store = tmp_path / "s.ome.zarr"
    (store / "old").mkdir(parents=True)
    with atomic_path(store, directory=True) as tmp:
        (tmp / "new").mkdir(parents=True)
    assert [p.name for p in store.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ome.zarr", "sub"]


# --------------------------------------------------------------------------- OME-TIFF


def test_pyramid_shapes_and_downsample():
    assert pyramid_shapes((5000, 3000)) == [(5000, 3000), (2500, 1500), (1250, 750), (625, 375)]
    assert pyramid_shapes((900, 800)) == [(900, 800)]
    assert pyramid_shapes((901, 800), levels=3) == [(901, 800), (451, 400), (226, 200)]
    labels = np.array([[1, 1, 2], [0, 1, 2], [3, 3, 0]], np.uint8)
    np.testing.assert_array_equal(downsample2(labels, True), [[1, 2], [3, 0]])
    image = np.array([[0, 2], [4, 7]], np.uint8)
    assert downsample2(image, False).item() == 3  # 13 / 4 = 3.25 rounds to 3
    assert downsample2(image.astype(np.float32), False).item() == pytest.approx(3.25)


def test_ome_tiff_labels_round_trip(tmp_path):
    labels = _blocks_labels((3000, 2200))
    names = {0: "background", 1: "gland", 2: "stroma", 3: "necrosis"}
    calls = []
    out = write_ome_tiff(
        tmp_path / "mask.ome.tif",
        labels,
        mpp=0.504,
        is_labels=True,
        class_names=names,
        metadata={"model": "path-sam2", "slide": "CMU-1"},
        progress=lambda d, t, m="": calls.append((d, t)),
    )
    levels, mpp, meta = read_ome_tiff(out)
    assert [lvl.shape for lvl in levels] == [(3000, 2200), (1500, 1100), (750, 550)]
    assert levels[0].dtype == np.uint8
    np.testing.assert_array_equal(levels[0], labels)
    np.testing.assert_array_equal(levels[1], downsample2(labels, True))
    assert set(np.unique(levels[2])) <= set(names)
    assert mpp == pytest.approx(0.504)
    assert meta["class_names"] == names
    assert meta["is_labels"] is True and meta["axes"] == "YX"
    assert meta["model"] == "path-sam2" and meta["slide"] == "CMU-1"
    assert calls[-1][0] == calls[-1][1] and calls[-1][1] > 0
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome
        page = tif.pages[0]
        assert page.is_tiled and page.tilelength == 256
        assert len(page.subifds) == 2
        num, den = page.tags["XResolution"].value
        assert 1e4 * den / num == pytest.approx(0.504, rel=1e-5)
        assert 'PhysicalSizeXUnit="µm"' in tif.ome_metadata
    assert [p.name for p in tmp_path.iterdir()] == ["mask.ome.tif"]


def test_ome_tiff_float_heatmap_and_small(tmp_path):
    rng = np.random.default_rng(1)
    heat = rng.random((1300, 1100), dtype=np.float32)
    write_ome_tiff(tmp_path / "heat.ome.tif", heat, mpp=8.0, tile=(128, 256), levels=3)
    levels, mpp, meta = read_ome_tiff(tmp_path / "heat.ome.tif", lazy=True)
    assert [lvl.shape for lvl in levels] == [(1300, 1100), (650, 550), (325, 275)]
    assert levels[0].dtype == np.float32
    np.testing.assert_array_equal(levels[0].compute(), heat)
    expected = heat.reshape(650, 2, 550, 2).astype(np.float64).mean((1, 3)).astype(np.float32)
    np.testing.assert_allclose(levels[1].compute(), expected, rtol=1e-6)
    assert mpp == pytest.approx(8.0) and meta["is_labels"] is False
    tiny = np.arange(35, dtype=np.uint16).reshape(5, 7)
    write_ome_tiff(tmp_path / "tiny.ome.tif", tiny, axes="YX")
    levels, mpp, _ = read_ome_tiff(tmp_path / "tiny.ome.tif")
    assert len(levels) == 1 and mpp is None
    np.testing.assert_array_equal(levels[0], tiny)


def test_ome_tiff_rgb_real_image(tmp_path, shared_data):
    from PIL import Image

    rgb = np.asarray(Image.open(shared_data / "glas" / "train" / "images" / "train_1.png").convert("RGB"))
    big = np.tile(rgb, (3, 2, 1))  # > 1024 px so a pyramid level is made
    write_ome_tiff(tmp_path / "rgb.ome.tif", big, mpp=0.62, axes="YXC", compression="zlib")
    levels, _mpp, meta = read_ome_tiff(tmp_path / "rgb.ome.tif")
    assert meta["axes"] == "YXS" and levels[0].dtype == np.uint8
    np.testing.assert_array_equal(levels[0], big)
    assert levels[1].shape == ((big.shape[0] + 1) // 2, (big.shape[1] + 1) // 2, 3)
    with tifffile.TiffFile(tmp_path / "rgb.ome.tif") as tif:
        assert tif.is_ome and tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB


def test_ome_tiff_multichannel_names(tmp_path):
    data = np.random.default_rng(2).random((2, 300, 200)).astype(np.float32)
    write_ome_tiff(tmp_path / "c.ome.tif", data, axes="CYX", channel_names=["nuclei", "lipid"])
    levels, _, meta = read_ome_tiff(tmp_path / "c.ome.tif")
    np.testing.assert_array_equal(levels[0], data)
    assert meta["channel_names"] == ["nuclei", "lipid"] and meta["axes"] == "CYX"


def test_ome_tiff_dask_written_without_recomputing(tmp_path):
    counts: dict = {}
    lock = threading.Lock()

    def double(block, block_info=None):
        key = tuple(map(tuple, block_info[0]["array-location"]))
        with lock:
            counts[key] = counts.get(key, 0) + 1
        return block * 2

    base = da.arange(5000 * 3000, dtype=np.float32).reshape(5000, 3000).rechunk((1000, 1000))
    lazy = base.map_blocks(double, dtype=np.float32)
    write_ome_tiff(tmp_path / "big.ome.tif", lazy, mpp=1.0)
    assert len(counts) == 15 and max(counts.values()) == 1
    levels, _, _ = read_ome_tiff(tmp_path / "big.ome.tif", lazy=True)
    assert [lvl.shape for lvl in levels] == [(5000, 3000), (2500, 1500), (1250, 750), (625, 375)]
    window = (slice(3900, 4100), slice(2000, 2300))
    np.testing.assert_array_equal(levels[0][window].compute(), (base * 2)[window].compute())


def test_ome_tiff_large_levels_use_disk_buffers(tmp_path, monkeypatch):
    from napari_pathfm.io import ome_tiff

    labels = _blocks_labels((2600, 2100), seed=6)
    monkeypatch.setattr(ome_tiff, "_BAND_BYTES", 2**20)  # forces zarr scratch buffers and thin bands
    write_ome_tiff(
        tmp_path / "m.ome.tif",
        da.from_array(labels, chunks=(900, 2100)),
        is_labels=True,
        metadata={"score": np.float32(0.5)},
    )
    levels, _, meta = read_ome_tiff(tmp_path / "m.ome.tif")
    np.testing.assert_array_equal(levels[0], labels)
    expected = labels
    for level in levels[1:]:
        expected = downsample2(expected, True)
        np.testing.assert_array_equal(level, expected)
    assert meta["score"] == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["m.ome.tif"]


def test_ome_tiff_failure_and_cancel_leave_nothing(tmp_path):
    final = tmp_path / "mask.ome.tif"
    final.write_bytes(b"previous result")

    def fail_late(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 3:
            raise RuntimeError("disk full")
        return block

    zeros = da.zeros((4000, 1500), dtype=np.uint8, chunks=(1000, 1500))
    failing = zeros.map_blocks(fail_late, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="disk full"):
        write_ome_tiff(final, failing, is_labels=True)
    assert final.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.ome.tif"]

    seen = []
    cancel = lambda: len(seen) > 20
    with pytest.raises(Cancelled):
        write_ome_tiff(
            final, np.zeros((3000, 3000), np.uint8), cancel=cancel, progress=lambda d, t, m="": seen.append(d)
        )
    assert final.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["mask.ome.tif"]

    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        write_ome_tiff(tmp_path / "new.ome.tif", np.zeros((300, 300), np.uint8), cancel=event)
    assert [p.name for p in tmp_path.iterdir()] == ["mask.ome.tif"]


def test_ome_tiff_dtype_rules(tmp_path):
    write_ome_tiff(tmp_path / "b.ome.tif", np.eye(40, dtype=bool), is_labels=True)
    levels, _, _ = read_ome_tiff(tmp_path / "b.ome.tif")
    assert levels[0].dtype == np.uint8 and levels[0].sum() == 40
    with pytest.raises(PathFMError, match="do not fit"):
        write_ome_tiff(tmp_path / "i.ome.tif", np.full((20, 20), 2**40, np.int64), is_labels=True)
    with pytest.raises(ValueError, match="lossy"):
        write_ome_tiff(tmp_path / "j.ome.tif", np.zeros((20, 20), np.uint8), is_labels=True, compression="jpeg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.ome.tif"]


# --------------------------------------------------------------------------- OME-Zarr


def test_ome_zarr_labels_round_trip(tmp_path):
    labels = _blocks_labels((2500, 1800), n_classes=3, seed=3)
    store = tmp_path / "mask.ome.zarr"
    write_ome_zarr(
        store,
        da.from_array(labels, chunks=700),
        mpp=0.25,
        is_labels=True,
        class_names=["bg", "gland", "stroma"],
        chunks=256,
        metadata={"run": 7},
    )
    levels, mpp, meta = read_ome_zarr(store)
    assert [lvl.shape for lvl in levels] == [(2500, 1800), (1250, 900), (625, 450)]
    np.testing.assert_array_equal(levels[0].compute(), labels)
    np.testing.assert_array_equal(levels[1].compute(), downsample2(labels, True))
    assert mpp == pytest.approx(0.25)
    assert meta["class_names"] == {0: "bg", 1: "gland", 2: "stroma"} and meta["run"] == 7
    attrs = json.loads((store / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert ms["axes"][0]["unit"] == "micrometer"
    assert ms["datasets"][1]["coordinateTransformations"][0] == {"type": "scale", "scale": [0.5, 0.5]}
    assert {p["class"] for p in attrs["image-label"]["properties"]} == {"gland", "stroma"}
    assert json.loads((store / "0" / ".zarray").read_text())["dimension_separator"] == "/"


def test_ome_zarr_rgb_replace_and_cancel(tmp_path):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (600, 500, 3), dtype=np.uint8)
    store = tmp_path / "rgb.ome.zarr"
    write_ome_zarr(store, rgb, mpp=0.5, axes="YXC", levels=2, chunks=128)
    levels, mpp, meta = read_ome_zarr(store)
    assert meta["axes"] == "CYX" and levels[0].shape == (3, 600, 500) and levels[1].shape == (3, 300, 250)
    np.testing.assert_array_equal(np.moveaxis(levels[0].compute(), 0, -1), rgb)
    with pytest.raises(Cancelled):
        write_ome_zarr(store, np.zeros((600, 500), np.uint8), levels=2, chunks=128, cancel=lambda: True)
    levels, _, _ = read_ome_zarr(store)
    assert levels[0].shape == (3, 600, 500)
    assert [p.name for p in tmp_path.iterdir()] == ["rgb.ome.zarr"]
    write_ome_zarr(store, np.ones((64, 64), np.uint16), levels=1, chunks=32)
    levels, mpp, _ = read_ome_zarr(store)
    assert levels[0].shape == (64, 64) and mpp is None


# --------------------------------------------------------------------------- GeoJSON


def _signed_area(ring):
    xy = np.asarray(ring, float)
    x, y = xy[:-1, 0], xy[:-1, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _polygons(feature):
    geom = feature["geometry"]
    return [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]


def _check_schema(fc):
    assert fc["type"] == "FeatureCollection"
    for feat in fc["features"]:
        assert feat["type"] == "Feature"
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert isinstance(props["classification"]["name"], str)
        assert len(props["classification"]["color"]) == 3 and isinstance(props["label"], int)
        for poly in _polygons(feat):
            for i, ring in enumerate(poly):
                assert ring[0] == ring[-1] and len(ring) >= 5
                assert len({tuple(p) for p in ring[:-1]}) == len(ring) - 1, "ring is not simple"
                area = _signed_area(ring)
                assert area > 0 if i == 0 else area < 0, "exterior CCW (positive), holes negative"
    json.dumps(fc)


def test_geojson_round_trip_glas_masks(shared_data):
    for name, mask in _glas_masks(shared_data):
        labels = (mask > 0).astype(np.uint8)
        fc = labels_to_geojson(labels, ["background", "gland"])
        _check_schema(fc)
        assert {f["properties"]["classification"]["name"] for f in fc["features"]} == {"gland"}
        back = geojson_to_labels(fc, labels.shape, ["background", "gland"])
        np.testing.assert_array_equal(back, labels, err_msg=name)


def test_geojson_glas_downsample_offset_and_path(tmp_path, shared_data):
    _, mask = next(_glas_masks(shared_data, step=40))
    labels = (mask > 0).astype(np.uint8)
    out = write_geojson(
        tmp_path / "glands.geojson", labels, {1: "Tumor"}, downsample=4.0, offset=(1000, 2000), colors={1: (200, 0, 0)}
    )
    assert [p.name for p in tmp_path.iterdir()] == ["glands.geojson"]
    fc = json.loads(out.read_text())
    xs = [p[0] for f in fc["features"] for poly in _polygons(f) for r in poly for p in r]
    ys = [p[1] for f in fc["features"] for poly in _polygons(f) for r in poly for p in r]
    assert min(xs) >= 2000 and max(xs) <= 2000 + 4 * labels.shape[1]
    assert min(ys) >= 1000 and max(ys) <= 1000 + 4 * labels.shape[0]
    assert all(isinstance(v, int) for v in xs[:50])
    assert fc["features"][0]["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    back = geojson_to_labels(out, labels.shape, {1: "Tumor"}, downsample=4.0, offset=(1000, 2000))
    np.testing.assert_array_equal(back, labels)
    for f in fc["features"]:  # QuPath exports carry no "label": map by class name
        del f["properties"]["label"]
    by_name = geojson_to_labels(fc, labels.shape, {0: "bg", 1: "Tumor"}, downsample=4.0, offset=(1000, 2000))
    np.testing.assert_array_equal(by_name, labels)
    with pytest.raises(PathFMError, match="Tumor"):
        geojson_to_labels(fc, labels.shape, {1: "Stroma"}, downsample=4.0, offset=(1000, 2000))


def _three_class_synthetic():
    lab = np.zeros((60, 70), np.uint8)
    lab[5:40, 5:40] = 1
    lab[12:20, 12:20] = 0  # hole
    lab[25:32, 25:32] = 2  # class-2 island inside class 1 (hole of class 1)
    lab[27:30, 27:30] = 0  # hole inside the island
    lab[5:40, 40:55] = 3  # touches class 1 along an edge
    lab[45:50, 10:15] = 1
    lab[50:55, 15:20] = 1  # touches the block above only at a corner
    lab[44, 4] = lab[43, 3] = 2  # diagonal pair
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[2:7, 2:7] = False
    ring[1, 1] = False  # the C's tips touch at a corner: a pinched hole
    lab[48:57, 55:64][ring] = 3
    lab[5:10, 60:65] = 2
    lab[6, 61] = lab[8, 63] = 0  # holes touching each other diagonally: (7,62) pinches
    lab[7, 62] = 0
    return lab


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("downsample,offset", [(1.0, (0, 0)), (2.5, (100, 37)), (16, (4096, 8192))])
def test_geojson_three_classes_holes_touching(connectivity, downsample, offset):
    lab = _three_class_synthetic()
    names = ["background", "epithelium", "lumen", "stroma"]
    fc = labels_to_geojson(lab, names, downsample=downsample, offset=offset, connectivity=connectivity)
    _check_schema(fc)
    back = geojson_to_labels(fc, lab.shape, names, downsample=downsample, offset=offset)
    np.testing.assert_array_equal(back, lab)
    epi = [f for f in fc["features"] if f["properties"]["label"] == 1]
    holes = sum(len(poly) - 1 for f in epi for poly in _polygons(f))
    assert holes == 2
    kinds = {f["geometry"]["type"] for f in epi}
    assert kinds == ({"Polygon"} if connectivity == 1 else {"Polygon", "MultiPolygon"})


def test_geojson_random_fuzz_exact():
    rng = np.random.default_rng(5)
    for _ in range(150):
        lab = rng.integers(0, 4, (int(rng.integers(1, 25)), int(rng.integers(1, 25)))).astype(np.uint8)
        lab[rng.random(lab.shape) < 0.3] = 0
        fc = labels_to_geojson(lab, connectivity=int(rng.integers(1, 3)))
        _check_schema(fc)
        np.testing.assert_array_equal(geojson_to_labels(fc, lab.shape), lab)


def test_geojson_min_area_and_simplify():
    lab = np.zeros((80, 80), np.uint8)
    lab[2:4, 2:4] = 1
    yy, xx = np.mgrid[:80, :80]
    lab[(yy - 45) ** 2 + (xx - 45) ** 2 < 30**2] = 1
    fc = labels_to_geojson(lab, min_area_px=10)
    assert len(fc["features"]) == 1
    exact = len(fc["features"][0]["geometry"]["coordinates"][0])
    simple = labels_to_geojson(lab, min_area_px=10, simplify_tolerance=1.0)
    ring = simple["features"][0]["geometry"]["coordinates"][0]
    assert 4 < len(ring) < exact / 2 and ring[0] == ring[-1] and _signed_area(ring) > 0
    back = geojson_to_labels(simple, lab.shape)
    assert np.mean(back != (lab * (np.arange(80)[:, None] > 10))) < 0.02
    assert labels_to_geojson(np.zeros((5, 5), np.uint8)) == {"type": "FeatureCollection", "features": []}


def test_geojson_accepts_feature_list_and_ignores_points():
    features = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [4, 1], [4, 3], [1, 3], [1, 1]]]},
            "properties": {"classification": {"name": "Tumor"}},
        },
    ]
    out = geojson_to_labels(features, (5, 6))
    expected = np.zeros((5, 6), np.uint8)
    expected[1:3, 1:4] = 1
    np.testing.assert_array_equal(out, expected)
