"""Controls beside the image: each overlay's visibility, opacity, fill/outline and labels;
the probability heat map's colour bar and threshold; lesion boxes; classification scores."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QImage, QPixmap
from PySide6.QtWidgets import (QCheckBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QSlider,
                               QVBoxLayout, QWidget)

from app.core.display import heat_lut, label_colour
from app.viewer_state import LabelOverlay, OverlayState
from widgets.viewer.annotations import AI_MARKER

AI_STYLE = "background: #ffb000; color: #202020; padding: 1px 4px;"


def _slider(value: int, maximum: int = 100) -> QSlider:
    slider = QSlider(Qt.Orientation.Horizontal)
    slider.setRange(0, maximum)
    slider.setValue(value)
    return slider


def colour_bar(width: int = 160, height: int = 12) -> QPixmap:
    """The heat map's colours from probability 0 (left) to 1 (right)."""
    lut = heat_lut()[:, :3]
    columns = lut[np.linspace(0, 255, width).astype(int)]
    rgb = np.ascontiguousarray(np.repeat(columns[None, :, :], height, axis=0))
    image = QImage(rgb.data, width, height, width * 3, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(image.copy())


def _swatch(rgb) -> QLabel:
    swatch = QLabel()
    swatch.setFixedSize(14, 14)
    swatch.setStyleSheet(f"background: {QColor(*rgb).name()}; border: 1px solid #888;")
    return swatch


def source_line(source: str, is_ai: bool) -> QLabel:
    label = QLabel(f"{source}" + (f"  <span style='{AI_STYLE}'>{AI_MARKER}</span>" if is_ai else ""))
    label.setWordWrap(True)
    return label


class LabelOverlayControls(QGroupBox):
    """Visibility, opacity, fill/outline and per-label visibility of one label overlay."""

    def __init__(self, overlay: LabelOverlay, overlay_state: OverlayState, present_labels=(), parent=None):
        super().__init__(overlay.name, parent)
        self.name, self.overlay_state = overlay.name, overlay_state
        self.setCheckable(True)
        self.setChecked(overlay.visible)
        self.toggled.connect(lambda on: overlay_state.update_label(self.name, visible=on))
        form = QFormLayout(self)
        form.addRow(source_line(overlay.source or "labels", overlay.is_ai))
        self.opacity = _slider(int(overlay.opacity * 100))
        self.opacity.valueChanged.connect(lambda v: overlay_state.update_label(self.name, opacity=v / 100))
        form.addRow("Opacity", self.opacity)
        self.outline = QCheckBox("Outline only")
        self.outline.setChecked(overlay.outline)
        self.outline.toggled.connect(lambda on: overlay_state.update_label(self.name, outline=on))
        form.addRow(self.outline)
        self.label_boxes = {value: self._label_row(form, overlay, value) for value in present_labels}

    def _label_row(self, form: QFormLayout, overlay: LabelOverlay, value: int) -> QCheckBox:
        rgb = label_colour(overlay.colours, value)
        box = QCheckBox(overlay.label_names.get(value, f"label {value}"))
        box.setChecked(value not in overlay.hidden_labels)
        box.toggled.connect(self._hidden_changed)
        row = QHBoxLayout()
        row.addWidget(_swatch(rgb))
        row.addWidget(box, 1)
        form.addRow(row)
        return box

    def _hidden_changed(self) -> None:
        hidden = frozenset(v for v, box in self.label_boxes.items() if not box.isChecked())
        self.overlay_state.update_label(self.name, hidden_labels=hidden)


class ProbabilityControls(QGroupBox):
    def __init__(self, overlay_state: OverlayState, parent=None):
        probability = overlay_state.probability
        super().__init__(probability.name, parent)
        self.overlay_state = overlay_state
        self.setCheckable(True)
        self.setChecked(probability.visible)
        self.toggled.connect(lambda on: overlay_state.update_probability(visible=on))
        form = QFormLayout(self)
        form.addRow(source_line(probability.source or "model", probability.is_ai))
        bar = QLabel()
        bar.setPixmap(colour_bar())
        ends = QHBoxLayout()
        ends.addWidget(QLabel("0"))
        ends.addWidget(bar)
        ends.addWidget(QLabel("1"))
        form.addRow("Probability", ends)
        self.threshold = _slider(int(round(probability.threshold * 100)))
        self.threshold_text = QLabel(f"{probability.threshold:.2f}")
        self.threshold.valueChanged.connect(self._threshold_changed)
        row = QHBoxLayout()
        row.addWidget(self.threshold, 1)
        row.addWidget(self.threshold_text)
        form.addRow("Threshold", row)
        self.opacity = _slider(int(probability.opacity * 100))
        self.opacity.valueChanged.connect(lambda v: overlay_state.update_probability(opacity=v / 100))
        form.addRow("Opacity", self.opacity)

    def _threshold_changed(self, value: int) -> None:
        self.threshold_text.setText(f"{value / 100:.2f}")
        self.overlay_state.update_probability(threshold=value / 100)


class ScoresBox(QGroupBox):
    """Classification scores for the scan (e.g. malignancy 0.82), beside the image."""

    def __init__(self, parent=None):
        super().__init__("Scores", parent)
        self.text = QLabel("No classification scores.")
        self.text.setWordWrap(True)
        self.text.setTextFormat(Qt.TextFormat.RichText)
        QVBoxLayout(self).addWidget(self.text)

    def set_scores(self, scores: dict[str, float], source: str = "", is_ai: bool = True) -> None:
        if not scores:
            self.text.setText("No classification scores.")
            return
        rows = "".join(f"<tr><td>{name}</td><td align='right'>&nbsp;<b>{value:.2f}</b></td></tr>"
                       for name, value in scores.items())
        marker = f"<br><span style='{AI_STYLE}'>{AI_MARKER}</span>" if is_ai else ""
        self.text.setText(f"{source}{marker}<table>{rows}</table>")


class OverlayControls(QWidget):
    """All overlay controls; rebuilt when overlays are added or removed."""

    def __init__(self, overlay_state: OverlayState, parent=None):
        super().__init__(parent)
        self.overlay_state = overlay_state
        self.present_labels: dict[str, tuple[int, ...]] = {}
        self.markers = QCheckBox("Lesion boxes")
        self.markers.setChecked(overlay_state.show_markers)
        self.markers.toggled.connect(overlay_state.set_show_markers)
        self.scores = ScoresBox()
        self._groups = QVBoxLayout()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self._groups)
        layout.addWidget(self.markers)
        layout.addWidget(self.scores)
        layout.addStretch(1)  # groups stay their natural height at the top
        overlay_state.changed.connect(self._on_changed)

    def _on_changed(self, name: str) -> None:
        if name == "":
            self.rebuild()

    def rebuild(self) -> None:
        while self._groups.count():
            widget = self._groups.takeAt(0).widget()
            if widget is not None:
                widget.deleteLater()
        for overlay in self.overlay_state.labels.values():
            labels = self.present_labels.get(overlay.name, tuple(overlay.colours))
            self._groups.addWidget(LabelOverlayControls(overlay, self.overlay_state, labels))
        if self.overlay_state.probability is not None:
            self._groups.addWidget(ProbabilityControls(self.overlay_state))

    def group(self, name: str):
        """The controls of one overlay (tests and keyboard focus use it)."""
        for n in range(self._groups.count()):
            widget = self._groups.itemAt(n).widget()
            if widget is not None and widget.title() == name:
                return widget
        return None
