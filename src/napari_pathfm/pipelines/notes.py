"""What a model is and how far a run is from its training domain, in short sentences.

Every pipeline result (:func:`~napari_pathfm.pipelines.segment.segment_slide`,
:func:`~napari_pathfm.pipelines.classify.classify_slide`,
:func:`~napari_pathfm.pipelines.mil.mil_predict`,
:func:`~napari_pathfm.pipelines.translate.translate_stack`) carries ``notes``: plain sentences
built here from the model card and what the run actually did, so that the CLI (yellow lines),
the docks (one visible line) and the written files (``"notes"`` in summary.json, the prediction
JSON and the OME-TIFF metadata) say the same thing (design contract 11, "Honest models").

A note is written when

- the model is a **demonstration model**: its weights sit in the package's bundled model folder
  (``napari_pathfm/data/models``), or its card says ``"demonstration": true``. A copy of a bundled
  model saved elsewhere is the user's model and gets no note (its card is the user's to change);
- the run's µm/px is more than :data:`MPP_TOLERANCE` times off the card's ``input_mpp`` (the tiles
  were resampled that much), the slide is scanned that much coarser than the model needs, or the
  slide's µm/px is unknown while the card names one;
- tiles of another size than the card's ``tile_size`` were given to a tile classifier or MIL
  extractor;
- the slide's tissue colour statistics are far from the card's ``stain`` statistics (only when the
  card records them and the caller has them at hand; no extra pass over the slide is made here);
- a z-stack differs from a translation card in plane count, dtype or pixel size/magnification.

Pure Python: no Qt, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MPP_TOLERANCE",
    "STAIN_TOLERANCE",
    "bundled_models_dir",
    "demonstration_note",
    "is_demonstration",
    "merge_notes",
    "model_notes",
    "translate_notes",
]

#: a run this many times coarser/finer than the model's training µm/px is called out of domain
MPP_TOLERANCE = 1.5
#: mean tissue colour this many training standard deviations away from the card's mean is out of domain
STAIN_TOLERANCE = 3.0

#: public data sets named in bundled cards, matched case-insensitively in training_data / description
_DATASETS = (
    ("glas", "GlaS"),
    ("isl-blue", "the ISL well"),
    ("in-silico labeling", "the ISL well"),
    ("camelyon", "CAMELYON"),
    ("tcga", "TCGA"),
    ("panda", "PANDA"),
)


def bundled_models_dir() -> Path:
    """The package's folder of bundled (demonstration) models, resolved."""
    from importlib.resources import files

    return Path(str(files("napari_pathfm") / "data" / "models")).resolve()


def is_demonstration(checkpoint: Any, card: dict) -> bool:
    """True for a bundled model (weights inside :func:`bundled_models_dir`) or a card marked ``"demonstration"``.

    A model is judged by where its weights are, not by its name: a bundled model copied to
    another folder (and perhaps fine-tuned) is the user's model.
    """
    if card.get("demonstration"):
        return True
    if not checkpoint or not isinstance(checkpoint, (str, Path)):
        return False
    return Path(checkpoint).resolve().parent == bundled_models_dir()


def _dataset(card: dict) -> str:
    text = " ".join(str(card.get(k) or "") for k in ("training_data", "description", "data_license")).lower()
    for key, name in _DATASETS:
        if key in text:
            return name
    return "a small public set"


def _cpu_trained(card: dict) -> bool:
    text = " ".join(str(card.get(k) or "") for k in ("recipe_file", "command", "training_time", "description"))
    return bool(re.search(r"\bcpu\b|_cpu\b|cpu\.yaml|cpu cores", text, re.IGNORECASE))


def demonstration_note(checkpoint: Any, card: dict) -> str | None:
    """``"Demonstration model (name: small, CPU-trained on GlaS) — not for diagnosis."`` or None."""
    if not is_demonstration(checkpoint, card):
        return None
    if isinstance(checkpoint, (str, Path)):
        name = Path(checkpoint).name.removesuffix(".safetensors").removesuffix(".json")
    else:
        name = str(card.get("name") or "model")
    how = "small, CPU-trained" if _cpu_trained(card) else "small, trained"
    return f"Demonstration model ({name}: {how} on {_dataset(card)}) — not for diagnosis."


def _ratio(a: float, b: float) -> float:
    return max(a / b, b / a)


def model_notes(
    card: dict,
    checkpoint: Any,
    *,
    slide_mpp: float | None,
    run_mpp: float | None,
    slide_name: str | None = None,
    run_tile: int | None = None,
    tissue_fraction: float | None = None,
    stain: dict | None = None,
) -> list[str]:
    """Plain sentences about what the model is and how far this run is from its training domain.

    Parameters
    ----------
    card : dict
        The model card (``input_mpp``, ``tile_size``, optional ``stain`` {"mean", "std"} of the
        training tissue's RGB in [0, 1], optional ``demonstration``).
    checkpoint : path or None
        Where the weights were loaded from (None for an in-memory model).
    slide_mpp : float or None
        µm/px of the slide's level 0 as used by the run (None: unknown).
    run_mpp : float or None
        µm/px of the tiles the model saw.
    slide_name : str, optional
        Named in the "unknown µm/px" sentence.
    run_tile : int, optional
        Tile side the model was given (pixels at ``run_mpp``), checked against the card's ``tile_size``.
    tissue_fraction : float, optional
        Share of the slide detected as tissue; a run on (almost) no tissue is said to be one.
    stain : dict, optional
        ``{"mean": [r, g, b], "std": [r, g, b]}`` of the slide's tissue (0-1), compared with the
        card's ``stain`` when it has one.

    Returns
    -------
    list of str
        Empty when nothing is worth saying.

    Examples
    --------
    >>> model_notes({"input_mpp": 1.0}, None, slide_mpp=0.5, run_mpp=3.0)
    ['Out of domain: run at 3 µm/px, but the model was trained at 1 µm/px.']
    """
    notes = []
    demo = demonstration_note(checkpoint, card)
    if demo:
        notes.append(demo)
    trained = card.get("input_mpp")
    trained = float(trained) if trained else None
    if trained and slide_mpp is None:
        name = slide_name or "the slide"
        notes.append(
            f"{name} has no pixel size (µm/px unknown): run at its own resolution, not at the model's "
            f"{trained:.3g} µm/px; give --image-mpp (or enter it in the Slide dock) to resample."
        )
    if trained and run_mpp and _ratio(run_mpp, trained) > MPP_TOLERANCE:
        notes.append(f"Out of domain: run at {run_mpp:.3g} µm/px, but the model was trained at {trained:.3g} µm/px.")
    if trained and slide_mpp and slide_mpp > MPP_TOLERANCE * trained:
        notes.append(
            f"Out of domain: the slide has {slide_mpp:.3g} µm/px, coarser than the {trained:.3g} µm/px "
            "the model was trained at."
        )
    card_tile = card.get("tile_size")
    if card_tile and run_tile and _ratio(float(run_tile), float(card_tile)) > MPP_TOLERANCE:
        notes.append(
            f"Out of domain: tiles of {int(run_tile)} px, but the model was trained on {int(card_tile)} px tiles."
        )
    if tissue_fraction is not None and 0 < tissue_fraction < 0.01:
        notes.append(f"Only {100 * tissue_fraction:.2g} % of the slide was detected as tissue.")
    ref = card.get("stain") if isinstance(card.get("stain"), dict) else None
    if ref and stain and ref.get("mean") and ref.get("std") and stain.get("mean"):
        dist = max(
            abs(float(m) - float(r)) / max(float(s), 1e-3) for m, r, s in zip(stain["mean"], ref["mean"], ref["std"])
        )
        if dist > STAIN_TOLERANCE:
            notes.append(
                f"Out of domain: the slide's tissue colour is {dist:.1f} standard deviations from the "
                "stain the model was trained on (different stain or scanner?)."
            )
    return notes


def translate_notes(
    card: dict,
    checkpoint: Any,
    *,
    planes: int,
    dtype: Any,
    pixel_size: float | None = None,
    magnification: float | None = None,
) -> list[str]:
    """Sentences for a translation checkpoint run on a z-stack: demonstration model, and plane count,
    dtype, pixel size or magnification that differ from the card's ``input_planes``, ``input_dtype``,
    ``input_mpp`` and ``magnification``.

    Examples
    --------
    >>> translate_notes({"input_planes": 13, "input_dtype": "uint16"}, None, planes=20, dtype="uint16")
    ['the stack has 20 planes; model was trained on 13 (the planes it names are used).']
    """
    import numpy as np

    label = Path(checkpoint).name if isinstance(checkpoint, (str, Path)) else "model"
    notes = []
    demo = demonstration_note(checkpoint, card)
    if demo:
        notes.append(demo)
    n = card.get("input_planes")
    if n and int(n) != int(planes):
        notes.append(
            f"the stack has {int(planes)} planes; {label} was trained on {int(n)} (the planes it names are used)."
        )
    card_dtype = card.get("input_dtype")
    if card_dtype and np.dtype(card_dtype) != np.dtype(dtype):
        notes.append(
            f"the stack is {np.dtype(dtype)} but checkpoint {label} was trained on {card_dtype} planes;"
            " the card's intensity ranges are used as they are"
        )
    trained = card.get("input_mpp")
    if trained and pixel_size and _ratio(float(pixel_size), float(trained)) > MPP_TOLERANCE:
        notes.append(
            f"Out of domain: the stack has {pixel_size:.3g} µm/px, but {label} was trained at "
            f"{float(trained):.3g} µm/px (not resampled)."
        )
    mag = card.get("magnification")
    if mag and magnification and _ratio(float(magnification), float(mag)) > MPP_TOLERANCE:
        notes.append(f"Out of domain: the stack is at {magnification:g}x, but {label} was trained at {float(mag):g}x.")
    return notes


_DEMO = re.compile(r"^Demonstration model \((?P<name>[^:]+): (?P<how>.+)\) — not for diagnosis\.$")


def join_demonstration_notes(notes: Sequence[str]) -> list[str]:
    """Several "Demonstration model (name: how) — not for diagnosis." notes (one per checkpoint of a run,
    e.g. the bundled DAPI, MAP2 and NFH models) as one sentence, in the place of the first.

    >>> join_demonstration_notes(["Demonstration model (a: small, trained on X) — not for diagnosis.",
    ...                           "Demonstration model (b: small, trained on X) — not for diagnosis."])
    ['Demonstration models (a, b: small, trained on X) — not for diagnosis.']
    """
    demos = [(n, _DEMO.match(n)) for n in notes]
    found = [m for _, m in demos if m]
    if len(found) < 2:
        return list(notes)
    hows = list(dict.fromkeys(m["how"] for m in found))
    if len(hows) == 1:
        body = f"{', '.join(m['name'] for m in found)}: {hows[0]}"
    else:
        body = "; ".join(f"{m['name']}: {m['how']}" for m in found)
    joined, out = f"Demonstration models ({body}) — not for diagnosis.", []
    for note, m in demos:
        if m is None:
            out.append(note)
        elif joined not in out:
            out.append(joined)
    return out


def merge_notes(notes: Sequence[str], messages: list[str]) -> list[str]:
    """``notes`` followed by the ``messages`` not already among them (notes first: they say what the
    model is before what the run met)."""
    return list(notes) + [m for m in messages if m not in notes]
