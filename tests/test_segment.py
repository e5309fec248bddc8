"""Whole-slide segmentation on real slides and GlaS images: geometry, blending, outputs, CLI, bad input.

Two models are used. ``ColourThreshold`` is a real (tiny) torch module whose answer is known per
pixel (class 1 where the RGB mean is below a threshold), so the blended, tiled, resampled class
map can be compared with the exact per-pixel answer: that proves placement, alignment, seam-free
blending across tile and band borders, and tissue-only tiling. A small random-init Path-SAM2
(``create_model("pathsam2", encoder="hiera_micro", ...)``) saved as a real checkpoint drives the
checkpoint, card and CLI paths.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from napari_pathfm.cli import app
from napari_pathfm.errors import Cancelled, CheckpointError, SlideError

torch = pytest.importorskip("torch")

runner = CliRunner()
THRESHOLD = 180.5  # RGB means of uint8 pixels are multiples of 1/3: never a tie


class ColourThreshold(torch.nn.Module):
    """Class 1 where the pixel's RGB mean is below THRESHOLD: logits (0, THRESHOLD - mean)."""

    num_classes = 2

    def __init__(self, input_size: int = 256):
        super().__init__()
        self.input_size = input_size
        self.gain = torch.nn.Parameter(torch.ones(()))

    def preprocess(self, tiles):
        return tiles.permute(0, 3, 1, 2).float()

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        return {"logits": torch.cat([torch.zeros_like(mean), (THRESHOLD - mean) * self.gain], 1)}


def per_pixel_answer(rgb: np.ndarray) -> np.ndarray:
    return (rgb.astype(np.float64).mean(-1) < THRESHOLD).astype(np.uint8)


def covered_by_tiles(grid) -> np.ndarray:
    """Level-0 pixels inside some tile of a level-0 (scale 1) grid."""
    cov = np.zeros(grid.level0_shape, bool)
    for y, x in grid.output_coords:
        cov[y : y + grid.tile_size, x : x + grid.tile_size] = True
    return cov


@pytest.fixture(scope="module")
def cmu_rgb(cmu_small):
    from napari_pathfm.io import open_slide

    with open_slide(cmu_small) as s:
        return s.read(0, 0, 0, *s.shape)


@pytest.fixture(scope="module")
def glas_image(shared_data) -> Path:
    path = shared_data / "glas" / "train" / "images" / "train_1.png"
    if not path.is_file():
        pytest.skip(f"GlaS image not found at {path}")
    return path


@pytest.fixture(scope="module")
def pathsam2_checkpoint(tmp_path_factory) -> Path:
    """A small random-init Path-SAM2 saved as a real segmentation checkpoint (card with classes)."""
    from napari_pathfm.models import save_checkpoint
    from napari_pathfm.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(
        "pathsam2",
        num_classes=2,
        encoder="hiera_micro",
        uni=None,
        image_size=128,
        decoder_dim=32,
        decoder_heads=2,
        decoder_mlp_dim=64,
    )
    folder = tmp_path_factory.mktemp("segment-models")
    card = {"classes": ["background", "gland"], "input_mpp": 2.0, "tile_size": 128}
    return save_checkpoint(model, folder / "pathsam2-test", card)


def test_blended_class_map_is_the_per_pixel_answer_on_tissue_tiles(cmu_small, cmu_rgb):
    from napari_pathfm.pipelines.segment import segment_slide

    res = segment_slide(cmu_small, ColourThreshold(), device="cpu")
    grid = res.grid
    assert res.labels.shape == cmu_rgb.shape[:2] and res.labels.dtype == np.uint8
    assert res.mpp == pytest.approx(0.499) and grid.scale == 1.0 and grid.overlap == 64
    assert res.classes == ["background", "class 1"]
    assert 0 < len(grid) < grid.grid_shape[0] * grid.grid_shape[1], "glass-only tiles are skipped"
    assert np.all(grid.tissue_fraction > 0)
    cov = covered_by_tiles(grid)
    expected = np.where(cov, per_pixel_answer(cmu_rgb), 0)
    # Equal everywhere, tile borders included: blending reproduces what every tile agrees on,
    # tiles sit where they were read, and pixels outside tissue tiles are background.
    np.testing.assert_array_equal(res.labels, expected)
    assert res.tissue.tissue_fraction > 0.3 and not cov.all()
    kw = res.layer_kwargs()
    assert kw["scale"] == pytest.approx((0.499, 0.499)) and kw["translate"] == (0.0, 0.0)
    assert kw["metadata"]["classes"] == {0: "background", 1: "class 1"}


class RightBias(ColourThreshold):
    """ColourThreshold plus a ramp across each tile that favours class 1 towards its right edge: a
    model whose answer depends on which way the tile lies. The ramp is odd about the tile's middle,
    so averaged over the tile's flips it cancels and ColourThreshold's exact answer is left."""

    def forward(self, x):
        logits = super().forward(x)["logits"]
        ramp = torch.linspace(-60.0, 60.0, x.shape[-1])
        return {"logits": torch.cat([logits[:, :1], logits[:, 1:] + ramp], 1)}


def test_flips_average_each_tile_over_its_mirror_images(cmu_small, cmu_rgb, pathsam2_checkpoint, glas_image, tmp_path):
    """segment_slide(flips=True): every tile is run as it is and mirrored left-right, up-down and both,
    each output mirrored back before the four are averaged, so the ramp cancels exactly; by default
    the model card's ``flips`` decides; a flips run neither reads nor fills the embedding cache."""
    from napari_pathfm.pipelines.segment import segment_slide

    plain = segment_slide(cmu_small, RightBias(), device="cpu")
    flipped = segment_slide(cmu_small, RightBias(), device="cpu", flips=True)
    expected = np.where(covered_by_tiles(flipped.grid), per_pixel_answer(cmu_rgb), 0)
    np.testing.assert_array_equal(flipped.labels, expected)
    assert (plain.labels != expected).mean() > 0.01, "without flips the ramp shows"
    assert flipped.flips and flipped.summary()["flips"] and not plain.summary()["flips"]
    by_card = segment_slide(cmu_small, (RightBias(), {"flips": True}), device="cpu")
    np.testing.assert_array_equal(by_card.labels, flipped.labels)
    off = segment_slide(cmu_small, (RightBias(), {"flips": True}), device="cpu", flips=False)
    np.testing.assert_array_equal(off.labels, plain.labels)

    # Path-SAM2 has the cache protocol: with flips it runs through forward and the cache stays empty
    cache = tmp_path / "cache"
    res = runner.invoke(
        app,
        ["segment", str(glas_image), "-o", str(tmp_path / "m.ome.tif"), "-c", str(pathsam2_checkpoint)]
        + ["--image-mpp", "0.62", "--flips", "--no-objects"],
        env={"PATHFM_CACHE_DIR": str(cache)},
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["flips"] is True and summary["cache"]["tiles_encoded"] == 0, summary
    assert not cache.exists() or not any(cache.rglob("*")), "a flips run stores no embeddings"


@pytest.fixture(scope="module")
def coarse_result(cmu_small):
    """The colour model at 1 µm/px on a 0.499 µm/px slide: logits are upsampled ~2x to level 0."""
    from napari_pathfm.pipelines.segment import segment_slide

    return segment_slide(cmu_small, ColourThreshold(), mpp=1.0, device="cpu")


def test_upsampled_class_map_is_aligned_with_the_slide(coarse_result, cmu_rgb):
    from scipy import ndimage

    res = coarse_result
    grid = res.grid
    assert res.labels.shape == cmu_rgb.shape[:2]
    assert res.model_mpp == pytest.approx(1.0, rel=0.01) and grid.scale == pytest.approx(2.0, rel=0.01)
    truth = per_pixel_answer(cmu_rgb)
    side = int(np.ceil(grid.level0_size))
    tiled = np.zeros(truth.shape, bool)
    for y, x in grid.tiles:
        tiled[y : y + side, x : x + side] = True
    assert not res.labels[~tiled].any(), "outside tissue tiles is background"
    region = ndimage.binary_erosion(tiled, iterations=8)
    agreement = {
        (dy, dx): (np.roll(res.labels, (dy, dx), axis=(0, 1)) == truth)[region].mean()
        for dy in range(-3, 4)
        for dx in range(-3, 4)
    }
    assert max(agreement, key=agreement.get) == (0, 0), "no shift between mask and slide"
    assert agreement[(0, 0)] > 0.95  # the rest is texture finer than 1 µm/px
    assert agreement[(0, 0)] > max(agreement[(1, 0)], agreement[(-1, 0)], agreement[(0, 1)], agreement[(0, -1)])


def test_bands_and_disk_store_give_the_same_mask_as_in_memory(coarse_result, cmu_small, tmp_path, monkeypatch):
    import napari_pathfm.pipelines.segment as seg
    import napari_pathfm.pipelines.segment_outputs as seg_out
    from napari_pathfm.io.geojson import geojson_to_labels
    from napari_pathfm.io.ome_tiff import read_ome_tiff
    from napari_pathfm.tiles import canvas

    # Tiny budgets force ~8 blending bands, a temporary zarr level-0 store and GeoJSON traced
    # on the class map downsampled 4x.
    monkeypatch.setattr(canvas, "BAND_BYTES", 600 * 1109 * 3 * 4)
    monkeypatch.setattr(seg, "IN_MEMORY_PIXELS", 10_000)
    monkeypatch.setattr(seg_out, "GEOJSON_MAX_PIXELS", 1_000_000)
    out, geo = tmp_path / "mask.ome.tif", tmp_path / "mask.geojson"
    res = seg.segment_slide(cmu_small, ColourThreshold(), mpp=1.0, device="cpu", out=out, geojson=geo)
    assert not isinstance(res.labels, np.ndarray), "large class maps live in a temporary store"
    np.testing.assert_array_equal(np.asarray(res.labels[:]), coarse_result.labels)
    levels, mpp, _ = read_ome_tiff(out)
    assert mpp == pytest.approx(0.499)
    np.testing.assert_array_equal(levels[0], coarse_result.labels)
    quarter = levels[2]  # the pyramid's 2x2-mode level at 1/4, what the GeoJSON was traced on
    back = geojson_to_labels(geo, quarter.shape, {1: "class 1"}, downsample=4.0)
    np.testing.assert_array_equal(back, quarter)
    tmp_store = Path(res._tmp.name)
    assert tmp_store.parent == tmp_path
    res.close()
    assert not tmp_store.exists()


def test_pathsam2_checkpoint_on_glas_png_keeps_image_size_and_card_classes(pathsam2_checkpoint, glas_image):
    from PIL import Image

    from napari_pathfm.pipelines.segment import segment_slide

    h, w = np.asarray(Image.open(glas_image)).shape[:2]
    res = segment_slide(glas_image, pathsam2_checkpoint, device="cpu")
    assert res.labels.shape == (h, w) and res.labels.dtype == np.uint8
    assert res.classes == ["background", "gland"] and set(np.unique(res.labels)) <= {0, 1}
    assert res.mpp is None and res.grid.scale == 1.0
    assert any("no pixel size" in m for m in res.messages), res.messages
    res2 = segment_slide(glas_image, pathsam2_checkpoint, image_mpp=0.62, device="cpu")
    assert res2.labels.shape == (h, w) and res2.mpp == pytest.approx(0.62)
    assert res2.model_mpp == pytest.approx(2.0, rel=0.02) and not res2.messages


def test_cli_writes_ome_tiff_and_geojson_that_agree(pathsam2_checkpoint, cmu_small, tmp_path):
    from napari_pathfm.io.geojson import geojson_to_labels
    from napari_pathfm.io.ome_tiff import read_ome_tiff

    out, geo = tmp_path / "mask.ome.tif", tmp_path / "mask.geojson"
    result = runner.invoke(
        app,
        [
            "segment",
            str(cmu_small),
            "-c",
            str(pathsam2_checkpoint),
            "--out",
            str(out),
            "--geojson",
            str(geo),
            "--mpp",
            "4",
            "--device",
            "cpu",
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["classes"] == ["background", "gland"] and summary["tiles"] > 3
    levels, mpp, meta = read_ome_tiff(out)
    mask = np.asarray(levels[0])
    assert mask.shape == (2967, 2220) and mpp == pytest.approx(0.499)
    assert len(levels) >= 2, "pyramidal"
    assert meta["is_labels"] and meta["class_names"] == {0: "background", 1: "gland"}
    assert meta["model_mpp"] == pytest.approx(4.0, rel=0.02) and meta["tiles"] == summary["tiles"]
    assert mask.any(), "the random model marks something as gland"
    back = geojson_to_labels(geo, mask.shape, {1: "gland"})
    np.testing.assert_array_equal(back, mask)
    assert not list(tmp_path.glob(".*")), "no temporary files are left behind"


def test_default_checkpoint_is_found_or_the_error_says_how_to_get_one(
    pathsam2_checkpoint, cmu_small, tmp_path, monkeypatch
):
    import shutil

    import napari_pathfm.checkpoints as ck
    from napari_pathfm.pipelines.segment import default_segment_checkpoint

    monkeypatch.setattr(ck, "BUNDLED_MODELS", tmp_path / "bundled")
    monkeypatch.setenv("PATHFM_MODELS", str(tmp_path / "user"))
    out = tmp_path / "mask.ome.tif"
    result = runner.invoke(app, ["segment", str(cmu_small), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2
    assert "no segmentation model" in result.output and "--checkpoint" in result.output
    assert not out.exists()

    (tmp_path / "user").mkdir()
    for f in (pathsam2_checkpoint, pathsam2_checkpoint.with_suffix(".json")):
        shutil.copy(f, tmp_path / "user" / f.name)
    assert default_segment_checkpoint() == tmp_path / "user" / pathsam2_checkpoint.name
    result = runner.invoke(app, ["segment", str(cmu_small), "--out", str(out), "--mpp", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.is_file()


@pytest.mark.parametrize("stage", ["segmenting", "mask.geojson", "mask.ome.tif"])
def test_cancel_leaves_no_output_and_keeps_an_old_one(cmu_small, tmp_path, stage, monkeypatch):
    import napari_pathfm.pipelines.segment as seg
    import napari_pathfm.pipelines.segment_outputs as seg_out

    monkeypatch.setattr(seg, "IN_MEMORY_PIXELS", 10_000)  # the temporary store goes too
    monkeypatch.setattr(seg_out, "GEOJSON_MAX_PIXELS", 1_000_000)
    out, geo = tmp_path / "mask.ome.tif", tmp_path / "mask.geojson"
    out.write_bytes(b"old result")
    cancel = threading.Event()
    seen = []

    def progress(done, total, message=""):
        seen.append(message)
        if stage in message:
            cancel.set()

    with pytest.raises(Cancelled):
        seg.segment_slide(
            cmu_small, ColourThreshold(), mpp=2.0, device="cpu", out=out, geojson=geo, progress=progress, cancel=cancel
        )
    assert cancel.is_set(), seen
    assert out.read_bytes() == b"old result" and not geo.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.ome.tif"], "no temporary files either"


def test_no_tissue_writes_an_all_background_mask_and_says_so(tmp_path):
    from PIL import Image

    from napari_pathfm.io.ome_tiff import read_ome_tiff

    blank = tmp_path / "glass.png"  # bright glass with scanner noise (a perfectly flat image is refused)
    glass = np.random.default_rng(0).normal(243, 2, (300, 400, 3)).clip(0, 255).astype(np.uint8)
    Image.fromarray(glass).save(blank)
    out = tmp_path / "mask.ome.tif"
    result = runner.invoke(app, ["segment", str(blank), "-c", "unused", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2 and "unused" in result.output, "a missing checkpoint is named"

    from napari_pathfm.pipelines.segment import segment_slide

    res = segment_slide(blank, ColourThreshold(), device="cpu", out=out)
    assert res.empty and any("no tissue" in m for m in res.messages)
    levels, _, meta = read_ome_tiff(out)
    assert any("no tissue" in m for m in meta["messages"]), "the file says so too"
    assert levels[0].shape == (300, 400) and not np.asarray(levels[0]).any()


def test_images_smaller_than_a_tile_are_padded(wsi_dir, glas_image, pathsam2_checkpoint, tmp_path):
    from PIL import Image

    from napari_pathfm.pipelines.segment import segment_slide

    res = segment_slide(wsi_dir / "small.svs", ColourThreshold(), tissue_only=False, device="cpu")
    assert res.labels.shape == (16, 16) and res.n_tiles == 1
    crop = tmp_path / "crop.png"
    rgb = np.asarray(Image.open(glas_image).convert("RGB"))[:100, :90]
    Image.fromarray(rgb).save(crop)
    res = segment_slide(crop, pathsam2_checkpoint, tissue_only=False, device="cpu")
    assert res.labels.shape == (100, 90) and res.n_tiles == 1
    res = segment_slide(crop, ColourThreshold(), tissue_only=False, device="cpu")
    np.testing.assert_array_equal(res.labels, per_pixel_answer(rgb))


def test_unreadable_slides_name_the_file_and_write_nothing(wsi_dir, cmu_small, tmp_path):
    from napari_pathfm.pipelines.segment import segment_slide

    out = tmp_path / "mask.ome.tif"
    for name in ("unreadable.svs", "unopenable.tiff", "missing.svs"):
        with pytest.raises(SlideError, match=name):
            segment_slide(wsi_dir / name, ColourThreshold(), device="cpu", out=out)
    # A slide that opens but whose tiles are damaged half-way (a copy with zeroed bytes).
    data = bytearray(cmu_small.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 200_000] = bytes(200_000)
    broken = tmp_path / "broken.svs"
    broken.write_bytes(bytes(data))
    with pytest.raises(SlideError, match="broken.svs"):
        segment_slide(broken, ColourThreshold(), tissue_only=False, device="cpu", out=out)
    result = runner.invoke(app, ["segment", str(wsi_dir / "unreadable.svs"), "-c", "x", "--out", str(out)])
    assert result.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.svs"]


def test_checkpoints_that_do_not_fit_are_refused(pathsam2_checkpoint, cmu_small, tmp_path):
    from napari_pathfm.checkpoints import BUNDLED_MODELS
    from napari_pathfm.models import load_checkpoint, save_checkpoint
    from napari_pathfm.pipelines.segment import segment_slide

    model, card = load_checkpoint(pathsam2_checkpoint)
    wrong = save_checkpoint(model, tmp_path / "three", {**card, "classes": ["background", "gland", "lumen"]})
    out = tmp_path / "mask.ome.tif"
    result = runner.invoke(app, ["segment", str(cmu_small), "-c", str(wrong), "--out", str(out)])
    assert result.exit_code == 2
    assert "3 classes" in result.output and "predicts 2" in result.output and "three" in result.output
    with pytest.raises(CheckpointError, match="not a segmentation model"):
        segment_slide(cmu_small, BUNDLED_MODELS / "s4mil-glas-glands-demo.safetensors", out=out)
    model = ColourThreshold()
    model.num_classes = None  # a module that does not say: its output is checked against the card
    with pytest.raises(CheckpointError, match="expected 3 classes"):
        segment_slide(cmu_small, (model, {"classes": ["a", "b", "c"]}), device="cpu", out=out)
    with pytest.raises(Exception, match=r"\.ome\.tif"):
        segment_slide(cmu_small, ColourThreshold(), out=tmp_path / "mask.png")
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CI has none)")
def test_cuda_gives_the_cpu_mask():
    """The GPU path (blending and resampling in torch on the device, bf16 autocast) on the
    bundled sample slide: the exact colour model gives the CPU mask, Path-SAM2 nearly so."""
    from napari_pathfm._sample_data import sample_slide_path
    from napari_pathfm.models.registry import create_model
    from napari_pathfm.pipelines.segment import segment_slide

    slide = sample_slide_path()
    for mpp in (None, 1.0):
        cpu = segment_slide(slide, ColourThreshold(), mpp=mpp, device="cpu")
        gpu = segment_slide(slide, ColourThreshold(), mpp=mpp, device="cuda")
        assert (cpu.labels != gpu.labels).mean() < 1e-5
    torch.manual_seed(0)
    model = create_model("pathsam2", num_classes=3, encoder="hiera_micro", uni=None, image_size=256)
    cpu = segment_slide(slide, model, mpp=1.0, device="cpu")
    gpu = segment_slide(slide, model, mpp=1.0, device="cuda")
    assert gpu.labels.shape == cpu.labels.shape and (cpu.labels == gpu.labels).mean() > 0.97
