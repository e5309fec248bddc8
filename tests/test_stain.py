"""Stain statistics (tiles/stain.py) on real images: GlaS is in the bundled models' stain, CMU-1 is not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_pathfm.pipelines.notes import STAIN_TOLERANCE, model_notes
from napari_pathfm.tiles.stain import (
    MIN_STD,
    record_in_card,
    stain_reference,
    stain_reference_from_folder,
    stain_reference_from_paths,
)
from napari_pathfm.tiles.tissue import tissue_stain

MODELS = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "data" / "models"


def test_tissue_stain_leaves_out_glass_lumens_and_ink():
    img = np.full((10, 10, 3), 250, np.uint8)  # glass
    img[:4] = (200, 100, 180)  # stain
    img[4:6] = (10, 10, 10)  # ink
    stats = tissue_stain(img)
    assert stats["pixels"] == 40 and stats["mean"] == pytest.approx([200 / 255, 100 / 255, 180 / 255], abs=1e-3)
    mask = np.zeros((10, 10), bool)
    mask[:2] = True
    assert tissue_stain(img, mask)["pixels"] == 20
    assert tissue_stain(np.full((4, 4, 3), 255, np.uint8)) is None, "no stained pixel: nothing to say"


def test_reference_spread_has_a_floor_and_few_images_give_none(tmp_path):
    img = np.full((64, 64, 3), 245, np.uint8)
    img[8:56, 8:56] = (190, 90, 170)
    ref = stain_reference([img, img.copy()])
    assert ref["images"] == 2 and ref["std"] == [MIN_STD] * 3, "identical images: the floor, not zero"
    from PIL import Image

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    assert stain_reference_from_paths(paths) is None, "three painted tiles are no stain range"
    assert stain_reference_from_paths(paths, min_images=3)["images"] == 3


def test_glas_is_in_the_bundled_stain_and_cmu1_is_not(shared_data, cmu_small):
    from PIL import Image

    from napari_pathfm.io import open_slide
    from napari_pathfm.tiles.tissue import tissue_mask

    images = shared_data / "glas" / "train" / "images"
    if not images.is_dir():
        pytest.skip(f"GlaS training images not found at {images}")
    ref = stain_reference_from_folder(images)
    card = json.loads((MODELS / "pathsam2-glas-small.json").read_text())
    assert ref["images"] == 85
    assert ref["mean"] == card["stain"]["mean"] and ref["std"] == card["stain"]["std"], (
        "the bundled card's stain is what `python -m napari_pathfm.tiles.stain` measures on GlaS train"
    )

    # a GlaS image opened as a slide (array input) is in the domain: no stain note
    with Image.open(min(images.iterdir())) as im:
        rgb = np.asarray(im.convert("RGB"))
    glas = tissue_mask(rgb, image_mpp=0.62)
    assert glas.stain is not None
    notes = model_notes(card, None, slide_mpp=0.62, run_mpp=1.24, stain=glas.stain)
    assert not any("tissue colour" in n for n in notes), notes

    # CMU-1 (skin, another lab and scanner) is pinker than GlaS by more than the tolerance
    with open_slide(cmu_small) as slide:
        cmu = tissue_mask(slide)
    dist = max(abs(m - r) / s for m, r, s in zip(cmu.stain["mean"], card["stain"]["mean"], card["stain"]["std"]))
    assert dist > STAIN_TOLERANCE
    notes = model_notes(card, None, slide_mpp=0.5, run_mpp=1.24, stain=cmu.stain)
    assert any("tissue colour" in n and "standard deviations" in n for n in notes), notes


def test_record_in_card_keeps_the_card_layout(tmp_path):
    img = np.full((64, 64, 3), 245, np.uint8)
    img[8:56, 8:56] = (190, 90, 170)
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(img).save(folder / "a.png")
    card = tmp_path / "m.json"
    card.write_text('{\n "name": "m",\n "description": "1.24 \\u00b5m/px"\n}')
    record_in_card(card, folder)
    text = card.read_text()
    assert text.startswith('{\n "name": "m",\n "description": "1.24 \\u00b5m/px",\n "stain": {')
    assert json.loads(text)["stain"]["images"] == 1
