"""Training recipes: YAML files that say what to train, on what, and how.

A recipe has the top-level keys ``family``, ``description``, ``seed``, ``output``,
``model`` (registry ``name`` plus its config keys), ``data`` (family specific),
``optim`` and ``trainer``. :data:`SCHEMA` lists every known key with its type,
default and help text, so the CLI can validate and a GUI can render a form.

Strings may use ``${VAR}`` or ``${VAR:-default}``; ``${PATHFM_SHARED_DATA}``
defaults to ``<per-user data folder>/shared-data`` (:func:`default_shared_data`). A recipe is a
file or the name of a bundled one (``pathsam2/glas_cpu``, :mod:`napari_pathfm.recipe_files`).
Relative paths written in a recipe file
resolve against the recipe's folder; relative paths given as overrides resolve
against the current directory (where the command was typed).

Examples
--------
>>> r = load_recipe("training/classify/crc_tiny.yaml", ["optim.lr=0.01"])  # doctest: +SKIP
>>> r.get("optim.lr")  # doctest: +SKIP
0.01
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import RecipeError
from ..io.text import read_utf8

__all__ = ["Recipe", "Field", "load_recipe", "parse_override", "schema", "SCHEMA", "FAMILIES", "default_shared_data"]

# family -> module with ``build(recipe) -> (LightningModule, LightningDataModule)``
FAMILIES = {
    "classify": "napari_pathfm.training.tasks.classify",
    "mil": "napari_pathfm.training.tasks.mil",
    "segment": "napari_pathfm.training.tasks.segment",
    "translate": "napari_pathfm.training.tasks.translate",
}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_EXTENSIONS = [".tif", ".tiff", ".png", ".jpg", ".jpeg"]


@dataclass(frozen=True)
class Field:
    """One recipe key: accepted types, default, help text, and optional choices."""

    types: tuple
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    required: bool = False
    path: bool = False


_NUM = (int, float)
_OPT_NUM = (int, float, type(None))

SCHEMA: dict[str, Field] = {
    "family": Field((str,), None, "Task family: which trainer to use.", tuple(FAMILIES), required=True),
    "description": Field((str,), "", "What this recipe is for, in words."),
    "seed": Field((int,), 0, "Seed for weights init, data split and augmentation."),
    "output": Field(
        (str, type(None)), None, "Output folder (default runs/<recipe name>); relative to the current folder."
    ),
    "model.name": Field((str,), None, "Registry name of the model (see `pathfm models`).", required=True),
    "optim.name": Field((str,), "adamw", "Optimizer.", ("adamw", "adam", "sgd")),
    "optim.lr": Field(_NUM, 1e-3, "Learning rate."),
    "optim.weight_decay": Field(_NUM, 0.0, "Weight decay."),
    "optim.momentum": Field(_NUM, 0.9, "Momentum (SGD only)."),
    "optim.scheduler": Field((str,), "none", "Learning-rate schedule over max_epochs.", ("none", "cosine")),
    "trainer.max_epochs": Field((int,), 10, "Epochs to train in total (a resumed run continues up to this)."),
    "trainer.batch_size": Field((int,), 32, "Images per batch (per device)."),
    "trainer.num_workers": Field((int,), 0, "Data-loading worker processes."),
    "trainer.devices": Field((int, str, list), "auto", "Lightning devices: 'auto', a count or a list of ids."),
    "trainer.accelerator": Field((str,), "auto", "Lightning accelerator; 'auto' follows the device argument."),
    "trainer.precision": Field(
        (str, int, type(None)), None, "Lightning precision; default bf16/16-mixed on CUDA, 32 elsewhere."
    ),
    "trainer.strategy": Field((str,), "auto", "Lightning strategy, e.g. 'ddp' (passed through unchanged)."),
    "trainer.num_nodes": Field((int,), 1, "Machines for multi-node DDP."),
    "trainer.limit_train_batches": Field(_NUM, 1.0, "Fraction (float) or number (int) of train batches per epoch."),
    "trainer.limit_val_batches": Field(_NUM, 1.0, "Fraction (float) or number (int) of validation batches."),
    "trainer.log_every_n_steps": Field((int,), 10, "Log training metrics every n steps."),
    "trainer.gradient_clip_val": Field(_OPT_NUM, None, "Clip gradient norm to this value."),
    "trainer.accumulate_grad_batches": Field((int,), 1, "Accumulate gradients over n batches."),
    "trainer.early_stopping.enabled": Field((bool,), True, "Stop when the monitored metric stops improving."),
    "trainer.early_stopping.monitor": Field(
        (str,), "val_loss", "Metric for early stopping and for the best checkpoint."
    ),
    "trainer.early_stopping.mode": Field((str,), "min", "Whether the metric should go down or up.", ("min", "max")),
    "trainer.early_stopping.patience": Field((int,), 10, "Validation rounds without improvement before stopping."),
    "trainer.early_stopping.min_delta": Field(_NUM, 0.0, "Smallest change that counts as an improvement."),
}

DATA_SCHEMA: dict[str, dict[str, Field]] = {
    "classify": {
        "data.root": Field((str,), None, "Folder with one sub-folder of images per class.", required=True, path=True),
        "data.classes": Field((list, type(None)), None, "Class folder names in label order (default: all, sorted)."),
        "data.image_size": Field((int,), 224, "Images are resized to this many pixels square."),
        "data.val_fraction": Field(_NUM, 0.2, "Share of each class held out for validation (seeded, stratified)."),
        "data.split_file": Field(
            (str, type(None)),
            None,
            "JSON {'train': [...], 'val': [...], 'test': [...]} of paths relative to root; "
            "the best weights are evaluated on 'test' after training.",
            path=True,
        ),
        "data.label_fraction": Field(
            _NUM, 1.0, "Share of each class's training images used (seeded, at least 1 per class); val/test whole."
        ),
        "data.extensions": Field((list,), IMAGE_EXTENSIONS, "Image file suffixes to use."),
        "data.mean": Field((list,), IMAGENET_MEAN, "Normalisation mean (RGB, 0-1 scale)."),
        "data.std": Field((list,), IMAGENET_STD, "Normalisation std (RGB, 0-1 scale)."),
        "data.augment": Field((bool,), True, "Random flips and 90-degree rotations while training."),
        "data.input_mpp": Field(
            _OPT_NUM, None, "µm per pixel as the model sees the images (after resizing); goes on the model card."
        ),
        "optim.trainable": Field(
            (str,), "all", "all: train every layer (deep-tune); head: only the classifier (fine-tune).", ("all", "head")
        ),
    },
    "mil": {
        "data.features_dir": Field(
            (str,), None, "Folder of per-slide feature files (<slide>.features.zarr).", required=True, path=True
        ),
        "data.csv": Field(
            (str,),
            None,
            "CSV with columns slide,label and optional fold, split (train/val/test).",
            required=True,
            path=True,
        ),
        "data.classes": Field((list, type(None)), None, "Labels in class-index order (default: CSV labels, sorted)."),
        "data.val_fraction": Field(_NUM, 0.2, "Share of bags held out for validation when the CSV has no split/fold."),
        "data.val_fold": Field((int, type(None)), None, "Validate on this fold (cross-validation); the others train."),
        "data.n_folds": Field((int,), 5, "Folds to deal when val_fold is set and the CSV has no fold column."),
        "data.max_patches": Field(
            (int, type(None)), None, "Train on a random subset of this many patches per bag (None: whole bags)."
        ),
        "data.in_memory": Field((bool,), False, "Keep bags in memory after the first epoch (small data sets)."),
        "trainer.batch_size": Field((int,), 1, "Bags per batch; MIL trains on one bag at a time.", (1,)),
        "optim.name": Field(
            (str,), "adam", "Inner optimizer (wrapped in Lookahead when lookahead_k > 0).", ("adamw", "adam", "sgd")
        ),
        "optim.lr": Field(_NUM, 2e-4, "Learning rate."),
        "optim.weight_decay": Field(_NUM, 1e-4, "Weight decay."),
        "optim.lookahead_k": Field((int,), 5, "Lookahead: fast steps per slow update (0 turns Lookahead off)."),
        "optim.lookahead_alpha": Field(_NUM, 0.5, "Lookahead: slow-weights step size."),
        "loss.patch_weight": Field(
            _NUM, 5.0, "Weight λ of the patch cross-entropy (multitask models, labelled patches only)."
        ),
    },
    "segment": {
        "data.root": Field(
            (str,), None, "Folder with images/ and masks/ (one mask per image, same file name).", required=True, path=True
        ),
        "data.classes": Field(
            (list, type(None)), None, "Class names, background first (default: background, foreground / class_i)."
        ),
        "data.mask_format": Field(
            (str,), "auto",
            "binary (0/255), index (class ids, ignore_index = unlabelled), nonzero (instance ids -> 1) or auto.",
            ("auto", "binary", "index", "nonzero"),
        ),
        "data.mask_values": Field(
            (dict, type(None)), None, "Map raw mask values to classes first, e.g. {0: 0, 128: 1, 255: 2}."
        ),
        "data.ignore_index": Field(
            (int,), 255, "Mask value of unlabelled pixels in the files (no loss, no metrics; 255 in the card)."
        ),
        "data.val_names": Field(
            (list, type(None)), None, "Image names (no suffix) held out for validation; overrides val_fraction."
        ),
        "data.val_fraction": Field(_NUM, 0.2, "Share of the images held out for validation (seeded, by image)."),
        "data.extra_dirs": Field(
            (list,), [], "More images/ + masks/ folders for training only (e.g. corrections): a path or "
            "{path, repeat, mpp, mask_format, mask_values}.",
        ),
        "data.init_checkpoint": Field(
            (str, type(None)), None, "Start from this checkpoint's weights (fine-tuning); it is never overwritten.",
            path=True,
        ),
        "data.tile_size": Field((int, type(None)), None, "Training crop / validation tile size (default: model input size)."),
        "data.samples_per_image": Field((int,), 4, "Random training crops per image and epoch."),
        "data.val_stride": Field((int, type(None)), None, "Validation tile stride (default: tile_size; last tile at the edge)."),
        "data.mpp": Field(_OPT_NUM, None, "µm per pixel of the image files (GlaS: 0.62)."),
        "data.input_mpp": Field(
            _OPT_NUM, None, "µm per pixel the model sees; images are resampled from data.mpp (default: no resampling)."
        ),
        "data.augment": Field((bool,), True, "Random flips and 90-degree rotations of training crops."),
        "data.color_jitter": Field(_NUM, 0.1, "Brightness/contrast/saturation jitter strength (0 turns it off)."),
        "data.in_memory": Field((bool,), True, "Keep decoded images in memory after first use."),
        "data.extensions": Field((list,), IMAGE_EXTENSIONS, "Image and mask file suffixes to use."),
        "trainer.batch_size": Field((int,), 4, "Training crops per batch; also tiles per forward pass in validation."),
        "optim.lr": Field(_NUM, 1e-4, "Learning rate."),
        "optim.weight_decay": Field(_NUM, 1e-2, "Weight decay."),
        "loss.alpha": Field(_NUM, 0.125, "α: loss = (1-α)·Dice + α·Focal + β·MSE(IoU)."),
        "loss.beta": Field(_NUM, 0.01, "β: weight of the IoU-prediction MSE."),
        "trainer.early_stopping.monitor": Field(
            (str,), "val_dice", "Metric for early stopping and for the best checkpoint."
        ),
        "trainer.early_stopping.mode": Field((str,), "max", "Whether the metric should go down or up.", ("min", "max")),
    },
    "translate": {
        "data.stacks": Field(
            (list, str), None, "Training z-stacks: folders/plane files/TIFFs, or {path, well, field, channel}.",
            required=True, path=True,
        ),
        "data.val_stacks": Field((list, str, type(None)), None, "Validation z-stacks (whole fields of view).", path=True),
        "data.val_wells": Field((list, type(None)), None, "Wells whose sites validate (HASTE folders of many sites)."),
        "data.val_rows": Field(
            (list, type(None)), None, "[start, stop] rows of every training stack held out for validation "
            "(ISL convention: [768, 1024]).",
        ),
        "data.channels": Field((list,), None, "Target channel names in output order, e.g. [DAPI] or [lipids].",
                               required=True),
        "data.planes": Field((list, type(None)), None, "0-based input planes to use (default: all of them)."),
        "data.stats": Field(
            (str, type(None)), None, "Stats table CSV (`pathfm zstats`); default: computed on the training part.",
            path=True,
        ),
        "data.magnification": Field((str, type(None)), None, "Rows of the stats table to use (20x, 40x, 60x)."),
        "data.stats_columns": Field((list,), ["min", "max"], "Stats columns mapped to 0 and 1, e.g. [p1, p99.8]."),
        "data.percentiles": Field((list,), [1.0, 99.8], "Percentiles computed when there is no data.stats table."),
        "data.crop_size": Field((int,), 512, "Training crop size (multiple of 16)."),
        "data.val_tile": Field((int, type(None)), None, "Validation tile size (default: crop_size)."),
        "data.samples_per_epoch": Field((int,), 64, "Random training crops per epoch."),
        "data.augment": Field((bool,), True, "Random flips and 90-degree rotations of training crops."),
        "data.shift_scale_rotate": Field((bool,), False, "Affine shift-scale-rotate of training crops."),
        "data.ssr_shift": Field(_NUM, 0.2, "Shift limit as a fraction of the crop size."),
        "data.ssr_scale": Field(_NUM, 0.1, "Scale limit (1 ± this)."),
        "data.ssr_rotate": Field(_NUM, 180.0, "Rotation limit in degrees."),
        "data.nuclei_centred": Field(_NUM, 0.0, "Share of crops centred on a pixel of the nuclei (Otsu) mask."),
        "data.mask": Field((bool,), False, "Compute the Otsu nuclei mask of the first target (always for lupi)."),
        "data.input_dtype": Field((str, type(None)), None, "Required bit depth of the planes (uint16, uint8)."),
        "data.target_dtype": Field((str, type(None)), None, "Required bit depth of the targets (uint16, uint8)."),
        "loss.mode": Field((str,), "regression", "regression, gan (HASTE lipids/cytoplasm) or lupi (HASTE nuclei).",
                           ("regression", "gan", "lupi")),
        "loss.kind": Field((str,), "log_squared", "Regression loss.", ("log_squared", "l1", "mse", "median_mae")),
        "loss.pretrain_epochs": Field((int,), 0, "GAN: epochs of log-squared pretraining before the GAN."),
        "loss.adv_weight": Field(_NUM, 0.01, "GAN: weight of the relativistic average LS adversarial loss."),
        "loss.grad_weight": Field(_NUM, 10.0, "GAN: weight of the gradient loss (10 lipids, 100 cytoplasm)."),
        "loss.median_mae_weight": Field(_NUM, 1.0, "Weight of MAE/median (GAN 1; LUPI: the full-size image term, 0.5)."),
        "loss.disc_lr": Field(_NUM, 1e-6, "GAN: discriminator learning rate (Adam)."),
        "loss.pool_size": Field((int,), 50, "GAN: history pool of discriminator outputs."),
        "loss.grad_clip": Field(_OPT_NUM, 1.0, "GAN: gradient-norm clip of both nets."),
        "loss.discriminator": Field((dict, type(None)), None, "GAN: patchgan config (e.g. {ndf: 32, n_layers: 4})."),
        "loss.side_weight": Field(_NUM, 1.0, "LUPI: weight of the side-output (deep supervision) regression terms."),
        "loss.bce_weight": Field(_NUM, 1.0, "LUPI: weight of the mask BCE."),
        "loss.lwm_pixel_weight": Field(_NUM, 2.0, "LUPI: loss weight where the predicted mask is wrong (1 elsewhere)."),
        "loss.lupi_base": Field((str,), "median_mae", "LUPI: regression error.", ("median_mae", "log_squared", "l1")),
        "optim.lr": Field(_NUM, 1e-3, "Learning rate (generator lr in GAN mode)."),
        "optim.scheduler": Field(
            (str,), "none", "none, cosine, or cosine_warm_restarts (per batch; HASTE nuclei).",
            ("none", "cosine", "cosine_warm_restarts"),
        ),
        "optim.t0": Field((int,), 2, "Warm restarts: epochs of the first cycle."),
        "optim.t_mult": Field((int,), 2, "Warm restarts: cycle length factor."),
        "optim.low_lr_epoch": Field(_OPT_NUM, None, "From this epoch on, a constant optim.low_lr (low-lr phase)."),
        "optim.low_lr": Field(_NUM, 1e-5, "Learning rate of the low-lr phase."),
    },
}

_SECTIONS = {"model", "data", "optim", "loss", "trainer", "trainer.early_stopping"}
_MISSING = object()


def default_shared_data() -> Path:
    """The folder ``${PATHFM_SHARED_DATA}`` stands for: that variable, else ``shared-data`` in the per-user
    data folder (:func:`napari_pathfm.userdata.data_dir`); never a folder found relative to the package."""
    env = os.environ.get("PATHFM_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    from ..userdata import data_dir

    return data_dir() / "shared-data"


def _shared_data(where: str) -> Path:
    """:func:`default_shared_data` for a recipe that uses ``${PATHFM_SHARED_DATA}``; a missing folder is named."""
    folder = default_shared_data()
    if not folder.is_dir():
        raise RecipeError(
            where,
            f"uses ${{PATHFM_SHARED_DATA}}, but its data folder {folder} does not exist.",
            "Set PATHFM_SHARED_DATA to the folder holding the data sets (glas/, crc-tiles/, isl-blue-sample/, ...).",
        )
    return folder


def schema(family: str | None = None) -> dict[str, dict]:
    """Known keys as plain dicts (``type``, ``default``, ``help``, ``choices``, ``required``, ``path``) for forms."""
    fields = dict(SCHEMA)
    for fam, extra in DATA_SCHEMA.items():
        if family in (None, fam):
            fields.update(extra)
    return {
        key: {
            "type": [t.__name__ for t in f.types],
            "default": copy.deepcopy(f.default),
            "help": f.help,
            "choices": list(f.choices) if f.choices else None,
            "required": f.required,
            "path": f.path,
        }
        for key, f in fields.items()
    }


@dataclass
class Recipe:
    """A validated recipe: ``config`` with every default filled in, and the file it came from."""

    config: dict
    path: Path | None = None

    @property
    def name(self) -> str:
        """Recipe file stem, used for the default output folder."""
        return self.path.stem if self.path else "recipe"

    def get(self, key: str, default: Any = None) -> Any:
        """Value at dotted ``key`` (``"trainer.max_epochs"``), or ``default``."""
        return _get(self.config, key, default)

    def to_yaml(self) -> str:
        """The full recipe (defaults included) as YAML, for reproducibility."""
        return yaml.safe_dump(self.config, sort_keys=False)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        var, fallback = m.group(1), m.group(2)
        if var in os.environ:
            return os.environ[var]
        if var == "PATHFM_SHARED_DATA":
            return str(_shared_data(where))
        if fallback is not None:
            return fallback
        raise RecipeError(
            where,
            f"uses ${{{var}}} but the environment variable {var} is not set.",
            f"Set {var} or write ${{{var}:-default}}.",
        )

    return _VAR.sub(sub, value)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"optim.lr=0.01"`` into ``("optim.lr", 0.01)``; the value is parsed as a YAML scalar."""
    key, sep, raw = str(text).partition("=")
    key = key.strip().removeprefix("--set").strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set(config: dict, key: str, value: Any) -> None:
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _check(value: Any, key: str, f: Field, where: str) -> Any:
    if isinstance(value, str) and float in f.types:
        try:
            value = float(value)  # PyYAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    ok = isinstance(value, f.types) and not (isinstance(value, bool) and bool not in f.types)
    if not ok:
        want = " or ".join("null" if t is type(None) else t.__name__ for t in f.types)
        raise RecipeError(where, f"key '{key}' must be {want}, not {value!r}.", f"Help: {f.help}")
    if f.choices and value not in f.choices:
        raise RecipeError(where, f"key '{key}' is {value!r}; choose one of {list(f.choices)}.", f"Help: {f.help}")
    return value


def _unknown(key: str, known: Iterable[str], where: str) -> RecipeError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"Did you mean '{close[0]}'? " if close else ""
    section = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == section]
    return RecipeError(where, f"unknown key '{key}'.", f"{hint}Known keys here: {', '.join(siblings or known)}.")


def _validate(config: dict, where: str, base: Path | None) -> dict:
    config = copy.deepcopy(config)
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and "early_stopping" in trainer and not isinstance(trainer["early_stopping"], dict):
        if trainer["early_stopping"] in (None, False, True):
            trainer["early_stopping"] = {"enabled": bool(trainer["early_stopping"])}
    family = config.get("family")
    if family not in FAMILIES:
        raise RecipeError(
            where,
            f"key 'family' is {family!r}; choose one of {list(FAMILIES)}.",
            "Every recipe starts with family: <name>.",
        )
    fields = {**SCHEMA, **DATA_SCHEMA.get(family, {})}
    model_name = (config.get("model") or {}).get("name") if isinstance(config.get("model"), dict) else None
    from ..models.registry import _BUILD_ONLY_KEYS, list_models, model_info

    if model_name is None:
        raise RecipeError(where, "required key 'model.name' is missing.", f"Known models: {', '.join(list_models())}.")
    if model_name not in list_models():
        raise RecipeError(
            where,
            f"key 'model.name' is {model_name!r}, which is not a known model.",
            f"Known models: {', '.join(list_models())}.",
        )
    model_keys = {f"model.{k}" for k in model_info(model_name)["default_cfg"]}
    for key in model_keys:
        # files loaded at build time (weights, sam_checkpoint, backbone_weights, ...) are relative to the recipe
        is_file = key[len("model.") :] in _BUILD_ONLY_KEYS and not key.endswith("partial_weights")
        fields[key] = Field((object,), None, "Model config (see the model's docstring).", path=is_file)

    def walk(node: dict, prefix: str) -> None:
        if not isinstance(node, dict):
            raise RecipeError(
                where, f"key '{prefix}' must be a mapping of keys, not {node!r}.", "Check the indentation."
            )
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in _SECTIONS:
                if v is not None:
                    walk(v, key)
            elif key not in fields:
                raise _unknown(key, fields, where)

    walk(config, "")
    for key, f in fields.items():
        value = _get(config, key, _MISSING)
        if value is _MISSING:
            if key in model_keys:
                continue
            if f.required:
                raise RecipeError(where, f"required key '{key}' is missing.", f"Help: {f.help}")
            _set(config, key, copy.deepcopy(f.default))
            continue
        if f.types != (object,):
            value = _check(value, key, f, where)
        if f.path and value == "":  # e.g. ${OPTIONAL_WEIGHTS:-} left unset: no file, not the recipe's folder
            value = None
        if f.path and isinstance(value, str) and base is not None and not Path(value).is_absolute():
            value = str((base / value).resolve())
        _set(config, key, value)
    return config


def _get(config: dict, key: str, default: Any) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def load_recipe(source: str | Path | dict | Recipe, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override, expand and validate a recipe.

    Parameters
    ----------
    source : str, Path, dict or Recipe
        A YAML file, or an already-loaded mapping (paths then resolve against
        the current folder).
    overrides : iterable of str
        ``"key.sub=value"`` items (the CLI's ``--set``); values parse as YAML scalars.

    Returns
    -------
    Recipe

    Raises
    ------
    RecipeError
        Unreadable YAML, unknown key, wrong type, bad choice or missing required
        key; the message names the recipe file and the key.
    """
    path: Path | None = None
    if isinstance(source, Recipe):
        raw, path = copy.deepcopy(source.config), source.path
        where = str(path) if path else "<recipe dict>"
    elif isinstance(source, dict):
        raw, where = copy.deepcopy(source), "<recipe dict>"
    else:
        from ..recipe_files import resolve_recipe

        path = resolve_recipe(source).resolve()  # a file, or the bundled recipe of that name
        where = str(path)
        text = read_utf8(path, RecipeError, "Save it as UTF-8.")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = ""
            if mark is not None:
                lines = text.splitlines()
                text = lines[mark.line].strip() if mark.line < len(lines) else ""
                where = f" at line {mark.line + 1}, column {mark.column + 1}" + (f" ({text!r})" if text else "")
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise RecipeError(path, f"is not valid YAML{where} ({problem}).",
                              "Fix the syntax there (indentation, a missing ':', bracket or quote).") from exc  # fmt: skip
        if not isinstance(raw, dict):
            raise RecipeError(
                path, "must be a mapping of keys (family, model, data, ...).", "See training/classify/crc_tiny.yaml."
            )
    config = _validate(_expand(raw, where), where, path.parent if path else Path.cwd())
    if overrides:
        for item in overrides:
            try:
                key, value = parse_override(item)
            except ValueError as exc:
                raise RecipeError(where, str(exc), "Write overrides as --set section.key=value.") from exc
            _set(config, key, _expand(value, where))
        config = _validate(config, where, Path.cwd())
    return Recipe(config=config, path=path)


# Human labels and units of recipe keys, for forms (the training panel): key -> (label, unit).
# Keys not listed get a label derived from the key (:func:`field_label`); the help text stays in SCHEMA.
FIELD_LABELS: dict[str, tuple[str, str]] = {
    "seed": ("Random seed", ""),
    "optim.name": ("Optimizer", ""),
    "optim.lr": ("Learning rate", ""),
    "optim.weight_decay": ("Weight decay", ""),
    "optim.momentum": ("Momentum", ""),
    "optim.scheduler": ("Learning-rate schedule", ""),
    "optim.trainable": ("Layers trained", ""),
    "optim.lookahead_k": ("Lookahead steps", "batches"),
    "optim.lookahead_alpha": ("Lookahead step size", ""),
    "optim.low_lr_epoch": ("Low learning rate from", "epoch"),
    "optim.low_lr": ("Low learning rate", ""),
    "optim.t0": ("First restart after", "epochs"),
    "optim.t_mult": ("Restart period factor", "×"),
    "trainer.max_epochs": ("Epochs", ""),
    "trainer.batch_size": ("Batch size", "tiles"),
    "trainer.num_workers": ("Data-loading workers", "processes"),
    "trainer.devices": ("Devices", ""),
    "trainer.accelerator": ("Accelerator", ""),
    "trainer.precision": ("Precision", ""),
    "trainer.strategy": ("Parallel strategy", ""),
    "trainer.num_nodes": ("Machines", ""),
    "trainer.limit_train_batches": ("Training batches per epoch", "share or count"),
    "trainer.limit_val_batches": ("Validation batches", "share or count"),
    "trainer.log_every_n_steps": ("Log every", "batches"),
    "trainer.gradient_clip_val": ("Gradient clipping", "norm"),
    "trainer.accumulate_grad_batches": ("Accumulate gradients over", "batches"),
    "trainer.early_stopping.enabled": ("Early stopping", ""),
    "trainer.early_stopping.monitor": ("Metric to watch", ""),
    "trainer.early_stopping.mode": ("Better when the metric goes", ""),
    "trainer.early_stopping.patience": ("Early stopping patience", "epochs"),
    "trainer.early_stopping.min_delta": ("Smallest improvement", ""),
    "data.root": ("Data folder", ""),
    "data.classes": ("Classes", ""),
    "data.image_size": ("Image size", "px"),
    "data.tile_size": ("Tile size", "px"),
    "data.crop_size": ("Crop size", "px"),
    "data.val_tile": ("Validation tile size", "px"),
    "data.val_stride": ("Validation tile stride", "px"),
    "data.val_fraction": ("Held out for validation", "share"),
    "data.label_fraction": ("Training images used", "share"),
    "data.split_file": ("Split file", ""),
    "data.augment": ("Flips and rotations", ""),
    "data.color_jitter": ("Colour jitter", "strength"),
    "data.mpp": ("Resolution of the images", "µm/px"),
    "data.input_mpp": ("Resolution", "µm/px"),
    "data.mean": ("Normalisation mean", "RGB, 0–1"),
    "data.std": ("Normalisation std", "RGB, 0–1"),
    "data.extensions": ("File types", ""),
    "data.extra_dirs": ("Extra training folders", ""),
    "data.init_checkpoint": ("Start from checkpoint", ""),
    "data.samples_per_image": ("Crops per image", "per epoch"),
    "data.samples_per_epoch": ("Crops per epoch", ""),
    "data.in_memory": ("Keep data in memory", ""),
    "data.ignore_index": ("Unlabelled mask value", ""),
    "data.features_dir": ("Features folder", ""),
    "data.csv": ("Slide labels (CSV)", ""),
    "data.max_patches": ("Patches per bag", ""),
    "data.stacks": ("Training z-stacks", ""),
    "data.val_stacks": ("Validation z-stacks", ""),
    "data.channels": ("Target channels", ""),
    "data.planes": ("Input planes", ""),
    "data.ssr_rotate": ("Rotation limit", "°"),
    "loss.patch_weight": ("Patch loss weight", "λ"),
    "loss.alpha": ("Focal loss weight", "α"),
    "loss.beta": ("IoU loss weight", "β"),
    "loss.pretrain_epochs": ("Pretraining", "epochs"),
    "loss.disc_lr": ("Discriminator learning rate", ""),
    "model.backbone": ("Backbone", ""),
    "model.drop_rate": ("Dropout", "share"),
}


# where a family counts in other units than tiles
FAMILY_LABELS: dict[str, dict[str, tuple[str, str]]] = {
    "mil": {"trainer.batch_size": ("Batch size", "slides")},
    "segment": {"trainer.batch_size": ("Batch size", "crops")},
    "translate": {"trainer.batch_size": ("Batch size", "crops")},
}


def field_label(key: str, family: str | None = None) -> tuple[str, str]:
    """``(label, unit)`` of a recipe key for forms: from :data:`FAMILY_LABELS` / :data:`FIELD_LABELS`,
    else derived from the key.

    >>> field_label("trainer.batch_size")
    ('Batch size', 'tiles')
    >>> field_label("model.hidden_dim")
    ('Hidden dim', '')
    """
    if key in FAMILY_LABELS.get(family or "", {}):
        return FAMILY_LABELS[family][key]
    if key in FIELD_LABELS:
        return FIELD_LABELS[key]
    leaf = key.rsplit(".", 1)[-1].replace("_", " ").strip() or key
    return leaf[:1].upper() + leaf[1:], ""
