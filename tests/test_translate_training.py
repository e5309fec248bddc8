"""Training data and the ``translate`` family (HASTE) on the real ISL well, plus ``pathfm zstats``.

The ISL sample (13 phase planes, DAPI/MAP2/NFH) lives in ../shared/data; tests skip
when it is absent. Trainings use the tiny recipes of training/translate (seconds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_pathfm.errors import RecipeError, ZStackError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "training" / "translate"
ISL_NAME = (
    "lab-FINKBEINER,condition-KEVAN_0_8,acquisition_date,year-2015,month-10,day-5,minute-0,well-A4,"
    "tile_computation-STITCHED,{part},channel-{channel},is_mask-false.png"
)


@pytest.fixture(scope="module")
def isl(shared_data: Path) -> Path:
    path = shared_data / "isl-blue-sample"
    if not path.is_dir():
        pytest.skip(f"ISL sample not found at {path}")
    return path


def _data(isl: Path, **extra) -> dict:
    return {
        "stacks": [str(isl)],
        "val_rows": [768, 1024],
        "channels": ["DAPI"],
        "stats_columns": ["p1", "p99.8"],
        "crop_size": 64,
        "samples_per_epoch": 8,
        **extra,
    }


@pytest.fixture(scope="module")
def dm(isl: Path):
    from napari_pathfm.training.translate_datamodule import TranslateDataModule

    m = TranslateDataModule(_data(isl, shift_scale_rotate=True, nuclei_centred=1.0), 13, with_mask=True)
    m.setup()
    return m


def _write_stack(folder: Path, planes: list, targets: dict) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for z, p in enumerate(planes):
        Image.fromarray(p).save(folder / ISL_NAME.format(part=f"z_depth-{z}", channel="PHASE_CONTRAST"))
    for name, t in targets.items():
        Image.fromarray(t).save(
            folder / ISL_NAME.format(part="depth_computation-MAXPROJECT", channel=f"{name}_CONFOCAL")
        )
    return folder


# --- data ---------------------------------------------------------------------------------------


def test_row_split_and_normalisation_follow_the_stats(dm, isl: Path):
    from napari_pathfm.io.zstack import open_zstack

    assert [f.shape for f in dm.train_fovs] == [(768, 1024)] and [f.shape for f in dm.val_fovs] == [(256, 1024)]
    raw = np.asarray(open_zstack(isl).data[3, :768])
    lo, hi = np.percentile(raw, [1, 99.8])
    assert dm.input_limits[0][3] == pytest.approx(lo) and dm.input_limits[1][3] == pytest.approx(hi)
    expect = np.clip((raw.astype(np.float64) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(dm.train_fovs[0].planes[3], expect, atol=1e-5)
    for f in dm.train_fovs + dm.val_fovs:
        assert 0.0 <= f.planes.min() and f.planes.max() <= 1.0 and f.targets.dtype == np.float32
    mask = dm.train_fovs[0].mask
    assert set(np.unique(mask).tolist()) == {0.0, 1.0} and 0.01 < mask.mean() < 0.3  # Otsu nuclei of DAPI
    norm = dm.normalization()
    assert len(norm["input_min"]) == 13 and norm["target_dtype"] == "uint16"


def test_crops_keep_input_and_target_aligned_under_every_augmentation():
    from napari_pathfm.training.translate_crops import TranslateCropDataset
    from napari_pathfm.training.translate_data import FieldOfView

    rng = np.random.default_rng(0)
    # blocks of 12 px: bilinear (planes) and nearest (mask) warps agree away from block edges
    planes = np.kron(rng.random((3, 8, 10)), np.ones((12, 12))).astype(np.float32)
    fov = FieldOfView("synthetic", planes, planes[:1].copy(), (planes[0] > 0.5).astype(np.float32))
    for ssr in (None, (0.2, 0.1, 180.0)):
        ds = TranslateCropDataset([fov], 32, 20, augment=True, nuclei_centred=0.5, ssr=ssr)
        for i in range(len(ds)):
            item = ds[i]
            assert item["input"].shape == (3, 32, 32) and item["target"].shape == (1, 32, 32)
            np.testing.assert_array_equal(item["input"][0].numpy(), item["target"][0].numpy())
            agree = (item["mask"][0].numpy() == (item["input"][0].numpy() > 0.5)).mean()
            assert agree == 1.0 if ssr is None else agree > 0.85


def test_nuclei_centred_crops_hit_nuclei(dm):
    from napari_pathfm.training.translate_crops import random_crop

    rng = np.random.default_rng(1)
    fov = dm.train_fovs[0]
    centres = [random_crop(fov, 64, rng, centre_on_mask=True)[2] for _ in range(40)]
    uniform = [random_crop(fov, 64, rng)[2] for _ in range(40)]
    assert np.mean([c[32, 32] for c in centres]) > 0.75  # centre on a nucleus unless clipped at an edge
    assert np.mean([c.mean() for c in centres]) > np.mean([c.mean() for c in uniform])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (4, 13, 64, 64) and batch["mask"].shape == (4, 1, 64, 64)


def test_validation_tiles_cover_the_validation_rows(dm):
    from napari_pathfm.training.translate_crops import TranslateTileDataset, tile_origins

    assert tile_origins(256, 64) == [0, 64, 128, 192] and tile_origins(100, 64) == [0, 36]
    ds = TranslateTileDataset(dm.val_fovs, 256)
    assert len(ds) == 4 and ds[3]["input"].shape == (13, 256, 256)
    np.testing.assert_array_equal(ds[3]["target"][0].numpy(), dm.val_fovs[0].targets[0, :, 768:1024])


# --- errors -------------------------------------------------------------------------------------


def test_plane_count_differing_from_the_model_names_the_stack_and_the_fix(isl: Path):
    from napari_pathfm.training.translate_datamodule import TranslateDataModule

    with pytest.raises(ZStackError) as err:
        TranslateDataModule(_data(isl), 7, with_mask=False)
    text = str(err.value)
    assert str(isl) in text and "model takes 7" in text and "data.planes" in text
    m = TranslateDataModule(_data(isl, planes=[0, 2, 4, 6, 8, 10, 12]), 7, with_mask=False)
    assert m.plane_names[1] == "z_depth-2" and len(m.input_limits[0]) == 7


def test_missing_target_channel_lists_what_is_there(isl: Path):
    from napari_pathfm.training.translate_datamodule import TranslateDataModule

    with pytest.raises(ZStackError, match=r"no target channel\(s\) \['GFP'\].*DAPI.*MAP2.*NFH"):
        TranslateDataModule(_data(isl, channels=["GFP"], stats_columns=["min", "max"]), 13, with_mask=False)


def test_8bit_surprises_name_the_file(tmp_path: Path, isl: Path):
    from napari_pathfm.io.normalize import StatsTable
    from napari_pathfm.training.translate_datamodule import TranslateDataModule

    rng = np.random.default_rng(0)
    planes8 = [rng.integers(0, 255, (48, 48), dtype=np.uint8) for _ in range(3)]
    stack8 = _write_stack(tmp_path / "s8", planes8, {"DAPI": rng.integers(0, 255, (48, 48), dtype=np.uint8)})
    rows = [
        {"magnification": "20x", "channel": "PHASE_CONTRAST", "plane": z, "min": 100.0, "max": 9000.0} for z in range(3)
    ] + [{"magnification": "20x", "channel": "DAPI", "plane": 0, "min": 0.0, "max": 60000.0}]
    table = StatsTable(rows).to_csv(tmp_path / "stats16.csv")
    cfg = {
        "stacks": [str(stack8)],
        "val_rows": [32, 48],
        "channels": ["DAPI"],
        "stats": str(table),
        "magnification": "20x",
        "crop_size": 16,
    }
    with pytest.raises(ZStackError, match="8-bit.*computed on 16-bit data") as err:
        TranslateDataModule(cfg, 3, with_mask=False)
    assert "z_depth-0" in str(err.value)
    cfg.pop("stats")
    with pytest.raises(ZStackError, match="target DAPI is uint8 but data.target_dtype is uint16") as err:
        TranslateDataModule({**cfg, "target_dtype": "uint16"}, 3, with_mask=False)
    assert "DAPI_CONFOCAL" in str(err.value)


def test_constant_and_nan_planes_are_refused(tmp_path: Path):
    import tifffile

    from napari_pathfm.training.translate_data import (
        StackSpec,
        load_fov,
        open_fov_stack,
    )

    rng = np.random.default_rng(0)
    planes = [rng.integers(0, 4000, (48, 48), dtype=np.uint16) for _ in range(3)]
    planes[1][:] = 777
    stack = _write_stack(tmp_path / "const", planes, {"DAPI": rng.integers(0, 4000, (48, 48), dtype=np.uint16)})
    spec = StackSpec(stack)
    zs = open_fov_stack(spec)
    lim = (np.zeros(3), np.full(3, 4000.0))
    with pytest.raises(ZStackError, match="plane z_depth-1 is constant") as err:
        load_fov(spec, zs, ["DAPI"], [0, 1, 2], lim, (np.zeros(1), np.ones(1)), with_mask=False, where="t")
    assert "z_depth-1,channel-PHASE_CONTRAST" in str(err.value)
    data = rng.random((3, 32, 32)).astype(np.float32)
    data[2, 5, 5] = np.nan
    tif = tmp_path / "nan.ome.tif"
    tifffile.imwrite(tif, data, metadata={"axes": "ZYX"})
    spec = StackSpec(tif)
    with pytest.raises(ZStackError, match="plane z2 holds NaN") as err:
        load_fov(
            spec,
            open_fov_stack(spec),
            ["DAPI"],
            [0, 1, 2],
            (np.zeros(3), np.ones(3)),
            (np.zeros(1), np.ones(1)),
            with_mask=False,
            where="t",
        )
    assert "nan.ome.tif" in str(err.value)


def test_nuclei_centred_crops_get_the_mask_in_every_mode(isl: Path):
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.tasks.translate import build

    _, data, card = build(load_recipe(RECIPES / "tiny_regression.yaml", ["data.nuclei_centred=0.5"]))
    assert data.train_fovs[0].mask is not None and card["has_mask"] is False  # centring only, no mask output


def test_lupi_gradient_term_adds_its_weight_times_the_edge_error(isl: Path):
    """loss.lupi_grad_weight w: the LUPI loss plus w x the L1 between image gradients (0 by default)."""
    import torch

    from napari_pathfm.models.haste.losses import gradient_loss
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.tasks.translate import build

    task, _data, _card = build(load_recipe(RECIPES / "tiny_lupi.yaml"))
    with_grad, _d, _c = build(load_recipe(RECIPES / "tiny_lupi.yaml", ["loss.lupi_grad_weight=5"]))
    g = torch.Generator().manual_seed(0)
    batch = {"input": torch.rand(2, 13, 32, 32, generator=g), "target": torch.rand(2, 1, 32, 32, generator=g)}
    batch["mask"] = (batch["target"] > 0.5).float()
    with torch.no_grad():
        out = task.model(batch["input"])
        plain, parts = task.generator_loss(out, batch)
        total, parts_grad = with_grad.generator_loss(out, batch)
    edge = gradient_loss(out.image, batch["target"])
    assert "gradient" not in parts and float(parts_grad["gradient"]) == pytest.approx(float(edge))
    assert float(total) == pytest.approx(float(plain) + 5 * float(edge), rel=1e-5)


def test_recipe_errors_are_plain():
    from napari_pathfm.training.recipes import load_recipe
    from napari_pathfm.training.tasks.translate import build

    with pytest.raises(RecipeError, match="loss.mode is 'lupi' but model.name is 'dense_unet'"):
        build(load_recipe(RECIPES / "tiny_regression.yaml", ["loss.mode=lupi"]))
    with pytest.raises(RecipeError, match="unknown key 'loss.knd'"):
        load_recipe(RECIPES / "tiny_regression.yaml", ["loss.knd=l1"])


def test_every_translate_recipe_validates():
    from napari_pathfm.training.recipes import load_recipe

    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {
        "isl_dapi_lupi_cpu.yaml",
        "isl_map2_gan_cpu.yaml",
        "isl_nfh_gan_cpu.yaml",
        "isl_dapi_l1_unet_cpu.yaml",
    } <= set(names)
    for name in names:
        r = load_recipe(RECIPES / name)
        assert r.get("family") == "translate" and r.get("loss.mode") in ("regression", "gan", "lupi")


# --- training -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regression", "gan", "lupi"])
def test_tiny_training_exports_a_card_per_contract_and_reloads(mode: str, isl: Path, tmp_path: Path):
    import torch
    from safetensors.torch import load_file

    from napari_pathfm.models import load_checkpoint
    from napari_pathfm.training.engine import run_recipe

    res = run_recipe(
        RECIPES / f"tiny_{mode}.yaml", ["trainer.limit_val_batches=1"], output=tmp_path / mode, progress=lambda *a: None
    )
    assert res.history and all(np.isfinite(h["train_loss"]) for h in res.history)
    for key in ("val_loss", "val_mae_median", "val_psnr", "val_ssim"):
        assert np.isfinite(res.best_metrics[key])
    card = res.card
    assert card["family"] == "translate" and card["input_planes"] == 13 and card["input_dtype"] == "uint16"
    assert card["has_mask"] is (mode == "lupi") and card["channel_roles"] == ["map2" if mode == "gan" else "nuclei"]
    n = card["normalization"]
    assert n["kind"] == "minmax" and len(n["input_min"]) == 13 and len(n["target_max"]) == 1
    assert (tmp_path / mode / "stats.csv").is_file() and (tmp_path / mode / "split.json").is_file()
    assert not any(k.startswith("discriminator") for k in load_file(res.checkpoint))
    model, card2 = load_checkpoint(res.checkpoint)
    x = torch.rand(1, 13, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), load_checkpoint(res.checkpoint)[0](x)
    a, b = (a.image, b.image) if mode == "lupi" else (a, b)
    torch.testing.assert_close(a, b)
    assert card2["channels"] == card["channels"]


# --- zstats -------------------------------------------------------------------------------------


def test_zstats_cli_on_the_isl_stack(isl: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.io.normalize import StatsTable
    from napari_pathfm.io.zstack import open_zstack

    out = tmp_path / "stats.csv"
    res = CliRunner().invoke(
        app,
        [
            "zstats",
            str(isl),
            "--out",
            str(out),
            "--magnification",
            "20x",
            "--percentiles",
            "1",
            "99.8",
            "--rows",
            "0",
            "768",
        ],
    )
    assert res.exit_code == 0, res.output
    table = StatsTable.read_csv(out)
    assert len(table) == 16 and {r["channel"] for r in table.rows} == {"PHASE_CONTRAST", "DAPI", "MAP2", "NFH"}
    zs = open_zstack(isl)
    raw = np.asarray(zs.data[12, :768])
    row = table.select("PHASE_CONTRAST", "20x")[12]
    assert (row["min"], row["max"]) == (raw.min(), raw.max())
    assert row["p99.8"] == pytest.approx(np.percentile(raw, 99.8))
    dapi = table.select("DAPI", "20x")[0]
    assert dapi["p1"] == pytest.approx(np.percentile(np.asarray(zs.targets["DAPI"][:768]), 1))
    res = CliRunner().invoke(app, ["zstats", str(isl), "--out", str(out), "--magnification", "40x", "--append"])
    assert res.exit_code == 0, res.output
    assert len(StatsTable.read_csv(out)) == 32


def test_haste_folder_of_sites_splits_by_well_and_pools_stats(tmp_path: Path):
    import tifffile

    from napari_pathfm.training.translate_datamodule import TranslateDataModule
    from napari_pathfm.training.translate_stats import zstack_stats

    rng = np.random.default_rng(0)
    folder = tmp_path / "20x_images"
    folder.mkdir()
    for well in ("B04", "D04"):
        for c, planes in ((4, 3), (1, 1)):
            for z in range(1, planes + 1):
                tifffile.imwrite(
                    folder / f"AssayPlate_Greiner_#655090_{well}_T0001F001L01A0{c}Z0{z}C0{c}.tif",
                    rng.integers(100, 5000, (48, 64), dtype=np.uint16),
                )
    table = zstack_stats([folder], magnification="20x", percentiles=(0.01, 99.99))
    assert [r["channel"] for r in table.rows] == ["C04"] * 3 + ["nuclei"]
    cfg = {
        "stacks": [str(folder)],
        "val_wells": ["D04"],
        "channels": ["nuclei"],
        "crop_size": 32,
        "magnification": "20x",
    }
    m = TranslateDataModule(cfg, 3, with_mask=True)
    assert len(m.train_fovs) == 1 and len(m.val_fovs) == 1
    assert "B04" in m.train_fovs[0].source and "D04" in m.val_fovs[0].source
