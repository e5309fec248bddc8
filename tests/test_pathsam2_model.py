"""Path-SAM2 model: KAN layers, shapes, frozen encoders, loss, and loading original-format weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_pathfm.errors import CheckpointError
from napari_pathfm.models.registry import create_model

SMALL = dict(
    encoder="hiera_micro", uni="uni_micro", image_size=64, decoder_dim=64, decoder_heads=4, decoder_mlp_dim=128
)


def small(**kw):
    torch.manual_seed(0)
    return create_model("pathsam2", **{"num_classes": 3, **SMALL, **kw})


# --- KAN ---------------------------------------------------------------------------------


def test_b_spline_bases_form_a_partition_of_unity_on_the_grid():
    from napari_pathfm.models.pathsam2.kan import KANLinear

    layer = KANLinear(4, 2)
    x = torch.linspace(-1, 0.999, 50)[:, None].repeat(1, 4)
    bases = layer.b_splines(x)
    assert bases.shape == (50, 4, 5 + 3)
    torch.testing.assert_close(bases.sum(-1), torch.ones(50, 4))
    assert (bases >= 0).all()


def test_kan_layer_is_base_branch_plus_splines():
    from napari_pathfm.models.pathsam2.kan import KANLinear

    torch.manual_seed(0)
    layer = KANLinear(3, 2)
    x = torch.rand(5, 3) * 2 - 1
    by_hand = torch.nn.functional.silu(x) @ layer.base_weight.T
    w = layer.spline_weight * layer.spline_scaler[..., None]
    by_hand = by_hand + torch.einsum("nik,oik->no", layer.b_splines(x), w)
    torch.testing.assert_close(layer(x), by_hand)
    layer(x).sum().backward()
    assert layer.spline_weight.grad.abs().sum() > 0 and layer.base_weight.grad.abs().sum() > 0


# --- the network -------------------------------------------------------------------------------


def test_forward_gives_per_class_masks_at_input_size_and_iou():
    model = small().eval()
    tiles = np.random.default_rng(0).integers(0, 255, (2, 80, 80, 3), dtype=np.uint8)
    x = model.preprocess(tiles)
    assert x.shape == (2, 3, 64, 64) and abs(float(x.mean())) < 2
    out = model(x)
    assert out["logits"].shape == (2, 3, 64, 64) and out["iou"].shape == (2, 3)
    assert model.predict(tiles).shape == (2, 64, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 48, 48))


def test_high_res_features_reach_the_masks_as_in_sam2():
    """high_res: the trunk's stride-4/8 features enter the decoder's upscaling (SAM2's use_high_res_features),
    so they are in encode()'s output (what the embedding cache stores) and they change the masks."""
    model = small(high_res=True).eval()
    x = model.preprocess(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    enc = model.encode(x)
    assert {k: tuple(v.shape[-2:]) for k, v in enc.items() if k.startswith("hiera")} == {
        "hiera": (2, 2),
        "hiera_s0": (16, 16),
        "hiera_s1": (8, 8),
    }
    out = model.decode(None, enc)
    assert out["logits"].shape == (2, 3, 64, 64)
    torch.testing.assert_close(out["logits"], model(x)["logits"])
    zeroed = {**enc, "hiera_s0": torch.zeros_like(enc["hiera_s0"])}
    assert not torch.allclose(model.decode(None, zeroed)["logits"], out["logits"])
    assert model.embedding_spec()["config"]["high_res"] is True
    assert "hiera_s0" not in small().eval().encode(x), "off by default: older checkpoints load as they were"


def test_kan_and_mlp_heads_are_the_ablation_switch():
    kan, mlp = small(), small(prompt_head="mlp")
    assert type(kan.prompt_generator).__name__ == "KAN" and len(kan.prompt_generator.layers) == 3
    assert type(mlp.prompt_generator).__name__ == "MLP"
    assert type(kan.decoder.output_hypernetworks_mlps[0]).__name__ == "KAN"
    assert type(kan.decoder.iou_prediction_head).__name__ == "KAN"
    assert mlp(torch.zeros(1, 3, 64, 64))["logits"].shape == (1, 3, 64, 64)


def test_frozen_encoders_get_no_gradients_and_stay_in_eval_mode():
    model = small(freeze_encoders=True).train()
    assert not model.trunk.training and not model.uni.training and model.decoder.training
    out = model(torch.randn(1, 3, 64, 64))
    out["logits"].sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    assert all(p.grad is None for p in model.uni.parameters())
    assert model.align.conv1.weight.grad is not None and model.class_embed.weight.grad is not None
    trainable = small(freeze_encoders=False)
    assert all(p.requires_grad for p in trainable.trunk.parameters())


def test_sam2_alone_without_uni():
    model = small(uni=None)
    assert model.uni is None and model(torch.zeros(1, 3, 64, 64))["logits"].shape == (1, 3, 64, 64)


def test_hiera_mini_preset_is_a_wider_deeper_trunk_with_the_same_strides():
    """``hiera_mini`` (the bigger CPU preset; benchmarks/segment_glas/levers.md) builds and keeps micro's strides."""
    mini, micro = small(encoder="hiera_mini", uni=None, high_res=True), small(uni=None)
    assert [f["num_chs"] for f in mini.trunk.feature_info] == [64, 128, 256, 512]
    assert [f["reduction"] for f in mini.trunk.feature_info] == [f["reduction"] for f in micro.trunk.feature_info]
    assert len(mini.trunk.blocks) == 9 and len(micro.trunk.blocks) == 5
    assert mini(torch.zeros(1, 3, 64, 64))["logits"].shape == (1, 3, 64, 64)


def test_paper_configuration_builds_with_frozen_foundation_encoders():
    model = create_model("pathsam2", num_classes=2)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.input_size == 1024 and model.uni.embed_dim == 1024 and len(model.uni.blocks) == 24
    assert 350e6 < total < 420e6 and trainable < 15e6  # Hiera-B+ (69M) + ViT-L (303M) frozen
    assert model.uni.blocks[0].ls1.gamma.detach().abs().max() == pytest.approx(1e-5)


# --- loss --------------------------------------------------------------------------------------


def test_loss_is_small_for_the_right_masks_and_ignores_the_ignore_label():
    from napari_pathfm.models.pathsam2.loss import pathsam2_loss

    target = torch.zeros(1, 16, 16, dtype=torch.long)
    target[0, 4:12, 4:12] = 1
    onehot = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float()
    good = {"logits": (onehot * 2 - 1) * 20, "iou": torch.ones(1, 2)}
    bad = {"logits": -good["logits"], "iou": torch.ones(1, 2)}
    lg, parts = pathsam2_loss(good, target)
    lb, _ = pathsam2_loss(bad, target)
    assert float(lg) < 0.01 and float(lb) > 0.8 and float(parts["iou_mse"]) < 1e-6
    ignored = target.clone()
    ignored[0, :2] = 255
    flipped = {k: v.clone() for k, v in good.items()}
    flipped["logits"][0, :, :2] *= -1  # wrong only where the label is ignored
    assert float(pathsam2_loss(flipped, ignored)[0]) == pytest.approx(float(pathsam2_loss(good, ignored)[0]), abs=1e-4)
    # the IoU head is pulled toward the true IoU of the thresholded mask
    half = {"logits": good["logits"].clone(), "iou": torch.ones(1, 2)}
    half["logits"][0, 1, 8:12] = -20  # half of the class-1 square missed
    _, p = pathsam2_loss(half, target)
    assert float(p["iou_mse"]) == pytest.approx(((1 - 0.5) ** 2 + 0.0) / 2, rel=1e-3)  # class 0 still exact


# --- original-format weights ----------------------------------------------------------------------


def _sam2_decoder_tensors(dim=256, mlp=2048, internal=128, tokens=4):
    """An original SAM2 checkpoint's decoder/prompt-encoder keys with their real shapes (random values)."""
    t = {}
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    def attn(prefix, inner):
        for p in ("q_proj", "k_proj", "v_proj"):
            t[f"{prefix}.{p}.weight"], t[f"{prefix}.{p}.bias"] = r(inner, dim), r(inner)
        t[f"{prefix}.out_proj.weight"], t[f"{prefix}.out_proj.bias"] = r(dim, inner), r(dim)

    d = "sam_mask_decoder."
    for i in range(2):
        L = f"{d}transformer.layers.{i}"
        attn(f"{L}.self_attn", dim)
        attn(f"{L}.cross_attn_token_to_image", internal)
        attn(f"{L}.cross_attn_image_to_token", internal)
        t[f"{L}.mlp.layers.0.weight"], t[f"{L}.mlp.layers.0.bias"] = r(mlp, dim), r(mlp)
        t[f"{L}.mlp.layers.1.weight"], t[f"{L}.mlp.layers.1.bias"] = r(dim, mlp), r(dim)
        for n in range(1, 5):
            t[f"{L}.norm{n}.weight"], t[f"{L}.norm{n}.bias"] = 1 + r(dim), r(dim)
    attn(f"{d}transformer.final_attn_token_to_image", internal)
    t[f"{d}transformer.norm_final_attn.weight"], t[f"{d}transformer.norm_final_attn.bias"] = 1 + r(dim), r(dim)
    t[f"{d}iou_token.weight"], t[f"{d}mask_tokens.weight"], t[f"{d}obj_score_token.weight"] = (
        r(1, dim),
        r(tokens, dim),
        r(1, dim),
    )
    t[f"{d}output_upscaling.0.weight"], t[f"{d}output_upscaling.0.bias"] = r(dim, dim // 4, 2, 2), r(dim // 4)
    t[f"{d}output_upscaling.1.weight"], t[f"{d}output_upscaling.1.bias"] = 1 + r(dim // 4), r(dim // 4)
    t[f"{d}output_upscaling.3.weight"], t[f"{d}output_upscaling.3.bias"] = r(dim // 4, dim // 8, 2, 2), r(dim // 8)
    t[f"{d}conv_s0.weight"], t[f"{d}conv_s1.weight"] = r(dim // 8, dim, 1, 1), r(dim // 4, dim, 1, 1)
    for k in range(tokens):
        for j, (o, i) in enumerate([(dim, dim), (dim, dim), (dim // 8, dim)]):
            t[f"{d}output_hypernetworks_mlps.{k}.layers.{j}.weight"] = r(o, i)
    for j, (o, i) in enumerate([(256, dim), (256, 256), (tokens, 256)]):
        t[f"{d}iou_prediction_head.layers.{j}.weight"] = r(o, i)
    t["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = r(2, dim // 2) * 50
    t["sam_prompt_encoder.no_mask_embed.weight"] = r(1, dim)
    t["sam_prompt_encoder.point_embeddings.0.weight"] = r(1, dim)
    t["image_encoder.neck.convs.0.conv.weight"] = r(dim, 768, 1, 1)
    t["memory_attention.layers.0.self_attn.q_proj.weight"] = r(dim, dim)
    t["maskmem_tpos_enc"] = r(7, 1, 1, 64)
    return t


def _sam2_checkpoint(path, encoder="sam2_hiera_tiny"):
    """``{"model": state_dict}`` as the SAM2 release ships it: trunk keys under image_encoder.trunk. with
    SAM2's ``mlp.layers.i`` names (timm renames them fc1/fc2), no classifier norm, plus decoder and others."""
    import timm
    from timm.models.hieradet_sam2 import HieraDet

    from napari_pathfm.models.pathsam2.encoders import HIERA_PRESETS

    torch.manual_seed(2)
    trunk = (
        HieraDet(num_classes=0, **HIERA_PRESETS[encoder])
        if encoder in HIERA_PRESETS
        else timm.create_model(encoder, num_classes=0)
    )
    sd = {}
    for k, v in trunk.state_dict().items():
        if k.startswith("head."):
            continue
        sd["image_encoder.trunk." + k.replace("mlp.fc1", "mlp.layers.0").replace("mlp.fc2", "mlp.layers.1")] = v
    sd.update(_sam2_decoder_tensors())
    torch.save({"model": sd}, path)
    return sd


def test_original_sam2_checkpoint_loads_trunk_and_compatible_decoder(tmp_path):
    ckpt = tmp_path / "sam2_hiera_tiny.pt"
    sd = _sam2_checkpoint(ckpt)
    assert "image_encoder.trunk.blocks.0.mlp.layers.0.weight" in sd
    torch.manual_seed(0)
    model = create_model(
        "pathsam2", num_classes=2, encoder="sam2_hiera_tiny", uni=None, image_size=64, sam2_checkpoint=str(ckpt)
    )
    trunk = model.load_reports["sam2_trunk"]
    assert not [k for k in trunk.missing if not k.startswith("head.")] and len(trunk.loaded) > 100
    torch.testing.assert_close(
        model.trunk.blocks[0].mlp.fc1.weight, sd["image_encoder.trunk.blocks.0.mlp.layers.0.weight"]
    )
    dec = model.load_reports["sam2_decoder"]
    assert "decoder.transformer.layers.1.mlp.layers.1.weight" in dec.loaded
    assert "pe_layer.positional_encoding_gaussian_matrix" in dec.loaded and "decoder.no_mask_embed.weight" in dec.loaded
    torch.testing.assert_close(
        model.decoder.output_upscaling[3].weight, sd["sam_mask_decoder.output_upscaling.3.weight"]
    )
    report = model.weights_report()
    assert "sam2_trunk" in report and "sam2_decoder" in report
    assert "pathsam2" in model.pathfm_config["name"] and "sam2_checkpoint" not in model.pathfm_config
    assert model(torch.zeros(1, 3, 64, 64))["logits"].shape == (1, 2, 64, 64)


def test_sam2_checkpoint_of_another_size_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "sam2_hiera_micro_as_tiny.pt"
    _sam2_checkpoint(ckpt, encoder="hiera_micro")
    with pytest.raises(CheckpointError, match="does not fit") as err:
        create_model(
            "pathsam2", num_classes=2, encoder="sam2_hiera_tiny", uni=None, image_size=64, sam2_checkpoint=str(ckpt)
        )
    assert str(ckpt) in str(err.value)
    other = tmp_path / "not_sam2.pt"
    torch.save({"model": {"backbone.weight": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not an original SAM2 checkpoint"):
        small(sam2_checkpoint=str(other))


def test_sam_v1_decoder_weights_load_with_their_own_mlp_names(tmp_path):
    sam2 = _sam2_decoder_tensors()
    sam1 = {}
    for k, v in sam2.items():
        if k.startswith("sam_mask_decoder."):
            k = "mask_decoder." + k[len("sam_mask_decoder.") :]
            k = k.replace(".mlp.layers.0.", ".mlp.lin1.").replace(".mlp.layers.1.", ".mlp.lin2.")
        elif k.startswith("sam_prompt_encoder."):
            k = "prompt_encoder." + k[len("sam_prompt_encoder.") :]
        sam1[k] = v
    sam1["image_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam1, path)
    model = small(decoder_dim=256, decoder_heads=8, decoder_mlp_dim=2048, sam_checkpoint=str(path))
    rep = model.load_reports["sam_decoder"]
    assert "decoder.transformer.layers.0.mlp.layers.0.weight" in rep.loaded
    torch.testing.assert_close(
        model.decoder.transformer.layers[0].mlp.layers[0].weight,
        sam1["mask_decoder.transformer.layers.0.mlp.lin1.weight"],
    )


def test_decoder_weights_of_another_width_are_skipped_and_reported(tmp_path):
    path = tmp_path / "sam2.pt"
    _sam2_checkpoint(path, encoder="hiera_micro")
    model = small(encoder="hiera_micro", sam2_checkpoint=str(path))  # decoder_dim 64 here, the file has 256
    dec = model.load_reports["sam2_decoder"]
    assert dec.mismatched and "decoder.transformer.layers.0.self_attn.q_proj.weight" in [m[0] for m in dec.mismatched]


def test_uni_weights_load_from_timm_vit_keys_and_mismatches_are_refused(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from napari_pathfm.models.pathsam2.encoders import UNI_PRESETS

    torch.manual_seed(3)
    vit = VisionTransformer(img_size=224, num_classes=0, dynamic_img_size=True, **UNI_PRESETS["uni_micro"])
    sd = vit.state_dict()
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.ls1.gamma", "norm.weight"} <= set(sd)
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    model = small(uni_checkpoint=str(path))
    assert not model.load_reports["uni"].missing
    torch.testing.assert_close(model.uni.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    with pytest.raises(CheckpointError, match="does not fit the UNI encoder"):
        small(uni="vit_small_patch16_224", uni_checkpoint=str(path))
    with pytest.raises(CheckpointError, match="no UNI encoder"):
        small(uni=None, uni_checkpoint=str(path))


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    from napari_pathfm.models.checkpoint import load_checkpoint, save_checkpoint

    model = small().eval()
    path = save_checkpoint(model, tmp_path / "pathsam2-small", {"family": "segment", "classes": ["bg", "a", "b"]})
    again, card = load_checkpoint(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x)["logits"], model(x)["logits"])
    assert card["config"]["encoder"] == "hiera_micro" and card["family"] == "segment"
