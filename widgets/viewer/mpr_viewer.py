"""Axial, coronal and sagittal views side by side (1×3) or one of them alone (1×1), linked by a crosshair."""
from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QHBoxLayout, QWidget

from app.core.display import VIEWS, DisplayedScan
from app.viewer_state import OverlayState, ViewerState
from widgets.viewer.slice_view import SliceView

# While a series streams in, reformatted views are redrawn at most this often (ms).
REFORMAT_REFRESH_MS = 150


class MprViewer(QWidget):
    """The three linked views. All state lives in ViewerState / OverlayState."""

    view_activated = Signal(str)

    def __init__(self, state: ViewerState, overlay_state: OverlayState, parent=None):
        super().__init__(parent)
        self.state, self.overlay_state = state, overlay_state
        self.scan: DisplayedScan | None = None
        self.active_view = "axial"
        self.views = {name: SliceView(name, state, overlay_state, self) for name in VIEWS}
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        for view in self.views.values():
            layout.addWidget(view, 1)
            view.activated.connect(self._on_activated)
        self.setStyleSheet("MprViewer { background: #303030; }")
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground)
        self._reformat_timer = QTimer(self, singleShot=True, interval=REFORMAT_REFRESH_MS)
        self._reformat_timer.timeout.connect(self._redraw_reformats)
        self._connect_state()
        self._apply_layout(state.layout, state.single_view)

    def _connect_state(self) -> None:
        for view in self.views.values():
            self.state.position_changed.connect(view.on_position_changed)
            self.state.window_changed.connect(view.on_window_changed)
            self.state.slab_changed.connect(view.draw_slice)
            self.state.crosshair_changed.connect(view.on_crosshair_changed)
            self.overlay_state.changed.connect(view.draw_overlays)
            self.overlay_state.markers_changed.connect(view.on_markers_changed)
        self.state.layout_changed.connect(self._apply_layout)

    def set_scan(self, scan: DisplayedScan | None) -> None:
        self.scan = scan
        for view in self.views.values():
            view.set_scan(scan)
            if scan is not None:
                view.on_position_changed(self.state.position)

    def _apply_layout(self, layout: str, single_view: str) -> None:
        for name, view in self.views.items():
            view.setVisible(layout == "1x3" or name == single_view)
        if layout == "1x1":
            self.active_view = single_view
        QTimer.singleShot(0, self, self._fit_all)  # dropped if the viewer is gone by then

    def _fit_all(self) -> None:
        for view in self.views.values():
            view.reset_zoom()

    def _on_activated(self, view: str) -> None:
        self.active_view = view
        self.view_activated.emit(view)

    def refresh_slices(self, k_lo: int, k_hi: int) -> None:
        """Slices k_lo..k_hi-1 just arrived: redraw a view showing one of them now, reformats soon."""
        if self.scan is None:
            return
        k = self.state.position[0]
        for view in self.views.values():
            if self.scan.axes.array_axis[view.axis] == 0:
                if k_lo <= k < k_hi:
                    view.draw_slice()
            elif not self._reformat_timer.isActive():
                self._reformat_timer.start()

    def _redraw_reformats(self) -> None:
        for view in self.views.values():
            if self.scan is not None and self.scan.axes.array_axis[view.axis] != 0:
                view.draw_slice()
