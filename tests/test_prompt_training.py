"""Path-SAM2's click/box prompt path (issue 18 part 1, model and training): SAM's prompt encoder, one more
mask token, and training with prompts simulated from the ground-truth masks; off unless asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from toy_models import TINY_PATHSAM2 as MODEL  # the toy Path-SAM2 of the dock tests

from napari_pathfm.models import create_model
from napari_pathfm.training.prompt_clicks import simulate_prompts

TINY = {**MODEL, "high_res": True}
RECIPES = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "recipes" / "pathsam2"


def test_prompt_path_is_optional_and_named_as_sam():
    plain = create_model("pathsam2", num_classes=2, **TINY)
    assert plain.prompt_encoder is None and not [k for k in plain.state_dict() if "prompt_encoder" in k]
    with pytest.raises(ValueError, match="no prompt path"):
        plain.decode_prompt(None, plain.encode(torch.zeros(1, 3, 64, 64)), torch.zeros(1, 1, 2), torch.ones(1, 1))
    model = create_model("pathsam2", num_classes=2, prompts=True, **TINY).eval()
    keys = set(model.state_dict())
    assert {"prompt_encoder.point_embeddings.0.weight", "prompt_encoder.not_a_point_embed.weight"} <= keys
    assert "prompt_decoder.mask_tokens.weight" in keys and "decoder.mask_tokens.weight" in keys
    x = torch.rand(2, 3, 64, 64)
    enc = model.encode(x)
    pts, lbl = torch.tensor([[[10.0, 12.0], [0.0, 0.0]], [[40.0, 30.0], [5.0, 5.0]]]), torch.tensor([[1, -1], [1, 0]])
    with torch.no_grad():
        a = model.decode_prompt(x, enc, pts, lbl)
        b = model.decode_prompt(x, enc, pts.flip(0), lbl.flip(0))
        c = model.decode_prompt(x, enc, None, None, torch.tensor([[2.0, 2.0, 30.0, 30.0], [0.0, 0.0, 63.0, 63.0]]))
    assert a.shape == c.shape == (2, 1, 64, 64)
    assert not torch.allclose(a, b), "where the click is changes the mask"


def test_simulated_prompts_pick_one_gland_of_a_real_mask(shared_data):
    from PIL import Image

    path = shared_data / "glas" / "train" / "masks" / "train_1.png"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    mask = (np.asarray(Image.open(path))[:256, :256] > 0).astype(np.uint8)
    p = simulate_prompts(mask[None], np.random.default_rng(1), p_box=1.0, p_negative=1.0, p_box_only=0.0)
    (target,) = p["targets"]
    x, y = (int(v) for v in p["points"][0, 0])
    assert p["labels"][0, 0] == 1 and target[y, x] == 1, "the positive click is on the object"
    if p["labels"][0, 1] == 0:
        nx, ny = (int(v) for v in p["points"][0, 1])
        assert mask[ny, nx] == 0, "the negative click is on background"
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    assert len(np.unique(labels[target == 1])) == 1, "the target is one gland"
    ys, xs = np.nonzero(target)
    h, w = ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()
    exact = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
    assert (np.abs(p["boxes"][0] - exact) <= 0.1 * np.array([w, h, w, h]) + 1e-3).all(), "SAM's box noise"
    alone = simulate_prompts(mask[None], np.random.default_rng(1), p_box=1.0, p_box_only=1.0)
    assert alone["boxes"] is not None and (alone["labels"] == -1).all(), "a box alone, as a user draws it"


def test_training_with_simulated_prompts_saves_a_promptable_model(shared_data, tmp_path):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app
    from napari_pathfm.models.checkpoint import load_checkpoint

    if not (shared_data / "glas" / "train").is_dir():
        pytest.skip("GlaS not found")
    out = tmp_path / "run"
    sets = ["model.prompts=true", "loss.prompt_weight=1.0", "trainer.max_epochs=1", "model.high_res=true"]
    args = ["train", str(RECIPES / "glas_tiny.yaml"), "--out", str(out), *[a for s in sets for a in ("--set", s)]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    events = (out / "events.jsonl").read_text()
    assert "train_loss_prompt" in events, "the prompt loss is logged"
    model, card = load_checkpoint(out / "model.safetensors")
    assert model.prompt_encoder is not None and card["recipe"]["loss"]["prompt_weight"] == 1.0
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        logits = model.decode_prompt(x, model.encode(x), torch.tensor([[[32.0, 32.0]]]), torch.tensor([[1]]))
    assert logits.shape == (1, 1, 64, 64) and torch.isfinite(logits).all()
