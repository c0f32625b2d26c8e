"""Shared by the viewer tests: a small chest phantom, real mouse/wheel events, grabbing pixels."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PySide6.QtCore import QEvent, QPoint, QPointF, Qt
from PySide6.QtGui import QImage, QMouseEvent, QWheelEvent
from PySide6.QtWidgets import QApplication

from app.core.volume import Volume
from tests.core.test_display import POSITIONS

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"

BODY_HU, LUNG_HU, NODULE_HU, AIR_HU = 40, -850, 60, -1000


def phantom(shape=(24, 48, 48), spacing=(2.5, 0.8, 0.8), direction=None, nodules=((12, 18, 14, 4),),
            **volume_kwargs) -> tuple[Volume, np.ndarray]:
    """A chest-like volume (air, body, two lungs, spherical nodules) and its nodule label map.

    ``nodules`` are (k, j, i, radius in voxels in-plane); spheres are scaled by the spacing.
    """
    nk, nj, ni = shape
    k, j, i = np.mgrid[0:nk, 0:nj, 0:ni]
    voxels = np.full(shape, AIR_HU, np.int16)
    voxels[((j - nj / 2) / (nj * 0.42)) ** 2 + ((i - ni / 2) / (ni * 0.47)) ** 2 < 1] = BODY_HU
    for centre in (ni * 0.3, ni * 0.7):
        voxels[((j - nj / 2) / (nj * 0.3)) ** 2 + ((i - centre) / (ni * 0.15)) ** 2 < 1] = LUNG_HU
    labels = np.zeros(shape, np.uint8)
    ratio = spacing[0] / spacing[1]
    for kc, jc, ic, radius in nodules:
        ball = ((k - kc) * ratio) ** 2 + (j - jc) ** 2 + (i - ic) ** 2 <= radius ** 2
        voxels[ball] = NODULE_HU
        labels[ball] = 1
    kwargs = dict(spacing=spacing, description={"series_description": "Phantom chest", "modality": "CT"})
    if direction is not None:
        kwargs["direction"] = direction
    kwargs.update(volume_kwargs)
    return Volume(voxels, **kwargs), labels


def grab_rgb(widget) -> np.ndarray:
    """RGB pixels of a widget as drawn (a copy, so the QImage may go)."""
    image = widget.grab().toImage().convertToFormat(QImage.Format.Format_RGB888)
    rows = np.frombuffer(image.constBits(), dtype=np.uint8, count=image.sizeInBytes())
    rows = rows.reshape(image.height(), image.bytesPerLine())[:, : image.width() * 3]
    return rows.reshape(image.height(), image.width(), 3).copy()


def device_point(slice_view, x_mm: float, y_mm: float) -> QPoint:
    """Widget pixel of a point given in the view's scene millimetres."""
    scene = slice_view.view_box.mapViewToScene(QPointF(x_mm, y_mm))
    return slice_view.mapFromScene(scene)


def pixel_centre_mm(slice_view, row: int, col: int) -> tuple[float, float]:
    row_mm, col_mm = slice_view.pixel_mm()
    return (col + 0.5) * col_mm, (row + 0.5) * row_mm


def wheel(widget, point: QPoint, notches: int, modifiers=Qt.KeyboardModifier.NoModifier) -> None:
    """A real wheel event: positive notches roll away from the user (previous slice)."""
    pos = QPointF(point)
    event = QWheelEvent(pos, QPointF(widget.mapToGlobal(point)), QPoint(0, 0), QPoint(0, 120 * notches),
                        Qt.MouseButton.NoButton, modifiers, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication.sendEvent(widget.viewport(), event)


def _mouse(widget, kind, point: QPoint, button, buttons, modifiers) -> None:
    event = QMouseEvent(kind, QPointF(point), QPointF(widget.viewport().mapToGlobal(point)), button, buttons,
                        modifiers)
    QApplication.sendEvent(widget.viewport(), event)


def drag(widget, start: QPoint, end: QPoint, button=Qt.MouseButton.LeftButton,
         modifiers=Qt.KeyboardModifier.NoModifier, steps: int = 6) -> None:
    """Press, move in steps with the button held, release: as a hand drags.

    pyqtgraph drops mouse moves that come faster than its rate limit, so each step waits a little.
    """
    none = Qt.MouseButton.NoButton
    _mouse(widget, QEvent.Type.MouseButtonPress, start, button, button, modifiers)
    for n in range(1, steps + 1):
        time.sleep(0.02)
        point = start + (end - start) * (n / steps)
        _mouse(widget, QEvent.Type.MouseMove, point, none, button, modifiers)
    _mouse(widget, QEvent.Type.MouseButtonRelease, end, button, none, modifiers)


def save_screenshot(widget, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    assert widget.grab().save(str(path)), f"could not save {path}"
    return path


# Patient positions as scanners write them (shared with the display maths tests).
PATIENT_POSITIONS = {name: POSITIONS[name] for name in ("HFS", "FFS", "HFP")}


def is_red(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, int)
    return (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
