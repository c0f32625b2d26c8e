"""The Jobs dock: every job with its progress, status, a cancel button and, on failure, the error."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QDockWidget, QHBoxLayout, QLabel, QMessageBox, QProgressBar,
                               QPushButton, QScrollArea, QSizePolicy, QVBoxLayout, QWidget)

from app.jobs import JobManager, JobRecord, JobState

_STATE_TEXT = {
    JobState.QUEUED: "waiting",
    JobState.RUNNING: "running",
    JobState.FINISHED: "done",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


class JobRow(QWidget):
    """One job: name, status, progress bar, Cancel; a failed job shows its message and Details."""

    def __init__(self, manager: JobManager, job_id: int, parent: QWidget | None = None):
        super().__init__(parent)
        self._manager, self.job_id = manager, job_id
        self.name_label = QLabel()
        self.status_label = QLabel()
        self.status_label.setMinimumWidth(70)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setMaximumHeight(14)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(lambda: manager.cancel(job_id))
        self.error_label = QLabel()
        self.error_label.setStyleSheet("color: #c0392b;")
        self.error_label.setWordWrap(True)
        self.details_button = QPushButton("Details…")
        self.details_button.clicked.connect(self.show_details)
        self._layout()
        self.refresh()

    def _layout(self) -> None:
        top = QHBoxLayout()
        top.addWidget(self.name_label, 2)
        top.addWidget(self.progress_bar, 3)
        top.addWidget(self.status_label)
        top.addWidget(self.cancel_button)
        bottom = QHBoxLayout()
        bottom.addWidget(self.error_label, 1)
        bottom.addWidget(self.details_button)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(6, 2, 6, 2)
        outer.addLayout(top)
        outer.addLayout(bottom)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)

    def refresh(self) -> None:
        rec: JobRecord = self._manager.record(self.job_id)
        self.name_label.setText(rec.name)
        status = _STATE_TEXT[rec.state]
        if rec.state is JobState.RUNNING and rec.message:
            status = rec.message
        self.status_label.setText(status)
        self.status_label.setToolTip(rec.message)
        if rec.fraction is None and rec.state is JobState.RUNNING:
            self.progress_bar.setRange(0, 0)   # busy indicator: amount of work unknown
        else:
            self.progress_bar.setRange(0, 1000)
            self.progress_bar.setValue(int(1000 * (rec.fraction or 0.0)))
        self.cancel_button.setEnabled(not rec.state.is_final)
        failed = rec.state is JobState.FAILED
        self.error_label.setVisible(failed)
        self.details_button.setVisible(failed)
        self.error_label.setText(rec.error)

    def show_details(self) -> None:
        rec = self._manager.record(self.job_id)
        box = QMessageBox(QMessageBox.Icon.Warning, f"{rec.name} failed", rec.error, parent=self)
        box.setDetailedText(rec.detail)
        box.open()


class JobPanel(QDockWidget):
    def __init__(self, manager: JobManager, parent: QWidget | None = None):
        super().__init__("Jobs", parent)
        self.setObjectName("JobPanel")
        self._manager = manager
        self.rows: dict[int, JobRow] = {}
        self._list = QVBoxLayout()
        self._list.setAlignment(Qt.AlignmentFlag.AlignTop)
        self._empty = QLabel("No jobs yet. Long operations (loading, inference, compression) appear here.")
        self._empty.setStyleSheet("color: gray;")
        self._list.addWidget(self._empty)
        clear = QPushButton("Clear finished")
        clear.clicked.connect(self.clear_finished)
        body = QWidget()
        body.setLayout(self._list)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)
        outer = QWidget()
        layout = QVBoxLayout(outer)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)
        layout.addWidget(clear, 0, Qt.AlignmentFlag.AlignRight)
        outer.setMinimumHeight(100)
        self.setWidget(outer)
        manager.added.connect(self._add_row)
        manager.changed.connect(self._refresh_row)

    def _add_row(self, job_id: int) -> None:
        self._empty.hide()
        row = JobRow(self._manager, job_id)
        self.rows[job_id] = row
        self._list.insertWidget(0, row)   # newest first

    def _refresh_row(self, job_id: int) -> None:
        row = self.rows.get(job_id)
        if row is not None:
            row.refresh()

    def clear_finished(self) -> None:
        for job_id, row in list(self.rows.items()):
            if self._manager.record(job_id).state in (JobState.FINISHED, JobState.CANCELLED):
                self._list.removeWidget(row)
                row.deleteLater()
                del self.rows[job_id]
        self._empty.setVisible(not self.rows)
