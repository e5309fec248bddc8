"""MIL models: output contract, S4D kernel and causality, learning, checkpoints, 200k-patch bags."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from napari_pathfm.models import create_model, list_models, load_checkpoint, save_checkpoint
from napari_pathfm.models.layers.s4d import S4D, S4DKernel, fft_length, optim_groups
from napari_pathfm.models.mil import PAPER_S4MIL_PARAMS, heatmap_scores

NAMES = ["s4mil", "meanpool", "maxpool", "abmil", "transmil"]
_MODELS: dict = {}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models run fastest on one thread, and stay fast when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str, **cfg):
    key = (name, tuple(sorted(cfg.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = create_model(name, in_dim=16, n_classes=3, **cfg)
    return _MODELS[key]


def test_registry_lists_the_mil_family_with_the_factories_defaults():
    from napari_pathfm.models import registry

    assert list_models(family="mil") == sorted(NAMES)
    for name in NAMES:
        create_model(name, in_dim=4)
        assert registry._BUILTINS[name].default_cfg == registry._RUNTIME[name].default_cfg, name


@pytest.mark.parametrize("L", [1, 7, 1000])
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("name,cfg", [(n, {}) for n in NAMES] + [("s4mil", {"multitask": True})])
def test_output_shapes_and_keys(name, cfg, B, L):
    model = _model(name, **cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(B, L, 16))
    assert out["logits"].shape == (B, 3)
    assert out["patch_scores"].shape == (B, L, 3)
    assert ("patch_logits" in out) == bool(cfg.get("multitask"))
    if "patch_logits" in out:
        assert out["patch_logits"].shape == (B, L, 3)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_bags_of_a_batch_are_independent():
    for name in NAMES:
        model = _model(name).eval()
        x = torch.randn(2, 40, 16)
        with torch.no_grad():
            both, first = model(x)["logits"], model(x[:1])["logits"]
        torch.testing.assert_close(both[:1], first, atol=1e-4, rtol=1e-4, msg=name)


def test_patch_scores_average_to_the_logits_where_the_model_is_linear_in_them():
    x = torch.randn(2, 30, 16)
    for name in ("meanpool", "abmil"):
        with torch.no_grad():
            out = _model(name).eval()(x)
        torch.testing.assert_close(out["patch_scores"].mean(1), out["logits"], atol=1e-5, rtol=1e-4)


def test_heatmap_scores():
    out = {"patch_scores": torch.tensor([[[0.0, 2.0], [1.0, -1.0]]])}
    s1 = heatmap_scores(out, 1)
    torch.testing.assert_close(s1, torch.sigmoid(torch.tensor([[2.0, -2.0]])))
    torch.testing.assert_close(heatmap_scores(out, 0) + s1, torch.ones(1, 2))
    with pytest.raises(IndexError, match="2 classes"):
        heatmap_scores(out, 2)


def test_bad_input_is_named():
    model = _model("s4mil")
    with pytest.raises(ValueError, match="dimension 8 but this model expects 16"):
        model(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="empty"):
        model(torch.randn(1, 0, 16))
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        model(torch.randn(5, 16))


@pytest.mark.parametrize("L", [1, 2, 7, 1000, 4097])
@pytest.mark.parametrize("chunk", [None, 1, 3, 64])
def test_chunked_kernel_equals_naive_formula(L, chunk):
    torch.manual_seed(1)
    kernel = S4DKernel(48, 32)
    with torch.no_grad():
        kernel.log_dt.add_(0.5 * torch.randn(48))
        kernel.log_A_real.add_(0.3 * torch.randn(48, 16))
    fast, naive = kernel(L, chunk), kernel.naive(L)
    assert fast.shape == (48, L)
    assert ((fast - naive).abs().max() / naive.abs().max()).item() < 1e-4


def test_fft_length_is_smooth_and_long_enough():
    for n in [1, 2, 7, 60000, 60022, 400000, 400014]:
        m = fft_length(n)
        assert m >= n and m < 1.25 * n + 8
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        assert m == 1


def _hidden(model, x):
    return model.hidden(x).transpose(1, 2)


def test_s4mil_is_causal_before_pooling():
    torch.manual_seed(0)
    model = create_model("s4mil", in_dim=16, d_model=32).eval()
    x = torch.randn(1, 60, 16)
    x2 = x.clone()
    x2[:, 31:] = torch.randn(1, 29, 16)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            h, h2 = _hidden(model, x), _hidden(model, x2)
        torch.testing.assert_close(h[:, :31], h2[:, :31], atol=1e-5, rtol=1e-5)
        assert (h[:, 31:] - h2[:, 31:]).abs().amax() > 1e-3
        with torch.set_grad_enabled(grad):
            s, s2 = model(x)["patch_scores"], model(x2)["patch_scores"]
        torch.testing.assert_close(s[:, :31], s2[:, :31], atol=1e-5, rtol=1e-5)


def test_s4d_inference_path_cache_and_channel_blocks_match_autograd():
    torch.manual_seed(0)
    layer = S4D(24, 16, transposed=False).eval()
    u = torch.randn(2, 2100, 24)
    reference = layer(u).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(u), reference, atol=1e-5, rtol=1e-4)
        assert layer._cache is not None
        torch.testing.assert_close(layer(u), reference, atol=1e-5, rtol=1e-4)
        layer.fft_block = 1000
        torch.testing.assert_close(layer(u), reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer(u).detach(), reference, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        layer.kernel.log_dt.add_(0.3)
    changed = layer(u).detach()
    assert (changed - reference).abs().amax() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(layer(u), changed, atol=1e-5, rtol=1e-4)
    layer.train()
    assert layer._cache is None


@pytest.mark.parametrize("L", [16 * 32, 16 * 32 + 77, 3000])
def test_s4d_chunked_inference_passes_the_state_between_chunks(L):
    """Long bags are convolved in chunks with the diagonal state carried over: same output as the full FFT."""
    torch.manual_seed(0)
    layer = S4D(20, 16, transposed=True, chunk_len=32).eval()
    with torch.no_grad():
        layer.kernel.log_dt.fill_(math.log(1e-3))  # slow decay: earlier chunks matter
    u = torch.randn(2, 20, L)
    reference = layer(u).detach()  # autograd path: one full-length FFT
    with torch.no_grad():
        chunked = layer(u)
        layer.fft_block = 3000  # several channel blocks
        blocks = layer(u)
        far = (
            layer._conv_chunked(u)[..., -1]
            - layer._conv_chunked(torch.cat([0 * u[..., :32], u[..., 32:]], -1))[..., -1]
        )
    torch.testing.assert_close(chunked, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(blocks, reference, atol=1e-4, rtol=1e-4)
    assert far.abs().amax() > 1e-3  # the first chunk still reaches the last position


def test_s4mil_blocked_inference_projection_matches_the_autograd_path():
    """Eval-mode inference projects blocks of patches straight into the S4D layout; same numbers, batches kept apart."""
    torch.manual_seed(0)
    model = create_model("s4mil", in_dim=40, d_model=24, d_state=8).eval()
    x = torch.randn(2, 1300, 40)
    reference = model(x)["logits"].detach()
    with torch.inference_mode():
        torch.testing.assert_close(model._project_inference(x, rows=512), model.norm(model.fc1(x)).transpose(1, 2))
        torch.testing.assert_close(model(x)["logits"], reference, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(x[1:])["logits"], reference[1:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("multitask", [False, True])
def test_s4mil_streams_long_bags_block_by_block_with_the_same_numbers(multitask):
    """A long bag in inference runs projection, chunked S4D, mixing and scoring one block at a time,
    the S4D state carried between blocks: the same logits and patch scores as the autograd path."""
    torch.manual_seed(0)
    model = create_model("s4mil", in_dim=40, d_model=24, d_state=8, multitask=multitask).eval()
    model.s4.chunk_len = 32
    model.s4.fft_block = 2 * 24 * 33 * 3  # two bags, three chunks per block: 1613 patches take 17 blocks
    with torch.no_grad():
        model.s4.kernel.log_dt.fill_(math.log(1e-3))  # slow decay: earlier blocks matter
    x = torch.randn(2, 32 * 16 * 3 + 77, 40)
    reference = {k: v.detach() for k, v in model(x).items()}
    with torch.inference_mode():
        assert model._streams(x) and not model._streams(x[:, :500])
        assert model.s4.block_positions(2) == 96
        out = model(x)
    assert out.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(out[key], value, atol=1e-5, rtol=1e-4)


def test_optimizer_groups_honour_the_s4d_hints():
    model = create_model("s4mil", in_dim=16, d_model=32)
    groups = optim_groups(model, lr=2e-4, weight_decay=1e-3)
    hinted = [g for g in groups if g["weight_decay"] == 0.0]
    assert len(hinted) == 1 and hinted[0]["lr"] == 2e-4 and len(hinted[0]["params"]) == 3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.Adam(groups)


@pytest.mark.parametrize("name,cfg", [(n, {}) for n in NAMES] + [("s4mil", {"multitask": True})])
def test_gradients_reach_every_parameter(name, cfg):
    torch.manual_seed(0)
    model = create_model(name, in_dim=16, n_classes=3, **cfg).train()
    out = model(torch.randn(2, 7, 16))
    loss = out["logits"].square().sum() + out["patch_scores"].square().sum()
    if "patch_logits" in out:
        loss = loss + out["patch_logits"].square().sum()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_parameter_count_matches_the_paper():
    n = sum(p.numel() for p in create_model("s4mil").parameters())
    print(f"\ns4mil binary, in_dim 1024, d_state 32: {n:,} parameters (paper: {PAPER_S4MIL_PARAMS:,})")
    assert abs(n - PAPER_S4MIL_PARAMS) / PAPER_S4MIL_PARAMS < 0.02


def _toy_bags(n: int, L: int, generator: torch.Generator):
    x = torch.randn(n, L, 16, generator=generator)
    x[..., 0] = x[..., 0].clamp(max=1.5)
    y = torch.arange(n) % 2
    where = torch.randint(0, L, (n,), generator=generator)
    hit = 2.5 + 1.5 * torch.rand(n, generator=generator)
    x[y == 1, where[y == 1], 0] = hit[y == 1]
    return x, y


@pytest.mark.parametrize("name", ["s4mil", "abmil", "maxpool"])
def test_learns_a_trivial_mil_task(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = create_model(name, in_dim=16, n_classes=2, d_model=64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        x, y = _toy_bags(16, 50, gen)
        loss = torch.nn.functional.cross_entropy(model(x)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _toy_bags(400, 50, gen)
    with torch.no_grad():
        accuracy = (model(x)["logits"].argmax(-1) == y).float().mean().item()
    print(f"\n{name}: toy MIL accuracy {accuracy:.3f}")
    assert accuracy > 0.9


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    cfg = {"multitask": True, "d_model": 32} if name == "s4mil" else {}
    model = create_model(name, in_dim=16, n_classes=3, **cfg).eval()
    save_checkpoint(model, tmp_path / name, card={"classes": ["a", "b", "c"]})
    loaded, card = load_checkpoint(tmp_path / name)
    assert card["family"] == "mil" and card["config"]["in_dim"] == 16
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_200k_patch_bag_runs_in_eval_mode_within_memory():
    code = textwrap.dedent("""
        import resource, sys, time
        import napari_pathfm.models, napari_pathfm.models.layers
        assert "torch" not in sys.modules, "importing the models/layers packages imported torch"
        import torch
        from napari_pathfm.models import create_model
        torch.set_num_threads(1)
        model = create_model("s4mil", in_dim=64).eval()
        x = torch.randn(1, 200_000, 64)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(x)
        assert out["patch_scores"].shape == (1, 200_000, 2) and torch.isfinite(out["logits"]).all()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{time.perf_counter() - t0:.2f} {rss:.2f}")
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    seconds, gib = map(float, out.stdout.split())
    print(f"\n200 000 x 64 bag: forward {seconds:.1f} s, peak RSS {gib:.2f} GiB")
    assert gib < 8 and math.isfinite(seconds)
