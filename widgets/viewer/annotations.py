"""The text a radiologist reads around an image: four corners, orientation letters at the edges,
"loading…" over a slice that has not arrived, and the research-use marker of AI overlays.

Plain QLabels over the graphics view: cheap to update per frame and never scaled by the zoom.
"""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QWidget

# A faint dark box keeps white text readable over white bone or contrast.
TEXT_STYLE = "color: #e8e8e8; background: rgba(0, 0, 0, 110); font-size: 11px; padding: 1px 3px;"
LETTER_STYLE = ("color: #ffb000; background: rgba(0, 0, 0, 110); font-size: 15px; font-weight: bold;"
                " padding: 0px 3px;")
LOADING_STYLE = "color: #bbbbbb; background: transparent; font-size: 16px;"
AI_STYLE = "color: #202020; background: #ffb000; font-size: 11px; font-weight: bold; padding: 1px 6px;"
AI_MARKER = "AI finding — research use only"
MARGIN = 6


def _label(parent: QWidget, style: str) -> QLabel:
    label = QLabel(parent)
    label.setStyleSheet(style)
    label.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
    return label


class ViewAnnotations:
    """Owns the labels; ``place`` lays them out for the view's current size."""

    def __init__(self, parent: QWidget):
        self.parent = parent
        self.top_left, self.top_right = _label(parent, TEXT_STYLE), _label(parent, TEXT_STYLE)
        self.bottom_left, self.bottom_right = _label(parent, TEXT_STYLE), _label(parent, TEXT_STYLE)
        for right in (self.top_right, self.bottom_right):
            right.setAlignment(Qt.AlignmentFlag.AlignRight)
        self.letters = {edge: _label(parent, LETTER_STYLE) for edge in ("left", "right", "top", "bottom")}
        self.loading = _label(parent, LOADING_STYLE)
        self.loading.setText("loading…")
        self.loading.hide()
        self.ai_banner = _label(parent, AI_STYLE)
        self.ai_banner.hide()

    @property
    def corners(self) -> tuple[QLabel, ...]:
        return self.top_left, self.top_right, self.bottom_left, self.bottom_right

    def set_text(self, label: QLabel, text: str) -> None:
        """Change one label; only that label is measured and moved again (this runs per frame)."""
        if label.text() != text:
            label.setText(text)
            if label in self.corners:
                self._place_corner(label)
            else:
                self.place()

    def set_letters(self, letters: dict[str, str]) -> None:
        for edge, text in letters.items():
            self.letters[edge].setText(text)
        self.place()

    def set_loading(self, loading: bool, fraction: float | None = None) -> None:
        """'loading…' over a slice still to come; with the share already there over a reformat."""
        self.loading.setVisible(loading)
        if loading:
            text = "loading…" if fraction is None else f"loading… {fraction:.0%}"
            if text != self.loading.text():
                self.loading.setText(text)
                self.place()

    def set_ai_sources(self, sources: list[str]) -> None:
        """Show the research-use marker, naming each AI source once, while any AI overlay is shown."""
        self.ai_banner.setVisible(bool(sources))
        if sources:
            self.set_text(self.ai_banner, f"{AI_MARKER} · " + ", ".join(dict.fromkeys(sources)))

    def place(self) -> None:
        w, h, m = self.parent.width(), self.parent.height(), MARGIN
        for label in self.corners:
            self._place_corner(label)
        self._place_letters(w, h, m)
        for label in (self.loading, self.ai_banner):
            label.adjustSize()
        self.loading.move((w - self.loading.width()) // 2, (h - self.loading.height()) // 2)
        # Under the series description, left: never over the image centre nor the slice number.
        self.ai_banner.move(m, self.top_left.y() + self.top_left.height() + 4)

    def _place_corner(self, label: QLabel) -> None:
        w, h, m = self.parent.width(), self.parent.height(), MARGIN
        label.setMaximumWidth(max(40, w // 2 - 2 * m))  # two corners never overlap in a narrow view
        label.adjustSize()
        label.setVisible(bool(label.text()))  # an empty label would still draw its dark box
        x = m if label in (self.top_left, self.bottom_left) else w - label.width() - m
        y = m if label in (self.top_left, self.top_right) else h - label.height() - m
        label.move(x, y)
        if label is self.top_left:
            self.ai_banner.move(m, self.top_left.y() + self.top_left.height() + 4)

    def _place_letters(self, w: int, h: int, m: int) -> None:
        letters = self.letters
        for label in letters.values():
            label.adjustSize()
        letters["left"].move(m, (h - letters["left"].height()) // 2)
        letters["right"].move(w - letters["right"].width() - m, (h - letters["right"].height()) // 2)
        letters["top"].move((w - letters["top"].width()) // 2, m)
        letters["bottom"].move((w - letters["bottom"].width()) // 2, h - letters["bottom"].height() - m)
