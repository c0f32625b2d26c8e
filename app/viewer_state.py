"""The viewer's state, as small QtCore models the viewer widgets observe.

Widgets send intents (scroll, drag the window, pick a preset, toggle an overlay); these models
clamp and store them and announce changes; every view redraws from them. Testable without a
single widget.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from PySide6.QtCore import QObject, Signal

from app.core.display import PRESETS, default_window

LAYOUTS = ("1x1", "1x3")
TOOLS = ("navigate", "ruler", "roi")
PRESET_KEYS = tuple(PRESETS)  # number keys 1..5 in this order; 0 is the DICOM's own window
DEFAULT_SLAB_MM = 10.0


class ViewerState(QObject):
    """Where the user is in the scan and how it is shown: position, window, layout, slab, tool."""

    position_changed = Signal(object)  # (k, j, i) ints
    window_changed = Signal(float, float)  # width, level
    layout_changed = Signal(str, str)  # layout, the view shown in 1x1
    slab_changed = Signal(float)  # slab thickness in mm; 0 = single slices
    crosshair_changed = Signal(bool)
    tool_changed = Signal(str)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.shape: tuple[int, int, int] = (1, 1, 1)
        self.position: tuple[int, int, int] = (0, 0, 0)
        self.window: tuple[float, float] = PRESETS["mediastinum"]
        self.dicom_window: tuple[float, float] = PRESETS["mediastinum"]
        self.layout = "1x3"
        self.single_view = "axial"
        self.slab_mm = 0.0
        self.slab_thickness_mm = DEFAULT_SLAB_MM
        self.crosshair = True
        self.tool = "navigate"

    # --- the scan -------------------------------------------------------------------------
    def reset_for(self, shape, dicom_default: tuple[float, float] | None, modality: str = "CT",
                  sample=None) -> None:
        """A new scan: centre the position and show the DICOM's own window (or one from ``sample``)."""
        self.shape = tuple(int(n) for n in shape)
        self.dicom_window = default_window(dicom_default, modality, sample)
        self.position = (-1, -1, -1)
        self.set_position(tuple(n // 2 for n in self.shape))
        self.set_window(*self.dicom_window)

    # --- position ---------------------------------------------------------------------------
    def set_position(self, kji) -> None:
        clamped = tuple(int(min(max(round(v), 0), n - 1)) for v, n in zip(kji, self.shape))
        if clamped != self.position:
            self.position = clamped
            self.position_changed.emit(clamped)

    def step(self, array_axis: int, delta: int) -> None:
        """Move the position ``delta`` voxels along one array axis (k=0, j=1, i=2)."""
        moved = list(self.position)
        moved[array_axis] += int(delta)
        self.set_position(moved)

    # --- window / level ---------------------------------------------------------------------
    def set_window(self, width: float, level: float) -> None:
        window = (max(float(width), 1.0), float(level))
        if window != self.window:
            self.window = window
            self.window_changed.emit(*window)

    def apply_preset(self, key: int) -> bool:
        """Number key 1..5 → a radiology preset, 0 → the DICOM's own window. False for other keys."""
        if key == 0:
            self.set_window(*self.dicom_window)
            return True
        if 1 <= key <= len(PRESET_KEYS):
            self.set_window(*PRESETS[PRESET_KEYS[key - 1]])
            return True
        return False

    def drag_window(self, dx: float, dy: float) -> None:
        """Right-drag: right widens the window, down raises the level (as RadiAnt and OHIF do)."""
        width, level = self.window
        rate = max(1.0, width / 256.0)  # a wide lung window moves faster than a brain window
        self.set_window(width + dx * rate * 2.0, level + dy * rate)

    # --- layout, slab, crosshair, tool ------------------------------------------------------
    def set_layout(self, layout: str, single_view: str | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}")
        single_view = single_view or self.single_view
        if (layout, single_view) != (self.layout, self.single_view):
            self.layout, self.single_view = layout, single_view
            self.layout_changed.emit(layout, single_view)

    def toggle_layout(self, active_view: str | None = None) -> None:
        """1x3 → 1x1 of the active view, and back."""
        if self.layout == "1x3":
            self.set_layout("1x1", active_view or self.single_view)
        else:
            self.set_layout("1x3")

    def set_slab_mm(self, slab_mm: float) -> None:
        slab_mm = max(0.0, float(slab_mm))
        if slab_mm > 0:
            self.slab_thickness_mm = slab_mm
        if slab_mm != self.slab_mm:
            self.slab_mm = slab_mm
            self.slab_changed.emit(slab_mm)

    def toggle_slab(self) -> None:
        self.set_slab_mm(0.0 if self.slab_mm > 0 else self.slab_thickness_mm)

    def set_crosshair(self, shown: bool) -> None:
        if bool(shown) != self.crosshair:
            self.crosshair = bool(shown)
            self.crosshair_changed.emit(self.crosshair)

    def set_tool(self, tool: str) -> None:
        if tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}")
        if tool != self.tool:
            self.tool = tool
            self.tool_changed.emit(tool)


@dataclass(frozen=True)
class LabelOverlay:
    """One label map drawn over the scan, from ground truth or from a model's findings."""

    name: str
    colours: dict = field(default_factory=dict)  # label value → (r, g, b)
    label_names: dict = field(default_factory=dict)  # label value → name shown in the controls
    source: str = ""  # "ground truth (SEG)", a model variant's name ...
    is_ai: bool = False  # AI findings carry a "research use only" marker wherever shown
    opacity: float = 0.45
    visible: bool = True
    outline: bool = False
    hidden_labels: frozenset = frozenset()


@dataclass(frozen=True)
class ProbabilityOverlay:
    name: str
    source: str = ""
    is_ai: bool = True
    threshold: float = 0.5
    opacity: float = 0.6
    visible: bool = True


class OverlayState(QObject):
    """Which overlays exist and how each is drawn. The voxel arrays live with the views."""

    changed = Signal(str)  # overlay name ("" = the set of overlays changed)
    markers_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.labels: dict[str, LabelOverlay] = {}
        self.probability: ProbabilityOverlay | None = None
        self.show_markers = True

    def add_label(self, overlay: LabelOverlay) -> None:
        self.labels[overlay.name] = overlay
        self.changed.emit("")

    def set_probability(self, overlay: ProbabilityOverlay | None) -> None:
        self.probability = overlay
        self.changed.emit("")

    def clear(self) -> None:
        self.labels.clear()
        self.probability = None
        self.changed.emit("")

    def update_label(self, name: str, **settings) -> None:
        """Change how one label overlay is drawn: opacity, visible, outline, hidden_labels."""
        if name in self.labels:
            self.labels[name] = replace(self.labels[name], **settings)
            self.changed.emit(name)

    def update_probability(self, **settings) -> None:
        if self.probability is not None:
            self.probability = replace(self.probability, **settings)
            self.changed.emit(self.probability.name)

    def set_show_markers(self, shown: bool) -> None:
        if bool(shown) != self.show_markers:
            self.show_markers = bool(shown)
            self.markers_changed.emit(self.show_markers)

    def ai_sources_shown(self) -> list[str]:
        """Sources of the visible AI overlays: the viewer marks them "research use only"."""
        shown = [o.source or o.name for o in self.labels.values() if o.is_ai and o.visible]
        p = self.probability
        if p is not None and p.is_ai and p.visible:
            shown.append(p.source or p.name)
        return shown
