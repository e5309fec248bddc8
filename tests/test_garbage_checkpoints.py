"""Garbage checkpoints and weights are refused with a message that names the file (issue 14, part 4).

Real files only: the bundled checkpoints copied to tmp_path and poisoned with NaN/Inf (card sha256
recomputed, so only the NaN check can catch them), an unrelated .safetensors given to training as
model.weights, backbone files that fit only partly, and .pt/.ckpt pickles given as checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from _cli_helpers import cli_refuses
from safetensors.torch import load_file, save_file

from napari_pathfm.errors import CheckpointError
from napari_pathfm.io.jsonsafe import UndefinedMetricWarning
from napari_pathfm.models import create_model, load_checkpoint, read_card
from napari_pathfm.models.weights import check_fit, load_into, load_state_dict_file

MODELS = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "data" / "models"
DATA = MODELS.parent
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "classify" / "crc_tiny.yaml"
BACKBONE = MODELS / "resnet10t-trunc-glas-bncal.safetensors"  # resnet10t up to layer3, no card
UNRELATED = MODELS / "s4mil-glas-glands-demo.safetensors"  # a MIL model: nothing in it fits a CNN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def poison(stem: str, dst: Path, value: float = float("nan"), n_tensors: int = 1) -> Path:
    """Copy bundled checkpoint ``stem`` to ``dst`` with ``value`` in the first ``n_tensors`` float
    tensors, re-hashed in the card as a diverged training run would have written it."""
    sd = load_file(str(MODELS / f"{stem}.safetensors"))
    floats = [k for k, t in sd.items() if t.is_floating_point()]
    for k in floats[:n_tensors]:
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] = value
    weights = dst / f"{stem}.safetensors"
    save_file(sd, str(weights))
    card = json.loads((MODELS / f"{stem}.json").read_text())
    card["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    card["weights_file"] = weights.name
    weights.with_suffix(".json").write_text(json.dumps(card))
    return weights


# --- NaN / Inf tensors ------------------------------------------------------------------------


def test_nan_checkpoint_with_matching_card_is_refused_naming_the_tensor(tmp_path):
    weights = poison("haste-isl-dapi", tmp_path)
    first = next(k for k, t in load_file(str(weights)).items() if t.is_floating_point())
    assert read_card(weights)["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()  # sha256 cannot catch it
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(weights)
    text = str(err.value)
    assert str(weights) in text and first in text
    assert "NaN or Inf values in 1 of" in text and "earlier checkpoint" in text


def test_inf_in_several_tensors_gives_count_and_first_names(tmp_path):
    weights = poison("s4mil-glas-glands-demo", tmp_path, value=float("inf"), n_tensors=7)
    with pytest.raises(CheckpointError, match=r"NaN or Inf values in 7 of \d+ tensors \(.* and 2 more\)"):
        load_checkpoint(weights)
    with pytest.raises(CheckpointError, match="NaN or Inf"):  # the foreign-weights path checks too
        load_state_dict_file(weights)


def test_nan_in_pickled_backbone_weights_is_refused(tmp_path):
    sd = load_file(str(BACKBONE))
    sd["conv1.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError, match=r"backbone\.pth.*conv1\.0\.weight"):
        create_model("resnet50_trunc", backbone="resnet10t", weights=tmp_path / "backbone.pth")


def test_cli_translate_refuses_nan_checkpoint(tmp_path):
    weights = poison("haste-isl-dapi", tmp_path)
    cli_refuses(
        ["translate", DATA / "isl-blue-crop.ome.tif", "-c", weights, "--out", tmp_path / "out"],
        weights.name,
        "NaN or Inf",
    )
    assert not (tmp_path / "out" / "summary.json").exists()


# --- weights that do not fit ------------------------------------------------------------------


def test_unrelated_weights_refused_with_table():
    with pytest.raises(CheckpointError) as err:
        create_model("timm_classifier", backbone="resnet10t", num_classes=3, weights=UNRELATED)
    text = str(err.value)
    assert str(UNRELATED) in text and "0 matched" in text
    for row in ("matched", "missing", "unexpected", "wrong shape"):
        assert row in text
    with pytest.raises(CheckpointError, match="0 matched"):  # asking for a partial load does not help
        create_model("timm_classifier", backbone="resnet10t", weights=UNRELATED, partial_weights=True)


def test_partly_fitting_weights_need_partial_weights():
    with pytest.raises(CheckpointError) as err:
        create_model("timm_classifier", backbone="resnet10t", num_classes=3, weights=BACKBONE)
    text = str(err.value)
    assert "layer4." in text and "model.partial_weights: true" in text
    net = create_model("timm_classifier", backbone="resnet10t", num_classes=3, weights=BACKBONE, partial_weights=True)
    assert torch.equal(net.conv1[0].weight, load_file(str(BACKBONE))["conv1.0.weight"])
    assert net.pathfm_load_report.missing and "partial_weights" not in net.pathfm_config


def test_feature_backbone_partial_weights(tmp_path):
    full = create_model("timm_classifier", backbone="resnet18", num_classes=2)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    with pytest.raises(CheckpointError, match=r"r18\.safetensors: does not fit the resnet10t backbone"):
        create_model("timm_features", backbone="resnet10t", weights=tmp_path / "r18.safetensors")
    ex = create_model("timm_features", backbone="resnet10t", weights=tmp_path / "r18.safetensors", partial_weights=True)
    assert ex.load_report.mismatched and ex.load_report.loaded
    ok = create_model("resnet50_trunc", backbone="resnet10t", weights=BACKBONE)  # a file that fits still loads
    assert ok.load_report.ok


def test_check_fit_counts_and_ignored_head():
    net = create_model("timm_classifier", backbone="resnet10t", num_classes=4)
    other = create_model("timm_classifier", backbone="resnet10t", num_classes=3).state_dict()
    report = load_into(net, other, dry_run=True)
    assert check_fit(report, "w.safetensors", "net", ignore=("fc.",)) is report  # only the head differs: fine
    with pytest.raises(CheckpointError, match=r"wrong shape\s+2\s+fc\.weight"):
        check_fit(report, "w.safetensors", "net")


def test_training_with_unrelated_weights_is_refused(shared_data, tmp_path, monkeypatch):
    from napari_pathfm.training.engine import run_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    with pytest.raises(CheckpointError, match=r"s4mil-glas-glands-demo\.safetensors: has no tensor that fits"):
        run_recipe(TINY, [f"model.weights={UNRELATED}"], output=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    cli_refuses(
        ["train", TINY, "--out", tmp_path / "run2", "--set", f"model.weights={UNRELATED}"],
        "s4mil-glas-glands-demo.safetensors",
        "0 matched",
    )


def test_training_with_partial_weights_on_purpose(shared_data, tmp_path, monkeypatch):
    from napari_pathfm.training.engine import run_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    sets = [
        f"model.weights={BACKBONE}",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "data.image_size=32",
        "trainer.log_every_n_steps=1",
    ]
    with pytest.raises(CheckpointError, match="partial_weights"):
        run_recipe(TINY, sets, output=tmp_path / "refused", device="cpu")
    result = run_recipe(TINY, [*sets, "model.partial_weights=true"], output=tmp_path / "run", device="cpu")
    card = read_card(result.checkpoint)
    assert "partial_weights" not in card["config"] and "weights" not in card["config"]
    json.loads((tmp_path / "run" / "model.json").read_text())  # strict JSON


# --- pickles given as checkpoints -------------------------------------------------------------


def test_pt_given_as_checkpoint_says_what_it_is(tmp_path):
    net = create_model("timm_classifier", backbone="resnet10t", num_classes=2)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "model.pt")
    text = str(err.value)
    assert str(tmp_path / "model.pt") in text and "a PyTorch pickle" in text
    assert "model card not found" not in text
    assert ".safetensors" in text and "weights_only=True" in text and "model.safetensors" in text


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/pathfm-garbage-pwned"),))


def test_lightning_ckpt_given_as_checkpoint_is_named_and_never_unpickled(tmp_path):
    Path("/tmp/pathfm-garbage-pwned").unlink(missing_ok=True)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"pytorch-lightning_version": "2.4.0", "state_dict": {"model.w": torch.zeros(2)}, "x": _Evil()}, ckpt)
    with pytest.raises(CheckpointError, match=r"last\.ckpt: is a PyTorch Lightning training checkpoint"):
        read_card(ckpt)
    text = cli_refuses(
        ["classify", DATA / "CMU-1-Small-Region.svs", "-c", ckpt, "--out", tmp_path / "out"],
        "last.ckpt",
        "Lightning",
        ".safetensors",
    )
    assert "model card not found" not in text
    assert not Path("/tmp/pathfm-garbage-pwned").exists()


def test_diverged_training_warns_at_export_and_its_checkpoint_is_refused(shared_data, tmp_path, monkeypatch):
    from napari_pathfm.training.engine import run_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    sets = [
        "optim.lr=1e30",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "data.image_size=32",
        "trainer.log_every_n_steps=1",
        "trainer.early_stopping=false",
    ]
    with (
        pytest.warns(UndefinedMetricWarning, match="metrics.best.val_loss"),
        pytest.warns(RuntimeWarning, match="training diverged"),
    ):
        result = run_recipe(TINY, sets, output=tmp_path / "run", device="cpu")
    json.loads((tmp_path / "run" / "model.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "warning" and "diverged" in e["message"] for e in events)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: holds NaN or Inf"):
        load_checkpoint(result.checkpoint)
