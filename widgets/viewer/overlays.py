"""What a slice view draws over the scan: label maps, a probability heat map, lesion boxes.

Each overlay is one ImageItem fed uint8 through a 256-entry RGBA table, which pyqtgraph turns
into an indexed QImage without any per-pixel Python work.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtGui import QColor, QPainterPath, QPen
from PySide6.QtWidgets import QGraphicsPathItem

from app.core.display import (VIEW_AXES, heat_lut, label_lut, label_slice_uint8, outline,
                              probability_to_uint8, view_slice)
from app.viewer_state import LabelOverlay, ProbabilityOverlay

LABEL_Z = 10
PROBABILITY_Z = 5
MARKER_Z = 20


def place_in_mm(item: pg.ImageItem, rect) -> None:
    """Scale an image to millimetres; only when it changes, as it invalidates the item's geometry."""
    if getattr(item, "_mm_rect", None) != rect:
        item._mm_rect = rect
        item.setRect(*rect)


class LabelLayer:
    """One label map in one view: redrawn when the slice or the overlay's settings change."""

    def __init__(self, view_box: pg.ViewBox, canonical_labels: np.ndarray):
        self.labels = canonical_labels
        self.item = pg.ImageItem(axisOrder="row-major")
        self.item.setZValue(LABEL_Z)
        view_box.addItem(self.item)
        self._lut_key = None

    def draw(self, view: str, index: int, settings: LabelOverlay, slab: int, rect) -> None:
        self.item.setVisible(settings.visible)
        if not settings.visible:
            return
        labels = view_slice(self.labels, view, index, slab)
        labels = label_slice_uint8(labels)
        if settings.outline:
            labels = outline(labels)
        self._set_lut(settings)
        self.item.setImage(labels, autoLevels=False)
        place_in_mm(self.item, rect)
        self.item.setOpacity(settings.opacity)

    def _set_lut(self, settings: LabelOverlay) -> None:
        key = (tuple(sorted((v, str(c)) for v, c in settings.colours.items())), settings.hidden_labels)
        if key != self._lut_key:
            self._lut_key = key
            self.item.setLookupTable(label_lut(settings.colours, settings.hidden_labels))

    def remove(self, view_box: pg.ViewBox) -> None:
        view_box.removeItem(self.item)


class ProbabilityLayer:
    """A heat map of a model's probabilities, hidden below the threshold."""

    def __init__(self, view_box: pg.ViewBox, canonical_probability: np.ndarray):
        self.probability = canonical_probability
        self.item = pg.ImageItem(axisOrder="row-major")
        self.item.setZValue(PROBABILITY_Z)
        self.item.setLookupTable(heat_lut())
        view_box.addItem(self.item)

    def draw(self, view: str, index: int, settings: ProbabilityOverlay, slab: int, rect) -> None:
        self.item.setVisible(settings.visible)
        if not settings.visible:
            return
        heat = probability_to_uint8(view_slice(self.probability, view, index, slab), settings.threshold)
        self.item.setImage(heat, autoLevels=False)
        place_in_mm(self.item, rect)
        self.item.setOpacity(settings.opacity)

    def remove(self, view_box: pg.ViewBox) -> None:
        view_box.removeItem(self.item)


def lesion_box(lesion, scan, view: str):
    """(slice range, (x0, y0, x1, y1) in mm) of a lesion's bounding box in one view, or None.

    ``bbox`` is (k0, k1, j0, j1, i0, i1) with exclusive ends, in array indices.
    """
    k0, k1, j0, j1, i0, i1 = lesion.bbox
    a = scan.to_canonical((k0, j0, i0))
    b = scan.to_canonical((k1 - 1, j1 - 1, i1 - 1))
    lo = [min(p, q) for p, q in zip(a, b)]
    hi = [max(p, q) for p, q in zip(a, b)]
    axis, rows, cols = VIEW_AXES[view]
    row_mm, col_mm = scan.spacing[rows], scan.spacing[cols]
    rect = (lo[cols] * col_mm, lo[rows] * row_mm, (hi[cols] + 1) * col_mm, (hi[rows] + 1) * row_mm)
    return (lo[axis], hi[axis]), rect


class LesionMarkers:
    """Boxes and numbers around the lesions that cross the shown slice."""

    def __init__(self, view_box: pg.ViewBox):
        self.view_box = view_box
        self.path_item = QGraphicsPathItem()
        pen = QPen(QColor(255, 170, 0))
        pen.setCosmetic(True)
        pen.setWidthF(1.5)
        self.path_item.setPen(pen)
        self.path_item.setZValue(MARKER_Z)
        view_box.addItem(self.path_item)
        self.texts: list[pg.TextItem] = []
        self.boxes: list[tuple[int, tuple[int, int], tuple[float, float, float, float]]] = []

    def set_lesions(self, lesions, scan, view: str) -> None:
        self.boxes = [(lesion.lesion_id, *lesion_box(lesion, scan, view)) for lesion in lesions]

    def draw(self, index: int, shown: bool) -> None:
        path = QPainterPath()
        visible = [(lid, rect) for lid, (lo, hi), rect in self.boxes if shown and lo <= index <= hi]
        margin = 2.0  # mm around the lesion, so the box does not hide its edge
        for lid, (x0, y0, x1, y1) in visible:
            path.addRect(x0 - margin, y0 - margin, x1 - x0 + 2 * margin, y1 - y0 + 2 * margin)
        self.path_item.setPath(path)
        self._place_numbers(visible, margin)

    def _place_numbers(self, visible, margin: float) -> None:
        while len(self.texts) < len(visible):
            text = pg.TextItem(color=(255, 170, 0), anchor=(0, 1))
            text.setZValue(MARKER_Z)
            self.view_box.addItem(text)
            self.texts.append(text)
        for n, text in enumerate(self.texts):
            if n < len(visible):
                lid, (x0, y0, _, _) = visible[n]
                text.setText(f"#{lid}")
                text.setPos(x0 - margin, y0 - margin)
            text.setVisible(n < len(visible))
