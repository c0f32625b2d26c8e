"""Measurement tools drawn on a slice view: a ruler (mm) and an elliptical ROI (mean/SD HU, area).

Scene coordinates of a slice view are millimetres (x right, y down), so a ruler's length is
its length in the scene; the numbers themselves come from app.core.display.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QPen
from PySide6.QtWidgets import QGraphicsEllipseItem, QGraphicsLineItem

from app.core.display import RoiStats, ellipse_mask, roi_stats, ruler_distance_mm

MEASURE_COLOUR = QColor(255, 215, 0)


def _cosmetic_pen(colour: QColor = MEASURE_COLOUR, width: float = 1.5) -> QPen:
    pen = QPen(colour)
    pen.setWidthF(width)
    pen.setCosmetic(True)  # same thickness whatever the zoom
    return pen


def _label() -> pg.TextItem:
    text = pg.TextItem(color=MEASURE_COLOUR, fill=pg.mkBrush(0, 0, 0, 150), anchor=(0, 1))
    text.setZValue(41)
    return text


class Ruler:
    """A straight line with its length in mm, living on one slice of one view."""

    def __init__(self, view_box: pg.ViewBox, start: QPointF, slice_index: int):
        self.slice_index = slice_index
        self.start = QPointF(start)
        self.end = QPointF(start)
        self.line = QGraphicsLineItem()
        self.line.setPen(_cosmetic_pen())
        self.line.setZValue(40)
        self.text = _label()
        view_box.addItem(self.line)
        view_box.addItem(self.text)
        self.update(start)

    @property
    def length_mm(self) -> float:
        return ruler_distance_mm((self.start.x(), self.start.y()), (self.end.x(), self.end.y()))

    def update(self, end: QPointF) -> None:
        self.end = QPointF(end)
        self.line.setLine(self.start.x(), self.start.y(), self.end.x(), self.end.y())
        self.text.setText(f"{self.length_mm:.1f} mm")
        self.text.setPos(self.end)

    def set_visible(self, shown: bool) -> None:
        self.line.setVisible(shown)
        self.text.setVisible(shown)

    def remove(self, view_box: pg.ViewBox) -> None:
        view_box.removeItem(self.line)
        view_box.removeItem(self.text)


class EllipseRoi:
    """An ellipse dragged corner to corner; shows mean/SD HU (padding excluded) and area in mm²."""

    def __init__(self, view_box: pg.ViewBox, start: QPointF, slice_index: int):
        self.slice_index = slice_index
        self.start = QPointF(start)
        self.rect = QRectF(start, start)
        self.ellipse = QGraphicsEllipseItem()
        self.ellipse.setPen(_cosmetic_pen())
        self.ellipse.setZValue(40)
        self.text = _label()
        self.stats = RoiStats(None, None, 0.0, 0)
        view_box.addItem(self.ellipse)
        view_box.addItem(self.text)

    def update(self, end: QPointF, image_hu: np.ndarray, pixel_mm, padding: np.ndarray | None) -> None:
        self.rect = QRectF(self.start, end).normalized()
        self.ellipse.setRect(self.rect)
        self.stats = measure_ellipse(self.rect, image_hu, pixel_mm, padding)
        self.text.setText(roi_text(self.stats))
        self.text.setPos(self.rect.bottomRight())

    def set_visible(self, shown: bool) -> None:
        self.ellipse.setVisible(shown)
        self.text.setVisible(shown)

    def remove(self, view_box: pg.ViewBox) -> None:
        view_box.removeItem(self.ellipse)
        view_box.removeItem(self.text)


def measure_ellipse(rect_mm: QRectF, image_hu: np.ndarray, pixel_mm, padding) -> RoiStats:
    """ROI statistics of the pixels whose centres fall inside an ellipse given in scene mm."""
    row_mm, col_mm = pixel_mm
    centre = (rect_mm.center().y() / row_mm - 0.5, rect_mm.center().x() / col_mm - 0.5)
    radii = (rect_mm.height() / 2 / row_mm, rect_mm.width() / 2 / col_mm)
    inside = ellipse_mask(image_hu.shape, centre, radii)
    return roi_stats(image_hu, inside, pixel_mm, padding)


def roi_text(stats: RoiStats) -> str:
    if stats.mean_hu is None:
        return f"area {stats.area_mm2:.1f} mm²\n(no tissue inside)"
    return f"mean {stats.mean_hu:.1f} HU  SD {stats.sd_hu:.1f}\narea {stats.area_mm2:.1f} mm²"


def crosshair_lines() -> tuple[pg.InfiniteLine, pg.InfiniteLine]:
    """A vertical and a horizontal line showing where the other two views cut this one."""
    pen = pg.mkPen(QColor(80, 200, 255, 170), width=1, style=Qt.PenStyle.DashLine)
    vertical = pg.InfiniteLine(angle=90, movable=False, pen=pen)
    horizontal = pg.InfiniteLine(angle=0, movable=False, pen=pen)
    for line in (vertical, horizontal):
        line.setZValue(30)
    return vertical, horizontal
