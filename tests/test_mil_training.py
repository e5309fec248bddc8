"""MIL training: Lookahead, feature-bag data, the ``mil`` task on real GlaS tile bags, cross-validation."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_pathfm.errors import FeatureError, RecipeError
from napari_pathfm.training.lookahead import Lookahead
from napari_pathfm.training.mil_data import (
    BagDataset,
    assign_folds,
    read_bag_table,
    write_bag,
)
from napari_pathfm.training.recipes import load_recipe
from napari_pathfm.training.tasks.mil import BagDataModule

REPO = Path(__file__).resolve().parents[1]
S4MIL = REPO / "training" / "s4mil"
TINY = S4MIL / "glas_bags_tiny.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread avoids OpenMP spin-waiting when the shared cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- Lookahead ---------------------------------------------------------------------------


def _quadratic_steps(opt, w, n):
    for _ in range(n):
        opt.zero_grad()
        (0.5 * w.square().sum()).backward()
        opt.step()


def test_lookahead_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = Lookahead(torch.optim.SGD([w], lr=0.1), k=3, alpha=0.5)
    # f = w^2 / 2: each SGD step multiplies w by 0.9; every 3rd step w <- slow + 0.5 (w - slow)
    slow = 1.0
    expected = []
    fast = 1.0
    for step in range(1, 8):
        fast *= 0.9
        if step % 3 == 0:
            slow = slow + 0.5 * (fast - slow)
            fast = slow
        expected.append(fast)
    got = []
    for _ in range(7):
        _quadratic_steps(opt, w, 1)
        got.append(w.item())
    assert got == pytest.approx(expected, rel=1e-6)
    assert expected[2] == pytest.approx(1 + 0.5 * (0.9**3 - 1))  # 0.8645


def test_lookahead_state_dict_resumes_exactly():
    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4))
        return w, Lookahead(torch.optim.Adam([w], lr=0.05), k=5, alpha=0.5)

    w_ref, ref = make()
    _quadratic_steps(ref, w_ref, 12)

    w_a, a = make()
    _quadratic_steps(a, w_a, 7)
    state = a.state_dict()
    assert state["lookahead"]["fast_steps"] == 7 and 0 in state["lookahead"]["slow"]
    w_b, b = make()
    with torch.no_grad():
        w_b.copy_(w_a)
    b.load_state_dict(state)
    _quadratic_steps(b, w_b, 5)
    assert torch.allclose(w_b, w_ref, atol=1e-7)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(b, T_max=4)
    _quadratic_steps(b, w_b, 1)
    sched.step()
    assert b.optimizer.param_groups[0]["lr"] < 0.05
    with pytest.raises(ValueError):
        Lookahead(torch.optim.SGD([w_a], lr=0.1), k=0)


# --- feature bags ------------------------------------------------------------------------


def _bags(root: Path, spec: dict, dim: int = 8, seed: int = 0, labels: bool = True) -> Path:
    """Write random bags ``{name: length}`` into ``root`` (feature files only)."""
    rng = np.random.default_rng(seed)
    for name, n in spec.items():
        pl = rng.integers(0, 2, n).astype(np.int8) if labels else None
        write_bag(root / f"{name}.features.zarr", rng.normal(size=(n, dim)), np.zeros((n, 2)), {"backbone": "toy"}, pl)
    return root


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bag_table_and_dataset(tmp_path):
    feats = _bags(tmp_path / "f", {"a": 5, "b": 7, "c": 3, "d": 4})
    write_bag(feats / "e.features.zarr", np.ones((2, 8)), np.zeros((2, 2)), {"backbone": "toy"})  # no patch labels
    items, classes = read_bag_table(_csv(tmp_path / "l.csv", "slide,label\na,10\nb,2\nc,2\nd,10\ne,2\n"), feats)
    assert classes == ["2", "10"] and [it.label for it in items] == [1, 0, 0, 1, 0]
    ds = BagDataset(items, 8)
    item = ds[1]
    assert item["features"].shape == (7, 8) and item["features"].dtype == torch.float32
    assert item["patch_labels"].shape == (7,) and set(item["patch_labels"].tolist()) <= {0, 1}
    assert ds[4]["patch_labels"].tolist() == [-1, -1]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=1)))
    assert batch["features"].shape == (1, 5, 8) and batch["label"].tolist() == [1]
    with pytest.raises(FeatureError, match="16-d"):
        BagDataset(items, 16)[0]
    sub = BagDataset(items, 8, max_patches=4)
    assert sub[1]["features"].shape == (4, 8)


def test_bag_table_errors(tmp_path):
    feats = _bags(tmp_path / "f", {"a": 5, "b": 7})
    with pytest.raises(FeatureError, match=r"'zz'.*line 3"):
        read_bag_table(_csv(tmp_path / "1.csv", "slide,label\na,x\nzz,y\n"), feats)
    with pytest.raises(RecipeError, match=r"label 'maybe'.*\['no', 'yes'\]"):
        read_bag_table(_csv(tmp_path / "2.csv", "slide,label\na,yes\nb,maybe\n"), feats, ["no", "yes"])
    with pytest.raises(RecipeError, match="listed twice"):
        read_bag_table(_csv(tmp_path / "3.csv", "slide,label\na,x\na,y\n"), feats)
    with pytest.raises(RecipeError, match="'slide' and 'label'"):
        read_bag_table(_csv(tmp_path / "4.csv", "name,class\na,x\n"), feats)
    with pytest.raises(RecipeError, match="fold"):
        read_bag_table(_csv(tmp_path / "5.csv", "slide,label,fold\na,x,one\n"), feats)
    odd = tmp_path / "f" / "c.features.zarr"
    write_bag(odd, np.ones((3, 16)), np.zeros((3, 2)), {"backbone": "toy"})
    data = {"features_dir": str(feats), "csv": str(_csv(tmp_path / "6.csv", "slide,label\na,x\nb,y\nc,x\n"))}
    with pytest.raises(FeatureError, match=r"c\.features\.zarr.*16-d.*8-d"):
        BagDataModule(data)


def test_splits_and_folds(tmp_path):
    feats = _bags(tmp_path / "f", {f"s{i}": 3 for i in range(10)})
    rows = "".join(f"s{i},{'ab'[i % 2]},{i % 2},{'test' if i >= 8 else ''}\n" for i in range(10))
    csv_path = _csv(tmp_path / "l.csv", "slide,label,fold,split\n" + rows)
    dm = BagDataModule({"features_dir": str(feats), "csv": str(csv_path), "val_fold": 1})
    assert [it.slide for it in dm.test_items] == ["s8", "s9"]
    assert {it.fold for it in dm.val_items} == {1} and {it.fold for it in dm.train_items} == {0}
    folds = assign_folds([0] * 6 + [1] * 4, 2, seed=3)
    assert np.bincount(folds).tolist() == [5, 5] and np.bincount(folds[:6]).tolist() == [3, 3]
    plain = _csv(tmp_path / "m.csv", "slide,label\n" + "".join(f"s{i},{'ab'[i % 2]}\n" for i in range(10)))
    dm = BagDataModule({"features_dir": str(feats), "csv": str(plain), "val_fraction": 0.2})
    assert len(dm.val_items) == 2 and {it.label for it in dm.val_items} == {0, 1}
    assert dm.dim == 8 and dm.has_patch_labels


# --- loss and model ----------------------------------------------------------------------


def _task(multitask: bool, dim: int = 8, lr: float = 2e-3):
    from napari_pathfm.models.registry import create_model
    from napari_pathfm.training.tasks.mil import MILTask

    torch.manual_seed(0)
    model = create_model("s4mil", in_dim=dim, n_classes=2, d_model=16, d_state=4, multitask=multitask)
    return MILTask(model, 2, {"name": "adam", "lr": lr, "weight_decay": 0.0, "lookahead_k": 5}, 5, 5.0, multitask)


def test_loss_is_cross_entropy_on_logits():
    import torch.nn.functional as F

    x, y = torch.randn(1, 12, 8), torch.tensor([1])
    pl = torch.tensor([[1, 0, -1] * 4])
    task = _task(False)
    out, loss, slide_loss, patch_loss = task.compute_loss({"features": x, "label": y, "patch_labels": pl})
    assert patch_loss is None and torch.allclose(loss, F.cross_entropy(out["logits"], y))
    mt = _task(True)
    out, loss, slide_loss, patch_loss = mt.compute_loss({"features": x, "label": y, "patch_labels": pl})
    known = pl >= 0
    expected = F.cross_entropy(out["logits"], y) + 5.0 * F.cross_entropy(out["patch_logits"][known], pl[known])
    assert torch.allclose(loss, expected) and torch.allclose(slide_loss, F.cross_entropy(out["logits"], y))


def test_slide_and_patch_metrics():
    from napari_pathfm.training.tasks.mil import patch_auroc, slide_metrics

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    m = slide_metrics(probs, np.array([0, 1, 1, 0]))
    assert m["acc"] == 0.5 and m["auroc"] == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ranked right
    three = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    m = slide_metrics(three, np.array([0, 1, 2, 1]))
    assert m["acc"] == 1.0 and m["auroc"] == pytest.approx(1.0)
    assert np.isnan(slide_metrics(probs, np.zeros(4, int))["auroc"])
    assert patch_auroc([0.1, 0.9, 0.5, 0.7], [0, 1, -1, 0]) == pytest.approx(1.0)


def test_s4_state_parameters_train_without_weight_decay():
    task = _task(False, lr=2e-4)
    task.optim_cfg["weight_decay"] = 1e-3
    opt = task.configure_optimizers()
    groups = opt.param_groups
    ssm = {id(p) for n, p in task.model.named_parameters() if n.split(".")[-1] in ("log_dt", "log_A_real", "A_imag")}
    assert ssm
    for g in groups:
        assert g["lr"] == 2e-4
        in_ssm = {id(p) in ssm for p in g["params"]}
        assert len(in_ssm) == 1
        assert g["weight_decay"] == (0.0 if in_ssm.pop() else 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(task.model.parameters()))


def test_multitask_loss_reduces_patch_error():
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8).astype(np.float32)
    bags = []
    for b in range(12):
        n = int(rng.integers(20, 40))
        pl = (rng.random(n) < (0.3 if b % 2 else 0.0)).astype(np.int64)
        x = (rng.normal(size=(n, 8)) + 1.5 * pl[:, None] * direction).astype(np.float32)
        bags.append((torch.from_numpy(x)[None], torch.tensor([b % 2]), torch.from_numpy(pl)[None]))

    def train(multitask):
        task = _task(multitask, lr=1e-2)
        opt = task.configure_optimizers()
        for _ in range(10):
            for x, y, pl in bags:
                opt.zero_grad()
                task.compute_loss({"features": x, "label": y, "patch_labels": pl})[1].backward()
                opt.step()
        with torch.no_grad():
            wrong = [(task(x)["patch_scores"].argmax(-1) != pl).float().mean() for x, _, pl in bags]
        return float(torch.stack(wrong).mean())

    multitask, slide_only = train(True), train(False)
    assert multitask < 0.08 and multitask < slide_only / 3


# --- engine, checkpoint, cross-validation on real GlaS tile bags ------------------------


@pytest.fixture(scope="module")
def glas_bags(shared_data, tmp_path_factory) -> Path:
    """8 tiny bags of real GlaS 64 px tiles with 512-d random-init resnet10t features (built by the benchmark code)."""
    sys.path.insert(0, str(REPO / "benchmarks" / "mil_glas"))
    import build_bags

    root = tmp_path_factory.mktemp("glas-mil")
    args = build_bags.parser().parse_args(
        [
            "--glas",
            str(shared_data / "glas" / "train"),
            "--images",
            "6",
            "--cache",
            str(root / "cache"),
            "--out",
            str(root / "bags"),
            "--extractor",
            "timm_features",
            "--backbone",
            "resnet10t",
            "--bags",
            "4,2,2",
            "--min-len",
            "16",
            "--max-len",
            "48",
        ]
    )
    return build_bags.build(args)


def _paths(bags: Path) -> list[str]:
    return [f"data.features_dir={bags / 'bags'}", f"data.csv={bags / 'bags.csv'}"]


def test_recipes_keep_paper_settings(monkeypatch):
    for name, wd in (("camelyon16", 1e-4), ("tcga_nsclc", 1e-3), ("camelyon16_multitask", 1e-4)):
        r = load_recipe(S4MIL / f"{name}.yaml")
        model = (r.get("family"), r.get("model.name"), r.get("model.d_state"), r.get("model.d_model"))
        assert model == ("mil", "s4mil", 32, 512)
        assert (r.get("optim.name"), r.get("optim.lr"), r.get("optim.weight_decay")) == ("adam", 2e-4, wd)
        assert (r.get("optim.lookahead_k"), r.get("optim.lookahead_alpha")) == (5, 0.5)
        assert r.get("trainer.batch_size") == 1 and r.get("trainer.early_stopping.patience") == 10
        assert "placeholder" in r.get("description")
    assert load_recipe(S4MIL / "camelyon16_multitask.yaml").get("loss.patch_weight") == 5.0
    monkeypatch.setenv("CAMELYON16_FEATURES", "/elsewhere/feats")
    assert load_recipe(S4MIL / "camelyon16.yaml").get("data.features_dir") == "/elsewhere/feats"
    for name in ("glas_bags", "glas_bags_multitask", "glas_bags_tiny"):
        assert load_recipe(S4MIL / f"{name}.yaml").get("optim.lr") == 2e-4
    with pytest.raises(RecipeError, match="batch_size"):
        load_recipe(TINY, ["trainer.batch_size=4"])


def test_train_glas_bags_tiny(glas_bags, tmp_path):
    from napari_pathfm.models.checkpoint import load_checkpoint
    from napari_pathfm.training.engine import run_recipe
    from napari_pathfm.training.tasks.mil import evaluate_bags

    out = tmp_path / "run"
    first = run_recipe(TINY, [*_paths(glas_bags), "trainer.max_epochs=1"], output=out, progress=lambda *a: None)
    assert first.epoch == 1 and (out / "last.ckpt").is_file()
    res = run_recipe(TINY, _paths(glas_bags), output=out, progress=lambda *a: None)  # resumes the Lookahead state
    assert res.start_epoch == 1 and res.epoch == 2
    assert {"val_loss", "val_acc", "val_auroc"} <= set(res.best_metrics)
    card = json.loads((out / "model.json").read_text())
    assert card["family"] == "mil" and card["classes"] == ["negative", "positive"] and card["in_dim"] == 512
    fx = card["feature_extractor"]
    assert fx["backbone"] == "resnet10t" and fx["tile_size"] == 64 and fx["mpp"] == pytest.approx(0.62)
    assert fx["weights_sha256"] == hashlib.sha256(Path(fx["weights"]).read_bytes()).hexdigest()
    assert json.loads((out / "split.json").read_text())["test"] == ["test_000", "test_001"]
    model, _ = load_checkpoint(res.checkpoint)
    dm = BagDataModule(load_recipe(TINY, _paths(glas_bags)).get("data"))
    ev = evaluate_bags(model, dm.dataset("test"))
    assert ev["probs"].shape == (2, 2) and np.isfinite(ev["metrics"]["patch_auroc"])
    assert [len(s) for s in ev["patch_scores"]] == [len(p) for p in ev["patch_labels"]]


def test_multitask_recipe_logs_patch_auroc_and_checks_inputs(glas_bags, tmp_path):
    from napari_pathfm.training.engine import run_recipe

    overrides = [*_paths(glas_bags), "model.multitask=true", "trainer.max_epochs=1"]
    res = run_recipe(TINY, overrides, output=tmp_path / "mt", progress=lambda *a: None)
    assert "val_patch_auroc" in res.best_metrics and "train_patch_loss" in res.best_metrics
    with pytest.raises(RecipeError, match="model.in_dim is 1024.*512"):
        run_recipe(TINY, [*_paths(glas_bags), "model.in_dim=1024"], output=tmp_path / "bad")


def test_cross_validation_two_folds(glas_bags, tmp_path):
    from napari_pathfm.training.crossval import cv_command, run_cv

    events = []
    overrides = [*_paths(glas_bags), "trainer.max_epochs=1"]
    result = run_cv(TINY, 2, overrides, output=tmp_path / "cv", progress=lambda *a: events.append(a))
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    assert summary["k"] == 2 and summary["completed"] == 2 and len(summary["folds"]) == 2
    assert {"val_acc", "val_auroc", "test_acc", "test_auroc"} <= set(summary["metrics"])
    assert summary["metrics"]["val_acc"]["n"] == 2 and "fold 1 (2/2)" in events[-1][2]
    assert all((tmp_path / "cv" / f"fold_{f}" / "model.safetensors").is_file() for f in (0, 1))
    again = cv_command(TINY, 2, overrides, out=tmp_path / "cv")  # finished folds are reused
    assert again["folds"] == result.folds and "±" in again["table"]["val_acc"]
