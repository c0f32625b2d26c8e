"""The viewer's state models on their own: no widget, just intents in and signals out."""
from __future__ import annotations

import pytest

from app.core.display import PRESETS
from app.viewer_state import LabelOverlay, OverlayState, ProbabilityOverlay, ViewerState


@pytest.fixture
def state(qtbot):
    s = ViewerState()
    s.reset_for((30, 64, 80), dicom_default=(-600.0, 1600.0))
    return s


def test_new_scan_starts_centred_with_the_dicom_window(state):
    assert state.position == (15, 32, 40)
    assert state.window == (1600.0, -600.0)


def test_position_is_clamped_and_announced_once(qtbot, state):
    with qtbot.waitSignal(state.position_changed) as signal:
        state.set_position((99, -5, 10.6))
    assert signal.args == [(29, 0, 11)]
    with qtbot.assertNotEmitted(state.position_changed):
        state.set_position((29, 0, 11))
    state.step(0, -3)
    assert state.position == (26, 0, 11)


def test_number_keys_are_presets_and_zero_is_the_dicom_window(state):
    for key, name in enumerate(PRESETS, start=1):
        assert state.apply_preset(key)
        assert state.window == PRESETS[name]
    assert state.apply_preset(0) and state.window == (1600.0, -600.0)
    assert not state.apply_preset(7)


def test_window_drag_widens_and_raises_and_never_goes_below_one(state):
    state.set_window(400, 40)
    state.drag_window(10, 0)
    assert state.window[0] > 400 and state.window[1] == 40
    state.drag_window(0, 10)
    assert state.window[1] > 40
    state.drag_window(-10_000, 0)
    assert state.window[0] == 1.0


def test_layout_slab_crosshair_and_tool(qtbot, state):
    with qtbot.waitSignal(state.layout_changed) as signal:
        state.toggle_layout("sagittal")
    assert signal.args == ["1x1", "sagittal"]
    state.toggle_layout()
    assert state.layout == "1x3"
    state.toggle_slab()
    assert state.slab_mm == 10.0
    state.set_slab_mm(20)
    state.toggle_slab()
    state.toggle_slab()
    assert state.slab_mm == 20.0  # the last thickness is remembered
    state.set_crosshair(False)
    assert not state.crosshair
    with pytest.raises(ValueError):
        state.set_tool("scalpel")


def test_overlay_settings_and_the_research_use_marker(qtbot):
    overlays = OverlayState()
    overlays.add_label(LabelOverlay("truth", source="SEG"))
    overlays.add_label(LabelOverlay("model A", source="nodule-seg", is_ai=True))
    assert overlays.ai_sources_shown() == ["nodule-seg"]
    with qtbot.waitSignal(overlays.changed) as signal:
        overlays.update_label("model A", visible=False, opacity=0.2)
    assert signal.args == ["model A"]
    assert overlays.labels["model A"].opacity == 0.2 and overlays.ai_sources_shown() == []
    overlays.set_probability(ProbabilityOverlay("p", source="nodule-seg"))
    overlays.update_probability(threshold=0.8)
    assert overlays.probability.threshold == 0.8 and overlays.ai_sources_shown() == ["nodule-seg"]
    overlays.clear()
    assert overlays.labels == {} and overlays.probability is None
