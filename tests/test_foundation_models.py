"""Foundation models by name, offline: a Hugging Face cache written here, features that record and check
the weights' sha256, and the `pathfm models list|verify` commands.

Each test builds its own hub cache in ``tmp_path`` (``HF_HUB_CACHE``) in the real layout
(``models--ORG--NAME/{refs/main, snapshots/<commit>/, blobs/<sha256>}``) holding tiny random-weight
timm ViTs saved by timm's own ``save_for_hf`` (``config.json`` with ``architecture``, ``model_args``,
``pretrained_cfg``), so the code reads exactly what ``hf download`` leaves on a user's disk.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from napari_pathfm.cli import app
from napari_pathfm.errors import InputError

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
TINY = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32, "init_values": 1e-5}
NAME = "hf-hub:pathfm-test/tiny-vit"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_to_cache(cache, repo: str, model, *, drop_args=(), commit: str = "0123456789abcdef" * 2 + "01234567"):
    """Save ``model`` with timm's ``save_for_hf`` into ``cache`` as ``hf download repo`` would leave it."""
    from safetensors.torch import save_file
    from timm.models._hub import save_for_hf

    staging = cache.parent / f"staging-{repo.replace('/', '-')}"
    save_for_hf(model, staging, model_args={k: None for k in drop_args} or None)
    config = json.loads((staging / "config.json").read_text())
    for key in drop_args:  # layer classes cannot be written to JSON: the model card passes them in code
        config["model_args"].pop(key, None)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, staging / "model.safetensors")
    (staging / "pytorch_model.bin").unlink()
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for f in staging.iterdir():
        blob = root / "blobs" / _sha(f)
        shutil.move(f, blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob.name}")
    staging.rmdir()
    return snap / "model.safetensors"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache with one tiny ViT (``pathfm-test/tiny-vit``); returns (cache folder, model, weights file)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY)
    return cache, model, add_to_cache(cache, "pathfm-test/tiny-vit", model)


def test_name_resolves_to_exactly_the_cached_weights(hub):
    from napari_pathfm.models import create_model

    _, model, weights = hub
    fx = create_model("timm_features", backbone=NAME)
    ref = model.blocks[0].attn.qkv.weight
    assert torch.equal(fx.trunk.blocks[0].attn.qkv.weight, ref)
    assert fx.backbone == NAME and fx.out_dim == 32 and fx.input_size == 32
    assert fx.weights_sha256 == _sha(weights) == weights.resolve().name  # the blob is named by its sha256
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fx(x), model.eval()(x), atol=1e-6)


def test_hf_home_and_case_insensitive_names(hub, monkeypatch):
    from napari_pathfm.models.hub_cache import hub_cache_dir, resolve_local_model

    cache, _, weights = hub
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    assert hub_cache_dir() == cache
    local = resolve_local_model("hf-hub:PathFM-Test/Tiny-ViT")  # the hub ignores case, so does the lookup
    assert local.weights == weights and local.architecture == "vit_small_patch16_224"


def test_missing_model_is_one_clear_refusal_with_exit_2(hub, cmu_small, tmp_path):
    result = runner.invoke(
        app, ["features", str(cmu_small), "--out", str(tmp_path / "f"), "--backbone", "hf-hub:nobody/absent"]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for piece in (
        "hf-hub:nobody/absent",
        "not in the local Hugging Face cache",
        "never downloads",
        "hf download nobody/absent",
    ):
        assert piece in text, text
    assert str(hub[0]) in text.replace(" ", "") or "models--nobody--absent" in text
    assert not (tmp_path / "f" / "CMU-1-Small-Region.features.zarr").exists()


def test_conch_is_refused_with_how(hub):
    from napari_pathfm.models.foundation import build_foundation

    with pytest.raises(InputError, match="conch"):
        build_foundation("hf-hub:MahmoodLab/CONCH")


def _as_transformers_dinov2(vit) -> dict:
    """A timm ViT's tensors under transformers ``Dinov2Model`` names (Phikon-v2's layout), qkv split in three."""
    out = {"embeddings.mask_token": torch.zeros(1, vit.embed_dim)}
    names = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings", "norm": "layernorm"}
    for key, value in vit.state_dict().items():
        parts = key.split(".")
        if key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + parts[-1]] = value
        elif parts[0] in names:
            out[".".join([names[parts[0]], *parts[1:]])] = value
        elif parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            layer = f"encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                for name, chunk in zip(("query", "key", "value"), value.chunk(3, 0)):
                    out[layer + f"attention.attention.{name}.{parts[-1]}"] = chunk.clone()
            elif rest.startswith("attn.proj."):
                out[layer + "attention.output.dense." + parts[-1]] = value
            elif rest.startswith(("ls1.", "ls2.")):
                out[layer + f"layer_scale{rest[2]}.lambda1"] = value
            else:
                out[layer + rest] = value  # norm1, norm2, mlp.fc1, mlp.fc2
    return out


def test_phikon_v2_transformers_layout_is_built_as_a_timm_vit(hub):
    """Phikon-v2 ships as a transformers Dinov2Model (config model_type dinov2, embeddings.* / encoder.layer.*
    names): it is built as a timm ViT with the weights renamed, and gives the original network's embedding."""
    from safetensors.torch import save_file

    from napari_pathfm.models.foundation import build_foundation

    cache = hub[0]
    torch.manual_seed(3)
    tiny = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 16, "img_size": 32, "init_values": 0.5}
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, global_pool="token", **tiny)
    snap = cache / "models--owkin--phikon-v2" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (cache / "models--owkin--phikon-v2" / "refs").mkdir()
    (cache / "models--owkin--phikon-v2" / "refs" / "main").write_text("ab" * 20)
    config = {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 16,
        "image_size": 32,
        "mlp_ratio": 4,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "qkv_bias": True,
    }
    (snap / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in _as_transformers_dinov2(vit).items()}, snap / "model.safetensors")
    built = build_foundation("hf-hub:owkin/phikon-v2")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(built.module.eval()(x), vit.eval()(x))
    assert built.out_dim == 32 and built.input_size == 32 and built.report.ok

    config["use_swiglu_ffn"] = True
    (snap / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="SwiGLU"):
        build_foundation("hf-hub:owkin/phikon-v2")


def test_virchow_layout_gives_class_and_mean_tokens_and_shows_terms_once(hub, caplog):
    """A Virchow2-shaped model (4 registers, SwiGLU from the table, config.json without layer classes)."""
    from timm.layers import SwiGLUPacked

    from napari_pathfm.models import create_model

    cache = hub[0]
    args = dict(TINY, img_size=28, reg_tokens=4, global_pool="", dynamic_img_size=True, mlp_ratio=2.0)
    torch.manual_seed(1)
    vit = timm.create_model(
        "vit_huge_patch14_224", pretrained=False, num_classes=0, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, **args
    )
    add_to_cache(cache, "paige-ai/Virchow2", vit, drop_args=("mlp_layer", "act_layer"))
    with caplog.at_level("WARNING"):
        fx = create_model("timm_features", backbone="hf-hub:paige-ai/Virchow2")
        again = create_model("timm_features", backbone="hf-hub:paige-ai/Virchow2")
    assert sum("CC-BY-NC-ND-4.0" in r.getMessage() for r in caplog.records) == 1  # licence terms shown once
    assert fx.out_dim == again.out_dim == 64
    x = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        tokens = vit.eval().forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)  # class token + patches, no registers
        assert torch.allclose(fx(x), expected, atol=1e-6)


def test_features_record_the_sha256_and_a_changed_weight_file_is_caught(hub, cmu_small, tmp_path):
    from safetensors.torch import save_file

    from napari_pathfm.io.features import extractor_card, read_feature_attrs
    from napari_pathfm.pipelines.features_many import features_command

    _, model, weights = hub
    out = tmp_path / "features"
    kw = {"mpp": 8.0, "tile": 32, "device": "cpu", "cache": False, "min_tissue": 0.1}
    first = features_command(cmu_small, out, backbone=NAME, **kw)
    assert first["counts"]["written"] == 1, first
    path = out / "CMU-1-Small-Region.features.zarr"
    attrs = read_feature_attrs(path)
    assert attrs["backbone"] == NAME and attrs["weights_sha256"] == _sha(weights)
    card = tmp_path / "mil-card.json"  # what a MIL model trained on these features keeps of them
    card.write_text(json.dumps({"family": "mil", "feature_extractor": extractor_card(attrs)}))

    ok = runner.invoke(app, ["models", "verify", str(path), str(card)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("ok ") == 2

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["blocks.0.attn.qkv.weight"] += 0.01
    blob = weights.resolve()
    blob.unlink()
    save_file(state, blob)  # the cached file changed in place (its blob name still says the old sha256)

    changed = runner.invoke(app, ["models", "verify", str(path), str(card)])
    assert changed.exit_code == 1, changed.output
    assert changed.output.count("changed") >= 2 and "the weights changed" in changed.output
    damaged = runner.invoke(app, ["models", "verify"])
    assert damaged.exit_code == 1 and "damaged" in damaged.output, damaged.output

    second = features_command(cmu_small, out, backbone=NAME, **kw)  # not reused: recomputed with the new weights
    assert second["counts"] == {"written": 1, "empty": 0, "skipped": 0, "failed": 0}, second
    assert read_feature_attrs(path)["weights_sha256"] == _sha(blob) != attrs["weights_sha256"]


def test_models_list_shows_cached_models_and_keeps_the_plain_listing(hub):
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    assert NAME in listed.output and "timm_features" in listed.output
    data = json.loads(runner.invoke(app, ["models", "list", "--json"]).output)
    assert [m["name"] for m in data["foundation"]] == [NAME]
    plain = runner.invoke(app, ["models"])
    assert plain.exit_code == 0 and "timm_features" in plain.output and NAME not in plain.output
    verified = runner.invoke(app, ["models", "verify", "--json"])  # the cache and the bundled MIL demo's extractor
    checked = json.loads(verified.output)["checked"]
    assert verified.exit_code == 0 and {r["status"] for r in checked} == {"ok"}, verified.output
    assert any(r["source"].endswith("s4mil-glas-glands-demo.safetensors") for r in checked)
    bad = runner.invoke(app, ["models", "frobnicate"])
    assert bad.exit_code == 2 and "list" in bad.output


def test_mil_model_finds_its_foundation_extractor_by_name_and_refuses_other_weights(
    hub, cmu_small, tmp_path, monkeypatch
):
    """A MIL card records hf-hub:ORG/NAME and the sha256; on a machine whose cache lives elsewhere prediction finds
    the model by name, and features or weights of another sha256 are refused, never silently used."""
    from safetensors.torch import save_file

    from napari_pathfm.errors import FeatureError
    from napari_pathfm.io.features import extractor_card, read_features
    from napari_pathfm.models import create_model, save_checkpoint
    from napari_pathfm.pipelines.features import extract_features
    from napari_pathfm.pipelines.mil import mil_predict

    cache, model, _ = hub
    kw = {"mpp": 8.0, "tile_size": 32, "device": "cpu", "cache": False, "min_tissue": 0.1}
    bag = read_features(
        extract_features(cmu_small, create_model("timm_features", backbone=NAME), tmp_path / "a.zarr", **kw)
    )
    mil = create_model("s4mil", in_dim=bag.dim, n_classes=2, d_model=16, d_state=4)
    ckpt = save_checkpoint(
        mil, tmp_path / "s4mil", {"classes": ["a", "b"], "feature_extractor": extractor_card(bag.attrs)}
    )

    moved = tmp_path / "other-machine" / "hub"
    shutil.copytree(cache, moved, symlinks=True)
    shutil.rmtree(cache)  # the recorded weights path is gone; the name still resolves in the new cache
    monkeypatch.setenv("HF_HUB_CACHE", str(moved))
    pred = mil_predict(ckpt, slide=cmu_small, device="cpu")
    assert len(pred.coords) == len(bag.features) and pred.probabilities.sum() == pytest.approx(1.0, abs=1e-5)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["norm.weight"] *= 2
    blob = next(moved.glob("models--*/snapshots/*/model.safetensors")).resolve()
    blob.unlink()
    save_file(state, blob)
    with pytest.raises(FeatureError, match="sha256"):
        mil_predict(ckpt, slide=cmu_small, device="cpu")
    other = extract_features(cmu_small, create_model("timm_features", backbone=NAME), tmp_path / "b.zarr", **kw)
    with pytest.raises(FeatureError, match="trained with"):
        mil_predict(ckpt, features=other, device="cpu")


def test_classifier_and_pathsam2_on_cached_foundation_weights_record_them_in_the_card(hub, tmp_path):
    """A tile classifier on hf-hub:ORG/NAME and Path-SAM2's UNI by name: the cached weights load, the card
    keeps name and sha256 (``foundation_weights``), and `pathfm models verify CARD` checks them."""
    from napari_pathfm.models import create_model, load_checkpoint, save_checkpoint
    from napari_pathfm.models.checkpoint import read_card

    cache, model, weights = hub
    clf = create_model("timm_classifier", backbone=NAME, num_classes=3)
    assert torch.equal(clf.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight) and clf.head.out_features == 3
    path = save_checkpoint(clf, tmp_path / "clf", {"classes": ["a", "b", "c"]})
    record = read_card(path)["foundation_weights"]["backbone"]
    assert record["backbone"] == NAME and record["weights_sha256"] == _sha(weights)
    again, _ = load_checkpoint(path)
    assert torch.equal(again.head.weight, clf.head.weight)

    torch.manual_seed(2)
    uni_micro = dict(patch_size=16, embed_dim=96, depth=2, num_heads=3, init_values=1e-5)  # pathsam2's preset
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **uni_micro)
    uni_file = add_to_cache(cache, "pathfm-test/uni-micro", vit)
    seg = create_model(
        "pathsam2",
        num_classes=2,
        encoder="hiera_micro",
        uni="uni_micro",
        image_size=64,
        decoder_dim=64,
        decoder_heads=4,
        decoder_mlp_dim=128,
        uni_checkpoint="hf-hub:pathfm-test/uni-micro",
    )
    assert torch.equal(seg.uni.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    seg_path = save_checkpoint(seg, tmp_path / "seg", {"classes": ["bg", "gland"]})
    assert read_card(seg_path)["foundation_weights"]["uni"]["weights_sha256"] == _sha(uni_file)
    verified = runner.invoke(app, ["models", "verify", str(path), str(seg_path), "--json"])
    assert verified.exit_code == 0, verified.output
    assert [r["status"] for r in json.loads(verified.output)["checked"]] == ["ok", "ok"]


def test_the_docs_table_names_every_known_model():
    from pathlib import Path

    from napari_pathfm.models.foundation import FOUNDATION_MODELS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "foundation-models.md").read_text(encoding="utf-8")
    for spec in FOUNDATION_MODELS.values():
        assert f"`{spec.repo_id}`" in doc, spec.repo_id
        assert str(spec.embed_dim) in doc


@pytest.mark.gui
def test_training_form_offers_the_cached_foundation_models(hub, qtbot):
    """The training panel's backbone row lists the models found offline (looked up in a thread), keeping its text."""
    from napari_pathfm.widgets._train_form import Form

    form = Form()
    qtbot.addWidget(form)
    form.build("classify", {"model.name": "timm_classifier", "model.backbone": "resnet10t"})
    combo = form.editors["model.backbone"][0]
    qtbot.waitUntil(lambda: combo.count() == 2, timeout=10000)
    assert combo.currentText() == "resnet10t" and combo.itemText(1) == NAME
    assert form.overrides() == []
    combo.setCurrentIndex(1)
    assert form.overrides() == [f"model.backbone={NAME}"]


def test_a_weights_file_alone_is_built_with_the_table_architecture(hub, tmp_path, monkeypatch):
    """`--backbone hf-hub:ORG/NAME --weights FILE` with no cached copy: the table's architecture and timm
    arguments (here a tiny entry added to the one table) build the network the file is loaded into."""
    from safetensors.torch import save_file

    from napari_pathfm.models import create_model
    from napari_pathfm.models.foundation import FOUNDATION_MODELS, FoundationModel

    entry = FoundationModel(
        "pathfm-test/tiny-table", "tiny", "MIT", "test terms", 32, timm_args=TINY, architecture="vit_small_patch16_224"
    )
    monkeypatch.setitem(FOUNDATION_MODELS, entry.repo_id.lower(), entry)
    _, model, _ = hub
    loose = tmp_path / "downloaded-by-hand.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, loose)
    fx = create_model("timm_features", backbone="hf-hub:pathfm-test/tiny-table", weights=str(loose))
    assert torch.equal(fx.trunk.pos_embed, model.pos_embed) and fx.weights_sha256 == _sha(loose)
    with pytest.raises(InputError, match="not in the local Hugging Face cache"):
        create_model("timm_features", backbone="hf-hub:pathfm-test/tiny-table")  # no file, no cached copy


def test_model_folders_modern_and_legacy_configs(tmp_path, monkeypatch):
    """A folder in the repository layout (`--backbone FOLDER` or `local-dir:FOLDER`), and timm's older flat
    config.json (no pretrained_cfg: the normalisation sits at the top level)."""
    from safetensors.torch import save_file
    from timm.models._hub import save_for_hf

    from napari_pathfm.models import create_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    torch.manual_seed(3)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY)
    modern = tmp_path / "modern"
    save_for_hf(model, modern, safe_serialization=True)
    (modern / "pytorch_model.bin").unlink(missing_ok=True)
    for name in (str(modern), f"local-dir:{modern}"):
        fx = create_model("timm_features", backbone=name)
        assert torch.equal(fx.trunk.patch_embed.proj.weight, model.patch_embed.proj.weight) and fx.out_dim == 32
        assert fx.weights == str(modern / "model.safetensors")

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    tiny = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, legacy / "model.safetensors")
    flat = {"architecture": "vit_tiny_patch16_224", "num_classes": 0, "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    (legacy / "config.json").write_text(json.dumps(flat))
    fx = create_model("timm_features", backbone=str(legacy))
    assert fx.mean == (0.1, 0.2, 0.3) and fx.std == (0.4, 0.5, 0.6) and fx.out_dim == 192


def test_slca_takes_its_taps_from_a_cached_foundation_vit(hub, tmp_path):
    """SLCA with ``sam: hf-hub:ORG/NAME``: the cached ViT's weights are the frozen tap source (patch tokens of
    its blocks and final norm as maps), recorded in the card, cached by weights hash, saved and reloaded."""
    from napari_pathfm.models import create_model, load_checkpoint, save_checkpoint
    from napari_pathfm.models.checkpoint import read_card
    from napari_pathfm.models.slca import ViTTaps

    _cache, vit, weights = hub
    model = create_model("slca", backbone="resnet10t", sam=NAME, num_classes=3, sam_img_size=64).eval()
    assert isinstance(model.sam, ViTTaps)
    assert torch.equal(model.sam.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight), "cached weights"
    assert not any(p.requires_grad for p in model.sam.parameters()), "frozen, as SAM is"
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        taps = model.sam_features(x)
        logits = model(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert {tuple(t.shape) for t in taps.values()} == {(2, 32, 4, 4)}, "64 px at patch 16: 4 x 4 maps of width 32"
    with torch.no_grad():  # the neck tap is the ViT's own embedding: its final-norm patch tokens
        small = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        tokens = model.sam.vit.forward_features(small)[:, 1:]
    torch.testing.assert_close(taps["neck"], tokens.reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
    assert model.embedding_spec()["name"] == f"sam:{NAME}"
    path = save_checkpoint(model, tmp_path / "slca-uni", {"classes": ["a", "b", "c"]})
    assert read_card(path)["foundation_weights"]["sam"]["weights_sha256"] == _sha(weights)
    again, _ = load_checkpoint(path)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), logits)
    with pytest.raises(ValueError, match="multiple of the encoder's patch size"):
        create_model("slca", backbone="resnet10t", sam=NAME, num_classes=3, sam_img_size=60)
