"""CUDA checks of the models and training steps; skipped where no GPU is present (as in CI).

They compare each GPU result with the CPU one on the same weights and inputs, so a
device-specific bug (a kernel cache left on the wrong device, a dtype that differs)
shows up as a number, not as a crash later in the napari widget.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (CI has none)")


def _pair(name: str, **kw):
    from napari_pathfm.models.registry import create_model

    torch.manual_seed(0)
    cpu = create_model(name, **kw).eval()
    gpu = create_model(name, **kw).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


@pytest.mark.parametrize("name", ["s4mil", "meanpool", "maxpool", "abmil", "transmil"])
def test_mil_models_give_the_cpu_answer_on_cuda(name):
    cpu, gpu = _pair(name, in_dim=64, n_classes=3)
    x = torch.randn(1, 5000, 64, generator=torch.Generator().manual_seed(1))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        a, b = cpu(x), gpu(x.cuda())
        b2 = gpu(x.cuda())  # s4mil: second call uses the cached kernel
    for key in ("logits", "patch_scores"):
        torch.testing.assert_close(b[key].cpu(), a[key], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(b2["logits"], b["logits"])


def test_s4mil_cached_kernel_follows_the_model_between_devices():
    cpu, gpu = _pair("s4mil", in_dim=32, n_classes=2, d_model=64, d_state=8)
    x = torch.randn(1, 300, 32)
    with torch.inference_mode():
        ref = cpu(x)["logits"]
        gpu(x.cuda())
        back = gpu.cpu()(x)["logits"]  # a kernel cached on CUDA must not leak into the CPU call
    torch.testing.assert_close(back, ref, rtol=1e-4, atol=1e-4)


def test_mil_training_steps_reduce_the_loss_on_cuda():
    from napari_pathfm.models.registry import create_model
    from napari_pathfm.training.tasks.mil import MILTask

    torch.manual_seed(0)
    model = create_model("s4mil", in_dim=16, n_classes=2, d_model=32, d_state=8, multitask=True)
    task = MILTask(model, 2, {"name": "adam", "lr": 2e-3, "weight_decay": 1e-4, "lookahead_k": 5}, 5, 5.0, True).cuda()
    opt = task.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    bags = []
    for b in range(8):
        pl = (torch.rand(200, generator=g) < (0.2 if b % 2 else 0.0)).long()
        x = torch.randn(1, 200, 16, generator=g) + 2.0 * pl[None, :, None]
        bags.append({"features": x.cuda(), "label": torch.tensor([b % 2]).cuda(), "patch_labels": pl[None].cuda()})
    losses = []
    for _ in range(15):
        total = 0.0
        for batch in bags:
            opt.zero_grad()
            loss = task.compute_loss(batch)[1]
            loss.backward()
            opt.step()
            total += float(loss)
        losses.append(total)
    assert losses[-1] < 0.5 * losses[0], losses


def test_feature_extractor_matches_cpu_on_cuda():
    import numpy as np

    cpu, gpu = _pair("resnet50_trunc", backbone="resnet18", input_size=0)
    tiles = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        torch.testing.assert_close(gpu(tiles).cpu(), cpu(tiles), rtol=2e-3, atol=2e-3)


def test_auto_device_picks_cuda():
    from napari_pathfm.device import resolve_device

    assert str(resolve_device("auto")).startswith("cuda")


def test_pathsam2_matches_cpu_on_cuda_and_trains():
    from napari_pathfm.models.pathsam2.loss import pathsam2_loss

    kw = dict(
        num_classes=3,
        encoder="hiera_micro",
        uni="uni_micro",
        image_size=128,
        decoder_dim=64,
        decoder_heads=4,
        decoder_mlp_dim=128,
        freeze_encoders=False,
    )
    cpu, gpu = _pair("pathsam2", **kw)
    g = torch.Generator().manual_seed(4)
    y = torch.zeros(2, 128, 128, dtype=torch.long)
    y[0, :, :64], y[1, 64:, :] = 1, 2  # learnable: each class is a half-image with its own colour
    x = torch.randn(2, 3, 128, 128, generator=g) * 0.3
    x[:, 0] += 2.0 * (y == 1)
    x[:, 1] += 2.0 * (y == 2)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        a, b = cpu(x), gpu(x.cuda())
    # fused attention kernels on CUDA round differently through 5 transformer blocks: 1e-2, not 1e-3
    torch.testing.assert_close(b["logits"].cpu(), a["logits"], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(b["iou"].cpu(), a["iou"], rtol=1e-2, atol=1e-2)
    opt = torch.optim.AdamW(gpu.parameters(), lr=1e-3)
    losses = []
    gpu.train()
    for _ in range(40):
        loss, _ = pathsam2_loss(gpu(x.cuda()), y.cuda())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses  # 0.60 -> 0.35 in 30 steps on the CPU


def test_pathsam2_paper_configuration_runs_at_1024_under_bf16():
    from napari_pathfm.models.registry import create_model

    model = create_model("pathsam2", num_classes=2).cuda().eval()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 1024, 1024, device="cuda"))
    assert out["logits"].shape == (1, 2, 1024, 1024) and torch.isfinite(out["logits"]).all()


def test_embedding_cache_on_cuda_gives_the_uncached_answer_and_is_keyed_by_precision(tmp_path):
    """Segment and classify the bundled slide on CUDA (bf16 autocast) with and without the cache:
    the cached second run equals the uncached one, and CPU float32 runs get their own entries."""
    import numpy as np

    from napari_pathfm.checkpoints import BUNDLED_MODELS
    from napari_pathfm.demo import demo_classify_checkpoint
    from napari_pathfm.pipelines.classify import classify_slide
    from napari_pathfm.pipelines.segment import segment_slide
    from napari_pathfm.tiles.embedding_cache import EmbeddingCache

    slide = BUNDLED_MODELS.parent / "CMU-1-Small-Region.svs"
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)  # these small models are cheaper to recompute
    ref = segment_slide(slide, device="cuda", cache=False)
    cold = segment_slide(slide, device="cuda", cache=cache)
    warm = segment_slide(slide, device="cuda", cache=cache)
    assert warm.cache["tiles_from_cache"] == ref.n_tiles and warm.cache["tiles_encoded"] == 0
    np.testing.assert_array_equal(np.asarray(warm.labels), np.asarray(ref.labels))  # bf16 outputs kept bit for bit
    np.testing.assert_array_equal(np.asarray(cold.labels), np.asarray(ref.labels))
    c_ref = classify_slide(slide, demo_classify_checkpoint(), device="cuda", cache=False)
    classify_slide(slide, demo_classify_checkpoint(), device="cuda", cache=cache)
    c_warm = classify_slide(slide, demo_classify_checkpoint(), device="cuda", cache=cache)
    assert c_warm.cache["tiles_from_cache"] == c_ref.n_tiles
    np.testing.assert_allclose(c_warm.probabilities, c_ref.probabilities, atol=1e-6)
    n_entries = len(cache.entries())
    assert segment_slide(slide, device="cpu", cache=cache).cache["tiles_encoded"] == ref.n_tiles
    assert len(cache.entries()) == n_entries + 1
