"""SLCA classifier: fusion maths, tap mapping, backbone families, frozen SAM, SAM checkpoints, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from napari_pathfm.errors import CheckpointError
from napari_pathfm.models.registry import create_model

REPO = Path(__file__).resolve().parents[1]
TINY_SAM = {"depth": 4, "embed_dim": 64, "num_heads": 2, "neck_chans": 32}
SMALL = {"backbone": "resnet10t", "num_classes": 3, "sam_img_size": 64, "sam_kwargs": TINY_SAM, "projector_dim": 32}


def small(**kw):
    torch.manual_seed(0)
    return create_model("slca", **{**SMALL, **kw})


def _sam_state(img_size: int, seed: int = 1) -> tuple[torch.nn.Module, dict]:
    """A tiny timm SAM with random weights and its state dict written in the original SAM key format."""
    import timm

    torch.manual_seed(seed)
    enc = timm.create_model(
        "samvit_base_patch16",
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        depth=4,
        embed_dim=64,
        num_heads=2,
        neck_chans=32,
        global_attn_indexes=[0, 1, 2, 3],
    )
    for p in enc.parameters():  # zero-initialised position tables would hide resampling errors
        p.data.normal_(0, 0.02) if p.ndim > 1 else None
    sd = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v.clone() for k, v in enc.state_dict().items()}
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    return enc.eval(), sd


# --- fusion blocks --------------------------------------------------------------------------------


def test_slap_keeps_size_and_averages_only_inside_the_map():
    from napari_pathfm.models.layers.slca import SLAP

    x = torch.full((1, 2, 5, 7), 3.0)
    torch.testing.assert_close(SLAP(3)(x), x)  # no zero padding leaks into the border means
    x = torch.arange(25.0).view(1, 1, 5, 5)
    y = SLAP(3)(x)
    assert y.shape == x.shape and y[0, 0, 2, 2] == x[0, 0, 1:4, 1:4].mean() and y[0, 0, 0, 0] == x[0, 0, :2, :2].mean()
    with pytest.raises(ValueError, match="odd"):
        SLAP(4)


@pytest.mark.parametrize("fusion", ["slca", "sigmoid", "add"])
def test_fusions_compute_the_documented_formula(fusion):
    from napari_pathfm.models.layers.slca import TapFusion

    torch.manual_seed(0)
    block = TapFusion(6, 16, fusion, kernel=3, reduction=2)
    feat, tap = torch.randn(2, 16, 8, 8), torch.randn(2, 6, 4, 4)
    p = block.proj(torch.nn.functional.interpolate(tap, size=(8, 8), mode="bilinear", align_corners=False))
    if fusion == "add":
        expected = feat + p
    elif fusion == "sigmoid":
        expected = feat + feat * torch.sigmoid(p)
    else:
        pooled = torch.nn.functional.avg_pool2d(p, 3, stride=1, padding=1, count_include_pad=False)
        hidden = torch.relu(block.attn.down(pooled))
        assert block.attn.down.out_channels == 8  # 16 channels / r=2
        expected = feat + feat * torch.sigmoid(block.attn.up(hidden))
    torch.testing.assert_close(block(feat, tap), expected)
    assert (block.attn is None) == (fusion != "slca")


# --- the network ----------------------------------------------------------------------------------


# SwinV2 at toy width/depth (same code path, a fraction of the build time)
SWIN = {"img_size": 64, "window_size": 4, "embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
FAMILIES = [
    ("resnet10t", None, False),
    ("legacy_seresnet18", None, False),
    ("swinv2_cr_tiny_ns_224", SWIN, False),
    ("swinv2_tiny_window8_256", SWIN, True),
    ("efficientnet_b0", None, False),  # forward_features ends in a 1280-wide conv after the last stage
]


@pytest.mark.parametrize("backbone,kwargs,nhwc", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_backbone_family_fuses_after_every_stage(backbone, kwargs, nhwc):
    model = small(backbone=backbone, backbone_kwargs=kwargs).eval()
    assert model.nhwc is nhwc and len(model.fused) == 4
    assert all(s.fusion is not None for s in model.fused)
    seen, cam = [], []
    hooks = [s.fusion.register_forward_hook(lambda m, a, o: seen.append(o.shape) and None) for s in model.fused]
    hooks.append(model.gradcam_target_layers()[0].register_forward_hook(lambda m, a, o: cam.append(o.shape)))
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert [s[-1] for s in seen] == [16, 8, 4, 2]  # strides 4..32 of 64 px, NCHW inside the fusion
    assert cam == [(2, model.backbone.num_features, 2, 2)]  # NCHW for Grad-CAM whatever the layout
    assert model.get_classifier() is model.head.fc and model.head.fc.in_features == cam[0][1] + 32
    with pytest.raises(RuntimeError, match="without its SAM tap"):  # taps live only during the model's pass
        model.backbone.forward_features(x)


def test_tap_mapping_defaults_and_choices():
    model = small()
    assert model.taps == ["patch_embed", 0, 1, 3] and model.projector_tap == "neck"  # depth 4: middle = block 1
    feats = model.sam_features(torch.randn(1, 3, 96, 96))  # resized to sam_img_size=64 -> 4x4 grid
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "patch_embed": (1, 64, 4, 4),
        0: (1, 64, 4, 4),
        1: (1, 64, 4, 4),
        3: (1, 64, 4, 4),
        "neck": (1, 32, 4, 4),
    }
    model = small(taps=[None, "middle", -1, 2, "last"], projector=True)
    assert model.taps == [None, 1, 3, 2] and model.projector_tap == 3 and model.fused[0].fusion is None
    assert model.fused[1].fusion.proj.in_channels == 64 and model.projector.stem[0].in_channels == 64
    assert small(taps=["neck"] * 4).projector_tap == "neck"
    with pytest.raises(ValueError, match="taps has 3 entries but the backbone has 4 stages"):
        small(taps=["first", "last", "neck"])
    with pytest.raises(ValueError, match="unknown tap 'lastt'"):
        small(taps=["lastt"] * 4)
    with pytest.raises(ValueError, match="outside the SAM encoder's 4 blocks"):
        small(taps=[7, 0, 0, 0])


def test_ablation_switches_change_parameters_and_outputs():
    x = torch.randn(2, 3, 64, 64)
    outs, names = {}, {}
    for tag, kw in {
        "slca": {},
        "sigmoid": {"fusion": "sigmoid"},
        "add": {"fusion": "add"},
        "no_projector": {"projector": False},
        "neck_only": {"taps": [None, None, None, "neck", "neck"]},
    }.items():
        model = small(**kw).eval()
        outs[tag] = model(x)
        names[tag] = {n for n, _ in model.named_parameters()}
    assert any("fusion.attn.down." in n for n in names["slca"])
    assert not any("fusion.attn." in n for n in names["sigmoid"])
    assert {n for n in names["sigmoid"] if "fusion" in n} == {n for n in names["add"] if "fusion" in n}
    assert not any(n.startswith("projector.") for n in names["no_projector"])
    assert {n.split(".fusion.")[0] for n in names["neck_only"] if ".fusion." in n} == {"backbone.layer4"}
    tags = list(outs)
    for i, a in enumerate(tags):
        for b in tags[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), (a, b)
    with pytest.raises(ValueError, match="fusion must be one of"):
        small(fusion="mul")


def test_one_step_trains_everything_but_the_frozen_sam():
    model = small().train()
    assert not model.sam.training and model.fused[0].training  # SAM stays in eval mode
    assert not any(p.requires_grad for p in model.sam.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(p.grad is None for p in model.sam.parameters())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("sam.") for n in changed)
    for part in (
        "backbone.conv1.",
        "backbone.layer1.stage.",
        "backbone.layer1.fusion.attn.up.",
        "backbone.layer4.fusion.proj.",
        "projector.stem.",
        "projector.down.2.",
        "head.fc.",
    ):
        assert any(n.startswith(part) for n in changed), part
    unfrozen = small(freeze_sam=False).train()
    assert unfrozen.sam.training and all(p.requires_grad for p in unfrozen.sam.parameters())


def test_parameter_count_of_the_paper_size_model():
    """resnet152 + SAM ViT-B at 1024 px, counted on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = create_model("slca", backbone="resnet152", sam="samvit_base_patch16", num_classes=9)
    count = lambda m: sum(p.numel() for p in m.parameters())
    sam, head = count(model.sam), count(model.head)
    fusions = sum(count(s.fusion) for s in model.fused)
    backbone = count(model.backbone) - fusions
    total, trainable = count(model), sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"slca resnet152+samvit_base: total {total:,}; SAM {sam:,}; backbone {backbone:,}; fusions {fusions:,}; "
        f"projector {count(model.projector):,}; head {head:,}; trainable {trainable:,}"
    )
    assert sam == 89_670_912  # timm samvit_base_patch16 encoder at 1024 px (SAM ViT-B)
    assert backbone == 60_192_808 - 2048 * 1000 - 1000  # timm resnet152 without its ImageNet head
    assert head == (2048 + 256) * 9 + 9 and trainable == total - sam
    assert total == sam + backbone + fusions + count(model.projector) + head


# --- weights --------------------------------------------------------------------------------------


def test_original_sam_checkpoint_loads_and_position_tables_follow_the_input_size(tmp_path):
    enc, sd = _sam_state(img_size=128)
    assert {
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.blocks.3.attn.rel_pos_h",
        "image_encoder.blocks.0.mlp.lin1.weight",
        "image_encoder.neck.3.bias",
    } <= set(sd)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(sd, path)
    kw = {"sam_kwargs": {**TINY_SAM, "global_attn_indexes": [0, 1, 2, 3]}}
    same = small(sam_img_size=128, sam_checkpoint=str(path), **kw)
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(same.sam.state_dict()[k], v)
    assert same.load_reports["sam"].ok and "sam_checkpoint" not in same.pathfm_config
    # Built for 64 px: tables resampled once at load == what timm does to the 128-px tables on the fly.
    smaller = small(sam_img_size=64, **kw).eval()
    smaller.load_sam(path)
    assert smaller.sam.pos_embed.shape == (1, 4, 4, 64) and smaller.sam.blocks[0].attn.rel_pos_h.shape == (7, 32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(smaller.sam.forward_features(x), enc.forward_features(x), rtol=1e-4, atol=1e-5)
    assert "sam: loaded" in smaller.weights_report()
    # timm's own samvit key format (e.g. the Hugging Face timm/samvit_*.sa1b safetensors) loads too
    from safetensors.torch import save_file

    timm_file = tmp_path / "samvit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(timm_file))
    assert small(sam_img_size=128, **kw).load_sam(timm_file).ok


def test_foreign_checkpoints_are_refused_with_the_fix(tmp_path):
    sam2 = tmp_path / "sam2_hiera_base_plus.pt"
    torch.save({"model": {"image_encoder.trunk.blocks.0.attn.qkv.weight": torch.zeros(6, 2)}}, sam2)
    with pytest.raises(CheckpointError, match=r"sam2_hiera_base_plus\.pt.*SAM2.*sam_vit_h_4b8939\.pth"):
        small(sam_checkpoint=str(sam2))
    uni = tmp_path / "pytorch_model.bin"
    torch.save(
        {
            "cls_token": torch.zeros(1, 1, 8),
            "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
            "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
        },
        uni,
    )
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*plain ViT.*UNI"):
        small(sam_checkpoint=str(uni))
    huge = tmp_path / "sam_vit_h_4b8939.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1280, 3, 16, 16)}, huge)
    with pytest.raises(CheckpointError, match=r"sam_vit_h_4b8939\.pth.*1280-wide.*Set model\.sam to 'samvit_huge"):
        small(sam_checkpoint=str(huge))
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet125' \(close matches: resnet152"):
        small(backbone="resnet125")
    with pytest.raises(ValueError, match=r"unknown SAM encoder 'sam_vit_h'.*samvit_huge_patch16"):
        small(sam="sam_vit_h")
    with pytest.raises(ValueError, match="no hierarchy of feature stages"):
        small(backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 64})


def test_backbone_weights_load_and_wrong_ones_are_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    good = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(good))
    model = small(backbone_weights=str(good))
    torch.testing.assert_close(model.backbone.layer2.stage[0].conv1.weight, ref.layer2[0].conv1.weight)
    assert "backbone_weights" not in model.pathfm_config and "fc.weight" in model.load_reports["backbone"].unexpected
    bad = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(bad))
    with pytest.raises(CheckpointError, match=r"resnet18\.safetensors.*does not fit the timm backbone 'resnet10t'"):
        small(backbone_weights=str(bad))


# --- training through the classify engine -----------------------------------------------------------


@pytest.mark.slow
def test_classify_recipe_trains_slca_and_the_export_reproduces_logits(shared_data, tmp_path, monkeypatch):
    from napari_pathfm.models import load_checkpoint
    from napari_pathfm.training import run_recipe

    monkeypatch.setenv("PATHFM_SHARED_DATA", str(shared_data))
    recipe = yaml.safe_load((REPO / "training" / "classify" / "crc_tiny.yaml").read_text())
    recipe["model"] = {"name": "slca", **{k: v for k, v in SMALL.items() if k != "num_classes"}}
    recipe["data"]["image_size"] = 64
    recipe["trainer"]["max_epochs"] = 1
    path = tmp_path / "crc_slca_tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_recipe(path, output=tmp_path / "run", progress=lambda *a: None, device="cpu")
    assert result.epochs_run == 1 and result.checkpoint.is_file()
    model, card = load_checkpoint(result.checkpoint)
    assert card["name"] == "slca" and card["config"]["sam_kwargs"] == TINY_SAM and len(card["classes"]) == 8
    assert card["config"]["taps"] == ["patch_embed", "first", "middle", "last", "neck"]
    trained = torch.load(result.output / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    again = create_model("slca", **card["config"]).eval()
    again.load_state_dict({k[len("model.") :]: v for k, v in trained.items() if k.startswith("model.")})
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))
        assert torch.equal(model(x), model(x))


def test_registry_entry_matches_the_factory():
    from napari_pathfm.models import registry

    small()
    runtime, builtin = registry._RUNTIME["slca"], registry._BUILTINS["slca"]
    assert {**runtime.default_cfg, "taps": list(runtime.default_cfg["taps"])} == builtin.default_cfg
    assert (runtime.family, runtime.target) == (builtin.family, builtin.target) == ("classify", builtin.target)


def test_recipe_file_keys_are_relative_to_the_recipe(tmp_path):
    from napari_pathfm.training.recipes import load_recipe

    (tmp_path / "recipes").mkdir()
    path = tmp_path / "recipes" / "slca.yaml"
    path.write_text(
        "family: classify\nmodel: {name: slca, sam_checkpoint: ../weights/sam_vit_h_4b8939.pth, "
        "backbone_weights: r152.safetensors, sam_kwargs: {depth: 4}}\ndata: {root: tiles}\n"
    )
    model = load_recipe(path).get("model")
    assert model["sam_checkpoint"] == str(tmp_path / "weights" / "sam_vit_h_4b8939.pth")
    assert model["backbone_weights"] == str(tmp_path / "recipes" / "r152.safetensors")
    assert model["sam_kwargs"] == {"depth": 4}


@pytest.mark.parametrize(
    "backbone,kwargs,channels",
    [
        ("resnet152", None, [256, 512, 1024, 2048]),
        ("legacy_senet154", None, [256, 512, 1024, 2048]),
        ("swinv2_base_window8_256", {"img_size": 224, "window_size": 7}, [128, 256, 512, 1024]),
    ],
)
def test_paper_backbones_with_sam_vit_h_build(backbone, kwargs, channels):
    """The paper's configurations construct (on the meta device): 4 fused stages fed by SAM ViT-H's 1280-d taps."""
    with torch.device("meta"):
        model = create_model(
            "slca", backbone=backbone, sam="samvit_huge_patch16", num_classes=4, backbone_kwargs=kwargs
        )
    assert [s.fusion.proj.out_channels for s in model.fused] == channels
    assert [s.fusion.proj.in_channels for s in model.fused] == [1280] * 4
    assert model.projector.stem[0].in_channels == 256 and model.head.fc.in_features == channels[-1] + 256
    assert sum(p.numel() for p in model.sam.parameters()) == 637_026_048  # timm samvit_huge_patch16 (SAM ViT-H)


def test_concurrent_passes_and_copies_give_the_same_logits():
    import copy
    from concurrent.futures import ThreadPoolExecutor

    model = small().eval()
    xs = [torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        alone = [model(x) for x in xs]
        with ThreadPoolExecutor(2) as pool:  # each thread's pass sees its own SAM taps
            together = list(pool.map(model, xs))
        twin = copy.deepcopy(model)
        for a, b, x in zip(alone, together, xs):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(twin(x), a)
