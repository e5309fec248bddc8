"""Tile classifier family: any timm backbone with a linear head.

The simplest ``classify`` model and the first one the training engine trains.
Backbones are always built with ``pretrained=False`` (no downloads); pretrained
weights come only from a local file through :mod:`napari_pathfm.models.weights`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .registry import register_model
from .weights import check_fit, load_into, load_state_dict_file

__all__ = ["timm_classifier"]

log = logging.getLogger(__name__)


@register_model(family="classify")
def timm_classifier(
    backbone: str = "resnet18",
    num_classes: int = 2,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    weights: str | Path | None = None,
    partial_weights: bool = False,
):
    """Any timm image backbone with a linear classification head (tile classifier).

    Parameters
    ----------
    backbone : str
        timm model name, e.g. ``"resnet18"``, ``"resnet10t"``, ``"efficientnet_b0"``; or a
        foundation model found offline (``"hf-hub:ORG/NAME"``, a model folder), whose own weights
        are loaded (its classifier head is new) and recorded in the card (``foundation_weights``).
        Loading such a checkpoint later needs that model's files again (its architecture).
    num_classes : int
        Number of output logits.
    in_chans : int
        Input channels (3 for RGB H&E).
    drop_rate : float
        Dropout before the classifier.
    weights : str or Path, optional
        Local weights file (``.safetensors``/``.pt``/``.pth``/``.bin``) with timm
        key names. A classifier head of another size (trained for another number
        of classes) is skipped and reported in the log; any other tensor that is
        missing, unexpected or of the wrong shape refuses the file with a table
        (:func:`~napari_pathfm.models.weights.check_fit`), and a file in which
        nothing fits is always refused.
    partial_weights : bool
        Load only the tensors of ``weights`` that fit, on purpose (recipe key
        ``model.partial_weights: true``); at least one must fit.

    Returns
    -------
    torch.nn.Module
        Maps ``(N, in_chans, H, W)`` float images to ``(N, num_classes)`` logits.
    """
    from .hub_cache import is_foundation_name

    if is_foundation_name(backbone):
        return _foundation_classifier(backbone, num_classes, in_chans, drop_rate, weights, partial_weights)
    import timm

    model = timm.create_model(
        backbone, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate
    )
    if weights is not None:
        state = load_state_dict_file(weights)
        head = model.pretrained_cfg.get("classifier") or "fc"
        check_fit(
            load_into(model, state, source=weights, dry_run=True),
            weights,
            f"timm {backbone} classifier",
            partial=partial_weights,
            ignore=(f"{head}.",),
            partial_hint="set model.partial_weights: true",
        )
        report = load_into(model, state, source=weights)
        log.info("%s: %s", weights, report)
        model.pathfm_load_report = report
    return model


def _foundation_classifier(backbone, num_classes, in_chans, drop_rate, weights, partial_weights):
    """:func:`timm_classifier` on a foundation model found offline (:func:`.foundation.build_foundation`)."""
    from .foundation import build_foundation

    if int(in_chans) != 3:
        raise ValueError(f"{backbone} takes RGB tiles (in_chans 3), not in_chans {in_chans}")
    built = build_foundation(
        backbone,
        weights=weights,
        num_classes=num_classes,
        partial=partial_weights,
        partial_hint="set model.partial_weights: true",
        timm_kwargs={"drop_rate": drop_rate},
    )
    model = built.module
    model.pathfm_load_report = built.report
    model.pathfm_foundation = {"backbone": built.record()}
    return model
