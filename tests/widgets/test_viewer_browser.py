"""The series browser on a real index of real DICOM files (the demo generator's): tree, SEG
marked, thumbnails from a background job, double-click, problems; and a series opened from it
into the viewer while it loads progressively."""
from __future__ import annotations

import shutil

import numpy as np
from PySide6.QtCore import Qt

from app.core.progress import run_to_end
from widgets.viewer import SeriesBrowser, ViewerPanel


def _index(path):
    from app.core.dicom_index import index_path

    return run_to_end(index_path(str(path)))


def _browser(qtbot, job_manager, index) -> SeriesBrowser:
    browser = SeriesBrowser(job_manager)
    qtbot.addWidget(browser)
    browser.resize(600, 500)
    browser.show()
    qtbot.waitExposed(browser)
    browser.set_index(index)
    return browser


def _double_click(qtbot, browser: SeriesBrowser, series) -> object:
    item = browser.series_item(series.key)
    browser.tree.scrollToItem(item)
    rect = browser.tree.visualItemRect(item)
    with qtbot.waitSignal(browser.series_activated, timeout=5000) as signal:
        # a real double-click starts with a press; QTest's mouseDClick alone sends no press
        qtbot.mouseClick(browser.tree.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
        qtbot.mouseDClick(browser.tree.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    return signal.args[0]


def test_tree_lists_patients_studies_series_and_double_click_emits_the_series(qtbot, job_manager, demo_tiny):
    index = _index(demo_tiny)
    browser = _browser(qtbot, job_manager, index)
    assert browser.tree.topLevelItemCount() == len(index.patients) == 3
    images = index.image_series()
    assert len(images) == 3
    for series in images:
        item = browser.series_item(series.key)
        assert item.text(0).split("\n")[1].startswith(f"CT · {series.n_images} images")
    segs = [s for s in index.all_series() if s.kind == "SEG"]
    assert segs and all("[SEG]" in browser.series_item(s.key).text(0) for s in segs)
    patient = browser.tree.topLevelItem(0)
    assert index.patients[0].patient_id in patient.text(0) and "^" not in patient.text(0)
    study_text = patient.child(0).text(0)
    assert study_text[4] == "-" and study_text[7] == "-"  # the study date as YYYY-MM-DD
    chosen = images[1]
    assert _double_click(qtbot, browser, chosen).series_uid == chosen.series_uid
    # thumbnails arrive from the background job, not from the UI thread
    qtbot.waitUntil(lambda: all(not browser.series_item(s.key).icon(0).isNull() for s in images), timeout=20_000)


def test_unreadable_files_are_listed_with_their_reason(qtbot, job_manager, demo_tiny, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(demo_tiny / "CASE001" / "CT", case / "CT")
    (case / "CT" / "broken.dcm").write_bytes(b"DICM but not really" * 10)
    (case / "notes.txt").write_text("referral letter")
    index = _index(case)
    browser = _browser(qtbot, job_manager, index)
    broken = [p for p in index.problems if not p.not_dicom]
    assert [p.path for p in index.problems if p.not_dicom] == [str(case / "notes.txt")]
    top = [browser.problems.topLevelItem(n) for n in range(browser.problems.topLevelItemCount())]
    files = [item.text(0) for item in top if item.childCount() == 0]
    assert len(files) == len(broken) >= 1 and any(f.endswith("broken.dcm") for f in files)
    assert all(item.text(1) for item in top)
    group = next(item for item in top if item.childCount())
    assert group.child(0).text(0).endswith("notes.txt") and "not a DICOM file" in group.child(0).text(1)
    assert browser.problems_title.text().startswith(f"Files that could not be read ({len(broken)})")
    assert "1 non-DICOM skipped" in browser.problems_title.text()


def test_a_series_opened_from_the_browser_is_shown_while_it_loads(qtbot, job_manager, demo_tiny):
    from app.core.dicom_load import open_series

    index = _index(demo_tiny)
    browser = _browser(qtbot, job_manager, index)
    panel = ViewerPanel()
    qtbot.addWidget(panel)
    panel.resize(1200, 500)
    panel.show()
    series = _double_click(qtbot, browser, index.image_series()[0])
    loader = open_series(series)
    panel.set_volume(loader.volume, loader.first_slice)
    refreshed, load = [], {}

    def on_progress(job_id, fraction, message, data):
        if job_id == load["job"].job_id and data is not None:  # the thumbnail job reports too
            refreshed.append(data)
            panel.refresh_slices(*data)

    job_manager.progress.connect(on_progress)
    with qtbot.waitSignal(job_manager.finished, timeout=30_000,
                          check_params_cb=lambda job_id, result: job_id == load["job"].job_id):
        load["job"] = job_manager.submit("Load slices", loader.fill)
    volume = loader.volume
    assert refreshed and volume.is_complete
    axial = panel.mpr.views["axial"]
    assert not axial.annotations.loading.isVisible()
    k = panel.state.position[0]
    expected = panel.mpr.views["axial"].image_item.image
    assert expected.shape == volume.shape[1:] and expected.any()
    assert np.count_nonzero(volume.voxels[k]) > 0


def test_demo_case_seg_overlay_and_lesion_click_on_real_data(qtbot, demo_tiny):
    """The demo generator's CT with its DICOM SEG: the overlay colour lands exactly on the mask,
    and clicking a lesion in the list takes the views to it."""
    from app.core.dicom_load import load_series
    from app.core.lesions import lesion_table
    from app.core.masks import load_seg
    from tests.widgets.viewer_support import device_point, grab_rgb, is_red, pixel_centre_mm

    index = _index(demo_tiny / "CASE001")
    volume = run_to_end(load_series(index.image_series()[0]))
    labels, _ = load_seg(str(demo_tiny / "CASE001" / "seg.dcm"), volume)
    lesions = lesion_table(labels, volume)
    assert lesions, "the demo case has nodules"
    panel = ViewerPanel()
    qtbot.addWidget(panel)
    panel.resize(1400, 700)
    panel.show()
    qtbot.waitExposed(panel)
    panel.set_volume(volume)
    panel.add_label_overlay("ground truth", labels, {1: (255, 0, 0)}, source="SEG")
    panel.overlay_state.update_label("ground truth", opacity=1.0)
    panel.overlay_state.set_show_markers(False)
    panel.state.set_crosshair(False)
    panel.set_lesions(lesions, source="SEG")
    table = panel.lesion_list.table
    rect = table.visualRect(panel.lesion_list.proxy.index(panel.lesion_list.row_of(lesions[0].lesion_id), 0))
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    k = int(round(lesions[0].centre_index[0]))
    assert panel.state.position[0] == k
    axial = panel.mpr.views["axial"]
    shown = axial.scan.canonical.shape
    truth = axial.label_layers["ground truth"].labels[axial.slice_index] > 0  # as the view orients it
    rgb = grab_rgb(axial)
    rows, cols = np.nonzero(truth)
    region = [(r, c) for r in range(max(0, rows.min() - 2), min(shown[1], rows.max() + 3))
              for c in range(max(0, cols.min() - 2), min(shown[2], cols.max() + 3))]
    red = [bool(is_red(rgb[p.y(), p.x()])) for p in (device_point(axial, *pixel_centre_mm(axial, r, c))
                                                   for r, c in region)]
    assert red == [bool(truth[r, c]) for r, c in region]
