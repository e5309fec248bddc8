"""HASTE translation models and losses (issue 6): shapes, sizes, receptive field, ICNR, losses, a real crop.

Full-width models run at 64/128 px; the 512 px check uses a narrow model of the same
code path (the full one takes ~5 s per 512 tile on the shared CPU). Real data: a 64×64
crop of the ISL well (13 phase-contrast planes → DAPI), read with ``open_zstack``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_pathfm.models import create_model, list_models, registry
from napari_pathfm.models.haste import losses as L
from napari_pathfm.models.haste.dense_unet import PAPER_DENSE_UNET_PARAMS
from napari_pathfm.models.haste.layers import (
    TransitionUp,
    count_parameters,
    tanh_scaled,
)
from napari_pathfm.models.haste.lupi_unet import PAPER_LUPI_UNET_PARAMS, LUPIOutput
from napari_pathfm.models.haste.patchgan import PAPER_PATCHGAN_PARAMS, receptive_field

TRANSLATE = ("dense_unet", "lupi_unet", "patchgan")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- registry


def test_registry_lists_translate_models_without_torch():
    code = (
        "import sys; from napari_pathfm.models import list_models, model_info; "
        "names = list_models('translate'); info = model_info('lupi_unet'); "
        "print(sorted(names), info['family'], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'dense_unet'" in out and "'lupi_unet'" in out and "'patchgan'" in out
    assert out.strip().endswith("translate False")


@pytest.mark.parametrize("name", TRANSLATE)
def test_builtin_config_matches_factory(name):
    create_model(name, in_channels=8 if name == "patchgan" else 3)
    assert registry._BUILTINS[name].default_cfg == registry._RUNTIME[name].default_cfg
    assert name in list_models("translate")


def test_config_round_trips_through_json_card(tmp_path: Path):
    from napari_pathfm.models import load_checkpoint, save_checkpoint

    net = create_model("dense_unet", in_channels=5, out_channels=2, init_filters=8, growth_rate=4)
    path = save_checkpoint(net, tmp_path / "tiny", card={"family": "translate", "channels": ["a", "b"]})
    model, card = load_checkpoint(path)
    assert card["config"]["down_blocks"] == [4, 4, 4, 4]
    x = torch.rand(1, 5, 32, 32)
    net.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))


# --------------------------------------------------------------------------- sizes


def test_parameter_counts_match_the_paper(capsys):
    counts = {
        "dense_unet": (count_parameters(create_model("dense_unet")), PAPER_DENSE_UNET_PARAMS),
        "lupi_unet": (count_parameters(create_model("lupi_unet")), PAPER_LUPI_UNET_PARAMS),
        "patchgan": (count_parameters(create_model("patchgan")), PAPER_PATCHGAN_PARAMS),
        "patchgan(ndf=32, n_layers=4) [HASTE config]": (
            count_parameters(create_model("patchgan", ndf=32, n_layers=4)),
            PAPER_PATCHGAN_PARAMS,
        ),
    }
    with capsys.disabled():
        for name, (n, paper) in counts.items():
            print(f"\n{name}: {n:,} parameters (paper ~{paper / 1e6:.1f}M, {100 * (n / paper - 1):+.1f}%)", end="")
    for name, (n, paper) in counts.items():
        assert abs(n / paper - 1) < 0.15, (name, n)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [64, 128])
def test_dense_unet_shapes_and_range(size):
    net = create_model("dense_unet", in_channels=7, out_channels=2)
    y = net(torch.rand(2, 7, size, size))  # train mode (dropout on)
    assert y.shape == (2, 2, size, size)
    assert float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1
    y.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("size", [64, 128])
def test_lupi_unet_returns_image_mask_and_side_outputs(size):
    net = create_model("lupi_unet", in_channels=7)
    out = net(torch.rand(2, 7, size, size))
    assert isinstance(out, tuple) and hasattr(out, "mask_logits") and isinstance(out, LUPIOutput)
    assert out.image.shape == (2, 1, size, size) and out.mask_logits.shape == (2, 1, size, size)
    assert 0 <= float(out.image.detach().min()) and float(out.image.detach().max()) <= 1
    assert [tuple(s.shape[-2:]) for s in out.side_outputs] == [(size // 8,) * 2, (size // 4,) * 2, (size // 2,) * 2]
    net.eval()
    with torch.no_grad():
        ev = net(torch.rand(1, 7, size, size))
    assert ev.image.shape == (1, 1, size, size)


def test_512_tiles_no_grad():
    # Same code path as the full-width nets, narrowed so that a 512 tile takes well under a second.
    narrow = {"init_filters": 4, "growth_rate": 2}
    x = torch.rand(1, 7, 512, 512)
    with torch.no_grad():
        y = create_model("dense_unet", **narrow).eval()(x)
        out = create_model("lupi_unet", **narrow).eval()(x)
        d = create_model("patchgan", ndf=8).eval()(torch.rand(1, 8, 512, 512))
    assert y.shape == (1, 1, 512, 512) and out.image.shape == out.mask_logits.shape == (1, 1, 512, 512)
    assert d.shape == (1, 1, 62, 62)


@pytest.mark.parametrize("name", ["dense_unet", "lupi_unet"])
def test_bad_inputs_say_what_to_do(name):
    net = create_model(name, in_channels=7)
    with pytest.raises(ValueError, match="7 planes"):
        net(torch.rand(1, 6, 64, 64))
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 7, 60, 64))
    with pytest.raises(ValueError, match="same length"):
        create_model(name, down_blocks=(4, 4), up_blocks=(4, 4, 4))


# --------------------------------------------------------------------------- patchgan


def _measured_receptive_field(net, size=256) -> tuple[int, int]:
    net.eval()  # BatchNorm in train mode would couple all pixels
    x = torch.rand(1, net.in_channels, size, size, requires_grad=True)
    y = net(x)
    h, w = y.shape[-2:]
    y[0, 0, h // 2, w // 2].backward()
    ys, xs = torch.nonzero(x.grad.abs().sum((0, 1)), as_tuple=True)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def test_patchgan_receptive_field_is_70():
    net = create_model("patchgan", in_channels=8)
    assert net.receptive_field == receptive_field(3) == 70
    assert _measured_receptive_field(net) == (70, 70)
    assert net(torch.rand(2, 8, 256, 256)).shape == (2, 1, 30, 30)
    with pytest.raises(ValueError, match="concatenate"):
        net(torch.rand(1, 7, 64, 64))


def test_haste_released_discriminator_sees_142_pixels():
    net = create_model("patchgan", ndf=32, n_layers=4)
    assert _measured_receptive_field(net) == (142, 142) == (net.receptive_field,) * 2


# --------------------------------------------------------------------------- ICNR


def test_icnr_pixel_shuffle_is_checkerboard_free_at_init():
    up = TransitionUp(16, 8)
    w = up.conv.weight  # (4·8, 16, 3, 3)
    for c in range(8):  # the 4 sub-pixel kernels of each output channel
        for k in range(1, 4):
            torch.testing.assert_close(w[4 * c + k], w[4 * c])
    with torch.no_grad():
        z = up.upsample(torch.randn(2, 16, 10, 10))  # (2, 8, 20, 20), before the blur
        blocks = [z[..., i::2, j::2] for i in (0, 1) for j in (0, 1)]
        for b in blocks[1:]:
            torch.testing.assert_close(b, blocks[0])  # every 2×2 block is constant: no checkerboard
        assert up(torch.randn(2, 16, 10, 10)).shape == (2, 8, 20, 20)
    # Without ICNR the four sub-pixel positions differ (what makes checkerboards).
    torch.nn.init.kaiming_normal_(up.conv.weight)
    with torch.no_grad():
        z = up.upsample(torch.randn(2, 16, 10, 10))
    assert not torch.allclose(z[..., 0::2, 0::2], z[..., 1::2, 1::2])


# --------------------------------------------------------------------------- losses


def test_log_squared_known_values():
    t = torch.full((1, 1, 4, 4), 1.0)
    assert float(L.log_squared_loss(t, t)) == 0.0
    assert float(L.log_squared_loss(torch.full_like(t, 0.5), t)) == pytest.approx(np.log(2) ** 2, rel=1e-6)
    # symmetric in the ratio: half or double the target cost the same
    assert float(L.log_squared_loss(torch.full_like(t, 0.25), torch.full_like(t, 0.5))) == pytest.approx(
        float(L.log_squared_loss(torch.full_like(t, 1.0), torch.full_like(t, 0.5))), rel=1e-6
    )
    w = torch.zeros_like(t)
    w[..., :2, :] = 1
    assert float(L.log_squared_loss(torch.full_like(t, 0.5), t, weight=w)) == pytest.approx(np.log(2) ** 2 / 2)


def test_median_mae_known_values_and_zero_median_guard():
    t = torch.tensor([0.2, 0.4, 0.5, 0.6, 0.8]).view(1, 1, 1, 5)
    assert float(L.median_mae_loss(t + 0.1, t)) == pytest.approx(0.1 / 0.5)
    sparse = torch.zeros(1, 1, 4, 4)
    sparse[..., 0, :2] = 1.0  # median 0, mean 2/16
    assert float(L.median_normalizer(sparse)) == pytest.approx(2 / 16)
    assert float(L.median_mae_loss(sparse + 0.1, sparse)) == pytest.approx(0.1 / (2 / 16))
    zero = torch.zeros(1, 1, 4, 4)
    assert float(L.median_mae_loss(zero + 0.3, zero)) == pytest.approx(0.3)  # all-zero target: plain MAE


def test_gradient_loss_known_values():
    W = 8
    ramp = torch.arange(W, dtype=torch.float32).mul(0.1).expand(1, 1, 4, W).contiguous()
    flat = torch.zeros_like(ramp)
    # |dx| of the ramp is 0.1 except the last (zero-padded) column; dy is 0 everywhere.
    assert float(L.gradient_loss(flat, ramp)) == pytest.approx(0.1 * (W - 1) / W / 2)
    assert float(L.gradient_loss(ramp + 0.3, ramp)) == pytest.approx(0.0, abs=1e-7)  # offsets do not count
    assert float(L.gradient_loss(-ramp, ramp)) == pytest.approx(0.0, abs=1e-7)  # magnitudes (HASTE)
    assert float(L.gradient_loss(-ramp, ramp, absolute=False)) == pytest.approx(0.2 * (W - 1) / W / 2)
    dx, dy = L.image_gradients(ramp)
    assert dx.shape == dy.shape == ramp.shape and float(dx[..., -1].abs().max()) == 0


def test_ralsgan_known_values():
    real, fake = torch.full((2, 1, 3, 3), 0.5), torch.full((2, 1, 3, 3), -0.5)
    assert float(L.ralsgan_d_loss(real, fake)) == pytest.approx(0.0)  # the discriminator's optimum
    assert float(L.ralsgan_g_loss(real, fake)) == pytest.approx(4.0)
    assert float(L.ralsgan_d_loss(torch.ones_like(real), -torch.ones_like(fake))) == pytest.approx(1.0)
    assert float(L.ralsgan_g_loss(fake, real)) == pytest.approx(0.0)  # roles swapped: G's optimum
    # history averages replace the batch averages
    ref = torch.full((50, 1, 3, 3), -1.5)
    assert float(L.ralsgan_d_loss(real, fake, fake_ref=ref)) == pytest.approx(((0.5 + 1.5 - 1) ** 2) / 2)


def test_mask_bce_and_lwm_weight_map():
    logits = torch.zeros(1, 1, 4, 4)
    mask = torch.zeros(1, 4, 4)
    assert float(L.mask_bce_loss(logits, mask)) == pytest.approx(np.log(2))
    assert float(L.mask_bce_loss(logits.half(), mask)) == pytest.approx(np.log(2))
    mask[0, 0, 0] = 1  # one nucleus pixel counted pos_weight times
    assert float(L.mask_bce_loss(logits, mask, pos_weight=3.0)) == pytest.approx(np.log(2) * (15 + 3) / 16)
    mask[0, 0, 0] = 0
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[..., :2, :] = 5.0  # predicts nuclei in the top half
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, :2] = 1  # nuclei are in the left half
    w = L.lwm_weight_map(logits, mask)
    expected = torch.ones(1, 1, 4, 4)
    expected[..., :2, 2:] = 2  # predicted, not true
    expected[..., 2:, :2] = 2  # true, missed
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad


def test_lwm_loss_composition_and_double_weight_where_segmentation_is_wrong():
    target = torch.full((1, 1, 8, 8), 0.5)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    right = torch.where(mask > 0, 6.0, -6.0)  # segmentation right everywhere
    image = torch.full_like(target, 0.6)
    side = [torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4)]
    total, parts = L.lwm_loss(LUPIOutput(image, right, side), target, mask)
    mae = 0.1 / 0.5
    side_mae = abs(float(tanh_scaled(torch.zeros(()))) - 0.5) / 0.5  # tanh_scaled(0) = 0.5 → 0
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(6.0), torch.tensor(1.0)))
    assert parts["wrong_fraction"] == 0
    assert parts["image"] == pytest.approx(mae) and parts["side"] == pytest.approx(2 * side_mae, abs=1e-7)
    assert float(total) == pytest.approx(0.5 * mae + bce + 0.1 * 2 * side_mae, rel=1e-5)
    wrong = -right  # segmentation wrong everywhere: every weight 2
    _, parts_w = L.lwm_loss(LUPIOutput(image, wrong, side), target, mask)
    assert parts_w["wrong_fraction"] == 1 and parts_w["image"] == pytest.approx(2 * mae)
    with pytest.raises(ValueError, match="unknown base"):
        L.lwm_loss(LUPIOutput(image, right, side), target, mask, base="l3")


def test_losses_give_finite_gradients_even_on_dark_targets():
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:8, 4:8] = 0.9  # sparse nuclei: median 0
    pred = torch.rand(2, 1, 16, 16).mul(1e-9).requires_grad_()  # predictions at ~0 stress the log
    for fn in (L.log_squared_loss, L.median_mae_loss, L.gradient_loss):
        pred.grad = None
        loss = fn(pred, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all(), fn.__name__
    half = torch.zeros(2, 1, 16, 16, dtype=torch.float16)  # fp16 (autocast) outputs: eps must not vanish
    assert torch.isfinite(L.log_squared_loss(half, target)) and L.log_squared_loss(half, target).dtype == torch.float32
    d_real, d_fake = torch.randn(2, 1, 6, 6, requires_grad=True), torch.randn(2, 1, 6, 6, requires_grad=True)
    (L.ralsgan_d_loss(d_real, d_fake) + L.ralsgan_g_loss(d_real, d_fake)).backward()
    assert torch.isfinite(d_real.grad).all() and torch.isfinite(d_fake.grad).all()


def test_lwm_loss_trains_both_decoders():
    net = create_model("lupi_unet", in_channels=3, init_filters=8, growth_rate=4)
    mask = (torch.rand(2, 1, 32, 32) > 0.7).float()
    total, _ = L.lwm_loss(net(torch.rand(2, 3, 32, 32)), torch.rand(2, 1, 32, 32), mask)
    total.backward()
    for part in ("seg_head", "seg_blocks", "reg_head", "final_block", "side_heads", "encoder"):
        grads = [p.grad for p in getattr(net, part).parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert any(float(g.abs().sum()) > 0 for g in grads), part


# --------------------------------------------------------------------------- image pool


def test_image_pool_caps_at_50_and_mixes_half_stored():
    pool = L.ImagePool(50, seed=42)
    first = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1)
    torch.testing.assert_close(pool.query(first), first)  # filling: items come back as they are
    assert len(pool) == 50
    new = torch.arange(100, 300, dtype=torch.float32).view(200, 1, 1, 1)
    out = torch.cat([pool.query(new[i : i + 4]) for i in range(0, 200, 4)])
    assert len(pool) == 50 and out.shape == new.shape
    stored = int((out < 100).sum() + (out != new).logical_and(out >= 100).sum())
    assert 70 <= stored <= 130  # ~half of the queries swap with a stored item
    seen = set(first.flatten().tolist()) | set(new.flatten().tolist())
    assert set(pool.stacked().flatten().tolist()) <= seen
    # the same seed replays the same history
    again = L.ImagePool(50, seed=42)
    again.query(first)
    torch.testing.assert_close(torch.cat([again.query(new[i : i + 4]) for i in range(0, 200, 4)]), out)
    state = again.state_dict()
    resumed = L.ImagePool(50)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.query(new[:8]), again.query(new[:8]))


def test_image_pool_edge_cases():
    x = torch.rand(3, 2)
    assert L.ImagePool(0).query(x) is x
    with pytest.raises(ValueError, match="empty"):
        L.ImagePool(5).stacked()
    with pytest.raises(ValueError, match=">= 0"):
        L.ImagePool(-1)
    g = torch.rand(2, 2, requires_grad=True)
    assert not L.ImagePool(5).query(g * 2).requires_grad


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def isl_crop(shared_data: Path):
    from napari_pathfm.io import open_zstack
    from napari_pathfm.io.normalize import normalize_minmax

    d = shared_data / "isl-blue-sample"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    zs = open_zstack(d)
    dapi = np.asarray(zs.targets["DAPI"][:768], np.float32)  # training rows only
    lo, hi = np.percentile(dapi, [1, 99.9])
    # the 64×64 window (64 px grid) with the most nuclei signal
    tiles = dapi[:768, :1024].reshape(12, 64, 16, 64).mean((1, 3))
    ty, tx = np.unravel_index(int(np.argmax(tiles)), tiles.shape)
    y, x = int(ty) * 64, int(tx) * 64
    planes = np.asarray(zs.data[:, y : y + 64, x : x + 64])
    x01 = normalize_minmax(planes, planes.reshape(13, -1).min(1), planes.reshape(13, -1).max(1))
    t01 = normalize_minmax(dapi[y : y + 64, x : x + 64], lo, hi)
    return torch.from_numpy(x01)[None], torch.from_numpy(t01)[None, None]


def test_dense_unet_learns_a_real_isl_crop(isl_crop):
    x, t = isl_crop
    assert x.shape == (1, 13, 64, 64) and t.shape == (1, 1, 64, 64) and float(t.max()) > 0.5
    # No dropout, and the loss measured in train mode (batch statistics): after 12 steps
    # the BatchNorm running averages are not settled yet, so eval mode would measure them.
    net = create_model("dense_unet", in_channels=13, out_channels=1, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.l1_loss(net(x), t))

    before = eval_loss()
    for _ in range(12):
        y = net(x)
        loss = L.median_mae_loss(y, t) + L.gradient_loss(y, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"\nISL crop 13 planes -> DAPI, dense_unet: L1 {before:.4f} -> {after:.4f} after 12 Adam steps")
    assert after < 0.7 * before
