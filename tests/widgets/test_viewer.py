"""The viewer as a radiologist uses it: real widgets, real events, pixels read back from the screen."""
from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QPoint, QPointF, Qt

from app.core.display import PRESETS, window_to_uint8
from app.core.lesions import lesion_table
from tests.widgets.viewer_support import (AIR_HU, BODY_HU, LUNG_HU, NODULE_HU, PATIENT_POSITIONS, device_point,
                                          drag, grab_rgb, is_red, phantom, pixel_centre_mm, save_screenshot, wheel)
from widgets.viewer import ViewerPanel

NK = 24  # phantom slices; identity direction: k runs toward the head, so axial slice index = NK-1-k


def _panel(qtbot, volume, size=(1300, 560)) -> ViewerPanel:
    panel = ViewerPanel()
    qtbot.addWidget(panel)
    panel.resize(*size)
    panel.show()
    qtbot.waitExposed(panel)
    panel.set_volume(volume)
    qtbot.wait(10)
    return panel


@pytest.fixture
def chest():
    return phantom(nodules=((12, 18, 14, 4), (6, 30, 34, 3)))


def _screen_grey(view, row: int, col: int) -> int:
    point = device_point(view, *pixel_centre_mm(view, row, col))
    return int(grab_rgb(view)[point.y(), point.x(), 0])


def test_wheel_and_keys_scroll_the_view_under_the_cursor(qtbot, chest):
    panel = _panel(qtbot, chest[0])
    axial = panel.mpr.views["axial"]
    start = axial.slice_index
    centre = QPoint(axial.width() // 2, axial.height() // 2)
    wheel(axial, centre, -1)  # toward the user: next slice
    assert axial.slice_index == start + 1
    wheel(axial, centre, 3)
    assert axial.slice_index == start - 2
    assert panel.state.position[0] == NK - 1 - axial.slice_index
    axial.setFocus()
    qtbot.keyClick(axial, Qt.Key.Key_Down)
    assert axial.slice_index == start - 1
    qtbot.keyClick(axial, Qt.Key.Key_PageDown)
    assert axial.slice_index == start + 9
    qtbot.keyClick(axial, Qt.Key.Key_End)
    assert axial.slice_index == NK - 1
    qtbot.keyClick(axial, Qt.Key.Key_Home)
    assert axial.slice_index == 0
    assert "Im 24 / 24" in axial.annotations.top_right.text()  # image numbers count k from 1


def test_presets_change_the_rendered_pixels_as_the_window_predicts(qtbot, chest):
    panel = _panel(qtbot, chest[0])
    axial = panel.mpr.views["axial"]
    axial.setFocus()
    row, col = 24, 4  # body, outside the lungs
    for key, name in ((Qt.Key.Key_1, "lung"), (Qt.Key.Key_2, "mediastinum"), (Qt.Key.Key_4, "bone")):
        qtbot.keyClick(axial, key)
        expected = int(window_to_uint8(np.array([BODY_HU]), *PRESETS[name])[0])
        assert panel.state.window == PRESETS[name]
        assert axial.image_item.image[row, col] == expected
        assert abs(_screen_grey(axial, row, col) - expected) <= 1
    lung = int(window_to_uint8(np.array([LUNG_HU]), *PRESETS["lung"])[0])
    qtbot.keyClick(axial, Qt.Key.Key_1)
    assert abs(_screen_grey(axial, 24, 14) - lung) <= 1
    qtbot.keyClick(axial, Qt.Key.Key_0)
    assert panel.state.window == PRESETS["mediastinum"]  # the phantom has no DICOM window
    assert panel.preset_box.currentIndex() == 0


def test_dicom_default_window_is_key_zero(qtbot):
    volume, _ = phantom(default_window=(-500.0, 1000.0))
    panel = _panel(qtbot, volume)
    assert panel.state.window == (1000.0, -500.0)
    panel.mpr.views["axial"].setFocus()
    qtbot.keyClick(panel.mpr.views["axial"], Qt.Key.Key_5)
    qtbot.keyClick(panel.mpr.views["axial"], Qt.Key.Key_0)
    assert panel.state.window == (1000.0, -500.0)


def test_right_drag_and_ctrl_left_drag_change_the_window(qtbot, chest):
    panel = _panel(qtbot, chest[0])
    axial = panel.mpr.views["axial"]
    width, level = panel.state.window
    centre = QPoint(axial.width() // 2, axial.height() // 2)
    drag(axial, centre, centre + QPoint(60, 0), button=Qt.MouseButton.RightButton)
    assert panel.state.window[0] > width and panel.state.window[1] == level
    width = panel.state.window[0]
    drag(axial, centre, centre + QPoint(0, 40), modifiers=Qt.KeyboardModifier.ControlModifier)
    assert panel.state.window[1] > level and panel.state.window[0] == width
    assert panel.preset_box.currentText() == "Custom"


def test_overlay_colour_appears_exactly_where_the_mask_is(qtbot, chest):
    volume, labels = chest
    panel = _panel(qtbot, volume)
    panel.add_label_overlay("ground truth", labels, {1: (255, 0, 0)}, source="NIfTI")
    panel.overlay_state.update_label("ground truth", opacity=1.0)
    panel.state.set_crosshair(False)
    panel.jump_to(12, 18, 14)
    axial = panel.mpr.views["axial"]
    truth = labels[12].astype(bool)  # axial rows/cols are j/i for this orientation

    def red_where_mask():
        rgb = grab_rgb(axial)
        region = [(r, c) for r in range(10, 27) for c in range(6, 23)]
        red = [is_red(rgb[p.y(), p.x()]) for p in (device_point(axial, *pixel_centre_mm(axial, r, c))
                                                    for r, c in region)]
        return np.array(red), np.array([truth[r, c] for r, c in region])

    red, mask = red_where_mask()
    assert mask.sum() > 20 and np.array_equal(red, mask)
    group = panel.controls.group("ground truth")
    group.setChecked(False)  # the user unticks the overlay
    red, _ = red_where_mask()
    assert not red.any()
    group.setChecked(True)
    group.outline.setChecked(True)
    red, mask = red_where_mask()
    assert red.sum() < mask.sum() and not (red & ~mask).any()
    assert not is_red(grab_rgb(axial)[device_point(axial, *pixel_centre_mm(axial, 18, 14)).y(),
                                       device_point(axial, *pixel_centre_mm(axial, 18, 14)).x()])


def test_clicking_a_lesion_lands_every_view_on_it(qtbot, chest):
    volume, labels = chest
    panel = _panel(qtbot, volume)
    lesions = lesion_table(labels, volume)
    panel.set_lesions(lesions, source="ground truth")
    panel.jump_to(0, 0, 0)
    table = panel.lesion_list.table
    target = min(lesions, key=lambda l: l.volume_ml)  # the small one, at k=6
    row = panel.lesion_list.row_of(target.lesion_id)
    rect = table.visualRect(panel.lesion_list.proxy.index(row, 0))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    expected = tuple(int(round(v)) for v in target.centre_index)
    assert panel.state.position == expected
    assert panel.mpr.views["axial"].slice_index == NK - 1 - expected[0]
    assert panel.mpr.views["coronal"].slice_index == expected[1]
    assert panel.mpr.views["sagittal"].slice_index == expected[2]


def test_lesion_table_sorts_by_size(qtbot, chest):
    volume, labels = chest
    panel = _panel(qtbot, volume)
    panel.set_lesions(lesion_table(labels, volume))
    panel.lesion_list.table.sortByColumn(1, Qt.SortOrder.AscendingOrder)
    sizes = [float(panel.lesion_list.proxy.index(r, 1).data()) for r in range(2)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[1]
    headers = [panel.lesion_list.proxy.headerData(c, Qt.Orientation.Horizontal) for c in range(5)]
    assert headers == ["#", "Size mm", "Vol mL", "Mean HU", "Slices"]
    small = [panel.lesion_list.proxy.index(0, c).data() for c in range(5)]
    assert small[3] == str(NODULE_HU) and small[4] == "7"  # only k=6, shown as image number 7


@pytest.mark.parametrize("view, rows_mm, cols_mm", [("coronal", NK * 2.5, 48 * 0.8),
                                                     ("sagittal", NK * 2.5, 48 * 0.8),
                                                     ("axial", 48 * 0.8, 48 * 0.8)])
def test_pixels_on_screen_keep_the_voxel_aspect(qtbot, chest, view, rows_mm, cols_mm):
    panel = _panel(qtbot, chest[0])
    shown = panel.mpr.views[view]
    top_left = device_point(shown, 0, 0)
    bottom_right = device_point(shown, *shown._mm_rect[2:])
    size = bottom_right - top_left
    assert size.y() / size.x() == pytest.approx(rows_mm / cols_mm, rel=0.03)


@pytest.mark.parametrize("position", list(PATIENT_POSITIONS))
def test_patient_right_is_on_the_screen_left_whatever_the_position(qtbot, position):
    direction = PATIENT_POSITIONS[position]
    volume, labels = phantom(direction=direction, nodules=((12, 24, 8, 4),))
    panel = _panel(qtbot, volume)
    panel.add_label_overlay("marker", labels, {1: (255, 0, 0)})
    panel.overlay_state.update_label("marker", opacity=1.0)
    panel.state.set_crosshair(False)
    panel.jump_to(12, 24, 8)
    axial = panel.mpr.views["axial"]
    letters = {edge: label.text() for edge, label in axial.annotations.letters.items()}
    assert letters == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    red_columns = np.nonzero(is_red(grab_rgb(axial)))[1]
    marker_x = volume.index_to_patient(12, 24, 8)[0]
    centre_x = volume.index_to_patient(12, 24, 24)[0]
    on_screen_left = red_columns.mean() < axial.width() / 2
    assert on_screen_left == (marker_x < centre_x)  # smaller LPS x = patient's right


def test_monochrome1_is_shown_inverted(qtbot):
    volume, _ = phantom(photometric="MONOCHROME1")
    panel = _panel(qtbot, volume)
    axial = panel.mpr.views["axial"]
    expected = 255 - int(window_to_uint8(np.array([BODY_HU]), *panel.state.window)[0])
    assert axial.image_item.image[24, 4] == expected
    assert int(axial.image_item.image[0, 0]) == 255 - int(window_to_uint8(np.array([AIR_HU]), *panel.state.window)[0])
    assert "MONOCHROME1" in axial.annotations.bottom_left.text()


def test_clicking_moves_the_crosshair_and_the_other_views(qtbot, chest):
    panel = _panel(qtbot, chest[0])
    axial = panel.mpr.views["axial"]
    qtbot.mouseClick(axial.viewport(), Qt.MouseButton.LeftButton, pos=device_point(axial, *pixel_centre_mm(axial, 10, 30)))
    assert panel.state.position[1:] == (10, 30)
    assert panel.mpr.views["coronal"].slice_index == 10
    assert panel.mpr.views["sagittal"].slice_index == 30
    assert panel.mpr.views["coronal"].cross_v.value() == pytest.approx(30.5 * 0.8)


def test_thick_slab_mip_shows_a_nodule_from_a_neighbouring_slice(qtbot, chest):
    panel = _panel(qtbot, chest[0])
    axial = panel.mpr.views["axial"]
    panel.jump_to(15, 18, 14)  # two slices above the nodule (k 11..13): lung here
    qtbot.keyClick(axial, Qt.Key.Key_1)
    lung, nodule = (int(window_to_uint8(np.array([hu]), *PRESETS["lung"])[0]) for hu in (LUNG_HU, NODULE_HU))
    assert axial.image_item.image[18, 14] == lung
    axial.setFocus()
    qtbot.keyClick(axial, Qt.Key.Key_M)  # 10 mm slab = 5 slices of 2.5 mm: k 13..17
    assert panel.state.slab_mm == 10.0 and panel.mip_action.isChecked()
    assert axial.image_item.image[18, 14] == nodule
    assert "MIP 10 mm" in axial.annotations.top_right.text()


def test_layout_switches_between_1x3_and_1x1(qtbot, chest):
    panel = _panel(qtbot, chest[0])
    coronal = panel.mpr.views["coronal"]
    coronal.setFocus()
    qtbot.keyClick(coronal, Qt.Key.Key_L)
    assert panel.state.layout == "1x1" and panel.state.single_view == "coronal"
    assert coronal.isVisible() and not panel.mpr.views["axial"].isVisible()
    qtbot.keyClick(coronal, Qt.Key.Key_L)
    assert all(v.isVisible() for v in panel.mpr.views.values())


def test_progressive_loading_shows_slices_as_they_arrive(qtbot):
    full, _ = phantom()
    voxels = np.zeros_like(full.voxels)
    loaded = np.zeros(NK, bool)
    volume = type(full)(voxels, spacing=full.spacing, loaded=loaded)
    panel = _panel(qtbot, volume)
    axial, coronal = panel.mpr.views["axial"], panel.mpr.views["coronal"]
    assert axial.annotations.loading.isVisible() and not axial.image_item.image.any()
    voxels[:14] = full.voxels[:14]
    loaded[:14] = True
    panel.refresh_slices(0, 14)  # the shown slice (k=12) has arrived
    assert not axial.annotations.loading.isVisible()
    assert axial.image_item.image[24, 4] == window_to_uint8(np.array([BODY_HU]), *panel.state.window)[0]
    qtbot.waitUntil(lambda: coronal.image_item.image[NK - 1 - 5, 4] > 0, timeout=2000)
    assert not coronal.image_item.image[0].any()  # k=23 (top row) not loaded yet: dark
    assert coronal.annotations.loading.text() == f"loading… {14 / NK:.0%}"
    wheel(axial, QPoint(axial.width() // 2, axial.height() // 2), 3)  # scrolling works while loading
    assert axial.annotations.loading.isVisible()


def test_probability_heat_map_hides_below_threshold(qtbot, chest):
    volume, _ = chest
    panel = _panel(qtbot, volume)
    k, j, i = np.mgrid[0:NK, 0:48, 0:48]
    probability = np.clip(1 - np.abs(i - 24) / 24, 0, 1).astype(np.float32)  # 1 at column 24, 0 at edges
    panel.set_probability_overlay("nodule probability", probability, threshold=0.5, source="model A")
    layer = panel.mpr.views["axial"].probability_layer
    shown = layer.item.image[20] > 0
    assert shown[24] and not shown[4] and shown.sum() == (probability[12, 20] >= 0.5).sum()
    panel.controls.group("nodule probability").threshold.setValue(90)
    assert (layer.item.image[20] > 0).sum() == (probability[12, 20] >= 0.9).sum()
    assert panel.mpr.views["axial"].annotations.ai_banner.isVisible()


def test_screenshots_of_the_main_layouts(qtbot):
    volume, labels = phantom(shape=(60, 128, 128), spacing=(2.5, 0.7, 0.7),
                             nodules=((30, 50, 38, 7), (20, 80, 92, 5)))
    panel = _panel(qtbot, volume, size=(1500, 620))
    panel.add_label_overlay("model A", labels, {1: (230, 25, 75)}, is_ai=True, source="nodule-seg (demo)",
                            label_names={1: "nodule"})
    panel.set_lesions(lesion_table(labels, volume), source="nodule-seg (demo)", is_ai=True)
    panel.set_scores({"nodule present": 0.97, "malignancy": 0.31}, source="nodule-cls (demo)")
    panel.jump_to(30, 50, 38)
    qtbot.keyClick(panel.mpr.views["axial"], Qt.Key.Key_1)
    qtbot.wait(50)  # let the side panel lay out its new overlay controls
    path = save_screenshot(panel, "viewer-1x3-overlay-lesions.png")
    assert path.stat().st_size > 10_000
    panel.state.set_layout("1x1", "axial")
    qtbot.wait(20)
    assert save_screenshot(panel, "viewer-1x1-axial.png").stat().st_size > 10_000


def test_a_second_series_of_another_size_replaces_the_first(qtbot, chest):
    panel = _panel(qtbot, chest[0])
    panel.add_label_overlay("truth", chest[1])
    panel.jump_to(23, 47, 47)
    small, _ = phantom(shape=(8, 32, 40), nodules=())
    panel.set_volume(small, first_slice=2)
    axial = panel.mpr.views["axial"]
    assert panel.state.position == (2, 16, 20)
    assert axial.image_item.image.shape == (32, 40) and axial.label_layers == {}
    assert panel.overlay_state.labels == {} and panel.controls.group("truth") is None


def test_ctrl_wheel_zooms_and_middle_drag_pans(qtbot, chest):
    panel = _panel(qtbot, chest[0])
    axial = panel.mpr.views["axial"]
    centre = QPoint(axial.width() // 2, axial.height() // 2)
    (x0, x1), _ = axial.view_box.viewRange()
    slice_before = axial.slice_index
    wheel(axial, centre, 2, Qt.KeyboardModifier.ControlModifier)
    (z0, z1), _ = axial.view_box.viewRange()
    assert (z1 - z0) < (x1 - x0) and axial.slice_index == slice_before  # zoomed in, not scrolled
    drag(axial, centre, centre + QPoint(80, 0), button=Qt.MouseButton.MiddleButton)
    (p0, p1), _ = axial.view_box.viewRange()
    assert p0 < z0 and (p1 - p0) == pytest.approx(z1 - z0)  # dragged right: the image follows the hand
    axial.setFocus()
    qtbot.keyClicks(axial, "+")
    (k0, k1), _ = axial.view_box.viewRange()
    assert (k1 - k0) == pytest.approx(0.8 * (p1 - p0))
    drag(axial, centre, centre + QPoint(0, 50), button=Qt.MouseButton.RightButton,
         modifiers=Qt.KeyboardModifier.ControlModifier)  # Ctrl+right-drag down: zoom out
    (d0, d1), _ = axial.view_box.viewRange()
    assert (d1 - d0) > (k1 - k0)
    qtbot.keyClick(axial, Qt.Key.Key_F)
    (f0, f1), _ = axial.view_box.viewRange()
    assert (f1 - f0) == pytest.approx(x1 - x0, rel=0.01)


def test_an_mr_series_without_a_window_gets_one_from_its_pixels(qtbot):
    voxels = np.broadcast_to(np.arange(48, dtype=np.int16) * 20, (6, 48, 48)).copy()  # 0..940
    from app.core.volume import Volume
    panel = _panel(qtbot, Volume(voxels, spacing=(5.0, 1.0, 1.0), modality="MR"))
    width, level = panel.state.window
    assert 800 < width <= 940 and level == pytest.approx(470, abs=10)
    axial = panel.mpr.views["axial"]
    axial._hover(axial.view_box.mapViewToScene(QPointF(*pixel_centre_mm(axial, 10, 10))))
    assert axial.annotations.bottom_right.text().startswith("200<br>")  # a plain value: MR has no HU


def test_a_single_image_is_shown_alone(qtbot):
    from app.core.volume import Volume
    panel = _panel(qtbot, Volume(np.zeros((1, 40, 30), np.int16), spacing=(1.0, 0.2, 0.2), modality="DX"))
    assert panel.state.layout == "1x1" and panel.state.single_view == "axial"
    assert panel.mpr.views["axial"].image_item.image.shape == (40, 30)
    panel.set_volume(phantom()[0])
    assert panel.state.layout == "1x3"


def test_float_voxels_are_windowed_like_integers(qtbot):
    from app.core.volume import Volume
    voxels = np.full((4, 16, 16), 40.5, np.float32)
    panel = _panel(qtbot, Volume(voxels, spacing=(1.0, 1.0, 1.0)))
    expected = window_to_uint8(np.array([40.5]), *panel.state.window)[0]
    assert panel.mpr.views["axial"].image_item.image[3, 3] == expected
