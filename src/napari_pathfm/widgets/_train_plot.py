"""The training panel's live plot: losses on the left axis, other metrics on the right, x in epochs.

Drawn with :class:`~qtpy.QtGui.QPainter` on a plain widget rather than matplotlib: a matplotlib
canvas of dock size took ~100 ms per draw on a busy machine (too long for the GUI thread at every
batch), its import adds ~0.3 s when the panel opens, and its warnings (``tight_layout`` in a narrow
dock, missing glyphs) reached napari as notifications. Here a repaint is a few ms, nothing
can warn, and the plot follows the dock's size (a minimum height of :data:`MIN_HEIGHT` px).

Points arrive per batch, so :meth:`LossPlot.add` only stores the point; a single-shot timer
repaints at most every :data:`REDRAW_MS` ms. Long curves are thinned to about two points per
pixel column before drawing.
"""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPalette, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["MIN_HEIGHT", "REDRAW_MS", "LossPlot", "nice_ticks", "pretty_name"]

REDRAW_MS = 300
MIN_HEIGHT = 240
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
NAMES = {"loss": "training loss", "val_loss": "validation loss"}
_MARGIN = {"left": 56, "right": 52, "top": 10, "bottom": 40}


def pretty_name(name: str) -> str:
    """``val_acc`` → ``validation acc``; ``loss`` → ``training loss``."""
    if name in NAMES:
        return NAMES[name]
    for prefix, word in (("val_", "validation "), ("train_", "training "), ("test_", "test ")):
        if name.startswith(prefix):
            return word + name[len(prefix) :].replace("_", " ")
    return name.replace("_", " ")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps of 1, 2 or 5 × 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(math.ceil((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


class LossPlot(QWidget):
    """Live curves of one run: ``add(name, x_epochs, value)``; losses left, other metrics right."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(MIN_HEIGHT)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setToolTip("Training loss per batch and validation metrics per epoch (x: epochs).")
        self.curves: dict[str, list[tuple[float, float]]] = {}
        self.x_label, self.y_label, self.y2_label = "epoch", "loss", "metric"
        self.draws = 0
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self.redraw)

    # ----------------------------------------------------------------- data
    def clear(self) -> None:
        """Forget every curve (a new run)."""
        self._timer.stop()
        self.curves.clear()
        self.update()

    def add(self, name: str, x: float, value: float | None) -> None:
        """Store one point (``x`` in epochs) of curve ``name``; the plot repaints within :data:`REDRAW_MS`."""
        if value is None or not math.isfinite(float(value)):
            return
        self.curves.setdefault(name, []).append((float(x), float(value)))
        if not self._timer.isActive():
            self._timer.start()

    def flush(self) -> None:
        """Repaint now with what :meth:`add` stored (end of a run)."""
        self._timer.stop()
        self.redraw()

    def redraw(self) -> None:
        """Repaint at once (synchronously: its cost is the paint's)."""
        self.draws += 1
        self.repaint()

    def legend(self) -> list[str]:
        """The legend's entries, in drawing order."""
        return [pretty_name(n) for n in self.curves]

    @staticmethod
    def _on_left(name: str) -> bool:
        return "loss" in name

    # ----------------------------------------------------------------- painting
    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        pal = self.palette()
        fg = pal.color(QPalette.ColorRole.WindowText)
        grid = QColor(fg)
        grid.setAlpha(40)
        m = _MARGIN
        area = QRectF(
            m["left"],
            m["top"],
            max(10, self.width() - m["left"] - m["right"]),
            max(10, self.height() - m["top"] - m["bottom"]),
        )
        p.setPen(QPen(fg, 1))
        p.drawRect(area)
        self._labels(p, area, fg)
        if not self.curves:
            p.drawText(area, Qt.AlignmentFlag.AlignCenter, "curves appear when training starts")
            p.end()
            return
        xs = [x for pts in self.curves.values() for x, _ in pts]
        xticks = nice_ticks(0.0, max(max(xs), 1.0))
        x0, x1 = xticks[0], xticks[-1]
        sides = {
            True: [n for n in self.curves if self._on_left(n)],
            False: [n for n in self.curves if not self._on_left(n)],
        }
        for left, names in sides.items():
            ys = [y for n in names for _, y in self.curves[n]]
            if not ys:
                continue
            yticks = nice_ticks(min(ys), max(ys), 4)
            y0, y1 = yticks[0], yticks[-1]

            def to_px(x, y, y0=y0, y1=y1):
                return QPointF(
                    area.left() + (x - x0) / (x1 - x0) * area.width(),
                    area.bottom() - (y - y0) / ((y1 - y0) or 1) * area.height(),
                )

            p.setPen(QPen(fg, 1))
            for t in yticks:
                y = to_px(x0, t).y()
                p.drawLine(
                    QPointF(area.left() if left else area.right() - 4, y),
                    QPointF(area.left() + 4 if left else area.right(), y),
                )
                rect = (
                    QRectF(0, y - 8, m["left"] - 6, 16) if left else QRectF(area.right() + 6, y - 8, m["right"] - 6, 16)
                )
                align = (
                    Qt.AlignmentFlag.AlignRight if left else Qt.AlignmentFlag.AlignLeft
                ) | Qt.AlignmentFlag.AlignVCenter
                p.drawText(rect, int(align), _fmt(t))
            for name in names:
                self._curve(p, name, [to_px(x, y) for x, y in self._thin(self.curves[name], area.width())])
        p.setPen(QPen(grid, 1))
        for t in xticks:
            x = area.left() + (t - x0) / (x1 - x0) * area.width()
            p.drawLine(QPointF(x, area.top()), QPointF(x, area.bottom()))
            p.setPen(QPen(fg, 1))
            p.drawText(QRectF(x - 30, area.bottom() + 2, 60, 16), int(Qt.AlignmentFlag.AlignHCenter), _fmt(t))
            p.setPen(QPen(grid, 1))
        self._legend(p, area, fg)
        p.end()

    def _curve(self, p: QPainter, name: str, points: list[QPointF]) -> None:
        color = QColor(COLORS[list(self.curves).index(name) % len(COLORS)])
        p.setPen(QPen(color, 1.2 if name == "loss" else 1.8))
        path = QPainterPath(points[0])
        for pt in points[1:]:
            path.lineTo(pt)
        p.drawPath(path)
        if name != "loss":  # per-epoch metrics: few points, marked
            p.setBrush(color)
            for pt in points:
                p.drawEllipse(pt, 2.5, 2.5)
            p.setBrush(Qt.BrushStyle.NoBrush)

    @staticmethod
    def _thin(points: list[tuple[float, float]], width: float) -> list[tuple[float, float]]:
        step = max(1, len(points) // max(1, int(2 * width)))
        return points[::step] if step > 1 else points

    def _labels(self, p: QPainter, area: QRectF, fg: QColor) -> None:
        p.setPen(QPen(fg, 1))
        p.drawText(
            QRectF(area.left(), self.height() - 18, area.width(), 16), int(Qt.AlignmentFlag.AlignHCenter), self.x_label
        )
        for text, x, angle in (
            (self.y_label, 12, -90),
            (self.y2_label if any(not self._on_left(n) for n in self.curves) else "", self.width() - 12, 90),
        ):
            if not text:
                continue
            p.save()
            p.translate(x, area.center().y())
            p.rotate(angle)
            p.drawText(QRectF(-area.height() / 2, -8, area.height(), 16), int(Qt.AlignmentFlag.AlignCenter), text)
            p.restore()

    def _legend(self, p: QPainter, area: QRectF, fg: QColor) -> None:
        fm = p.fontMetrics()
        names = list(self.curves)
        w = max(fm.horizontalAdvance(pretty_name(n)) for n in names) + 30
        h = fm.height() * len(names) + 6
        box = QRectF(area.right() - w - 4, area.top() + 4, w, h)
        bg = QColor(self.palette().color(QPalette.ColorRole.Window))
        bg.setAlpha(200)
        p.fillRect(box, bg)
        for i, name in enumerate(names):
            y = box.top() + 3 + fm.height() * (i + 0.5)
            p.setPen(QPen(QColor(COLORS[i % len(COLORS)]), 2))
            p.drawLine(QPointF(box.left() + 4, y), QPointF(box.left() + 22, y))
            p.setPen(QPen(fg, 1))
            p.drawText(
                QRectF(box.left() + 26, y - fm.height() / 2, w - 26, fm.height()),
                int(Qt.AlignmentFlag.AlignVCenter),
                pretty_name(name),
            )
