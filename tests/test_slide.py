"""open_slide on every real file in ../shared/data/wsi, plus OME-TIFF, RGBA and broken files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from napari_pathfm.errors import SlideError
from napari_pathfm.io import open_slide
from napari_pathfm.io._levels import composite_rgba


def test_cmu_small_region_metadata_and_pyramid(cmu_small):
    with open_slide(cmu_small) as s:
        assert s.backend == "openslide"
        assert s.vendor == "aperio"
        assert s.mpp == pytest.approx(0.499)
        assert s.objective_power == 20
        assert s.shape == (2967, 2220)
        assert set(s.associated_image_names) == {"label", "macro", "thumbnail"}
        label = s.associated_image("label")
        assert label.dtype == np.uint8 and label.ndim == 3 and label.shape[2] == 3
        level0 = s.pyramid[0]
        assert level0.shape == (2967, 2220, 3) and level0.dtype == np.uint8
        assert level0.chunksize == (240, 240, 3), "chunks follow the native 240 px tiles"
        assert max(s.pyramid[-1].shape[:2]) <= 2048, "an overview level exists for napari"
        region = s.read(0, 1000, 700, 300, 400)
        assert region.shape == (300, 400, 3)
        np.testing.assert_array_equal(level0[1000:1300, 700:1100].compute(), region)
        assert 50 < region.mean() < 230, "real H&E content, not a blank or black region"


def test_overview_level_is_the_average_of_level0(cmu_small):
    with open_slide(cmu_small) as s:
        lvl0 = s.pyramid[0][:480, :480].compute().astype(np.float32)
        expected = lvl0.reshape(240, 2, 240, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        np.testing.assert_array_equal(s.pyramid[1][:240, :240].compute(), expected)


def test_read_outside_image_is_background_not_black(cmu_small):
    with open_slide(cmu_small) as s:
        h, w = s.shape
        region = s.read(0, h - 10, w - 10, 40, 40)
        assert (region[20:, 20:] == 255).all()
        assert s.background == (255, 255, 255)
        with pytest.raises(SlideError, match="has no level 3"):
            s.read(3, 0, 0, 10, 10)


def test_pyramidal_generic_tiff(wsi_dir):
    with open_slide(wsi_dir / "boxes.tiff") as s:
        assert s.level_count == 4
        assert s.level_shapes[0] == (250, 300)
        assert [round(d) for d in s.level_downsamples] == [1, 2, 4, 8]
        assert s.mpp is None, "a 72 dpi resolution tag is not a microscope pixel size"
        assert "pathfm.ignored-mpp" in s.properties
        assert s.best_level_for_downsample(4.5) == 2
        assert s.pyramid[3].shape == (31, 37, 3)


@pytest.mark.parametrize("name", ["small.svs", "boxes_0.dcm", "boxes_1.dcm"])
def test_small_fixtures_open(wsi_dir, name):
    with open_slide(wsi_dir / name) as s:
        assert s.shape == (16, 16)
        assert s.mpp == pytest.approx(0.499)
        assert s.pyramid[0].compute().shape == (16, 16, 3)


def test_dicom_pair_is_one_slide(wsi_dir):
    with open_slide(wsi_dir / "boxes_0.dcm") as a, open_slide(wsi_dir / "boxes_1.dcm") as b:
        assert a.vendor == b.vendor == "dicom"
        np.testing.assert_array_equal(a.pyramid[0].compute(), b.pyramid[0].compute())


@pytest.mark.parametrize("name, problem", [("unreadable.svs", "could not be decoded"), ("unopenable.tiff", "52479")])
def test_unreadable_files_raise_naming_the_file(wsi_dir, name, problem):
    with pytest.raises(SlideError) as err:
        open_slide(wsi_dir / name)
    assert name in str(err.value)
    assert problem in str(err.value)
    assert "supported format" in str(err.value), "the message says what to do"


def test_truncated_copy_raises(cmu_small, tmp_path):
    broken = tmp_path / "truncated.svs"
    broken.write_bytes(cmu_small.read_bytes()[:1_000_000])
    with pytest.raises(SlideError, match="truncated.svs"):
        open_slide(broken)


def test_corrupt_tile_raises_instead_of_zeros(cmu_small, tmp_path):
    """A slide whose header is fine but one tile is garbage fails when that tile is read."""
    broken = tmp_path / "one-bad-tile.svs"
    shutil.copy(cmu_small, broken)
    with tifffile.TiffFile(broken) as tif:
        page = tif.pages[0]
        tiles_across = -(-page.imagewidth // page.tilewidth)
        index = 5 * tiles_across + 4
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(broken, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff\xda\x00\x01" * ((count - 4) // 4))
    with open_slide(broken) as s:
        s.read(0, 0, 0, 240, 240)
        with pytest.raises(SlideError, match="one-bad-tile.svs: a tile could not be decoded"):
            s.pyramid[0][5 * 240 : 6 * 240, 4 * 240 : 5 * 240].compute()


def test_missing_and_folder_paths(tmp_path):
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="is a folder"):
        open_slide(tmp_path)
    junk = tmp_path / "notes.svs"
    junk.write_text("not a slide")
    with pytest.raises(SlideError, match="notes.svs"):
        open_slide(junk)


def test_ome_tiff_pyramid_through_tifffile(cmu_small, tmp_path):
    with open_slide(cmu_small) as s:
        rgb = s.read(0, 0, 0, 1024, 768)
    path = tmp_path / "region.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"axes": "YXS", "PhysicalSizeX": 0.499, "PhysicalSizeY": 0.499, "PhysicalSizeXUnit": "µm"}
        tw.write(rgb, tile=(256, 256), subifds=2, photometric="rgb", metadata=meta, compression="zlib")
        tw.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1, compression="zlib")
        tw.write(rgb[::4, ::4], tile=(256, 256), photometric="rgb", subfiletype=1, compression="zlib")
    with open_slide(path) as o:
        assert o.backend == "tifffile" and o.vendor == "ome-tiff"
        assert o.mpp == pytest.approx(0.499)
        assert o.level_shapes == [(1024, 768), (512, 384), (256, 192)]
        assert o.pyramid[0].chunksize[:2] == (256, 256)
        np.testing.assert_array_equal(o.pyramid[0].compute(), rgb)
        np.testing.assert_array_equal(o.read(1, 10, 20, 50, 60), rgb[::2, ::2][10:60, 20:80])


def test_rgba_tiff_is_composited_on_white(tmp_path):
    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:128, :, 3] = 255
    path = tmp_path / "rgba.ome.tif"
    tifffile.imwrite(path, rgba, tile=(128, 128), photometric="rgb", extrasamples=["unassalpha"], ome=True)
    with open_slide(path) as s:
        px = s.pyramid[0].compute()
    assert (px[:128] == [200, 0, 0]).all()
    assert (px[128:] == 255).all(), "transparent areas are the background colour, never black"


def test_composite_rgba_half_alpha():
    px = np.array([[[0, 0, 0, 128]]], np.uint8)
    assert composite_rgba(px, (255, 255, 255)).tolist() == [[[127, 127, 127]]]


def test_plain_png_opens_as_single_level_slide(shared_data):
    path = shared_data / "glas" / "train" / "images" / "train_1.png"
    with open_slide(path) as s:
        assert s.backend == "image" and s.mpp is None and s.level_count == 1
        assert s.pyramid[0].dtype == np.uint8 and s.pyramid[0].shape[2] == 3


def test_panning_reads_only_the_visible_tiles(cmu_small):
    with open_slide(cmu_small) as s:
        calls = []
        real = s._backend.read_region

        def counting(level, y, x, h, w):
            calls.append((level, y, x, h, w))
            return real(level, y, x, h, w)

        s._backend.read_region = counting
        s.pyramid[0][400:600, 400:600].compute()
        assert len(calls) == 4, "a 200 px view across a tile corner touches 4 of the 240 px tiles"
        assert all(h <= 240 and w <= 240 for (_, _, _, h, w) in calls)


def test_opening_a_large_slide_costs_little_memory(tmp_path):
    """Open a 40k x 40k px pyramidal TIFF and read a few tiles in a fresh process: RSS stays < 150 MB."""
    path = tmp_path / "large.tif"
    tile = np.full((512, 512, 3), 230, np.uint8)
    shape = (40960, 40960, 3)

    def tiles(n):
        for _ in range(n):
            yield tile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for factor in (1, 4, 16):
            n = shape[0] // factor
            tw.write(
                tiles((n // 512) ** 2),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(512, 512),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if factor == 1 else 1,
            )
    code = textwrap.dedent(
        f"""
        import resource, json
        from napari_pathfm.io import open_slide
        import openslide, tifffile, zarr, dask.array
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        s = open_slide({str(path)!r})
        levels = s.pyramid
        levels[0][20000:20512, 20000:20512].compute()
        levels[-1][:256, :256].compute()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"delta_mb": (after - before) / 1024, "shape": s.shape, "levels": s.level_count}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [40960, 40960] and result["levels"] == 3
    assert result["delta_mb"] < 150, result


def test_subifd_pyramid_is_read_through_tifffile(tmp_path):
    """OpenSlide sees one level when a TIFF keeps its pyramid in SubIFDs; tifffile sees all of them."""
    rgb = np.full((2048, 2048, 3), 200, np.uint8)
    rgb[:1024, :1024] = (120, 40, 160)
    path = tmp_path / "subifds.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", subifds=2)
        tw.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
        tw.write(rgb[::4, ::4], tile=(256, 256), photometric="rgb", subfiletype=1)
    with open_slide(path) as s:
        assert s.backend == "tifffile"
        assert s.level_shapes == [(2048, 2048), (1024, 1024), (512, 512)]
        np.testing.assert_array_equal(s.pyramid[2].compute(), rgb[::4, ::4])
