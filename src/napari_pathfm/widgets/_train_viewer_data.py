"""The training panel's "data from what is open" button: train on what the viewer shows.

Which data a family can take from the viewer is part of its spec (``FamilySpec.viewer_data`` in
:mod:`napari_pathfm.families`): ``"corrections"`` (segment: painted-corrections folders appended
to ``data.extra_dirs``) or ``"zstacks"`` (translate: the open z-stacks replace ``data.stacks``).
This module holds the button's words for each kind and the actions; :class:`ViewerDataActions`
is mixed into :class:`~napari_pathfm.widgets.train_widget.TrainWidget`, which provides
``viewer``, ``family``, ``form`` and ``status``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..families import get_family

__all__ = ["VIEWER_DATA", "ViewerDataActions", "viewer_data_button"]

# kind (FamilySpec.viewer_data) -> (button text, tooltip, the panel's method that does it)
VIEWER_DATA = {
    "corrections": (
        "Add corrections from the viewer",
        (
            "Train also on painted corrections of what is open (Segment widget recordings, and the "
            "corrections saved in the per-user data folder for open files): appended to data.extra_dirs."
        ),
        "add_viewer_corrections",
    ),
    "zstacks": (
        "Use the open z-stacks",
        "Train on the z-stacks open in the viewer (with their target layers): they replace data.stacks.",
        "use_viewer_zstacks",
    ),
}


def viewer_data_button(family: str) -> tuple[str, str, str]:
    """``(text, tooltip, method name)`` of ``family``'s viewer-data button; empty strings when it has none."""
    try:
        kind = get_family(family).viewer_data
    except KeyError:
        kind = ""
    return VIEWER_DATA.get(kind, ("", "", ""))


class ViewerDataActions:
    """Put paths of what is open in the viewer into the recipe form (mixed into the training panel)."""

    def viewer_corrections(self) -> list[Path]:
        """Corrections folders of what is open in the viewer (images/ + masks/ training sets).

        Found from Segment widgets that record corrections and from the per-user corrections
        folders (:func:`napari_pathfm.userdata.corrections_dir`) of the files of open layers.
        """
        from ..pipelines.corrections import corrections_dir

        found: list[Path] = []
        if self.viewer is None:
            return found
        for widget in list(self.viewer.window.dock_widgets.values()):
            folder = getattr(widget, "corrections_folder", None)
            folder = folder() if callable(folder) else None
            if folder is not None:
                found.append(Path(folder))
        for layer in self.viewer.layers:
            path = getattr(layer.source, "path", None)
            if path and (corrections_dir(path) / "images").is_dir():
                found.append(corrections_dir(path))
        return list(dict.fromkeys(p.resolve() for p in found))

    def add_viewer_corrections(self) -> list[Path]:
        """Append the viewer's corrections folders to ``data.extra_dirs``; returns the folders added."""
        return self._put_paths(
            "data.extra_dirs",
            self.viewer_corrections(),
            append=True,
            missing="No corrections found: record some with the Segment widget (Record corrections).",
            done="training also on corrections folder(s): ",
        )

    def viewer_zstacks(self) -> list[Path]:
        """Files/folders of the z-stacks open in the viewer (layers the z-stack reader made)."""
        if self.viewer is None:
            return []
        paths = [layer.metadata.get("path") for layer in self.viewer.layers if "plane_names" in layer.metadata]
        return list(dict.fromkeys(Path(p) for p in paths if p))

    def use_viewer_zstacks(self) -> list[Path]:
        """Set ``data.stacks`` to the open z-stacks; returns them."""
        return self._put_paths(
            "data.stacks",
            self.viewer_zstacks(),
            append=False,
            missing="No z-stack is open: open one (File > Open) with its target images first.",
            done="training on the open z-stack(s): ",
        )

    def _put_paths(self, key: str, paths: list[Path], append: bool, missing: str, done: str) -> list[Path]:
        """Write ``paths`` into the form's ``key`` as a YAML list (after its current items with ``append``)."""
        if not paths:
            self.status.setText(missing)
            return []
        if key not in self.form.editors:
            self.form.add_row(key, [])
        current = (yaml.safe_load(str(self.form.value(key)) or "[]") or []) if append else []
        current = current if isinstance(current, list) else [current]
        listed = {str(d.get("path") if isinstance(d, dict) else d) for d in current}
        added = [p for p in paths if str(p) not in listed]
        self.form.set_value(key, yaml.safe_dump(current + [str(p) for p in added], default_flow_style=True).strip())
        self.status.setText(done + ", ".join(map(str, added)))
        return added

    def add_viewer_data(self) -> list[Path]:
        """The family's "data from what is open" action (its spec's ``viewer_data``); ``[]`` when it has none."""
        method = viewer_data_button(self.family.currentText())[2]
        return getattr(self, method)() if method else []
