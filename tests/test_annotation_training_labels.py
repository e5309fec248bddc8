"""QuPath GeoJSON / ASAP XML annotations as segmentation training labels (issue 18 part 3).

A data folder whose ``masks/`` holds annotation files instead of mask images: the real GlaS masks
traced to QuPath GeoJSON (class "Gland", as QuPath writes it after the user named the class) and to
ASAP XML. The training data must see exactly the masks the PNGs give, an object of a class the
recipe does not know is refused naming the file and the class, and ``pathfm train`` runs on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_pathfm.errors import PathFMError
from napari_pathfm.io.annotations import write_asap_xml
from napari_pathfm.io.geojson import write_geojson

RECIPES = Path(__file__).resolve().parents[1] / "src" / "napari_pathfm" / "recipes" / "pathsam2"
NAMES = ["train_1", "train_2", "train_3", "train_4", "train_5", "train_6"]


@pytest.fixture
def annotated_folder(shared_data, tmp_path) -> Path:
    glas = shared_data / "glas" / "train"
    if not (glas / "images").is_dir():
        pytest.skip(f"GlaS not found at {glas}")
    root = tmp_path / "annotated"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(NAMES):
        (root / "images" / f"{name}.png").symlink_to(glas / "images" / f"{name}.png")
        gland = (np.asarray(Image.open(glas / "masks" / f"{name}.png")) > 0).astype(np.uint8)
        if i % 2:
            write_asap_xml(root / "masks" / f"{name}.xml", gland, {1: "Gland"})
        else:
            write_geojson(root / "masks" / f"{name}.geojson", gland, {1: "Gland"}, per_value=True)
    return root


def test_annotation_masks_give_the_same_training_masks_as_the_pngs(annotated_folder, shared_data):
    from napari_pathfm.training.segment_datamodule import SegmentDataModule

    dm = SegmentDataModule(
        {"root": str(annotated_folder), "classes": ["background", "gland"], "val_names": ["train_1"]}, batch_size=2
    )
    assert dm.num_classes == 2
    for item in dm.train_items + dm.val_items:
        png = np.asarray(Image.open(shared_data / "glas" / "train" / "masks" / f"{item.name}.png")) > 0
        assert np.array_equal(dm.store.mask(item), png.astype(np.uint8)), item.mask.name


def test_an_unknown_annotation_class_names_the_file_and_the_class(annotated_folder):
    from napari_pathfm.training.segment_datamodule import SegmentDataModule

    with pytest.raises(PathFMError, match=r"train_1\.geojson.*'Gland'.*\['background', 'tumour'\]"):
        SegmentDataModule({"root": str(annotated_folder), "classes": ["background", "tumour"]}, batch_size=2)


def test_pathfm_train_runs_on_annotation_labels(annotated_folder, tmp_path):
    from typer.testing import CliRunner

    from napari_pathfm.cli import app

    out = tmp_path / "run"
    args = ["train", str(RECIPES / "glas_tiny.yaml"), "--out", str(out), "--set", f"data.root={annotated_folder}"]
    result = CliRunner().invoke(app, [*args, "--set", "trainer.max_epochs=1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "model.safetensors").is_file()
