"""Models say what they are (design contract 11): the pipelines' ``notes`` on real bundled models and data.

"Bundled" means the weights sit in the package's ``data/models`` folder (or the card says
``"demonstration": true``); a copy saved elsewhere is the user's model. Runs are kept small: the
bundled slide at coarse µm/px, a PNG crop of it (a file without µm/px), the bundled 256 x 256 z-stack.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_pathfm.pipelines.notes import bundled_models_dir, model_notes

DATA = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "data"
SLIDE = DATA / "CMU-1-Small-Region.svs"
MODELS = DATA / "models"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op torch thread (the test machine's cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def crop_png(tmp_path_factory) -> Path:
    """A 1024 x 1024 level-0 crop of the bundled slide saved as PNG: real tissue, no µm/px in the file."""
    from PIL import Image

    from napari_pathfm.io import open_slide

    with open_slide(SLIDE) as slide:
        rgb = np.asarray(slide.read(0, 900, 600, 1024, 1024))[..., :3]
    path = tmp_path_factory.mktemp("crop") / "cmu1-crop.png"
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path)
    return path


def _copy_model(name: str, folder: Path, **card_changes) -> Path:
    """A bundled model's weights and card copied to ``folder`` (the user's model now), card edited."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(MODELS / f"{name}.safetensors", folder / f"{name}.safetensors")
    card = json.loads((MODELS / f"{name}.json").read_text())
    card.update(card_changes)
    (folder / f"{name}.json").write_text(json.dumps(card))
    return folder / f"{name}.safetensors"


def _demo(notes: list[str]) -> list[str]:
    return [n for n in notes if n.startswith("Demonstration model")]


def test_bundled_means_inside_the_package_or_marked_on_the_card(tmp_path):
    card = json.loads((MODELS / "pathsam2-glas-small.json").read_text())
    bundled = MODELS / "pathsam2-glas-small.safetensors"
    m = card["input_mpp"]  # the µm/px the model was trained at
    assert bundled.resolve().parent == bundled_models_dir()
    notes = model_notes(card, bundled, slide_mpp=0.5, run_mpp=m)
    assert notes == ["Demonstration model (pathsam2-glas-small: small, CPU-trained on GlaS) — not for diagnosis."]
    copy = _copy_model("pathsam2-glas-small", tmp_path / "mine")
    assert model_notes(card, copy, slide_mpp=0.5, run_mpp=m) == [], "a copy elsewhere is the user's model"
    marked = model_notes({**card, "demonstration": True}, copy, slide_mpp=0.5, run_mpp=m)
    assert len(_demo(marked)) == 1
    unknown = model_notes(card, copy, slide_mpp=None, run_mpp=None, slide_name="x.png")
    assert unknown and "x.png has no pixel size" in unknown[0] and "--image-mpp" in unknown[0]
    far = model_notes(card, copy, slide_mpp=0.5, run_mpp=3 * m, run_tile=256)
    assert far == [f"Out of domain: run at {3 * m:.3g} µm/px, but the model was trained at {m:.3g} µm/px."]
    coarse = model_notes(card, copy, slide_mpp=4.0, run_mpp=4.0)
    assert any(f"coarser than the {m:.3g} µm/px" in n for n in coarse)
    stain = {**card, "stain": {"mean": [0.8, 0.5, 0.7], "std": [0.05, 0.05, 0.05]}}
    assert not model_notes(stain, copy, slide_mpp=0.5, run_mpp=m, stain={"mean": [0.82, 0.5, 0.68]})
    assert "tissue colour" in model_notes(stain, copy, slide_mpp=0.5, run_mpp=m, stain={"mean": [0.5, 0.3, 0.7]})[0]


def test_segment_notes_in_result_messages_and_the_ome_tiff(tmp_path):
    from napari_pathfm.io.ome_tiff import read_ome_tiff
    from napari_pathfm.pipelines.segment import segment_slide

    bundled = MODELS / "pathsam2-glas-small.safetensors"
    out = tmp_path / "mask.ome.tif"
    res = segment_slide(SLIDE, bundled, mpp=3 * 1.24, device="cpu", cache=False, out=out, workers=0)
    assert len(_demo(res.notes)) == 1 and "pathsam2-glas-small" in res.notes[0]
    assert any("run at 3.72 µm/px" in n for n in res.notes), res.notes
    assert res.messages[: len(res.notes)] == res.notes, "the CLI prints the notes (messages) once, first"
    assert res.summary()["notes"] == res.notes and res.layer_kwargs()["metadata"]["pathfm_notes"] == res.notes
    _, _, meta = read_ome_tiff(out)
    assert meta["notes"] == res.notes

    mine = _copy_model("pathsam2-glas-small", tmp_path / "mine")
    res2 = segment_slide(SLIDE, mine, device="cpu", cache=False, workers=0, mpp=3 * 1.24)
    assert not _demo(res2.notes) and any("run at 3.72" in n for n in res2.notes)


def test_classify_notes_in_summary_json_and_image_mpp(crop_png, tmp_path):
    from napari_pathfm.io.ome_tiff import read_ome_tiff
    from napari_pathfm.pipelines.classify import classify_slide, write_classify_outputs

    bundled = MODELS / "slca-glas-glands-demo.safetensors"
    res = classify_slide(SLIDE, bundled, mpp=3 * 1.24, device="cpu", cache=False, workers=0)
    assert len(_demo(res.notes)) == 1 and any("run at 3.72 µm/px" in n for n in res.notes), res.notes
    write_classify_outputs(res, tmp_path / "out", geojson=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["notes"] == res.notes and summary["messages"][: len(res.notes)] == res.notes
    assert read_ome_tiff(tmp_path / "out" / "class-map.ome.tif")[2]["notes"] == res.notes

    # a PNG has no µm/px: the note says so, and image_mpp is used as the slide's
    plain = classify_slide(crop_png, bundled, device="cpu", cache=False, workers=0, tissue_only=False)
    assert plain.mpp is None and plain.model_mpp is None
    assert any("cmu1-crop.png has no pixel size" in n for n in plain.notes), plain.notes
    given = classify_slide(crop_png, bundled, image_mpp=0.499, device="cpu", cache=False, workers=0, tissue_only=False)
    assert given.mpp == pytest.approx(0.499) and given.model_mpp == pytest.approx(1.24, rel=0.02)
    assert given.cell == pytest.approx(112 * 1.24 / 0.499, rel=0.02), "tiles of 112 px at 1.24 µm/px"
    assert not any("no pixel size" in n for n in given.notes) and len(_demo(given.notes)) == 1
    with pytest.raises(ValueError, match="image_mpp"):
        classify_slide(crop_png, bundled, image_mpp=0, device="cpu")

    mine = _copy_model("slca-glas-glands-demo", tmp_path / "mine")
    own = classify_slide(crop_png, mine, image_mpp=0.499, device="cpu", cache=False, workers=0, tissue_only=False)
    # (tissue_only=False: no tissue overview is made, so there is no stain to compare with the card's)
    assert own.notes == [], "the user's model at its own µm/px: nothing to say"
    tissue = classify_slide(crop_png, mine, image_mpp=0.499, device="cpu", cache=False, workers=0)
    assert [n for n in tissue.notes if "tissue colour" in n] == tissue.notes and tissue.notes, (
        "with the tissue overview: CMU-1's stain is far from the GlaS stain in the card"
    )


def test_mil_notes_in_prediction_json_and_image_mpp(crop_png, tmp_path):
    from napari_pathfm.io.ome_tiff import read_ome_tiff
    from napari_pathfm.pipelines.mil import mil_predict, write_mil_outputs

    ckpt = MODELS / "s4mil-glas-glands-demo.safetensors"
    pred = mil_predict(ckpt, slide=crop_png, image_mpp=0.499, device="cpu", cache=False)
    assert pred.source["slide_mpp"] == pytest.approx(0.499), "features were extracted with the given µm/px"
    assert pred.level0_tile_size == pytest.approx(64 * 0.62 / 0.499, abs=1)
    assert (
        pred.notes[0] == "Demonstration model (s4mil-glas-glands-demo: small, CPU-trained on GlaS) — not for diagnosis."
    )
    # CMU-1 (skin, another lab and scanner) is pinker than the GlaS colon the model saw: the card's stain says so
    assert len(pred.notes) == 2 and "tissue colour" in pred.notes[1], pred.notes
    assert pred.messages == pred.notes
    written = write_mil_outputs(pred, heatmap=tmp_path / "heat.ome.tif", json_path=tmp_path / "pred.json", mpp=0.499)
    assert json.loads(written["json"].read_text())["notes"] == pred.notes
    assert read_ome_tiff(written["heatmap"])[2]["notes"] == pred.notes
    with pytest.raises(ValueError, match="image_mpp"):
        mil_predict(ckpt, slide=crop_png, image_mpp=-1.0, device="cpu")


def test_translate_notes_for_bundled_models_and_plane_count(tmp_path):
    import tifffile

    from napari_pathfm.pipelines.translate import translate_stack, write_translation

    planes = tifffile.imread(DATA / "isl-blue-crop.ome.tif")[:, :128, :128]
    assert planes.shape == (13, 128, 128) and planes.dtype == np.uint16
    bundled = MODELS / "haste-isl-dapi.safetensors"
    res = translate_stack(planes, bundled, tile=128, device="cpu", nuclei_mask=False)
    assert res.notes == [
        "Demonstration model (haste-isl-dapi: small, CPU-trained on the ISL well) — not for diagnosis."
    ]
    write_translation(res, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["notes"] == res.notes

    mine = _copy_model("haste-isl-dapi", tmp_path / "mine")
    extra = np.concatenate([planes, planes[-1:]])  # 14 planes: the card's 13 named planes are used
    res2 = translate_stack(extra, mine, tile=128, device="cpu", nuclei_mask=False)
    assert res2.notes == [
        "the stack has 14 planes; haste-isl-dapi.safetensors was trained on 13 (the planes it names are used).",
    ]
    assert res2.messages[0] == res2.notes[0]


def test_demonstration_notes_of_several_models_read_as_one_sentence():
    from napari_pathfm.pipelines.notes import join_demonstration_notes

    notes = [
        f"Demonstration model (haste-isl-{c}: small, CPU-trained on ISL) — not for diagnosis."
        for c in ("dapi", "map2", "nfh")
    ] + ["The z-stack has 12 planes; the models were trained on 13."]
    assert join_demonstration_notes(notes) == [
        (
            "Demonstration models (haste-isl-dapi, haste-isl-map2, haste-isl-nfh: small, CPU-trained on ISL) — not for "
            "diagnosis."
        ),
        notes[-1],
    ]
    assert join_demonstration_notes(notes[:1]) == notes[:1]
