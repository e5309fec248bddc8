"""Which channels translation checkpoints predict, and how the Translate dock shows them (no Qt, no torch).

The Translate dock runs one checkpoint per target channel. These helpers name the role of a
channel (:func:`channel_role`: nuclei, lipids, cytoplasm, with its colour in :data:`ROLE_COLORMAPS`),
read what a card predicts (:func:`card_targets`), tell a LUPI nuclei model (:func:`is_lupi`), give each predicted
channel a distinct colormap name (:func:`channel_colormaps`), find two checkpoints that would
predict the same target (:func:`duplicate_targets`) and pick the checkpoints that pre-fill the
dock's rows (:func:`default_checkpoints`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "ROLE_COLORMAPS",
    "SPARE_COLORMAPS",
    "card_targets",
    "channel_colormaps",
    "channel_role",
    "default_checkpoints",
    "duplicate_targets",
    "is_lupi",
]

#: Colormaps handed to channels without a colour of their own, or whose colour is already taken.
SPARE_COLORMAPS = ("cyan", "yellow", "magenta", "red", "green", "blue", "bop orange", "bop purple")
#: Colour per channel role (HASTE's display: nuclei blue, lipids green, cytoplasm red).
ROLE_COLORMAPS = {"nuclei": "blue", "lipids": "green", "cytoplasm": "red"}
_ROLE_NAMES = {
    "nuclei": ("nuclei", "nucleus", "dapi", "hoechst", "c01"),
    "lipids": ("lipids", "lipid", "bodipy", "c02"),
    "cytoplasm": ("cytoplasm", "cellmask", "c03"),
}


def channel_role(name: str, card_role: str | None = None) -> str:
    """Role of an output channel (``nuclei``, ``lipids``, ``cytoplasm`` or the name itself).

    >>> channel_role("DAPI"), channel_role("x", "lipids"), channel_role("MAP2")
    ('nuclei', 'lipids', 'MAP2')
    """
    if card_role:
        return str(card_role)
    low = str(name).lower()
    return next((role for role, names in _ROLE_NAMES.items() if low in names), str(name))


def card_targets(card: dict, weights: str | Path | None = None) -> list[tuple[str, str]]:
    """``(channel name, role)`` of every channel a translation card predicts, in output order.

    Names come from the card's ``channels`` (else ``target``, else the checkpoint's file stem,
    as :func:`~napari_pathfm.pipelines.translate.translate_stack` names them); roles from
    ``channel_roles`` (else ``role``) or the name (DAPI → nuclei, BODIPY → lipids …).

    >>> card_targets({"channels": ["DAPI"], "channel_roles": ["nuclei"]})
    [('DAPI', 'nuclei')]
    >>> card_targets({"channels": ["MAP2"]})
    [('MAP2', 'MAP2')]
    """
    names = card.get("channels") or card.get("target") or ([Path(weights).stem] if weights else [])
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    roles = card.get("channel_roles") or card.get("role") or []
    roles = [roles] if isinstance(roles, str) else list(roles)
    return [(n, channel_role(n, roles[i] if i < len(roles) else None)) for i, n in enumerate(names)]


def is_lupi(card: dict) -> bool:
    """True for a LUPI nuclei model: its second decoder gives the nuclei confidence map."""
    return bool(card.get("has_mask")) or card.get("name") == "lupi_unet"


def channel_colormaps(channels: Sequence[tuple[str, str]]) -> dict[str, str]:
    """A distinct napari colormap per channel name, from its role or its stain name.

    Roles first (nuclei blue, lipids green, cytoplasm red), then stain names (MAP2 magenta,
    NFH green …); a channel with neither, or whose colour an earlier channel already has,
    gets the first unused spare colour (gray when all are used), so additive blending
    keeps the channels apart.

    >>> channel_colormaps([("DAPI", "nuclei"), ("MAP2", "map2"), ("NFH", "nfh"), ("GFAP", "GFAP")])
    {'DAPI': 'blue', 'MAP2': 'magenta', 'NFH': 'green', 'GFAP': 'cyan'}
    """
    from ..io.zstack_layers import TARGET_COLORMAPS

    out: dict[str, str] = {}
    for name, role in channels:
        role = str(role).lower()
        wanted = ROLE_COLORMAPS.get(role) or TARGET_COLORMAPS.get(role) or TARGET_COLORMAPS.get(name.lower())
        if wanted is None or wanted in out.values():
            wanted = next((c for c in SPARE_COLORMAPS if c not in out.values()), "gray")
        out[name] = wanted
    return out


def duplicate_targets(rows: Sequence[list[tuple[str, str]]]) -> tuple[int, int, str] | None:
    """``(row i, row j, target)`` of the first two rows predicting the same target, else None.

    Two channels are the same target when their roles match, case aside (DAPI and Hoechst
    are both ``nuclei``; MAP2 and ``map2`` are one stain).

    >>> duplicate_targets([[("DAPI", "nuclei")], [("MAP2", "map2")], [("Hoechst", "nuclei")]])
    (0, 2, 'nuclei')
    """
    seen: dict[str, int] = {}
    for j, targets in enumerate(rows):
        for _name, role in targets:
            key = str(role).lower()
            if key in seen and seen[key] != j:
                return seen[key], j, str(role)
            seen.setdefault(key, j)
    return None


def default_checkpoints(found: Sequence[tuple[Path, dict]], first: Sequence[str] = (), limit: int = 3) -> list[str]:
    """Checkpoints that pre-fill the rows: one per target, at most ``limit``, roles in ``first`` first.

    ``found`` is :func:`~napari_pathfm.checkpoints.find_checkpoints` of family ``translate``
    (bundled models first). A checkpoint is skipped when one already taken predicts any of
    its targets, so the rows never start with a duplicate. With only the bundled ISL models
    this gives DAPI (LUPI), MAP2 and NFH; with HASTE nuclei/lipids/cytoplasm models, those.
    """

    def targets(item: tuple[Path, dict]) -> set[str]:
        return {r.lower() for _n, r in card_targets(item[1], item[0])}

    ordered = [item for role in first for item in found if role in targets(item)]
    ordered += [item for item in found if item not in ordered]
    taken: list[str] = []
    covered: set[str] = set()
    for item in ordered:
        keys = targets(item)
        if len(taken) < limit and keys and not keys & covered:
            taken.append(str(item[0]))
            covered |= keys
    return taken
