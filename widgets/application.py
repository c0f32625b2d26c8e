"""Start-up of the GUI process: one QApplication, one JobManager, one MainWindow."""
from __future__ import annotations

import gc
import sys

from PySide6.QtWidgets import QApplication

from app.jobs import JobManager
from app.process_jobs import sweep_stale_scratch
from widgets.main_window import MainWindow


def create_main_window(app: QApplication | None = None) -> MainWindow:
    """The window with its session wired in (``window.session``, ``window.workspace``)."""
    from app.session import Session
    from widgets.workspace import Workspace

    app = app or QApplication.instance() or QApplication(sys.argv)
    app.setApplicationName("MedCompress")
    sweep_stale_scratch()   # scratch folders a crashed session left behind
    jobs = JobManager(parent=app)
    window = MainWindow(jobs)
    window.session = Session(jobs, parent=window)
    window.workspace = Workspace(window, window.session)
    window.closing.connect(window.session.close)
    return window


def launch(path: str | None = None, demo: bool = False) -> int:
    app = QApplication.instance() or QApplication(sys.argv)
    window = create_main_window(app)
    window.show()
    # Start-up objects live for the whole session: keep them out of full GC passes, which
    # otherwise stall the UI thread for tens of milliseconds now and then.
    gc.freeze()
    if demo:
        window.session.open_demo()
    elif path:
        window.open_path(path)
    return app.exec()
