"""The main window: menus, the central viewer area, the Jobs dock and the research-use notice."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QFileDialog, QLabel, QMainWindow, QMessageBox, QStackedWidget,
                               QWidget)

from app.jobs import JobManager
from app.settings import recent_paths, remember_path
from app.versions import package_versions

RESEARCH_NOTICE = "Research use only — not for diagnosis"


class MainWindow(QMainWindow):
    open_path_requested = Signal(str)
    open_model_requested = Signal(str)
    compress_requested = Signal()
    compare_requested = Signal()
    closing = Signal()   # after jobs have stopped: services release what they hold

    def __init__(self, jobs: JobManager, parent: QWidget | None = None):
        super().__init__(parent)
        self.jobs = jobs
        self.execution_providers: list[str] = []   # filled in once the compute process reports
        self.setWindowTitle("MedCompress")
        self.resize(1400, 900)
        self.central = QStackedWidget()
        self.welcome = _welcome_page()
        self.central.addWidget(self.welcome)
        self.setCentralWidget(self.central)
        from widgets.job_panel import JobPanel
        self.job_panel = JobPanel(jobs, self)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.job_panel)
        self._build_status_bar()
        self._build_menus()
        jobs.failed.connect(self._report_failure)

    # -- building ---------------------------------------------------------------------------
    def _build_status_bar(self) -> None:
        self.notice = QLabel(RESEARCH_NOTICE)
        self.notice.setObjectName("ResearchNotice")
        self.notice.setStyleSheet(
            "QLabel { background: #7a4b00; color: white; font-weight: bold; padding: 2px 8px; }")
        self.statusBar().addPermanentWidget(self.notice)
        self.statusBar().showMessage("Ready. File → Open DICOM folder… to begin.")

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        self.action_open_folder = self._action("Open DICOM &folder…", self.choose_folder,
                                               QKeySequence.StandardKey.Open)
        self.action_open_file = self._action("Open DICOM file, DICOMDIR or &zip…", self.choose_file)
        self.action_open_model = self._action("Open &model…", self.choose_model, "Ctrl+M")
        file_menu.addActions([self.action_open_folder, self.action_open_file, self.action_open_model])
        self.recent_menu = file_menu.addMenu("&Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        file_menu.addSeparator()
        file_menu.addAction(self._action("&Quit", self.close, QKeySequence.StandardKey.Quit))
        tools = bar.addMenu("&Tools")
        self.action_compress = self._action("&Compress model…", self.compress_requested.emit)
        tools.addAction(self.action_compress)
        self.action_compare = self._action("C&ompare models…", self.compare_requested.emit)
        tools.addAction(self.action_compare)
        self.view_menu = bar.addMenu("&View")
        self.view_menu.addAction(self.job_panel.toggleViewAction())
        help_menu = bar.addMenu("&Help")
        self.help_menu = help_menu
        help_menu.addAction(self._action("&About MedCompress", self.show_about))

    def _action(self, text: str, slot, shortcut=None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(lambda _checked=False: slot())
        return action

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        paths = recent_paths()
        if not paths:
            self.recent_menu.addAction("(none yet)").setEnabled(False)
        for path in paths:
            self.recent_menu.addAction(path, lambda p=path: self.open_path(p))

    # -- intents -------------------------------------------------------------------------------
    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open DICOM folder")
        if folder:
            self.open_path(folder)

    def choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open DICOM file, DICOMDIR or zip", "", "DICOM (*.dcm DICOMDIR *.zip);;All files (*)")
        if path:
            self.open_path(path)

    def choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open model", "", "Model card or file (*.json *.onnx *.pt *.pth *.ts);;All files (*)")
        if path:
            self.open_model_requested.emit(path)

    def open_path(self, path: str) -> None:
        remember_path(str(Path(path).resolve()))
        self.statusBar().showMessage(f"Opening {path} …")
        self.open_path_requested.emit(path)

    def show_central(self, widget: QWidget) -> None:
        if self.central.indexOf(widget) < 0:
            self.central.addWidget(widget)
        self.central.setCurrentWidget(widget)

    def about_text(self) -> str:
        from PySide6 import QtCore
        versions = package_versions()
        lines = [f"<b>MedCompress</b> — {RESEARCH_NOTICE}.", "",
                 f"Qt {QtCore.qVersion()} (PySide6 {versions.get('PySide6-Essentials', '?')})"]
        for name in ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "monai", "pydicom",
                     "SimpleITK", "highdicom", "pyqtgraph", "numpy"):
            if name in versions:
                lines.append(f"{name} {versions[name]}")
        providers = ", ".join(self.execution_providers) or "not known yet (no model has run)"
        lines += ["", f"Execution providers: {providers}",
                  "No data leaves this machine: MedCompress makes no network calls."]
        return "<br>".join(lines)

    def show_about(self) -> None:
        QMessageBox.about(self, "About MedCompress", self.about_text())

    def _report_failure(self, job_id: int, message: str, _detail: str) -> None:
        name = self.jobs.record(job_id).name
        self.statusBar().showMessage(f"{name} failed: {message} (details in the Jobs panel)", 15_000)
        self.job_panel.show()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.statusBar().showMessage("Stopping jobs …")
        self.jobs.shutdown()
        self.closing.emit()
        super().closeEvent(event)


def _welcome_page() -> QWidget:
    label = QLabel(
        "<h2>MedCompress</h2>"
        "<p>Open a DICOM folder, DICOMDIR or zip (<b>File → Open DICOM folder…</b>),"
        " run a model on it, compress the model and compare the findings side by side.</p>"
        f"<p style='color:#b06000'><b>{RESEARCH_NOTICE}.</b></p>")
    label.setAlignment(Qt.AlignmentFlag.AlignCenter)
    label.setWordWrap(True)
    return label
