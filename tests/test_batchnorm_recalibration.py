"""recalibrate_batchnorm: BatchNorm running statistics recomputed with dropout off, nothing else changed."""

import pytest

torch = pytest.importorskip("torch")

from napari_pathfm.training.batchnorm import recalibrate_batchnorm


def _net():
    torch.manual_seed(0)
    # conv -> dropout -> BN, as in the tiramisu dense layers (BN-ReLU-conv-dropout, then the next layer's BN)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.Dropout2d(0.5),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 2, 1),
        torch.nn.BatchNorm2d(2),
    )


def test_statistics_are_those_of_the_batches_with_dropout_off():
    net = _net()
    net.train()
    with torch.no_grad():  # ordinary training-mode passes: running stats of the dropped-out features
        for _ in range(20):
            net(torch.randn(8, 3, 16, 16))
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    x = torch.randn(16, 3, 16, 16) * 2 + 1
    assert recalibrate_batchnorm(net, [{"input": x[:8]}, {"input": x[8:]}]) == 16
    feats = net[0](x)  # what the first BN sees without dropout
    per_batch = [f.transpose(0, 1).flatten(1) for f in (feats[:8], feats[8:])]
    assert torch.allclose(net[2].running_mean, sum(f.mean(1) for f in per_batch) / 2, atol=1e-5)
    assert torch.allclose(net[2].running_var, sum(f.var(1) for f in per_batch) / 2, atol=1e-4)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())  # weights untouched
    assert net.training and all(m.training for m in net.modules())  # flags restored
    assert net[2].momentum == 0.1 and net[5].momentum == 0.1


def test_eval_output_matches_batch_statistics_after_recalibration():
    """The dropout variance shift: eval mode is far from batch statistics before, close after."""
    net = _net()
    net.train()
    with torch.no_grad():
        for _ in range(50):
            net(torch.randn(8, 3, 16, 16))
    x = torch.randn(64, 3, 16, 16)

    def batch_stats_output():
        net.eval()
        for m in (net[2], net[5]):
            m.train()
        with torch.no_grad():
            out = net(x)
        net.eval()
        return out

    reference = batch_stats_output()
    net.eval()
    with torch.no_grad():
        before = (net(x) - reference).abs().mean()
    recalibrate_batchnorm(net, [x])
    net.eval()
    with torch.no_grad():
        after = (net(x) - reference).abs().mean()
    assert after < 0.01 < before, (before, after)


def test_lupi_unet_is_recalibrated_in_place():
    from napari_pathfm.models import create_model

    net = create_model(
        "lupi_unet",
        in_channels=3,
        init_filters=8,
        down_blocks=[1, 1],
        up_blocks=[1, 1],
        bottleneck_layers=1,
        growth_rate=4,
    )
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert recalibrate_batchnorm(net, (torch.rand(2, 3, 32, 32) + 5 for _ in range(3))) == 6
    assert all(int(m.num_batches_tracked) == 3 for m in norms)  # every layer, counted from a reset
    assert all(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)


def test_empty_batches_leave_the_model_unchanged_and_no_batchnorm_is_a_no_op():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(net, [])
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert net[2].momentum == 0.1
    assert recalibrate_batchnorm(torch.nn.Conv2d(1, 1, 1), [torch.zeros(1, 1, 2, 2)]) == 0
