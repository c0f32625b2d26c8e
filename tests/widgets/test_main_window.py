"""The main window, its menus, the Jobs dock and the research-use notice, on a real display."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QMessageBox

from app.jobs import JobState
from tests.app import job_bodies
from widgets.main_window import RESEARCH_NOTICE, MainWindow

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"


def _window(qtbot, job_manager) -> MainWindow:
    window = MainWindow(job_manager)
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    return window


def _grab_array(widget) -> np.ndarray:
    """RGB pixels of a widget as it is drawn, copied out of the QImage (which is freed after)."""
    image = widget.grab().toImage().convertToFormat(QImage.Format.Format_RGB888)
    rows = np.frombuffer(image.constBits(), dtype=np.uint8, count=image.sizeInBytes())
    rows = rows.reshape(image.height(), image.bytesPerLine())[:, : image.width() * 3]
    return rows.reshape(image.height(), image.width(), 3).copy()


def test_window_opens_with_menus_notice_and_job_panel(qtbot, job_manager):
    window = _window(qtbot, job_manager)
    menus = [a.text().replace("&", "") for a in window.menuBar().actions()]
    assert menus == ["File", "Tools", "View", "Help"]
    file_items = [a.text().replace("&", "") for a in window.menuBar().actions()[0].menu().actions()]
    assert "Open DICOM folder…" in file_items and "Open model…" in file_items and "Recent" in file_items
    assert window.notice.text() == RESEARCH_NOTICE and window.notice.isVisible()
    assert window.job_panel.isVisible()


def test_screenshot_is_saved_and_not_blank(qtbot, job_manager):
    window = _window(qtbot, job_manager)
    with qtbot.waitSignal(job_manager.finished, timeout=10_000):
        job_manager.submit("Index demo folder", job_bodies.count_to, 4)
    job_manager.submit("Run model", job_bodies.fail_after, 1)
    qtbot.waitUntil(lambda: len(window.job_panel.rows) == 2
                    and job_manager.records()[-1].state is JobState.FAILED, timeout=10_000)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / "main_window.png"
    assert window.grab().save(str(path))
    pixels = _grab_array(window)
    assert pixels.std() > 10, "the window rendered as a flat colour"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    assert path.stat().st_size > 5_000


def test_job_panel_shows_progress_cancel_and_the_error_with_details(qtbot, job_manager):
    window = _window(qtbot, job_manager)
    running = job_manager.submit("Spin", job_bodies.endless)
    qtbot.waitUntil(lambda: running.state is JobState.RUNNING, timeout=10_000)
    row = window.job_panel.rows[running.job_id]
    assert row.cancel_button.isEnabled()
    with qtbot.waitSignal(job_manager.cancelled, timeout=10_000):
        row.cancel_button.click()
    qtbot.waitUntil(lambda: not row.cancel_button.isEnabled(), timeout=5_000)
    assert row.status_label.text() == "cancelled"

    with qtbot.waitSignal(job_manager.failed, timeout=10_000):
        failed = job_manager.submit("Load series", job_bodies.fail_after, 2)
    frow = window.job_panel.rows[failed.job_id]
    qtbot.waitUntil(lambda: frow.error_label.isVisible(), timeout=5_000)
    assert "at least 3 were needed" in frow.error_label.text()
    assert "Load series failed" in window.statusBar().currentMessage()
    frow.details_button.click()
    qtbot.waitUntil(lambda: window.job_panel.findChild(QMessageBox) is not None, timeout=5_000)
    box = window.job_panel.findChild(QMessageBox)
    assert "Traceback" in box.detailedText()
    box.close()


def test_about_lists_versions_from_metadata(qtbot, job_manager):
    window = _window(qtbot, job_manager)
    text = window.about_text()
    assert "Qt 6." in text and "torch " in text and "onnxruntime" in text
    assert RESEARCH_NOTICE in text


def test_closing_the_window_cancels_and_waits_for_jobs(qtbot, job_manager):
    window = _window(qtbot, job_manager)
    handle = job_manager.submit("Spin", job_bodies.endless)
    child = job_manager.submit("Spin in child", job_bodies.endless, in_process=True)
    qtbot.waitUntil(lambda: handle.state is JobState.RUNNING and child.state is JobState.RUNNING,
                    timeout=20_000)
    window.close()
    qtbot.waitUntil(lambda: handle.state.is_final and child.state.is_final, timeout=10_000)
    assert job_manager.active_count() == 0


def test_recent_paths_are_remembered(qtbot, job_manager, tmp_path):
    window = _window(qtbot, job_manager)
    with qtbot.waitSignal(window.open_path_requested, timeout=2_000) as blocker:
        window.open_path(str(tmp_path))
    assert blocker.args == [str(tmp_path)]
    window._fill_recent_menu()
    assert str(tmp_path.resolve()) in [a.text() for a in window.recent_menu.actions()]
