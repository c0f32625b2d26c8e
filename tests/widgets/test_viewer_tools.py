"""Ruler and ROI drawn with the mouse on known data: millimetres and HU as a radiologist reads them."""
from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QPointF, Qt

from app.core.volume import Volume
from tests.widgets.viewer_support import device_point, drag, pixel_centre_mm, save_screenshot
from widgets.viewer import ViewerPanel
from widgets.viewer.tools import EllipseRoi, Ruler


def _panel(qtbot, volume) -> ViewerPanel:
    panel = ViewerPanel()
    qtbot.addWidget(panel)
    panel.resize(1000, 700)
    panel.show()
    qtbot.waitExposed(panel)
    panel.set_volume(volume)
    panel.state.set_layout("1x1", "axial")
    qtbot.wait(20)  # the 1x1 layout fits the image to the now larger view
    return panel


def _ramp_volume(padding_columns: int = 0) -> Volume:
    """HU = 10 × column index: an ROI's mean tells where its centre is; optional padding on the right."""
    voxels = np.broadcast_to((np.arange(64) * 10).astype(np.int16), (5, 64, 64)).copy()
    padding = None
    if padding_columns:
        padding = np.zeros(voxels.shape, bool)
        padding[:, :, -padding_columns:] = True
        voxels[padding] = -3024
    return Volume(voxels, spacing=(5.0, 0.75, 0.75), padding_mask=padding)


def test_ruler_measures_millimetres(qtbot):
    panel = _panel(qtbot, _ramp_volume())
    axial = panel.mpr.views["axial"]
    axial.setFocus()
    qtbot.keyClick(axial, Qt.Key.Key_R)
    assert panel.state.tool == "ruler" and panel.tool_actions["ruler"].isChecked()
    start = device_point(axial, *pixel_centre_mm(axial, 10, 10))
    end = device_point(axial, *pixel_centre_mm(axial, 50, 40))
    drag(axial, start, end)
    rulers = [m for m in axial.measurements if isinstance(m, Ruler)]
    assert len(rulers) == 1
    expected = np.hypot(40 * 0.75, 30 * 0.75)  # 37.5 mm
    # one screen pixel is well under 0.1 mm at this zoom; allow a pixel at each end
    assert rulers[0].length_mm == pytest.approx(expected, abs=0.2)
    assert rulers[0].text.textItem.toPlainText() == f"{rulers[0].length_mm:.1f} mm"


def test_roi_reports_mean_sd_hu_and_area(qtbot):
    panel = _panel(qtbot, _ramp_volume())
    axial = panel.mpr.views["axial"]
    panel.state.set_tool("roi")
    # a circle of radius 8 px centred on pixel (32, 20): mean HU = 200 by symmetry
    top_left = device_point(axial, *pixel_centre_mm(axial, 24, 12))
    bottom_right = device_point(axial, *pixel_centre_mm(axial, 40, 28))
    drag(axial, top_left, bottom_right)
    roi = [m for m in axial.measurements if isinstance(m, EllipseRoi)][0]
    stats = roi.stats
    assert stats.mean_hu == pytest.approx(200.0, abs=2.0)
    assert stats.sd_hu == pytest.approx(np.sqrt(8 ** 2 / 4) * 10, rel=0.15)  # SD of x over a disc = r/2
    assert stats.area_mm2 == pytest.approx(np.pi * (8 * 0.75) ** 2, rel=0.1)
    assert stats.area_mm2 == pytest.approx(stats.pixels * 0.75 ** 2)
    assert "HU" in roi.text.textItem.toPlainText() and "mm²" in roi.text.textItem.toPlainText()
    save_screenshot(panel, "viewer-1x1-roi.png")


def test_roi_excludes_padding_from_the_statistics(qtbot):
    panel = _panel(qtbot, _ramp_volume(padding_columns=20))
    axial = panel.mpr.views["axial"]
    panel.state.set_tool("roi")
    # centred on column 44, half of it over the padding (columns 44..63)
    drag(axial, device_point(axial, *pixel_centre_mm(axial, 24, 36)),
         device_point(axial, *pixel_centre_mm(axial, 40, 52)))
    stats = axial.measurements[-1].stats
    assert stats.pixels * 0.75 ** 2 < stats.area_mm2  # padding counted in the area, not in the HU
    assert 360 <= stats.mean_hu <= 430  # only columns 36..43 (360..430 HU) are tissue


def test_measurements_stay_on_their_slice_and_clear(qtbot):
    panel = _panel(qtbot, _ramp_volume())
    axial = panel.mpr.views["axial"]
    panel.state.set_tool("ruler")
    drag(axial, device_point(axial, 10, 10), device_point(axial, 30, 30))
    ruler = axial.measurements[0]
    axial.scroll(1)
    assert not ruler.line.isVisible()
    axial.scroll(-1)
    assert ruler.line.isVisible()
    axial.setFocus()
    qtbot.keyClick(axial, Qt.Key.Key_C)
    assert axial.measurements == []
    qtbot.keyClick(axial, Qt.Key.Key_Escape)
    assert panel.state.tool == "navigate"


def test_cursor_readout_shows_hu_and_patient_coordinates(qtbot):
    volume = _ramp_volume()
    panel = _panel(qtbot, volume)
    axial = panel.mpr.views["axial"]
    x_mm, y_mm = pixel_centre_mm(axial, 12, 33)
    axial._hover(axial.view_box.mapViewToScene(QPointF(x_mm, y_mm)))  # as the scene reports a move
    text = axial.annotations.bottom_right.text()
    k = panel.state.position[0]
    lps = volume.index_to_patient(k, 12, 33)
    assert text.startswith("330 HU")
    assert f"({lps[0]:.1f}, {lps[1]:.1f}, {lps[2]:.1f}) mm" in text


def test_ruler_on_a_reformat_uses_the_slice_spacing(qtbot):
    panel = _panel(qtbot, _ramp_volume())  # 5 mm slices, 0.75 mm pixels
    panel.state.set_layout("1x1", "coronal")
    qtbot.wait(20)
    coronal = panel.mpr.views["coronal"]
    panel.state.set_tool("ruler")
    drag(coronal, device_point(coronal, *pixel_centre_mm(coronal, 0, 20)),
         device_point(coronal, *pixel_centre_mm(coronal, 4, 20)))
    assert coronal.measurements[-1].length_mm == pytest.approx(4 * 5.0, abs=0.3)
