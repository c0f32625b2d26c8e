"""The series browser: Patient → Study → Series, with thumbnails and the files that could not be read.

Thumbnails are read in a background job (never on the UI thread) and arrive one by one.
"""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import QLabel, QSplitter, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from app.core.display import dicom_date
from app.core.progress import Progress

THUMB_SIZE = 64
ENTRY_ROLE = Qt.ItemDataRole.UserRole
# One column, two lines per series, as radiology study browsers do: a dock is narrow, and four
# squeezed columns elide the one thing a reader looks for, the series description.
COLUMNS = ["Series"]


def series_thumbnails(series_list, size: int = THUMB_SIZE):
    """Job: one thumbnail per series, yielded as Progress(data=(key, uint8 image)) as it is read."""
    from app.core.dicom_load import series_thumbnail

    for n, series in enumerate(series_list):
        try:
            thumb = series_thumbnail(series, size)
        except Exception:  # noqa: BLE001 - a thumbnail that cannot be read is left blank
            thumb = None
        yield Progress((n + 1) / max(len(series_list), 1), f"thumbnail {n + 1}/{len(series_list)}",
                       (series.key, thumb))
    return len(series_list)


def series_details(series) -> str:
    """Second line of a series row: 'CT · 139 images · 2023-07-01'."""
    count = f"{series.n_images} image{'s' if series.n_images != 1 else ''}"
    return " · ".join(p for p in (series.modality, count, dicom_date(series.date)) if p)


def thumbnail_icon(thumb: np.ndarray) -> QIcon:
    grey = np.ascontiguousarray(thumb, dtype=np.uint8)
    if grey.ndim == 3:
        grey = np.ascontiguousarray(grey[..., 0])
    h, w = grey.shape
    image = QImage(grey.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
    return QIcon(QPixmap.fromImage(image))


class SeriesBrowser(QWidget):
    """Tree of the index; double-click (or Enter) on a series emits ``series_activated(SeriesEntry)``."""

    series_activated = Signal(object)

    def __init__(self, job_manager=None, parent=None):
        super().__init__(parent)
        self.job_manager = job_manager
        self.index = None
        self._items: dict[str, QTreeWidgetItem] = {}
        self._thumb_job = None
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(COLUMNS)
        self.tree.setHeaderHidden(True)
        self.tree.setIconSize(QSize(THUMB_SIZE, THUMB_SIZE))
        self.tree.setUniformRowHeights(False)
        self.tree.itemActivated.connect(self._on_activated)
        self.problems_title = QLabel("Files that could not be read")
        self.problems = QTreeWidget()
        self.problems.setHeaderLabels(["File", "Reason"])
        self.problems.setRootIsDecorated(False)
        bottom = QWidget()
        bottom_layout = QVBoxLayout(bottom)
        bottom_layout.setContentsMargins(0, 0, 0, 0)
        bottom_layout.addWidget(self.problems_title)
        bottom_layout.addWidget(self.problems)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.tree)
        splitter.addWidget(bottom)
        splitter.setSizes([500, 120])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(splitter)
        if job_manager is not None:
            job_manager.progress.connect(self._on_thumbnail)

    # --- filling --------------------------------------------------------------------------
    def set_index(self, index) -> None:
        """Show a DicomIndex: its patients, studies and series, and its problems."""
        self.index = index
        self.tree.clear()
        self._items.clear()
        for patient in index.patients:
            self._add_patient(patient)
        self.tree.expandAll()
        self._show_problems(index.problems)
        self._start_thumbnails([s for s in index.all_series() if s.kind == "image"])

    def _add_patient(self, patient) -> None:
        name = str(patient.patient_name or "").replace("^", " ").strip() or "(no name)"
        item = QTreeWidgetItem([f"{name}  [{patient.patient_id}]"])
        self.tree.addTopLevelItem(item)
        for study in patient.studies:
            study_item = QTreeWidgetItem([" · ".join(p for p in (dicom_date(study.date), study.description) if p)
                                          or "(study)"])
            item.addChild(study_item)
            for series in study.series:
                study_item.addChild(self._series_item(series))

    def _series_item(self, series) -> QTreeWidgetItem:
        number = "" if series.number in (None, "") else f"{series.number}: "
        kind = "" if series.kind == "image" else f"  [{series.kind}]"
        item = QTreeWidgetItem([f"{number}{series.description or '(no description)'}{kind}\n"
                                f"{series_details(series)}"])
        item.setData(0, ENTRY_ROLE, series)
        item.setToolTip(0, f"{series.description}\n{series.rows}×{series.columns}, {series.n_images} images"
                           f"\n{series.series_uid}")
        self._items[series.key] = item
        return item

    def _show_problems(self, problems) -> None:
        """Broken DICOM files first; files that are not DICOM at all (reports, masks, notes)
        grouped and folded away, so a clean folder with a CSV in it does not look broken."""
        self.problems.clear()
        broken = [p for p in problems if not p.not_dicom]
        skipped = [p for p in problems if p.not_dicom]
        for problem in broken:
            self.problems.addTopLevelItem(QTreeWidgetItem([str(problem.path), str(problem.reason)]))
        if skipped:
            group = QTreeWidgetItem([f"{len(skipped)} non-DICOM file(s) skipped", "not DICOM"])
            group.addChildren([QTreeWidgetItem([str(p.path), str(p.reason)]) for p in skipped])
            self.problems.addTopLevelItem(group)
        title = f"Files that could not be read ({len(broken)})"
        self.problems_title.setText(title + (f" · {len(skipped)} non-DICOM skipped" if skipped else ""))
        self.problems.setRootIsDecorated(bool(skipped))
        self.problems.resizeColumnToContents(0)

    # --- thumbnails, from a background job -------------------------------------------------------
    def _start_thumbnails(self, series_list) -> None:
        if self.job_manager is None or not series_list:
            return
        self._thumb_job = self.job_manager.submit("Series thumbnails", series_thumbnails, series_list,
                                                  owner="series-browser-thumbnails")

    def _on_thumbnail(self, job_id: int, fraction, message: str, data) -> None:
        if self._thumb_job is None or job_id != self._thumb_job.job_id or not data:
            return
        key, thumb = data
        item = self._items.get(key)
        if item is not None and thumb is not None:
            item.setIcon(0, thumbnail_icon(thumb))

    # --- choosing ------------------------------------------------------------------------------
    def series_item(self, key: str) -> QTreeWidgetItem | None:
        return self._items.get(key)

    def _on_activated(self, item: QTreeWidgetItem, column: int) -> None:
        series = item.data(0, ENTRY_ROLE)
        if series is not None:
            self.series_activated.emit(series)
