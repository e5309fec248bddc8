"""Model families as rows: one :class:`FamilySpec` per family, found by name.

A family (segmentation, tile classification, MIL and its baselines, translation, feature
extraction) is one row that says where each of its parts lives: the checkpoint loader, the
pipeline entry, the training task, its recipe keys and folders, the batch task and the dock.
Every other module looks a family up by name (:func:`get_family`) instead of branching on
``"segment"`` / ``"classify"`` / ...; adding a family is one :func:`register_family` call plus
its own model and pipeline modules (see "Add a family" in ``docs/architecture.md``).

Imports point down: this module lives in the small core and imports nothing heavy (no torch,
contract 6). A spec names the parts of upper layers (pipelines, training, widgets) as
``"module:attr"`` strings, imported only when used (:func:`resolve`), the way
``models/registry.py`` names model factories. Models say their family themselves
(``@register_model(family=...)``), as in timm.

Families from outside the package register when their module is imported: modules named in
the environment variable ``PATHFM_PLUGINS`` (comma separated) and the entry points of group
``napari_pathfm.families`` are imported on the first lookup (:func:`load_plugins`), in this
process and in every process it starts (``pathfm train``, dask workers of ``pathfm batch``).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGINS_ENV",
    "FamilySpec",
    "get_family",
    "list_families",
    "load_plugins",
    "register_family",
    "resolve",
]

PLUGINS_ENV = "PATHFM_PLUGINS"
ENTRY_POINT_GROUP = "napari_pathfm.families"


@dataclass(frozen=True)
class FamilySpec:
    """Everything the package needs to know about one model family.

    Parts of upper layers are ``"module:attr"`` strings (``training`` is a module name),
    imported on first use; ``None`` means the family has no such part (``features`` is not
    trained from a recipe; ``mil`` has no batch-size unit of tiles).

    Attributes
    ----------
    name : str
        The family's name, as in recipes (``family:``), model cards and ``pathfm batch --task``.
    title : str
        Name for people (GUI lists).
    noun : str
        What a checkpoint of this family is, for "is a 'mil' checkpoint, not <noun>".
    examples : str
        Which models or recipes make such checkpoints, for "Pick a checkpoint of family ... (<examples>)".
    use : str
        Where its checkpoints are used, for "use this one with <use>".
    card_keys : tuple of str
        Dotted model-card keys its checkpoints must carry besides ``name`` and ``config``
        (e.g. ``"config.in_dim"``).
    loader : str or None
        The family's one checkpoint loader: ``(model_or_checkpoint, device="cpu") -> (model, card, ...)``.
        ``None``: :func:`napari_pathfm.models.checkpoint.load_family_checkpoint` alone.
    pipeline : str or None
        The pipeline entry (``segment_slide``, ...); ``pathfm batch --set`` keys are its parameters.
    training : str or None
        Module with ``build(recipe) -> (LightningModule, LightningDataModule, card)``.
    recipe_fields : str or None
        ``{"data.key": Field, ...}``: the recipe keys only this family has (or whose defaults differ).
    recipe_folders : tuple of str
        Folders of the package's ``training/`` recipes that hold this family's recipes.
    batch : str or None
        The batch task ``(slide, out_folder, checkpoints or None, options) -> dict`` run per slide.
    batch_options : frozenset of str
        Options the batch task reads itself besides the pipeline's parameters (``top_k``).
    batch_fills : frozenset of str
        Pipeline parameters the batch task fills in (slide, checkpoint, outputs): not options.
    needs_checkpoint : bool
        The batch task cannot run without ``--checkpoint``.
    checkpoint_each : str
        What each of several checkpoints is for, e.g. ``"channel"`` (translate: one per channel).
    default_checkpoint : str or None
        ``() -> Path``: the checkpoint a batch uses when none is given.
    batch_unit : str
        What ``trainer.batch_size`` counts, for forms (``tiles``, ``crops``, ``slides``).
    viewer_data : str
        Training data the training panel can take from the viewer: ``"corrections"``,
        ``"zstacks"`` or ``""`` (none).
    dock : str or None
        The napari dock widget of the family's inference.
    """

    name: str
    title: str
    noun: str
    examples: str = ""
    use: str = ""
    card_keys: tuple[str, ...] = ()
    loader: str | None = None
    pipeline: str | None = None
    training: str | None = None
    recipe_fields: str | None = None
    recipe_folders: tuple[str, ...] = ()
    batch: str | None = None
    batch_options: frozenset = frozenset()
    batch_fills: frozenset = frozenset()
    needs_checkpoint: bool = False
    checkpoint_each: str = ""
    default_checkpoint: str | None = None
    batch_unit: str = "tiles"
    viewer_data: str = ""
    dock: str | None = None

    def part(self, field_name: str) -> Any:
        """The object a ``"module:attr"`` part names (a module for ``training``), imported now.

        Raises
        ------
        LookupError
            The family has no such part.
        """
        target = getattr(self, field_name)
        if not target:
            raise LookupError(f"family {self.name!r} has no {field_name}")
        return resolve(target)


def resolve(target: str) -> Any:
    """Import ``"package.module:attr"`` (or a plain module name) and return the object."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


_FAMILIES: dict[str, FamilySpec] = {}
_PLUGINS_LOADED = False


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` under ``spec.name``; registering the same spec again is a no-op.

    Raises
    ------
    ValueError
        Another spec is already registered under that name.
    """
    if not isinstance(spec, FamilySpec):
        raise TypeError(f"register_family takes a FamilySpec, not {type(spec).__name__}")
    old = _FAMILIES.get(spec.name)
    if old is not None and old != spec:
        by = old.loader or old.pipeline or "the package"
        raise ValueError(f"family {spec.name!r} is already registered (by {by})")
    _FAMILIES[spec.name] = spec
    return spec


def load_plugins() -> None:
    """Import the family plugins once: modules in ``$PATHFM_PLUGINS`` and ``napari_pathfm.families`` entry points.

    A plugin that cannot be imported is reported as a warning (the package's own families still
    work); its family is then unknown, which the lookup that needed it says.
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    try:
        from importlib.metadata import entry_points

        points = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # noqa: BLE001 - broken package metadata must not stop the built-in families
        points = []
    for target in names + [p.value for p in points]:
        try:
            resolve(target)
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not stop the others
            warnings.warn(f"napari-pathfm family plugin {target!r} could not be imported: {exc}", stacklevel=2)


def get_family(name: str) -> FamilySpec:
    """The spec of family ``name``.

    Raises
    ------
    KeyError
        Unknown family; the message lists the known ones.
    """
    spec = _FAMILIES.get(name)
    if spec is None:
        load_plugins()
        spec = _FAMILIES.get(name)
    if spec is None:
        raise KeyError(f"unknown family {name!r}; known families: {', '.join(list_families())}")
    return spec


def list_families(having: str | None = None) -> list[str]:
    """Names of the known families in registration order; with ``having``, only those that have that part.

    >>> list_families("training")
    ['classify', 'mil', 'segment', 'translate']
    >>> "features" in list_families("batch")
    True
    """
    load_plugins()
    if having is not None and having not in {f.name for f in fields(FamilySpec)}:
        raise ValueError(f"FamilySpec has no field {having!r}")
    return [n for n, s in _FAMILIES.items() if having is None or getattr(s, having)]


_P, _T, _W = "napari_pathfm.pipelines", "napari_pathfm.training", "napari_pathfm.widgets"

for _spec in (
    FamilySpec(
        name="classify",
        title="Tile classification",
        noun="a tile classifier",
        examples="timm_classifier or slca, trained with a classify recipe",
        use="pathfm classify / the Classify widget",
        loader=f"{_P}.classify:load_classifier",
        pipeline=f"{_P}.classify:classify_slide",
        training=f"{_T}.tasks.classify",
        recipe_fields=f"{_T}.recipe_fields:CLASSIFY",
        recipe_folders=("classify", "histokt", "slca"),  # HistoKT's encoders are tile classifiers too
        batch=f"{_P}.batch_tasks:classify",
        batch_fills=frozenset({"slide", "model_or_checkpoint", "progress", "cancel"}),
        needs_checkpoint=True,
        dock=f"{_W}.classify_widget:ClassifyWidget",
    ),
    FamilySpec(
        name="mil",
        title="Multiple-instance learning",
        noun="a MIL model",
        examples="s4mil or a MIL baseline, trained with a mil recipe",
        use="pathfm mil predict / the MIL widget",
        card_keys=("config.in_dim",),
        loader=f"{_P}.mil:load_mil_model",
        pipeline=f"{_P}.mil:mil_predict",
        training=f"{_T}.tasks.mil",
        recipe_fields=f"{_T}.recipe_fields:MIL",
        recipe_folders=("s4mil",),
        batch=f"{_P}.batch_tasks:mil",
        batch_options=frozenset({"top_k"}),
        batch_fills=frozenset({"checkpoint", "features", "slide", "progress", "cancel"}),
        needs_checkpoint=True,
        batch_unit="slides",
        dock=f"{_W}.mil_widget:MILWidget",
    ),
    FamilySpec(
        name="segment",
        title="Segmentation",
        noun="a segmentation model",
        examples="e.g. a trained pathsam2 model",
        use="pathfm segment / the Segment widget",
        loader=f"{_P}.segment_model:load_segmentation_model",
        pipeline=f"{_P}.segment:segment_slide",
        training=f"{_T}.tasks.segment",
        recipe_fields=f"{_T}.recipe_fields:SEGMENT",
        recipe_folders=("pathsam2",),
        batch=f"{_P}.batch_tasks:segment",
        batch_fills=frozenset({"slide_or_image", "model_or_checkpoint", "out", "geojson", "progress", "cancel"}),
        default_checkpoint=f"{_P}.segment_model:default_segment_checkpoint",
        batch_unit="crops",
        viewer_data="corrections",
        dock=f"{_W}.segment_widget:SegmentWidget",
    ),
    FamilySpec(
        name="translate",
        title="Z-stack translation",
        noun="a translation one",
        examples="HASTE dense_unet / lupi_unet",
        use="pathfm translate / the Translate widget",
        loader=f"{_P}.translate:load_translation_model",
        pipeline=f"{_P}.translate:translate_stack",
        training=f"{_T}.tasks.translate",
        recipe_fields=f"{_T}.recipe_fields:TRANSLATE",
        recipe_folders=("translate",),
        batch=f"{_P}.batch_tasks:translate",
        batch_fills=frozenset({"stack", "checkpoint", "store", "progress", "cancel"}),
        needs_checkpoint=True,
        checkpoint_each="channel",
        batch_unit="crops",
        viewer_data="zstacks",
        dock=f"{_W}.translate_widget:TranslateWidget",
    ),
    FamilySpec(
        name="features",
        title="Patch features",
        noun="a feature extractor",
        examples="resnet50_trunc or timm_features",
        use="pathfm features",
        pipeline=f"{_P}.features_many:features_command",
        batch=f"{_P}.batch_tasks:features",
        batch_options=frozenset({"backbone"}),
        batch_fills=frozenset({"inputs", "out_dir", "weights", "progress", "cancel"}),
    ),
):
    register_family(_spec)
del _spec
