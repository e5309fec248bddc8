"""A fine-tune from painted corrections trains with the loss its checkpoint was trained with.

The bundled Path-SAM2 is trained with the U-Net paper's border weights (the gaps between glands
count up to 11x); a fine-tune that dropped them would teach the model to merge neighbouring glands
again. On a real GlaS tile painted as a correction, with a tiny random-init Path-SAM2 whose card
says how it was trained, the fine-tune runs through the engine and its new card shows the loss.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(folder, model_settings, loss=None):
    from napari_pathfm.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("pathsam2", num_classes=2, **model_settings)
    card = {"family": "segment", "classes": ["background", "gland"], "num_classes": 2, "input_mpp": 2.48}
    card["tile_size"] = 64
    if loss is not None:
        card["recipe"] = {"family": "segment", "loss": loss}
    return save_checkpoint(model, folder / "toy-pathsam2", card)


def _corrections(shared_data, folder):
    """One corrected 64 px tile of GlaS train_3 at 2.48 µm/px with its real gland mask, as the recorder writes it."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    glas = shared_data / "glas" / "train"
    if not (glas / "images" / "train_3.png").is_file():
        pytest.skip(f"GlaS train_3 not found under {glas}")
    Image.open(glas / "images" / "train_3.png").reduce(4).crop((0, 0, 64, 64)).save(folder / "images" / "t.png")
    labels = Image.open(glas / "masks" / "train_3.png")  # gland instances; nearest keeps them whole
    mask = np.asarray(labels.resize((labels.width // 4, labels.height // 4), Image.NEAREST).crop((0, 0, 64, 64)))
    Image.fromarray((mask > 0).astype(np.uint8)).save(folder / "masks" / "t.png")
    (folder / "corrections.json").write_text(json.dumps({"mpp": 2.48, "classes": ["background", "gland"]}))
    return folder


def test_a_finetune_keeps_the_checkpoints_border_weights(shared_data, tmp_path, tiny_pathsam2):
    from napari_pathfm.training.finetune import finetune_from_corrections, finetune_recipe

    corr = _corrections(shared_data, tmp_path / "corrections")
    trained = {"alpha": 0.25, "beta": 0.01, "border_weight": 10, "border_sigma_um": 5.0, "prompt_weight": 0.0}
    ckpt = _checkpoint(tmp_path / "weighted", tiny_pathsam2, trained)
    out = finetune_from_corrections(ckpt, corr, epochs=1, output=tmp_path / "ft", device="cpu")
    card = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    loss = card["recipe"]["loss"]
    assert (loss["border_weight"], loss["border_sigma_um"], loss["alpha"]) == (10, 5.0, 0.25)
    assert np.isfinite(card["metrics"]["best"]["train_loss"])

    plain = finetune_recipe(_checkpoint(tmp_path / "plain", tiny_pathsam2), corr, output=tmp_path / "ft2")
    assert plain.get("loss.border_weight") == 0.0, "a checkpoint without a recipe keeps the defaults"
