"""Tiled z-stack translation (HASTE inference), its CLI, and translation evaluation on the real ISL well."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _translate_helpers import TINY, isl_card, one_thread, train_tiny_lupi

from napari_pathfm.errors import Cancelled, ZStackError
from napari_pathfm.io.normalize import denormalize, normalize_minmax

ROWS, COLS = slice(640, 800), slice(300, 524)  # a 160 x 224 crop with nuclei, not a multiple of the tile


one_torch_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def isl(shared_data):
    from napari_pathfm.io.zstack import open_zstack

    d = shared_data / "isl-blue-sample"
    if not d.is_dir():
        pytest.skip(f"ISL sample not found in {shared_data}")
    return open_zstack(d)


@pytest.fixture(scope="module")
def isl_planes(isl) -> np.ndarray:
    """All 13 planes decoded once (the lazy stack decodes every PNG per read)."""
    return np.asarray(isl.data)


@pytest.fixture(scope="module")
def planes(isl_planes) -> np.ndarray:
    return isl_planes[:, ROWS, COLS]


@pytest.fixture(scope="module")
def isl_dapi(isl) -> np.ndarray:
    return np.asarray(isl.targets["DAPI"])


@pytest.fixture(scope="module")
def norm_card(isl_planes, isl_dapi) -> dict:
    return isl_card(isl_planes, isl_dapi)


@pytest.fixture(scope="module")
def lupi_checkpoint(isl_planes, isl_dapi, norm_card, tmp_path_factory):
    """The tiny LUPI net after 12 Adam steps on 64 px crops of the ISL training rows, saved with its card."""
    return train_tiny_lupi(isl_planes, isl_dapi, norm_card, tmp_path_factory.mktemp("models") / "tiny-lupi-dapi")


def _bare(checkpoint, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """The model on the whole field in one forward pass: (DAPI uint16, confidence, card)."""
    from napari_pathfm.models import load_checkpoint

    model, card = load_checkpoint(checkpoint)
    n = card["normalization"]
    x = torch.from_numpy(normalize_minmax(planes, n["input_min"], n["input_max"])[None])
    with torch.inference_mode():
        out = model(x)
    img = denormalize(out.image[0, 0].numpy(), n["target_min"][0], n["target_max"][0], np.uint16)
    return img, torch.sigmoid(out.mask_logits[0, 0]).numpy(), card


def test_one_tile_equals_the_bare_model_and_tiles_agree_with_it(lupi_checkpoint, planes):
    from napari_pathfm.pipelines.translate import translate_stack

    bare, conf, _ = _bare(lupi_checkpoint, planes)
    whole = translate_stack(planes, lupi_checkpoint, tile=224, stride=224, device="cpu")
    assert whole.n_tiles == 1
    assert np.abs(whole.channels["DAPI"].astype(int) - bare).max() <= 1  # same numbers, rounding aside
    np.testing.assert_allclose(whole.confidence, conf, atol=1e-5)

    seen = []
    tiled = translate_stack(
        planes,
        lupi_checkpoint,
        tile=64,
        stride=32,
        batch_size=3,
        device="cpu",
        progress=lambda d, t, m: seen.append((d, t)),
    )
    assert tiled.n_tiles == 4 * 6 and seen[-1] == (24, 24)
    dapi = tiled.channels["DAPI"]
    assert dapi.dtype == np.uint16 and dapi.shape == planes.shape[1:]
    # away from the field's border every pixel is a blend of tiles the model saw with enough context
    inner = (slice(32, -32), slice(32, -32))
    diff = np.abs(dapi[inner].astype(float) - bare[inner])
    span = float(bare.max() - bare.min())
    assert np.median(diff) < 0.02 * span, (np.median(diff), span)
    assert np.corrcoef(dapi[inner].ravel(), bare[inner].ravel())[0, 1] > 0.95
    assert np.abs(tiled.confidence[inner] - conf[inner]).mean() < 0.05


def test_flips_average_the_model_over_the_four_flips_of_each_tile(lupi_checkpoint, isl_planes):
    """translate_stack(flips=True): each tile predicted as it is, mirrored left-right, up-down and both,
    each prediction mirrored back, the four averaged (channels and nuclei confidence)."""
    from napari_pathfm.pipelines.translate import translate_stack

    square = isl_planes[:, 600:824, 300:524]  # one 224 px tile, no padding: its flips are the field's flips
    plain = translate_stack(square, lupi_checkpoint, tile=224, stride=224, device="cpu")
    flipped = translate_stack(square, lupi_checkpoint, tile=224, stride=224, device="cpu", flips=True)
    images, confs = [], []
    for axes in ((), (1,), (0,), (0, 1)):
        img, conf, _ = _bare(lupi_checkpoint, np.ascontiguousarray(np.flip(square, [a + 1 for a in axes])))
        images.append(np.flip(img.astype(float), axes) if axes else img.astype(float))
        confs.append(np.flip(conf, axes) if axes else conf)
    assert np.abs(flipped.channels["DAPI"].astype(float) - np.mean(images, 0)).max() <= 1.0  # rounding aside
    np.testing.assert_allclose(flipped.confidence, np.mean(confs, 0), atol=1e-5)
    assert np.abs(flipped.confidence - plain.confidence).max() > 1e-3, "the flips changed the prediction"
    # by default a checkpoint runs as its card says (`flips`), and the option overrides the card
    from napari_pathfm.models import load_checkpoint

    model, card = load_checkpoint(lupi_checkpoint)
    by_card = translate_stack(square, (model, {**card, "flips": True}), tile=224, stride=224, device="cpu")
    np.testing.assert_array_equal(by_card.confidence, flipped.confidence)
    off = translate_stack(square, (model, {**card, "flips": True}), tile=224, stride=224, device="cpu", flips=False)
    np.testing.assert_array_equal(off.confidence, plain.confidence)


def test_flips_of_a_plain_output_model():
    """A model that returns one tensor (the plain U-Net, the GAN generator): the same average."""
    from napari_pathfm.pipelines.translate_tiles import Forward

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1).eval()
    batch = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    x = torch.from_numpy(batch)
    with torch.no_grad():
        want = sum(conv(x.flip(d)).flip(d) if d else conv(x) for d in ((), (-1,), (-2,), (-2, -1))) / 4
    got = Forward(conv, "cpu", flips=True)(batch)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    assert not np.allclose(got, Forward(conv, "cpu")(batch), atol=1e-4)


def test_constant_model_gives_a_seamless_constant_field(norm_card):
    from napari_pathfm.models import create_model
    from napari_pathfm.pipelines.translate import translate_stack

    model = create_model("lupi_unet", **TINY).eval()
    with torch.no_grad():
        for head, bias in ((model.reg_head, 0.3), (model.seg_head, 1.2)):
            head.weight.zero_()
            head.bias.fill_(bias)
    rng = np.random.default_rng(0)
    stack = rng.integers(100, 3000, (13, 150, 205)).astype(np.uint16)
    res = translate_stack(stack, (model, norm_card), tile=64, stride=24, device="cpu")
    n = norm_card["normalization"]
    expected = denormalize(np.array([(np.tanh(0.3) + 1) / 2]), n["target_min"][0], n["target_max"][0], np.uint16)
    assert np.unique(res.channels["DAPI"]).tolist() == expected.tolist()
    np.testing.assert_allclose(res.confidence, 1 / (1 + np.exp(-1.2)), rtol=1e-5)
    assert res.confidence.dtype == np.float32
    # everything above the threshold: one nucleus covering the field
    assert res.nuclei_labels.dtype == np.int32 and res.nuclei_labels.max() >= 1 and (res.nuclei_labels > 0).all()
    assert res.nuclei_mask(0.9).max() == 0  # a threshold above the confidence keeps nothing


def test_outputs_range_threshold_and_zarr_store(lupi_checkpoint, planes, tmp_path, monkeypatch):
    import napari_pathfm.pipelines.translate as tr

    res = tr.translate_stack(planes, lupi_checkpoint, tile=64, stride=32, device="cpu")
    n = json.loads(Path(lupi_checkpoint).with_suffix(".json").read_text())["normalization"]
    dapi = res.channels["DAPI"]
    assert n["target_min"][0] <= dapi.min() and dapi.max() <= n["target_max"][0]
    assert 0 <= res.confidence.min() and res.confidence.max() <= 1
    assert res.roles == {"DAPI": "nuclei"}
    low, high = res.nuclei_mask(0.2), res.nuclei_mask(0.8)
    assert (high > 0).sum() <= (low > 0).sum()

    # a zarr store (atomic directory) and, for canvases above IN_MEMORY_PIXELS, a temporary one
    coarse = tr.translate_stack(planes, lupi_checkpoint, tile=64, stride=64, device="cpu", nuclei_mask=False)
    stored = tr.translate_stack(planes, lupi_checkpoint, tile=64, stride=64, device="cpu", store=tmp_path / "r.zarr")
    assert type(stored.channels["DAPI"]).__module__.startswith("zarr")
    np.testing.assert_array_equal(np.asarray(stored.channels["DAPI"]), coarse.channels["DAPI"])
    np.testing.assert_allclose(np.asarray(stored.confidence), coarse.confidence, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["r.zarr"]
    monkeypatch.setattr(tr, "IN_MEMORY_PIXELS", 100)
    big = tr.translate_stack(planes, lupi_checkpoint, tile=64, stride=64, device="cpu", nuclei_mask=False)
    np.testing.assert_array_equal(np.asarray(big.channels["DAPI"]), coarse.channels["DAPI"])
    assert big._tmp is not None and Path(big._tmp.name).is_dir()


def test_bad_input_errors_name_the_stack_and_checkpoint(lupi_checkpoint, planes, isl):
    from napari_pathfm.pipelines.translate import translate_stack

    with pytest.raises(ZStackError, match=r"has 7 planes but checkpoint .*tiny-lupi-dapi.* takes 13"):
        translate_stack(planes[:7], lupi_checkpoint, tile=64, device="cpu")
    with pytest.raises(ZStackError, match=r"8-bit .*16-bit"):
        translate_stack((planes // 256).astype(np.uint8), lupi_checkpoint, tile=64, device="cpu")
    flat = planes.copy()
    flat[3] = 500
    with pytest.raises(ZStackError, match="plane z3 is constant"):
        translate_stack(flat, lupi_checkpoint, tile=64, device="cpu")
    nan = planes.astype(np.float32)
    nan[5, 10, 10] = np.nan
    with pytest.raises(ZStackError, match="plane z5 holds NaN"):
        translate_stack(nan, lupi_checkpoint, tile=64, device="cpu")
    sub = type(isl)(
        path=isl.path, data=isl.data[:5, :64, :64], plane_names=isl.plane_names[:5], plane_files=isl.plane_files[:5]
    )
    with pytest.raises(ZStackError, match="isl-blue-sample: has 5 planes"):
        translate_stack(sub, lupi_checkpoint, tile=64, device="cpu")


def test_cancel_leaves_no_files(lupi_checkpoint, planes, tmp_path):
    from napari_pathfm.pipelines.translate import translate_stack, write_translation

    stop = threading.Event()

    def progress(done, total, message=""):
        if done >= 2:
            stop.set()

    with pytest.raises(Cancelled):
        translate_stack(
            planes,
            lupi_checkpoint,
            tile=64,
            stride=32,
            batch_size=2,
            device="cpu",
            store=tmp_path / "run.zarr",
            progress=progress,
            cancel=stop,
        )
    assert list(tmp_path.iterdir()) == []

    res = translate_stack(planes, lupi_checkpoint, tile=64, stride=32, device="cpu")
    out = tmp_path / "out"
    calls = []
    with pytest.raises(Cancelled):
        write_translation(res, out, cancel=lambda: calls.append(1) or len(calls) > 3)
    assert list(out.iterdir()) == []


def test_cli_translate_writes_ome_tiffs(lupi_checkpoint, planes, tmp_path):
    import tifffile
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.io.ome_tiff import read_ome_tiff

    stack = tmp_path / "crop.ome.tif"
    tifffile.imwrite(stack, planes, ome=True, metadata={"axes": "ZYX"})
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app,
        [
            "translate",
            str(stack),
            "--checkpoint",
            str(lupi_checkpoint),
            "--out",
            str(out),
            "--tile",
            "64",
            "--stride",
            "32",
            "--device",
            "cpu",
            "--threshold",
            "0.4",
        ],
    )
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["DAPI.ome.tif", "nuclei-confidence.ome.tif", "nuclei-mask.ome.tif", "summary.json"]
    levels, _, _meta = read_ome_tiff(out / "DAPI.ome.tif")
    assert levels[0].dtype == np.uint16 and levels[0].shape[-2:] == planes.shape[1:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == 0.4 and summary["channels"]["DAPI"]["role"] == "nuclei"

    bad = CliRunner().invoke(
        app,
        ["translate", str(stack), "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o2")],
    )
    assert bad.exit_code == 2 and "missing" in bad.output


def test_evaluate_translation_on_real_isl_dapi(isl, tmp_path):
    from scipy import ndimage as ndi

    from napari_pathfm.pipelines.translate_eval import (
        compare_images,
        format_table,
        write_table,
    )

    real = np.asarray(isl.targets["DAPI"][768:1024])
    same = compare_images(real, real)
    assert same["mae_over_median"] == 0 and same["ssim"] == pytest.approx(1.0) and same["psnr"] == float("inf")
    assert same["nuclei_real"] == same["nuclei_pred"] > 5
    assert same["count_rel"] == same["area_rel"] == same["intensity_rel"] == same["texture_rel"] == 0

    blurred = ndi.gaussian_filter(real.astype(np.float64), 3).round().astype(np.uint16)
    worse = compare_images(blurred, real)
    assert worse["mae_over_median"] > 0 and worse["ssim"] < 0.99 and np.isfinite(worse["psnr"])
    assert abs(worse["texture_rel"]) > 0.1  # blurring removes the chromatin texture
    rows = [{"source": "real", "channel": "DAPI", **same}, {"source": "blurred", "channel": "DAPI", **worse}]
    table = format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["source", "channel", "mae_over_median"] and "blurred" in table
    csv_text = write_table(rows, tmp_path / "t.csv").read_text()
    assert csv_text.startswith("source,channel,mae_over_median") and csv_text.count("\n") == 3


def test_cli_evaluate_translation_checkpoint_vs_image(lupi_checkpoint, isl, tmp_path):
    """Rows 768:1024 of the ISL well: a checkpoint (translated on those rows only) and a predicted file."""
    import tifffile
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    noisy = np.asarray(isl.targets["DAPI"][768:1024]).astype(np.float64)
    noisy += np.random.default_rng(0).normal(0, 500, noisy.shape)
    tifffile.imwrite(tmp_path / "noisy.tif", noisy.clip(0, 65535).astype(np.uint16))
    out = tmp_path / "table.csv"
    r = CliRunner().invoke(
        app,
        [
            "evaluate-translation",
            str(lupi_checkpoint),
            str(tmp_path / "noisy.tif"),
            "--stack",
            str(isl.path),
            "--target",
            "DAPI",
            "--rows",
            "768:1024",
            "--tile",
            "256",
            "--stride",
            "256",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "tiny-lupi-dapi" in r.output and "noisy.tif" in r.output
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("tiny-lupi-dapi,DAPI vs DAPI,")
