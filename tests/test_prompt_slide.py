"""Whole-slide prompting (issue 18 part 1): adding a prompt path to a trained model without changing its
class masks, the object under a click or box on a real slide or GlaS image from the embedding cache,
``pathfm prompt``, and the Segment dock's prompt row, clicked like a user."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from toy_models import TINY_PATHSAM2 as MODEL  # the toy Path-SAM2 of the dock tests

from napari_pathfm.cli import app
from napari_pathfm.models import create_model, save_checkpoint

RECIPES = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "recipes" / "pathsam2"
GLAS_MPP = 0.62


def _toy(tmp_path, prompts=False, name="toy"):
    torch.manual_seed(0)
    model = create_model("pathsam2", num_classes=2, prompts=prompts, **MODEL)
    card = {"family": "segment", "classes": ["background", "gland"], "num_classes": 2, "input_mpp": 2.48}
    return save_checkpoint(model, tmp_path / name, {**card, "tile_size": 64})


def _cli(args):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


def test_prompt_only_training_adds_prompting_and_keeps_the_class_masks(shared_data, tmp_path):
    from napari_pathfm.models.checkpoint import load_checkpoint

    if not (shared_data / "glas" / "train").is_dir():
        pytest.skip("GlaS not found")
    init = _toy(tmp_path)
    out = tmp_path / "run"
    sets = [
        f"data.init_checkpoint={init}",
        "model.prompts=true",
        "loss.prompt_weight=1.0",
        "optim.trainable=prompt",
        "trainer.max_epochs=1",
    ]
    result = _cli(["train", RECIPES / "glas_tiny.yaml", "--out", out, *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    before, _ = load_checkpoint(init)
    after, card = load_checkpoint(out / "model.safetensors")
    assert after.prompt_encoder is not None and card["config"]["prompts"] is True
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old), "every weight of the class-mask path is the init's"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(before.eval()(x)["logits"], after.eval()(x)["logits"]), "automatic masks unchanged"
    fresh = create_model("pathsam2", num_classes=2, prompts=True, **MODEL).state_dict()
    moved = [k for k in new if k.startswith("prompt_encoder.") and not torch.equal(fresh[k], new[k])]
    assert moved, "the prompt path trained"

    refused = _cli(["train", RECIPES / "glas_tiny.yaml", "--out", tmp_path / "r2", "--set", "optim.trainable=prompt"])
    assert refused.exit_code == 2 and "data.init_checkpoint" in refused.output


def _glands(mask: np.ndarray, min_area: int = 2000) -> list[np.ndarray]:
    """The glands of a GlaS mask (connected components) clear of the image's edge, smallest first."""
    from scipy import ndimage

    parts, n = ndimage.label(mask > 0)
    edge = set(np.unique(np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]])))
    sizes = np.bincount(parts.ravel())
    return [
        parts == k for _, k in sorted((sizes[k], k) for k in range(1, n + 1) if k not in edge and sizes[k] >= min_area)
    ]


def _innermost(gland: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` farthest from the gland's edge (and the image's): where a user clicks."""
    from scipy import ndimage

    d = ndimage.distance_transform_edt(np.pad(gland, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(x), int(y)


def _gland_click(mask: np.ndarray) -> tuple[int, int, np.ndarray]:
    """A typical gland (median area), where a user clicks it, and the gland."""
    found = _glands(mask)
    gland = found[len(found) // 2]
    return (*_innermost(gland), gland)


@pytest.fixture
def glas_image(shared_data, tmp_path):
    from PIL import Image

    root = shared_data / "glas" / "train"
    if not root.is_dir():
        pytest.skip("GlaS not found")
    image = tmp_path / "train_3.png"
    image.write_bytes((root / "images" / "train_3.png").read_bytes())
    return image, np.asarray(Image.open(root / "masks" / "train_3.png")) > 0


def test_bundled_model_prompts_glands_from_the_segment_cache(glas_image, tmp_path):
    """Every gland of a GlaS image, clicked in its middle and boxed, on a segmented image (embedding cache).

    The bounds are below what this image gives (mean Dice 0.61 by click, 0.88 by box across tiles, over its 8 glands of
    at least 500 px clear of the image's edge). Clicks on this image are among the bundled model's worst: one of its
    glands comes back merged with the tissue around it (Dice 0.09). The earlier bundled model (871 steps, 10-minute
    prompt path) gave 0.70 here but was worse held out (fold-0 click Dice 0.615 against 0.691); the held-out numbers
    are benchmarks/segment_glas/prompt_eval.py's (docs/prompting.md)."""
    from napari_pathfm.pipelines.prompt import Prompt, PromptSession
    from napari_pathfm.pipelines.prompt_labels import paint_objects
    from napari_pathfm.pipelines.segment import segment_slide
    from napari_pathfm.pipelines.tile_run import opened_slide
    from napari_pathfm.tiles.embedding_cache import EmbeddingCache

    image, mask = glas_image
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    dice = {"click": [], "box": []}
    with opened_slide(image, GLAS_MPP) as slide:
        seg = segment_slide(slide, cache=cache, device="cpu")
        assert seg.cache["tiles_encoded"] > 0
        with PromptSession(slide, cache=cache, device="cpu", keep=0) as s:
            for gland in _glands(mask, min_area=500):
                x, y = _innermost(gland)
                for kind, prompt in (("click", Prompt(points=((x, y),))), ("box", Prompt(box=_box(gland)))):
                    obj = s.segment(prompt)
                    assert obj.from_cache
                    dice[kind].append(_dice(obj, gland))
            big = _glands(mask, min_area=500)[-1]  # 317 px tall: more than a 256 px tile at 0.62 µm/px
            one, grown = (s.segment(Prompt(box=_box(big)), max_tiles=m) for m in (1, None))
            assert one.at_edge and one.tiles == (one.tile,), "one tile cuts it"
            assert len(grown.tiles) > 1 and not grown.at_edge and grown.from_cache, "a box grows across tiles"
            assert _dice(grown, big) > _dice(one, big) + 0.1, (_dice(grown, big), _dice(one, big))
            assert s._encoder.computed == 0, "a segmented image's tiles come from the cache"
    assert len(dice["click"]) >= 5
    assert np.mean(dice["click"]) > 0.5 and np.mean(dice["box"]) > 0.75, {k: np.mean(v) for k, v in dice.items()}
    x, y, gland = _gland_click(mask)
    with opened_slide(image, GLAS_MPP) as slide, PromptSession(slide, cache=False, device="cpu") as s:
        obj = s.segment(Prompt(points=((x, y),)))
    labels = np.zeros(mask.shape, np.uint32)
    labels[obj.y0, obj.x0 : obj.x0 + obj.mask.shape[1]] = 9  # something already there is never overwritten
    before = (labels == 9).sum()
    assert paint_objects(labels, [obj], 1) == [1]
    assert (labels == 9).sum() == before and 0 < (labels == 1).sum() < obj.area


def _dice(obj, gland: np.ndarray) -> float:
    drawn = np.zeros(gland.shape, bool)
    drawn[obj.y0 : obj.y0 + obj.mask.shape[0], obj.x0 : obj.x0 + obj.mask.shape[1]] = obj.mask
    return float(2 * (drawn & gland).sum() / (drawn.sum() + gland.sum()))


def _box(gland: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(gland)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_prompt_command_writes_one_label_per_prompt(glas_image, tmp_path):
    from napari_pathfm.io.ome_tiff import read_ome_tiff

    image, mask = glas_image
    x, y, gland = _gland_click(mask)
    out = tmp_path / "objects.ome.tif"
    box = ",".join(str(v) for v in _box(gland))
    res = _cli(["prompt", image, "--point", f"{x},{y}", "--box", box, "--image-mpp", GLAS_MPP, "--out", out])
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert [o["id"] for o in summary["objects"]] == [1, 2]
    levels, mpp, meta = read_ome_tiff(out)
    labels = np.asarray(levels[0])
    assert labels.shape == mask.shape and mpp == pytest.approx(GLAS_MPP)
    assert meta["prompts"][0]["points"] == [[x, y]] and meta["prompts"][1]["box"] == list(_box(gland))
    assert labels[y, x] == 1, "object 1 is under the click"
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).sum() == summary["objects"][0]["area_px"]

    big = _glands(mask, min_area=500)[-1]  # taller than a tile: a click is cut, its box is not
    bx, by = _innermost(big)
    box = ",".join(str(v) for v in _box(big))
    big_out = tmp_path / "big.ome.tif"
    res = _cli(["prompt", image, "--point", f"{bx},{by}", "--box", box, "--image-mpp", GLAS_MPP, "--out", big_out])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "object 1 reaches the edge of the tile it was answered on" in res.output and "draw a box" in res.output
    click, boxed = json.loads(res.stdout[res.stdout.index("{") :])["objects"]
    assert click["at_tile_edge"] and click["tiles"] == [click["tile"]]
    assert not boxed["at_tile_edge"] and len(boxed["tiles"]) > 1 and "object 2" not in res.output

    for bad, words in (
        (["--point", "5"], "is not 2 numbers"),
        (["--point", "99999,5"], "outside the image"),
        ([], "no prompt given"),
        (["--point", "5,5", "--checkpoint", _toy(tmp_path)], "has no click/box prompt path"),
    ):
        res = _cli(["prompt", image, "--image-mpp", GLAS_MPP, "--out", tmp_path / "x.ome.tif", *bad])
        assert res.exit_code == 2 and words in res.output, res.output
        assert "Traceback" not in res.output


def test_a_damaged_cached_tile_is_recomputed_not_used(glas_image, tmp_path):
    """Integrity (contract 8): a prompt on a tile whose cached outputs were damaged gives the object an
    uncached run gives, computed from the pixels."""
    from napari_pathfm.pipelines.prompt import Prompt, PromptSession
    from napari_pathfm.pipelines.segment import segment_slide
    from napari_pathfm.pipelines.tile_run import opened_slide
    from napari_pathfm.tiles.embedding_cache import EmbeddingCache

    image, mask = glas_image
    x, y, _gland = _gland_click(mask)
    cache = EmbeddingCache(tmp_path / "cache", always_store=True)
    prompt = Prompt(points=((x, y),))
    with opened_slide(image, GLAS_MPP) as slide:
        segment_slide(slide, cache=cache, device="cpu")
        with PromptSession(slide, cache=False, device="cpu") as s:
            truth = s.segment(prompt)
        (entry,) = cache.entries()
        chunks = [c for c in (entry.path / "data" / "c").rglob("*") if c.is_file()]
        assert chunks
        for chunk in chunks:  # every chunk, so the prompt's tile is among the damaged rows
            data = bytearray(chunk.read_bytes())
            data[len(data) // 2] ^= 0xFF
            chunk.write_bytes(bytes(data))
        with PromptSession(slide, cache=cache, device="cpu") as s:
            obj = s.segment(prompt)
    assert not obj.from_cache, "the damaged row was not used"
    assert (obj.y0, obj.x0) == (truth.y0, truth.x0) and np.array_equal(obj.mask, truth.mask)
