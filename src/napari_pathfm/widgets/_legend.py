"""A dock's legend: class name ↔ colour swatches for Labels layers, a colorbar with its range for images.

:class:`Legend` reads what it shows from the result layers themselves — a Labels layer's
colormap and its ``metadata["classes"]``, an Image layer's colormap and contrast limits — and
follows their ``colormap`` / ``contrast_limits`` events, so the legend never disagrees with the
canvas (also after the user edits the limits in the layer controls). A dock calls
:meth:`Legend.show_layers` after each run (the Classify, MIL, Translate and Segment docks)::

    legend = Legend(title="Legend")
    layout.addWidget(legend)
    legend.show_layers([labels_layer, heat_layer], title="model.safetensors, run 2")

Nothing here computes over pixel data (the colorbar samples the colormap at 64 points).
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QImage, QPixmap
from qtpy.QtWidgets import (
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

__all__ = ["Legend", "fmt_value"]

SWATCH = 14
BAR_W, BAR_H = 160, 12
#: Shown under transparent colormap ends, so "transparent" reads as the dark canvas it lets through.
CANVAS_RGB = np.array([38, 41, 48], float)


def fmt_value(v: float) -> str:
    """A contrast limit for people: 3 significant digits, no exponent for ordinary ranges."""
    v = float(v)
    return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.2e}"


def _rgb_over_canvas(rgba: np.ndarray) -> np.ndarray:
    rgba = np.asarray(rgba, float).reshape(-1, 4)
    a = rgba[:, 3:4]
    return np.clip(rgba[:, :3] * 255 * a + CANVAS_RGB * (1 - a), 0, 255).astype(np.uint8)


def _swatch(rgb: tuple[int, int, int]) -> QLabel:
    label = QLabel()
    pix = QPixmap(SWATCH, SWATCH)
    pix.fill(QColor(*[int(c) for c in rgb]))
    label.setPixmap(pix)
    label.setFixedSize(SWATCH, SWATCH)
    return label


def _bar(colors: np.ndarray) -> QLabel:
    """A horizontal colorbar image of ``colors`` (N, 4) floats sampled left (low) to right (high)."""
    rgb = _rgb_over_canvas(colors)
    row = rgb[np.linspace(0, len(rgb) - 1, BAR_W).round().astype(int)]
    img = np.ascontiguousarray(np.broadcast_to(row[None], (BAR_H, BAR_W, 3)))
    qimg = QImage(img.data, BAR_W, BAR_H, 3 * BAR_W, QImage.Format.Format_RGB888).copy()
    label = QLabel()
    label.setPixmap(QPixmap.fromImage(qimg))
    label.setFixedSize(BAR_W, BAR_H)
    return label


def layer_classes(layer) -> list[tuple[int, str, tuple[int, int, int]]]:
    """``(value, class name, (r, g, b))`` of a Labels layer's named, visible classes, from its own colormap."""
    classes = layer.metadata.get("classes") or {}
    values = [int(v) for v in sorted(int(k) for k in classes) if int(v) != 0]
    if not values:
        return []
    rgba = np.asarray(layer.colormap.map(np.asarray(values, dtype=np.int64)), float).reshape(len(values), 4)
    return [
        (v, str(classes.get(v, classes.get(str(v)))), tuple(int(round(c * 255)) for c in row[:3]))
        for v, row in zip(values, rgba)
        if row[3] > 0
    ]


class Legend(QGroupBox):
    """Legend of a dock's result layers: swatches for classes, colorbars for continuous layers.

    Attributes
    ----------
    entries : list of dict
        What is shown, for tests and screenshots: ``{"layer", "kind": "classes", "classes": [(name, rgb)]}``
        or ``{"layer", "kind": "colorbar", "colormap", "range": (lo, hi)}``.
    """

    def __init__(self, title: str = "Legend", parent=None):
        super().__init__(title, parent)
        self._base_title = title
        self.entries: list[dict] = []
        self._layers: list = []
        self._body = QVBoxLayout(self)
        self._body.setContentsMargins(6, 4, 6, 4)
        self._rows: list[QWidget] = []
        self.setVisible(False)

    # -- public ---------------------------------------------------------------------
    def show_layers(self, layers, title: str | None = None) -> None:
        """Show the legend of ``layers`` (Labels → classes, Image → colorbar) and follow their changes."""
        self._disconnect()
        self._layers = [layer for layer in layers if layer is not None]
        for layer in self._layers:
            for name in ("colormap", "contrast_limits", "name"):
                emitter = getattr(layer.events, name, None)
                if emitter is not None:
                    emitter.connect(self._rebuild)
        self.setTitle(f"{self._base_title} — {title}" if title else self._base_title)
        self._rebuild()

    def clear(self) -> None:
        """Show nothing (and stop following the layers)."""
        self._disconnect()
        self._layers = []
        self._rebuild()

    # -- internals ------------------------------------------------------------------
    def _disconnect(self) -> None:
        for layer in self._layers:
            for name in ("colormap", "contrast_limits", "name"):
                emitter = getattr(layer.events, name, None)
                if emitter is not None:
                    emitter.disconnect(self._rebuild)

    def _rebuild(self, *_) -> None:
        for w in self._rows:
            self._body.removeWidget(w)
            w.setParent(None)
            w.deleteLater()
        self._rows, self.entries = [], []
        for layer in self._layers:
            if hasattr(layer, "contrast_limits") and not getattr(layer, "rgb", False):
                self._add_colorbar(layer)
            elif type(layer).__name__ == "Labels":
                self._add_classes(layer)
        self.setVisible(bool(self._rows))

    def _add(self, widget: QWidget) -> None:
        self._body.addWidget(widget)
        self._rows.append(widget)

    def _add_classes(self, layer) -> None:
        classes = layer_classes(layer)
        if not classes:
            return
        box = QWidget()
        grid = QGridLayout(box)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(4)
        grid.addWidget(QLabel(f"<b>{layer.name}</b>"), 0, 0, 1, 4)
        for i, (_v, name, rgb) in enumerate(classes):
            r, c = 1 + i // 2, (i % 2) * 2
            grid.addWidget(_swatch(rgb), r, c)
            text = QLabel(name)
            text.setToolTip(f"{name}: RGB {rgb[0]}, {rgb[1]}, {rgb[2]} (the same in GeoJSON/QuPath exports)")
            grid.addWidget(text, r, c + 1)
        grid.setColumnStretch(3, 1)
        self._add(box)
        self.entries.append({"layer": layer.name, "kind": "classes", "classes": [(n, rgb) for _v, n, rgb in classes]})

    def _add_colorbar(self, layer) -> None:
        lo, hi = (float(v) for v in layer.contrast_limits)
        colors = np.asarray(layer.colormap.map(np.linspace(0.0, 1.0, 64)), float)
        box = QWidget()
        col = QVBoxLayout(box)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(1)
        col.addWidget(QLabel(f"<b>{layer.name}</b>"))
        row = QHBoxLayout()
        low, high = QLabel(fmt_value(lo)), QLabel(fmt_value(hi))
        high.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter)
        row.addWidget(low)
        row.addWidget(_bar(colors))
        row.addWidget(high)
        row.addStretch(1)
        col.addLayout(row)
        box.setToolTip(
            f"{layer.name}: colormap {layer.colormap.name}, contrast {fmt_value(lo)} – {fmt_value(hi)}; "
            "values at or below the low end are transparent where the colormap starts transparent"
        )
        self._add(box)
        self.entries.append(
            {"layer": layer.name, "kind": "colorbar", "colormap": layer.colormap.name, "range": (lo, hi)}
        )
