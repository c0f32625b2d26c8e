"""The compare view on real widgets: linked panels, the disagreement list, the whole flow through
the compute process on the demo data, and screenshots to look at."""
from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import Qt
from scipy import ndimage

from app.compare import CaseView
from app.core.disagreement import ONLY_REFERENCE, voxel_disagreement
from app.core.lesions import lesion_table
from app.core.report import Table
from compression.compare_report import ChartSeries, ViewSummary
from tests.widgets.viewer_support import grab_rgb, phantom, save_screenshot
from widgets.compare_view import DISAGREEMENT, CompareView, connect_compare


def _case_view(names: int = 2) -> CaseView:
    volume, truth = phantom(shape=(24, 48, 48), nodules=((8, 18, 14, 4), (16, 30, 34, 3)))
    degraded = truth.copy()
    degraded[14:, :, 24:] = 0                                   # the second nodule is lost
    shrunk = ndimage.binary_erosion(truth).astype(np.uint8)
    labels = [truth, degraded, shrunk][:names]
    maps = [None] + [voxel_disagreement(truth, other) for other in labels[1:]]
    return CaseView(0, volume, labels, [lesion_table(l, volume) for l in labels], maps)


@pytest.fixture
def view(qtbot):
    widget = CompareView()
    qtbot.addWidget(widget)
    widget.resize(1300, 800)
    return widget


def test_scrolling_one_panel_moves_every_view(view, qtbot):
    view.set_variants(["original 1.0", "pruned 1.0", "int8 1.0"])
    view.set_cases(["Case 1"])
    view.show_case(_case_view(3))
    view.show()
    qtbot.waitExposed(view)
    first, second, third = view.panels
    start = first.state.position
    first.mpr.views["axial"].scroll(3)            # the wheel's action on the reference's axial view
    assert first.state.position != start
    assert second.state.position == third.state.position == first.state.position
    third.mpr.views["axial"].scroll(-5)           # any panel leads
    assert first.state.position == second.state.position == third.state.position
    first.state.set_window(400.0, 40.0)           # window/level and crosshair follow too
    first.state.set_crosshair(False)
    assert second.state.window == third.state.window == (400.0, 40.0)
    assert not second.state.crosshair and not third.state.crosshair
    axial = [p.mpr.views["axial"].view_box for p in view.panels]
    before = _centre_and_scale(axial[0])
    axial[0].scaleBy(s=(0.5, 0.5))                 # zoom and pan follow: same centre, same mm per pixel
    axial[1].translateBy(x=7.0, y=-3.0)
    after = [_centre_and_scale(box) for box in axial]
    assert np.allclose(after, after[0], rtol=1e-3)
    assert after[0][2] == pytest.approx(before[2] * 0.5, rel=1e-3)          # zoomed in twice
    assert after[0][0] == pytest.approx(before[0] + 7.0, abs=1e-3)          # panned


def _coloured(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels clearly green (only the reference) and clearly magenta (only the other variant)."""
    r, g, b = (rgb[..., n].astype(int) for n in range(3))
    return (g - r > 40) & (g > b), (r - g > 40) & (b - g > 40)


def _centre_and_scale(box) -> tuple[float, float, float]:
    (x0, x1), (y0, y1) = box.viewRange()
    return (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / box.width()


def test_the_disagreement_overlay_marks_only_the_voxels_one_side_found(view, qtbot):
    case = _case_view(2)
    view.set_variants(["original 1.0", "pruned 1.0"])
    view.show_case(case)
    view.show()
    qtbot.waitExposed(view)
    lost = lesion_table(case.labels[0], case.volume)[1]
    view.panels[0].jump_to(*lost.centre_index)
    qtbot.wait(50)
    assert view.panels[1].state.position == view.panels[0].state.position
    view.set_findings_visible(False)
    with_overlay = grab_rgb(view.panels[1].mpr.views["axial"])
    save_screenshot(view, "compare_disagreement_overlay.png")
    view.set_disagreement_visible(False)
    without = grab_rgb(view.panels[1].mpr.views["axial"])
    green, magenta = _coloured(with_overlay)
    assert green.sum() > 20 and not magenta.any()   # the lost nodule: "only the reference", in green
    assert not _coloured(without)[0].any()
    assert view.panels[1].overlay_state.labels[DISAGREEMENT].label_names[ONLY_REFERENCE] == "only the reference"


def test_clicking_a_disagreement_moves_every_view_to_it(view, qtbot):
    case = _case_view(2)
    view.set_variants(["original 1.0", "pruned 1.0"])
    view.show_case(case)
    lost = lesion_table(case.labels[0], case.volume)[1]
    table = Table("list", ["#", "Case", "Variant", "Kind", "Size mm", "Lung-RADS size", "Slice", "Detail"],
                  [["1", "Case 1", "pruned 1.0", "Missed", "4.8", "<6 mm", "17", "…"]])
    chart = ChartSeries("Dice per case", ["Case 1"], {"original 1.0": [1.0], "pruned 1.0": [0.7]}, "Dice",
                        y_range=(0.0, 1.05))
    view.show_summary(ViewSummary([table, table, table], [chart] * 4, table, [(0, lost.centre_index)], ["missed"],
                                  "insufficient evidence: 1 eval case"))
    assert view.disagreement_table.rowCount() == 1
    view.disagreement_table.cellClicked.emit(0, 2)
    expected = tuple(int(round(c)) for c in lost.centre_index)
    assert view.panels[0].state.position == view.panels[1].state.position == expected
    for panel in view.panels:   # zoomed in on the lesion, in both panels: the lesion in the middle
        box, slice_view = panel.mpr.views["axial"].view_box, panel.mpr.views["axial"]
        (x0, x1), (y0, y1) = box.viewRange()
        canonical = slice_view.scan.to_canonical(lost.centre_index)
        row_mm, col_mm = slice_view.pixel_mm()
        assert min(x1 - x0, y1 - y0) <= 75.0
        assert x0 < (canonical[2] + 0.5) * col_mm < x1 and y0 < (canonical[1] + 0.5) * row_mm < y1


@pytest.mark.timeout(300)
def test_comparing_two_variants_on_the_demo_eval_split_end_to_end(qtbot, job_manager, demo_tiny, tmp_path):
    """Real models through the compute process, findings cache, assembly, and the view; screenshots."""
    from app.compare import CompareService
    from app.compute import ComputeClient
    from app.core.findings_cache import FindingsCache
    from tests.compression.compare_fixtures import original_and_degraded

    models = [str(p) for p in original_and_degraded(tmp_path / "models")]
    compute = ComputeClient()
    service = CompareService(job_manager, compute, cache=FindingsCache(tmp_path / "cache"))
    view = CompareView()
    qtbot.addWidget(view)
    connect_compare(view, service)
    view.resize(1400, 900)
    view.show()
    try:
        view.set_models(models)                       # what the user picks in the setup row
        view.data_edit.setText(str(demo_tiny))
        with qtbot.waitSignals([service.comparison_ready, service.case_ready], timeout=240_000):
            qtbot.mouseClick(view.compare_button, Qt.MouseButton.LeftButton)
        assert len(view.panels) == 2 and view.disagreement_table.rowCount() == len(service.run.all_disagreements())
        assert view.disagreement_table.rowCount() > 0
        view.disagreement_table.cellClicked.emit(0, 0)   # the most serious one
        case_index, centre = view.locations[0]
        assert view.panels[1].state.position == tuple(int(round(c)) for c in centre)
        qtbot.wait(200)
        save_screenshot(view, "compare_two_variants.png")
        view.tabs.setCurrentIndex(1)
        save_screenshot(view, "compare_accuracy.png")
        view.tabs.setCurrentIndex(2)
        qtbot.wait(100)
        save_screenshot(view, "compare_charts.png")
        with qtbot.waitSignal(service.exported, timeout=120_000):   # the toolbar's Report… intent
            view.report_requested.emit(str(tmp_path / "out" / "comparison.html"), str(tmp_path / "out" / "c.pdf"))
        with qtbot.waitSignal(service.exported, timeout=120_000):   # and its DICOM SEG… intent
            view.seg_requested.emit(str(tmp_path / "seg"))
        assert (tmp_path / "out" / "comparison.html").is_file() and (tmp_path / "out" / "c.pdf").is_file()
        assert len(list((tmp_path / "seg").glob("*.seg.dcm"))) == 2
    finally:
        compute.close()


def test_tools_menu_opens_the_compare_view_with_the_open_models(qtbot, tmp_path):
    from widgets.application import create_main_window
    from tests.compression.compare_fixtures import original_and_degraded

    window = create_main_window()
    qtbot.addWidget(window)
    models = [str(p) for p in original_and_degraded(tmp_path)]
    window.workspace.show_compare(models)
    view = window.central.currentWidget()
    assert isinstance(view, CompareView) and view.model_paths() == models
    window.action_compare.trigger()                 # the menu again: the same view, not a second one
    assert window.central.currentWidget() is view
    window.session.close()


def test_a_disagreement_on_another_case_opens_that_case_then_jumps(view, qtbot):
    first, second = _case_view(2), _case_view(2)
    second.case_index = 1
    lost = lesion_table(second.labels[0], second.volume)[1]
    table = Table("list", ["#", "Case"], [["1", "Case 2"]])
    chart = ChartSeries("c", ["Case 1"], {"a": [1.0]}, "Dice")
    view.set_variants(["original 1.0", "pruned 1.0"])
    view.set_cases(["Case 1", "Case 2"])
    view.show_case(first)
    view.show_summary(ViewSummary([table] * 3, [chart] * 4, table, [(1, lost.centre_index)], ["missed"], ""))
    with qtbot.waitSignal(view.case_requested) as asked:
        view.disagreement_table.cellClicked.emit(0, 0)
    assert asked.args == [1]
    view.show_case(second)                         # what the service answers
    assert view.current_case == 1 and view.case_box.currentIndex() == 1
    assert view.panels[1].state.position == tuple(int(round(c)) for c in lost.centre_index)


@pytest.mark.timeout(300)
def test_stopping_a_comparison_cancels_its_runs_and_says_so(qtbot, job_manager, demo_tiny, tmp_path):
    from app.compare import CompareService
    from app.compute import ComputeClient
    from app.core.findings_cache import FindingsCache
    from tests.compression.compare_fixtures import original_and_degraded

    compute = ComputeClient()
    service = CompareService(job_manager, compute, cache=FindingsCache(tmp_path / "cache"))
    view = CompareView()
    qtbot.addWidget(view)
    connect_compare(view, service)
    finished = []
    service.comparison_ready.connect(lambda *_: finished.append(True))
    try:
        with qtbot.waitSignal(service.variants_ready, timeout=120_000):   # cases loaded, runs queued
            service.compare([str(p) for p in original_and_degraded(tmp_path / "m")], str(demo_tiny), "train")
        with qtbot.waitSignal(service.status, timeout=120_000,
                              check_params_cb=lambda text: "stopped: cancelled" in text):
            qtbot.mouseClick(view.cancel_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: job_manager.active_count() == 0, timeout=120_000)
        assert not finished and service.run is None
    finally:
        compute.close()
