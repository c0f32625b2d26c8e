"""One orientation of the scan (axial, coronal or sagittal), drawn as a radiologist expects.

Scene units are millimetres, so pixels keep the aspect of the voxel spacing. The view renders
from the shared ViewerState/OverlayState and sends intents back to them: scroll, move the
crosshair, drag the window. Per frame it redraws only the grey image and the overlays of its
own slice; a crosshair move that leaves its slice alone just moves two lines.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, Qt, Signal

from app.core.display import (VIEW_AXES, DisplayedScan, apply_window, loaded_along_view, series_caption,
                              orientation_letters, slab_voxels, view_index_to_canonical,
                              view_pixel_size, view_slice, voxel_value, window_lut_int16)
from app.viewer_state import OverlayState, ViewerState
from widgets.viewer.annotations import ViewAnnotations
from widgets.viewer.overlays import LabelLayer, LesionMarkers, ProbabilityLayer, place_in_mm
from widgets.viewer.tools import EllipseRoi, Ruler, crosshair_lines

SCROLL_KEYS = {Qt.Key.Key_Up: -1, Qt.Key.Key_Down: 1, Qt.Key.Key_Left: -1, Qt.Key.Key_Right: 1,
               Qt.Key.Key_PageUp: -10, Qt.Key.Key_PageDown: 10}
WHEEL_NOTCH = 120


class SliceViewBox(pg.ViewBox):
    """A ViewBox whose mouse gestures are the viewer's, not pyqtgraph's defaults."""

    def __init__(self, owner: "SliceView"):
        super().__init__(lockAspect=True, invertY=True, enableMenu=False)
        self.owner = owner
        self.setMouseEnabled(False, False)

    def wheelEvent(self, ev, axis=None):
        self.owner.wheel(ev.delta(), ev.modifiers(), self.mapToView(ev.pos()))
        ev.accept()

    def mouseClickEvent(self, ev):
        ev.accept()
        if ev.button() == Qt.MouseButton.LeftButton:
            self.owner.left_at(self.mapToView(ev.pos()))

    def mouseDragEvent(self, ev, axis=None):
        ev.accept()
        self.owner.drag(ev, self.mapToView(ev.pos()), self.mapToView(ev.lastPos()))


class SliceView(pg.GraphicsView):
    """One view of the MPR. ``view`` is 'axial', 'coronal' or 'sagittal'."""

    activated = Signal(str)  # this view was clicked or got the keyboard

    def __init__(self, view: str, state: ViewerState, overlay_state: OverlayState, parent=None):
        super().__init__(parent, background="k")
        self.view = view
        self.axis, self.rows, self.cols = VIEW_AXES[view]
        self.state, self.overlay_state = state, overlay_state
        self.scan: DisplayedScan | None = None
        self.slice_index = -1
        self._window_lut = None
        self._wheel_rest = 0
        self._drag_mode = None
        self.measurements: list = []
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self._build_scene()
        self.annotations = ViewAnnotations(self)
        self.scene().sigMouseMoved.connect(self._hover)

    # --- construction ----------------------------------------------------------------------
    def _build_scene(self) -> None:
        self.view_box = SliceViewBox(self)
        self.setCentralItem(self.view_box)
        self.image_item = pg.ImageItem(axisOrder="row-major")
        self.view_box.addItem(self.image_item)
        self.cross_v, self.cross_h = crosshair_lines()
        self.view_box.addItem(self.cross_v, ignoreBounds=True)
        self.view_box.addItem(self.cross_h, ignoreBounds=True)
        self.label_layers: dict[str, LabelLayer] = {}
        self.probability_layer: ProbabilityLayer | None = None
        self.markers = LesionMarkers(self.view_box)

    # --- the scan ------------------------------------------------------------------------------
    def set_scan(self, scan: DisplayedScan | None) -> None:
        self.scan = scan
        self.slice_index = -1
        self.clear_measurements()
        for name in list(self.label_layers):
            self.label_layers.pop(name).remove(self.view_box)
        self.set_probability(None)
        self.markers.set_lesions([], scan, self.view)
        if scan is None:
            self.image_item.clear()
            return
        self._mm_rect = self._image_rect()
        self.image_item._mm_rect = None  # placed in mm after its first image (pyqtgraph needs one)
        self.annotations.set_letters(orientation_letters(self.view, scan.axes))
        self.annotations.set_text(self.annotations.top_left, self._description())
        self.on_window_changed()
        self.reset_zoom()

    def pixel_mm(self) -> tuple[float, float]:
        """(height, width) in mm of one image pixel of this view."""
        return view_pixel_size(self.view, self.scan.spacing)

    def _image_rect(self) -> tuple[float, float, float, float]:
        n_rows, n_cols = self.scan.canonical.shape[self.rows], self.scan.canonical.shape[self.cols]
        row_mm, col_mm = self.pixel_mm()
        return (0.0, 0.0, n_cols * col_mm, n_rows * row_mm)

    def _description(self) -> str:
        return f"<b>{self.view.capitalize()}</b><br>" + series_caption(self.scan.volume)

    def reset_zoom(self) -> None:
        if self.scan is not None:
            x0, y0, x1, y1 = self._mm_rect
            self.view_box.setRange(xRange=(x0, x1), yRange=(y0, y1), padding=0.02)

    # --- overlays ------------------------------------------------------------------------------
    def add_labels(self, name: str, canonical_labels: np.ndarray) -> None:
        if name in self.label_layers:
            self.label_layers.pop(name).remove(self.view_box)
        self.label_layers[name] = LabelLayer(self.view_box, canonical_labels)
        self.draw_overlays()

    def set_probability(self, canonical_probability: np.ndarray | None) -> None:
        if self.probability_layer is not None:
            self.probability_layer.remove(self.view_box)
            self.probability_layer = None
        if canonical_probability is not None:
            self.probability_layer = ProbabilityLayer(self.view_box, canonical_probability)
            self.draw_overlays()

    def set_lesions(self, lesions) -> None:
        if self.scan is not None:
            self.markers.set_lesions(lesions, self.scan, self.view)
            self.markers.draw(self.slice_index, self.overlay_state.show_markers)

    # --- drawing -------------------------------------------------------------------------------
    def on_position_changed(self, position) -> None:
        """Redraw the slice only if this view's slice moved; otherwise just move the crosshair."""
        if self.scan is None:
            return
        canonical = self.scan.to_canonical(position)
        if canonical[self.axis] != self.slice_index:
            self.slice_index = canonical[self.axis]
            self.draw_slice()
        self._move_crosshair(canonical)

    def on_window_changed(self, *_):
        if self.scan is None:
            return
        width, level = self.state.window
        self._window_lut = None
        if self.scan.canonical.dtype == np.int16:
            self._window_lut = window_lut_int16(width, level, self.scan.inverted)
        self.draw_image()
        self._window_text()

    def draw_slice(self) -> None:
        self.draw_image()
        self.draw_overlays()
        self.markers.draw(self.slice_index, self.overlay_state.show_markers)
        for item in self.measurements:
            item.set_visible(item.slice_index == self.slice_index)
        self._slice_text()

    def _slab(self) -> int:
        return slab_voxels(self.state.slab_mm, self.scan.spacing[self.axis])

    def draw_image(self) -> None:
        """The grey image of the current slice (or slab MIP); unloaded parts dark, 'loading…' shown."""
        if self.scan is None or self.slice_index < 0:
            return
        loaded, row_mask, col_mask = loaded_along_view(self.scan.volume.loaded, self.view,
                                                       self.scan.axes, self.slice_index)
        raw = view_slice(self.scan.canonical, self.view, self.slice_index, self._slab())
        if not loaded:
            grey = np.zeros(raw.shape, dtype=np.uint8)
        else:
            width, level = self.state.window
            grey = apply_window(raw, self._window_lut, width, level, self.scan.inverted)
            if row_mask is not None:
                grey[~row_mask, :] = 0
            if col_mask is not None:
                grey[:, ~col_mask] = 0
        partial = row_mask if row_mask is not None else col_mask
        if partial is not None:  # a reformat through a series still arriving
            self.annotations.set_loading(True, float(partial.mean()))
        else:
            self.annotations.set_loading(not loaded)
        self.image_item.setImage(grey, autoLevels=False)
        place_in_mm(self.image_item, self._mm_rect)

    def draw_overlays(self) -> None:
        if self.scan is None or self.slice_index < 0:
            return
        slab = self._slab()
        for name, layer in self.label_layers.items():
            settings = self.overlay_state.labels.get(name)
            if settings is not None:
                layer.draw(self.view, self.slice_index, settings, slab, self._mm_rect)
        if self.probability_layer is not None and self.overlay_state.probability is not None:
            self.probability_layer.draw(self.view, self.slice_index, self.overlay_state.probability,
                                        slab, self._mm_rect)
        self.annotations.set_ai_sources(self.overlay_state.ai_sources_shown())

    def on_markers_changed(self, shown: bool) -> None:
        self.markers.draw(self.slice_index, shown)

    def _move_crosshair(self, canonical) -> None:
        row_mm, col_mm = self.pixel_mm()
        self.cross_v.setValue((canonical[self.cols] + 0.5) * col_mm)
        self.cross_h.setValue((canonical[self.rows] + 0.5) * row_mm)
        self.on_crosshair_changed(self.state.crosshair)

    def on_crosshair_changed(self, shown: bool) -> None:
        self.cross_v.setVisible(shown)
        self.cross_h.setVisible(shown)

    # --- corner text ----------------------------------------------------------------------------
    def _slice_text(self) -> None:
        n = self.scan.canonical.shape[self.axis]
        kji = self.scan.to_array(view_index_to_canonical(self.view, self.slice_index, 0, 0))
        a = self.scan.axes.array_axis[self.axis]
        lps = self.scan.volume.index_to_patient(*kji)
        along = {"axial": ("z", 2), "coronal": ("y", 1), "sagittal": ("x", 0)}[self.view]
        lines = [f"Im {int(round(kji[a])) + 1} / {n}", f"{along[0]} = {lps[along[1]]:.1f} mm"]
        if self.state.slab_mm > 0:
            lines.append(f"MIP {self.state.slab_mm:g} mm")
        self.annotations.set_text(self.annotations.top_right, "<br>".join(lines))

    def _window_text(self) -> None:
        width, level = self.state.window
        inverted = " (MONOCHROME1, inverted)" if self.scan.inverted else ""
        self.annotations.set_text(self.annotations.bottom_left, f"W {width:.0f}  L {level:.0f}{inverted}")

    def _hover(self, scene_pos) -> None:
        """HU and patient coordinates under the cursor, bottom right."""
        if self.scan is None or self.slice_index < 0:
            return
        kji = self._kji_at(self.view_box.mapSceneToView(scene_pos))
        value = voxel_value(self.scan.volume.voxels, kji)
        if value is None:
            self.annotations.set_text(self.annotations.bottom_right, "")
            return
        x, y, z = self.scan.volume.index_to_patient(*[round(v) for v in kji])
        unit = " HU" if self.scan.volume.modality == "CT" else ""
        self.annotations.set_text(self.annotations.bottom_right,
                                  f"{value:.0f}{unit}<br>L/P/S ({x:.1f}, {y:.1f}, {z:.1f}) mm")

    def resizeEvent(self, ev):
        super().resizeEvent(ev)
        if hasattr(self, "annotations"):  # pyqtgraph resizes the view before they exist
            self.annotations.place()

    # --- intents from the mouse and keyboard ------------------------------------------------------
    def _kji_at(self, point: QPointF) -> tuple[float, float, float]:
        row_mm, col_mm = self.pixel_mm()
        canonical = view_index_to_canonical(self.view, self.slice_index,
                                            int(np.floor(point.y() / row_mm)), int(np.floor(point.x() / col_mm)))
        return self.scan.to_array(canonical)

    def scroll(self, delta: int) -> None:
        """Move ``delta`` slices through this view (positive = toward feet / back / patient's left)."""
        if self.scan is not None:
            self.state.step(*self.scan.array_step(self.axis, delta))

    def wheel(self, delta: int, modifiers, point: QPointF) -> None:
        if modifiers & Qt.KeyboardModifier.ControlModifier:
            self.zoom(0.9 if delta > 0 else 1 / 0.9, point)
            return
        self._wheel_rest += delta
        notches = int(self._wheel_rest / WHEEL_NOTCH)  # trackpads send fractions of a notch
        self._wheel_rest -= notches * WHEEL_NOTCH
        if notches:
            self.scroll(-notches)

    def zoom(self, factor: float, centre: QPointF | None = None) -> None:
        """Scale the shown range by ``factor`` (< 1 zooms in) about ``centre`` (mm), or the view's centre."""
        self.view_box.scaleBy(s=(factor, factor), center=centre)

    def left_at(self, point: QPointF) -> None:
        """A left click in navigate mode moves the crosshair (and so the other two views) there."""
        self.setFocus()
        self.activated.emit(self.view)
        if self.scan is not None and self.state.tool == "navigate":
            self.state.set_position(self._kji_at(point))

    def drag(self, ev, point: QPointF, last: QPointF) -> None:
        if ev.isStart():
            self._drag_mode = self._gesture(ev.button(), ev.modifiers())
            self.setFocus()
            self.activated.emit(self.view)
        mode = self._drag_mode
        if mode == "window":
            delta = ev.screenPos() - ev.lastScreenPos()
            self.state.drag_window(delta.x(), delta.y())
        elif mode == "pan":
            self.view_box.translateBy(x=last.x() - point.x(), y=last.y() - point.y())
        elif mode == "zoom":
            delta = ev.screenPos() - ev.lastScreenPos()
            self.zoom(1.01 ** delta.y(), self.view_box.mapToView(ev.buttonDownPos()))
        elif mode in ("ruler", "roi"):
            self._measure_drag(mode, ev, point)
        elif mode == "navigate" and self.scan is not None:
            self.state.set_position(self._kji_at(point))
        if ev.isFinish():
            self._drag_mode = None

    def _gesture(self, button, modifiers) -> str:
        """Which gesture a drag is: right (or Ctrl+left) = window, middle (or Shift+left) = pan."""
        if button == Qt.MouseButton.RightButton:
            return "zoom" if modifiers & Qt.KeyboardModifier.ControlModifier else "window"
        if button == Qt.MouseButton.MiddleButton:
            return "pan"
        if modifiers & Qt.KeyboardModifier.ControlModifier:
            return "window"
        if modifiers & Qt.KeyboardModifier.ShiftModifier:
            return "pan"
        return self.state.tool

    def _measure_drag(self, mode: str, ev, point: QPointF) -> None:
        if self.scan is None:
            return
        if ev.isStart():
            start = self.view_box.mapToView(ev.buttonDownPos())
            tool = Ruler if mode == "ruler" else EllipseRoi
            self.measurements.append(tool(self.view_box, start, self.slice_index))
        current = self.measurements[-1]
        if isinstance(current, Ruler):
            current.update(point)
        else:
            current.update(point, *self._roi_inputs())

    def _roi_inputs(self):
        image = view_slice(self.scan.canonical, self.view, self.slice_index)
        padding = None if self.scan.padding is None else view_slice(self.scan.padding, self.view, self.slice_index)
        return image, self.pixel_mm(), padding

    def clear_measurements(self) -> None:
        for item in self.measurements:
            item.remove(self.view_box)
        self.measurements = []

    def keyPressEvent(self, ev):
        key = ev.key()
        if key in SCROLL_KEYS:
            self.scroll(SCROLL_KEYS[key])
        elif key in (Qt.Key.Key_Home, Qt.Key.Key_End) and self.scan is not None:
            target = 0 if key == Qt.Key.Key_Home else self.scan.canonical.shape[self.axis] - 1
            self.scroll(target - self.slice_index)
        elif Qt.Key.Key_0 <= key <= Qt.Key.Key_9 and self.state.apply_preset(key - Qt.Key.Key_0):
            pass
        elif not self._view_key(key, ev.text()):
            super().keyPressEvent(ev)
            return
        ev.accept()

    def _view_key(self, key, text: str) -> bool:
        """Keys that change how this view or the viewer looks; False if the key is not ours."""
        actions = {
            "+": lambda: self.zoom(0.8), "=": lambda: self.zoom(0.8), "-": lambda: self.zoom(1.25),
            "f": self.reset_zoom,
            "m": self.state.toggle_slab, "x": lambda: self.state.set_crosshair(not self.state.crosshair),
            "l": lambda: self.state.toggle_layout(self.view), "r": lambda: self.state.set_tool("ruler"),
            "o": lambda: self.state.set_tool("roi"), "n": lambda: self.state.set_tool("navigate"),
            "c": self.clear_measurements,
        }
        if key == Qt.Key.Key_Escape:
            self.state.set_tool("navigate")
            return True
        action = actions.get(text.lower()) if text else None
        if action is None:
            return False
        action()
        return True

    def focusInEvent(self, ev):
        super().focusInEvent(ev)
        self.activated.emit(self.view)
