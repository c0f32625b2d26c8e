"""The viewer as the main window shows it: a toolbar, the MPR views, overlay controls and the lesion list."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QActionGroup
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QScrollArea, QSplitter, QToolBar,
                               QVBoxLayout, QWidget)

from app.core.display import PRESETS, VIEW_AXES, VIEWS, DisplayedScan
from app.viewer_state import LabelOverlay, OverlayState, ProbabilityOverlay, ViewerState
from widgets.viewer.lesion_list import LesionList
from widgets.viewer.mpr_viewer import MprViewer
from widgets.viewer.overlay_controls import OverlayControls
from widgets.viewer.shortcuts import shortcuts_html

PRESET_CHOICES = ["DICOM default (0)"] + [f"{name.capitalize()} ({n})  W{w:.0f} L{l:.0f}"
                                          for n, (name, (w, l)) in enumerate(PRESETS.items(), start=1)]


class ViewerPanel(QWidget):
    """Composite viewer. Feed it a Volume, overlays and lesions; it keeps nothing else."""

    lesion_activated = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.state = ViewerState(self)
        self.overlay_state = OverlayState(self)
        self.scan: DisplayedScan | None = None
        self._layout_before_single: tuple[str, str] | None = None
        self.mpr = MprViewer(self.state, self.overlay_state)
        self.controls = OverlayControls(self.overlay_state)
        self.lesion_list = LesionList()
        self.lesion_list.lesion_activated.connect(self._on_lesion)
        self.toolbar = self._build_toolbar()
        self._build_layout()
        self.state.window_changed.connect(self._sync_preset_box)
        self.state.slab_changed.connect(self._sync_slab)
        self.state.tool_changed.connect(self._sync_tool)
        self.state.layout_changed.connect(self._sync_layout)

    # --- construction ----------------------------------------------------------------------
    def _build_layout(self) -> None:
        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(4, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.controls)
        splitter_side = QSplitter(Qt.Orientation.Vertical)
        splitter_side.addWidget(scroll)
        splitter_side.addWidget(self.lesion_list)
        splitter_side.setSizes([300, 300])
        side_layout.addWidget(splitter_side)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.mpr)
        self.splitter.addWidget(side)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setSizes([900, 320])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.splitter, 1)

    def _build_toolbar(self) -> QToolBar:
        bar = QToolBar("Viewer")
        self.layout_action = self._action(bar, "1×3", "Toggle 1×1 / 1×3 layout (L)",
                                          lambda: self.state.toggle_layout(self.mpr.active_view), checkable=True)
        self.layout_action.setChecked(True)
        self.view_box = QComboBox()
        self.view_box.addItems([v.capitalize() for v in VIEWS])
        self.view_box.setToolTip("View shown in the 1×1 layout")
        self.view_box.currentIndexChanged.connect(lambda n: self.state.set_layout("1x1", VIEWS[n]))
        bar.addWidget(self.view_box)
        bar.addSeparator()
        self.preset_box = QComboBox()
        self.preset_box.addItems(PRESET_CHOICES + ["Custom"])
        self.preset_box.setToolTip("Window presets (number keys 1–5, 0 = DICOM default); right-drag for any window")
        self.preset_box.activated.connect(self._on_preset_chosen)
        bar.addWidget(self.preset_box)
        bar.addSeparator()
        self.mip_action = self._action(bar, "MIP", "Thick-slab maximum intensity projection (M)",
                                       self.state.toggle_slab, checkable=True)
        self.slab_box = QDoubleSpinBox()
        self.slab_box.setRange(1.0, 100.0)
        self.slab_box.setSuffix(" mm")
        self.slab_box.setDecimals(1)
        self.slab_box.setValue(self.state.slab_thickness_mm)
        self.slab_box.setToolTip("Slab thickness")
        self.slab_box.valueChanged.connect(self._on_slab_thickness)
        bar.addWidget(self.slab_box)
        self.cross_action = self._action(bar, "Crosshair", "Show the crosshair (X)",
                                         lambda on: self.state.set_crosshair(on), checkable=True)
        self.cross_action.setChecked(True)
        bar.addSeparator()
        self._build_tools(bar)
        self._action(bar, "Clear", "Remove rulers and ROIs (C)", self.clear_measurements)
        self._action(bar, "Fit", "Fit the images to their views (F)", self.mpr._fit_all)
        return bar

    def _build_tools(self, bar: QToolBar) -> None:
        group = QActionGroup(self)
        self.tool_actions = {}
        for tool, text, tip in (("navigate", "Navigate", "Click/drag moves the crosshair (N)"),
                                ("ruler", "Ruler", "Drag to measure a distance in mm (R)"),
                                ("roi", "ROI", "Drag an ellipse: mean/SD HU and area (O)")):
            action = self._action(bar, text, tip, lambda _=False, t=tool: self.state.set_tool(t), checkable=True)
            group.addAction(action)
            self.tool_actions[tool] = action
        self.tool_actions["navigate"].setChecked(True)

    def _action(self, bar: QToolBar, text: str, tip: str, slot, checkable: bool = False) -> QAction:
        action = QAction(text, self)
        action.setToolTip(tip)
        action.setCheckable(checkable)
        action.triggered.connect(slot)
        bar.addAction(action)
        return action

    # --- the scan and what is drawn over it --------------------------------------------------
    def set_volume(self, volume, first_slice: int | None = None) -> None:
        """Show a (possibly still loading) volume; cheap: no pass over the voxels."""
        self.overlay_state.clear()
        self.lesion_list.set_lesions([])
        self.controls.scores.set_scores({})
        self.scan = DisplayedScan(volume)
        self.mpr.set_scan(None)  # the views forget the old scan before the position moves on
        self.state.reset_for(volume.shape, volume.default_window, volume.modality, _window_sample(volume))
        if first_slice is not None:
            self.state.set_position((first_slice, *self.state.position[1:]))
        self.mpr.set_scan(self.scan)
        self._single_image_layout()

    def _single_image_layout(self) -> None:
        """A single image (radiograph, one slice) has no reformats worth a view: show it alone."""
        flat = [c for c in range(3) if self.scan.canonical.shape[c] == 1]
        if flat:
            if self._layout_before_single is None:
                self._layout_before_single = (self.state.layout, self.state.single_view)
            self.state.set_layout("1x1", next(v for v in VIEWS if VIEW_AXES[v][0] == flat[0]))
        elif self._layout_before_single is not None:  # back to a volume: the reader's own layout
            self.state.set_layout(*self._layout_before_single)
            self._layout_before_single = None

    def refresh_slices(self, k_lo: int, k_hi: int) -> None:
        """Slices k_lo..k_hi-1 of the volume have arrived (progressive loading)."""
        self.mpr.refresh_slices(k_lo, k_hi)

    def add_label_overlay(self, name: str, labels: np.ndarray, colours: dict | None = None,
                          is_ai: bool = False, source: str = "", label_names: dict | None = None) -> None:
        """Draw a label map (ground truth or a model's findings) over the scan."""
        if self.scan is None:
            raise RuntimeError("set_volume first")
        canonical = self.scan.orient(labels)
        colours, label_names = dict(colours or {}), dict(label_names or {})
        self.controls.present_labels[name] = _present_labels(labels, colours, label_names)
        for view in self.mpr.views.values():
            view.add_labels(name, canonical)
        self.overlay_state.add_label(LabelOverlay(name, colours, label_names, source, is_ai))

    def set_probability_overlay(self, name: str, probability: np.ndarray | None, threshold: float = 0.5,
                                source: str = "", is_ai: bool = True) -> None:
        """A heat map of probabilities (0..1) on the volume grid; None removes it."""
        canonical = None if probability is None else self.scan.orient(probability)
        for view in self.mpr.views.values():
            view.set_probability(canonical)
        overlay = None if probability is None else ProbabilityOverlay(name, source, is_ai, threshold)
        self.overlay_state.set_probability(overlay)

    def set_lesions(self, lesions, source: str = "", is_ai: bool = False) -> None:
        self.lesion_list.set_lesions(lesions, source, is_ai)
        for view in self.mpr.views.values():
            view.set_lesions(lesions)

    def set_scores(self, scores: dict[str, float], source: str = "", is_ai: bool = True) -> None:
        self.controls.scores.set_scores(scores, source, is_ai)

    def jump_to(self, k: float, j: float, i: float) -> None:
        self.state.set_position((k, j, i))

    def clear_measurements(self) -> None:
        for view in self.mpr.views.values():
            view.clear_measurements()

    def shortcuts_html(self) -> str:
        return shortcuts_html()

    # --- keeping the toolbar in step with the state -------------------------------------------
    def _on_lesion(self, lesion) -> None:
        self.jump_to(*lesion.centre_index)
        self.lesion_activated.emit(lesion)

    def _on_preset_chosen(self, row: int) -> None:
        if row < len(PRESET_CHOICES):
            self.state.apply_preset(row)

    def _sync_preset_box(self, width: float, level: float) -> None:
        windows = [self.state.dicom_window] + list(PRESETS.values())
        row = windows.index((width, level)) if (width, level) in windows else len(PRESET_CHOICES)
        self.preset_box.setCurrentIndex(row)

    def _on_slab_thickness(self, mm: float) -> None:
        if self.state.slab_mm > 0:
            self.state.set_slab_mm(mm)
        else:
            self.state.slab_thickness_mm = mm

    def _sync_slab(self, mm: float) -> None:
        self.mip_action.setChecked(mm > 0)

    def _sync_tool(self, tool: str) -> None:
        self.tool_actions[tool].setChecked(True)

    def _sync_layout(self, layout: str, single_view: str) -> None:
        self.layout_action.setChecked(layout == "1x3")
        self.layout_action.setText("1×3" if layout == "1x3" else "1×1")
        self.view_box.blockSignals(True)
        self.view_box.setCurrentIndex(VIEWS.index(single_view))
        self.view_box.blockSignals(False)


def _window_sample(volume) -> np.ndarray | None:
    """One loaded slice to derive a window from when the series has none (MR, PET): cheap, 1 slice."""
    if volume.default_window is not None or volume.modality == "CT":
        return None
    loaded = np.arange(volume.shape[0]) if volume.loaded is None else np.flatnonzero(volume.loaded)
    return volume.voxels[int(loaded[len(loaded) // 2])] if len(loaded) else None


def _present_labels(labels: np.ndarray, colours: dict, label_names: dict) -> tuple[int, ...]:
    """Label values to list in the controls: the named/coloured ones, else those in a uint8 map."""
    named = sorted(set(colours) | set(label_names))
    if named:
        return tuple(named)
    if labels.dtype == np.uint8:
        return tuple(int(v) for v in np.flatnonzero(np.bincount(labels.ravel(), minlength=256)) if v != 0)
    return ()
