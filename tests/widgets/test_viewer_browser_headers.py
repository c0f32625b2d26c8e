"""The series browser's tree from real DICOM headers (read here with pydicom), independent of the
indexer: patient → study → series rows, non-image series marked, double-click, problems list."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import Qt

from widgets.viewer import SeriesBrowser


@dataclass
class Series:  # the fields of app.core.dicom_index.SeriesEntry the browser reads
    key: str
    series_uid: str
    modality: str
    description: str
    date: str
    number: int | None
    kind: str
    files: list
    n_images: int
    rows: int
    columns: int


@dataclass
class Study:
    study_uid: str
    date: str
    description: str
    series: list = field(default_factory=list)


@dataclass
class Patient:
    patient_id: str
    patient_name: str
    studies: list = field(default_factory=list)


@dataclass
class Problem:
    path: str
    reason: str


@dataclass
class Index:
    patients: list
    problems: list

    def all_series(self):
        return [s for p in self.patients for st in p.studies for s in st.series]


def _index_from_headers(case_dir: Path) -> Index:
    import pydicom

    ct_files = sorted((case_dir / "CT").glob("*.dcm"))
    first = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    seg = pydicom.dcmread(case_dir / "seg.dcm", stop_before_pixels=True)
    series = [Series(str(ds.SeriesInstanceUID), str(ds.SeriesInstanceUID), ds.Modality,
                     str(ds.get("SeriesDescription", "")), str(ds.get("SeriesDate", "")),
                     ds.get("SeriesNumber"), kind, files, len(files), int(ds.get("Rows", 0)),
                     int(ds.get("Columns", 0)))
              for ds, kind, files in ((first, "image", ct_files), (seg, "SEG", [case_dir / "seg.dcm"]))]
    study = Study(str(first.StudyInstanceUID), str(first.get("StudyDate", "")),
                  str(first.get("StudyDescription", "")), series)
    patient = Patient(str(first.PatientID), str(first.PatientName), [study])
    return Index([patient], [Problem(str(case_dir / "notes.txt"), "not a DICOM file")])


def test_tree_from_real_headers_and_double_click(qtbot, demo_tiny):
    index = _index_from_headers(demo_tiny / "CASE002")
    browser = SeriesBrowser(job_manager=None)
    qtbot.addWidget(browser)
    browser.resize(600, 500)
    browser.show()
    browser.set_index(index)
    ct, seg = index.all_series()
    ct_item, seg_item = browser.series_item(ct.key), browser.series_item(seg.key)
    title, details = ct_item.text(0).split("\n")
    assert ct.description in title and details.startswith(f"CT · {ct.n_images} images") and ct.n_images == 32
    assert "[SEG]" in seg_item.text(0) and "SEG · 1 image" in seg_item.text(0)
    patient = browser.tree.topLevelItem(0)
    assert index.patients[0].patient_id in patient.text(0) and "^" not in patient.text(0)
    study = patient.child(0)
    assert study.childCount() == 2 and study.text(0)[4] == "-" and study.text(0)[7] == "-"  # YYYY-MM-DD
    rect = browser.tree.visualItemRect(ct_item)
    with qtbot.waitSignal(browser.series_activated) as signal:
        # a real double-click starts with a press; QTest's mouseDClick alone sends no press
        qtbot.mouseClick(browser.tree.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
        qtbot.mouseDClick(browser.tree.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert signal.args[0] is ct
    assert browser.problems.topLevelItem(0).text(1) == "not a DICOM file"
    assert browser.problems_title.text().endswith("(1)")
