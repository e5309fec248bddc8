"""Checkpoints (.safetensors + JSON card) and safe loading of foreign weight files."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from napari_pathfm import __version__
from napari_pathfm.errors import CheckpointError
from napari_pathfm.models import create_model, list_checkpoints, load_checkpoint, read_card, save_checkpoint
from napari_pathfm.models.weights import LoadReport, load_into, load_state_dict_file, rename_keys

CARD = {
    "classes": ["tumor", "stroma", "fat"],
    "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "input_mpp": 0.5,
    "tile_size": 64,
    "training_data": "unit test",
    "metrics": {"val_acc": 0.5},
}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return create_model("timm_classifier", backbone="resnet10t", num_classes=3).eval()


@pytest.fixture
def saved(net, tmp_path):
    return save_checkpoint(net, tmp_path / "clf", CARD)


def test_round_trip_outputs_identical(net, saved):
    model, _card = load_checkpoint(saved)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    assert not model.training


def test_card_contents(saved):
    card = read_card(saved)
    assert saved.name == "clf.safetensors" and saved.with_suffix(".json").is_file()
    assert card["name"] == "timm_classifier" and card["family"] == "classify"
    assert card["config"] == {"backbone": "resnet10t", "num_classes": 3, "in_chans": 3, "drop_rate": 0.0}
    for key, value in CARD.items():
        assert card[key] == value
    assert card["package_version"] == __version__
    assert card["created"].startswith("20")
    assert card["sha256"] == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert card["num_parameters"] > 1_000_000
    assert list_checkpoints(saved.parent)[0][0] == saved


def test_no_temporary_files_left(saved):
    assert sorted(p.name for p in saved.parent.iterdir()) == ["clf.json", "clf.safetensors"]


def test_interrupted_save_keeps_old_checkpoint(net, saved, monkeypatch):
    import safetensors.torch

    before = (saved.read_bytes(), saved.with_suffix(".json").read_bytes())

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    other = create_model("timm_classifier", backbone="resnet10t", num_classes=3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(other, saved, CARD)
    assert (saved.read_bytes(), saved.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["clf.json", "clf.safetensors"]


def test_missing_card(saved):
    saved.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=r"clf\.json.*model card not found"):
        load_checkpoint(saved)


def test_unknown_model_name(saved):
    card_path = saved.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["name"] = "path_sam2_future"
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="path_sam2_future.*does not know"):
        load_checkpoint(saved)


def test_shape_mismatch_names_keys(saved):
    card_path = saved.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["config"]["num_classes"] = 5
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(saved)
    text = str(err.value)
    assert str(saved) in text
    assert "wrong shape: fc.weight (file [3, 512] vs model [5, 512])" in text


def test_corrupt_weights(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(saved)
    with pytest.raises(CheckpointError, match=r"clf\.safetensors.*not a readable safetensors file"):
        load_checkpoint(saved, verify=False)


# --- foreign weight files -------------------------------------------------------------

_EXECUTED = []


def _side_effect():
    _EXECUTED.append(True)
    return "pwned"


class Evil:
    def __reduce__(self):
        return (_side_effect, ())


def test_pt_state_dict_loads_with_weights_only(net, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(net.state_dict(), path)
    sd = load_state_dict_file(path)
    assert set(sd) == set(net.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 10},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"lr": 0.1}},
        lambda sd: {"state_dict": {f"module.model.{k}": v for k, v in sd.items()}},
    ],
    ids=["lightning", "model+ddp", "ddp+lightning"],
)
def test_containers_unwrapped(net, tmp_path, wrap):
    path = tmp_path / "w.ckpt"
    torch.save(wrap(net.state_dict()), path)
    assert set(load_state_dict_file(path)) == set(net.state_dict())


def test_refuses_arbitrary_pickle(net, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": net.state_dict(), "extra": Evil()}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_file(path)
    text = str(err.value)
    assert str(path) in text
    assert "refused to unpickle arbitrary objects" in text
    assert "safetensors" in text  # says how to convert
    assert not _EXECUTED


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown weights format"):
        load_state_dict_file(tmp_path / "w.npz")
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.pt")


def test_load_report_plain_words(net):
    target = create_model("timm_classifier", backbone="resnet10t", num_classes=4)
    sd = dict(net.state_dict())
    sd.pop("conv1.0.weight")
    sd["projector.weight"] = torch.zeros(2)
    report = load_into(target, sd)
    total = len(target.state_dict())
    assert isinstance(report, LoadReport) and not report.ok
    assert report.missing == ["conv1.0.weight"]
    assert report.unexpected == ["projector.weight"]
    assert [k for k, _, _ in report.mismatched] == ["fc.weight", "fc.bias"]
    text = str(report)
    assert text.startswith(
        f"loaded {total - 3} of {total} tensors; missing (the model has them, the file does not): conv1.0.weight"
    )
    assert "unexpected (in the file, not in the model): projector.weight" in text
    assert torch.equal(target.layer1[0].conv1.weight, net.layer1[0].conv1.weight)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_into(target, sd, strict=True, source="foreign.pth")


def test_key_map_in_timm_filter_style(net):
    foreign = {f"encoder.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    target = create_model("timm_classifier", backbone="resnet10t", num_classes=3)
    report = load_into(target, foreign, key_map=rename_keys({"encoder.": ""}))
    assert report.missing == ["fc.weight", "fc.bias"] and not report.unexpected
