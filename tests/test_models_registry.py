"""Model registry: lazy listing without torch, create_model, runtime registration."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from napari_pathfm.models import registry


def test_listing_and_card_reading_do_not_import_torch(tmp_path):
    card = tmp_path / "m.json"
    card.write_text('{"name": "timm_classifier", "config": {"num_classes": 3}, "classes": ["a", "b", "c"]}')
    code = textwrap.dedent(f"""
        import sys
        import napari_pathfm, napari_pathfm.models, napari_pathfm.training
        from napari_pathfm.models import list_models, model_info, read_card
        from napari_pathfm.training import load_recipe, schema
        assert "timm_classifier" in list_models()
        assert list_models(family="classify") == ["slca", "timm_classifier"]
        assert model_info("timm_classifier")["family"] == "classify"
        assert read_card({str(card)!r})["classes"] == ["a", "b", "c"]
        assert "data.root" in schema("classify")
        heavy = [m for m in ("torch", "lightning", "timm", "torchvision") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_model_info_fields():
    info = registry.model_info("timm_classifier")
    assert info["family"] == "classify"
    assert info["target"] == "napari_pathfm.models.tile_classifier:timm_classifier"
    assert info["default_cfg"]["backbone"] == "resnet18"
    assert "classification" in info["description"]


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError, match="timm_classifier"):
        registry.model_info("no_such_net")


def test_create_timm_classifier_records_config():
    import torch

    net = registry.create_model("timm_classifier", backbone="resnet10t", num_classes=5)
    assert net.pathfm_config == {
        "name": "timm_classifier",
        "backbone": "resnet10t",
        "num_classes": 5,
        "in_chans": 3,
        "drop_rate": 0.0,
    }
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


def test_builtin_table_matches_decorated_factory():
    registry.create_model("timm_classifier", backbone="resnet10t", num_classes=2)
    runtime = registry._RUNTIME["timm_classifier"]
    builtin = registry._BUILTINS["timm_classifier"]
    assert runtime.default_cfg == builtin.default_cfg
    assert runtime.family == builtin.family
    assert runtime.target == builtin.target


def test_unknown_config_key_names_accepted_keys():
    with pytest.raises(TypeError, match="backbone"):
        registry.create_model("timm_classifier", backbone_name="resnet10t")


def test_runtime_registration():
    import torch

    @registry.register_model(family="classify")
    def _tiny_linear(num_classes: int = 2, width: int = 4):
        """A tiny linear test model."""
        return torch.nn.Linear(width, num_classes)

    try:
        assert "_tiny_linear" in registry.list_models(family="classify")
        info = registry.model_info("_tiny_linear")
        assert info["description"] == "A tiny linear test model."
        assert info["default_cfg"] == {"num_classes": 2, "width": 4}
        net = registry.create_model("_tiny_linear", num_classes=3)
        assert net.pathfm_config == {"name": "_tiny_linear", "num_classes": 3, "width": 4}
        with pytest.raises(ValueError, match="built-in"):
            registry.register_model(_tiny_linear, name="timm_classifier")
    finally:
        registry._ENTRYPOINTS.pop("_tiny_linear", None)
        registry._RUNTIME.pop("_tiny_linear", None)


def test_timm_classifier_loads_local_backbone_weights(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    source = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "backbone.safetensors"))
    net = registry.create_model(
        "timm_classifier", backbone="resnet10t", num_classes=3, weights=tmp_path / "backbone.safetensors"
    )
    report = net.pathfm_load_report
    assert [k for k, _, _ in report.mismatched] == ["fc.weight", "fc.bias"]
    assert torch.equal(net.conv1[0].weight, source.conv1[0].weight)
    assert "weights" not in net.pathfm_config
