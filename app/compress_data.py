"""What the wizard's Data page shows: the scans a compression run would use, counted per split.

A manifest is read as it is; a folder is examined first (DICOM headers only, no pixels) and
split by patient with the user's proportions and seed, exactly as the compression job will
split it. Per split: patients, series, slices and lesions; then every problem the run would
hit (a label map that matches no series, a missing file), and a warning when the eval split
is too small for a verdict. Qt-free: it runs as a job, in a thread or a child process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator, Mapping

from app.core.manifest import (Case, Manifest, SPLITS, check_manifest, is_label_file,
                               labels_beside, manifest_from_index, read_manifest)
from app.core.progress import Progress, run_to_end

# compression.evaluate's evidence rule: below these a verdict reads "insufficient evidence"
MIN_EVAL_CASES = 30
MIN_LARGE_LESIONS = 50


@dataclass
class SplitCounts:
    patients: int = 0
    series: int = 0
    slices: int = 0
    lesions: int = 0
    labelled: int = 0   # series with a label map


@dataclass
class DataSurvey:
    splits: dict[str, SplitCounts] = field(default_factory=lambda: {s: SplitCounts() for s in SPLITS})
    problems: list[str] = field(default_factory=list)   # the run cannot start until fixed
    warnings: list[str] = field(default_factory=list)   # it can, but the user should know
    manifest: Manifest | None = None

    @property
    def usable(self) -> bool:
        return not self.problems and self.manifest is not None


@dataclass(frozen=True)
class FoundSeries:
    folder: Path
    patient: str
    slices: int
    shape: tuple[int, int, int]   # (slices, rows, columns)


# ---------------------------------------------------------------- a folder of scans


def find_series(folder: Path) -> Generator[Progress, None, list[FoundSeries]]:
    """Image series under ``folder`` from the shared DICOM index (headers only)."""
    from app.core.dicom_index import index_path

    index = yield from index_path(folder)
    return _found_series(index)


def _found_series(index) -> list[FoundSeries]:
    return [FoundSeries(Path(s.files[0]).parent, s.patient_id or Path(s.files[0]).parent.name, s.n_images,
                        (s.n_images, s.rows, s.columns)) for s in index.image_series() if s.files]


def labels_for(series: FoundSeries, root: Path) -> Path | None:
    """The label map beside a series (its folder or the case folder above it)."""
    return labels_beside(series.folder, root)


def orphan_labels(root: Path, series: list[FoundSeries]) -> list[Path]:
    """Label maps under ``root`` that sit beside no series: they would be silently ignored."""
    near = {s.folder for s in series} | {s.folder.parent for s in series}
    return sorted(p for p in root.rglob("*") if p.is_file() and is_label_file(p) and p.parent not in near)


def manifest_from_folder(folder: str | os.PathLike, proportions: Mapping[str, float],
                         seed: int) -> Generator[Progress, None, tuple[Manifest, list[FoundSeries]]]:
    from app.core.dicom_index import index_path

    root = Path(folder)
    index = yield from index_path(root)
    return manifest_from_index(index, root, proportions, seed), _found_series(index)


# ---------------------------------------------------------------- counting


def label_shape_and_lesions(path: Path) -> tuple[tuple[int, int, int], int]:
    """(slices, rows, columns) of a label map and its number of lesions (connected components)."""
    import SimpleITK as sitk
    from app.core.lesions import label_instances

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    _instances, count = label_instances(array > 0)
    return tuple(int(n) for n in array.shape), int(count)


def _series_shape(manifest: Manifest, case: Case, known: dict[Path, FoundSeries]) -> FoundSeries | None:
    path = manifest.series_path(case)
    if path is None or not path.exists():
        return None
    if path.resolve() in known:
        return known[path.resolve()]
    found = run_to_end(find_series(path)) if path.is_dir() else []
    return found[0] if found else None


def _count_case(manifest: Manifest, case: Case, counts: SplitCounts, survey: DataSurvey,
                known: dict[Path, FoundSeries]) -> None:
    series = _series_shape(manifest, case, known)
    counts.series += 1
    if series is None:
        if manifest.series_path(case) is not None and manifest.series_path(case).exists():
            survey.problems.append(f"case {case.case}: no DICOM image series in {manifest.series_path(case)}")
        return
    counts.slices += series.slices
    labels = manifest.labels_path(case)
    if labels is None or not labels.is_file():
        return
    try:
        shape, lesions = label_shape_and_lesions(labels)
    except Exception as exc:   # an unreadable label map is a problem of that case, not a crash
        survey.problems.append(f"case {case.case}: cannot read label map {labels.name} ({exc})")
        return
    if shape != series.shape:
        survey.problems.append(f"case {case.case}: labels {labels.name} {shape} match no series — "
                               f"its series {series.folder.name} is {series.shape} (slices, rows, columns)")
        return
    counts.labelled += 1
    counts.lesions += lesions


def _evidence_warning(survey: DataSurvey) -> None:
    evaluation = survey.splits["eval"]
    if evaluation.series == 0:
        survey.problems.append("The eval split is empty: there is nothing to judge the variants on.")
    elif evaluation.series < MIN_EVAL_CASES and evaluation.lesions < MIN_LARGE_LESIONS:
        survey.warnings.append(
            f"Only {evaluation.series} eval case(s) and {evaluation.lesions} lesion(s): too few for a verdict "
            f"(needs {MIN_EVAL_CASES} cases or {MIN_LARGE_LESIONS} lesions); results will say "
            "'insufficient evidence' beside the point estimates.")
    if survey.splits["calib"].series + survey.splits["train"].series == 0:
        survey.warnings.append("No calib or train scans: int8 calibration and fine-tuning have nothing to learn from.")


def survey_data(manifest_path: str = "", folder: str = "", proportions: Mapping[str, float] | None = None,
                seed: int = 0) -> Generator[Progress, None, DataSurvey]:
    """Count what a run would use; a job body (yields progress, returns a DataSurvey)."""
    survey = DataSurvey()
    yield Progress(None, "examining the data")
    manifest, known = yield from _open(manifest_path, folder, proportions or {}, seed, survey)
    if manifest is None:
        return survey
    survey.manifest = manifest
    survey.problems += check_manifest(manifest)
    patients: dict[str, set] = {s: set() for s in SPLITS}
    for number, case in enumerate(manifest.cases, 1):
        if case.split in survey.splits:
            patients[case.split].add(case.patient)
            _count_case(manifest, case, survey.splits[case.split], survey, known)
        yield Progress(number / len(manifest.cases), f"counted case {case.case}")
    for split, people in patients.items():
        survey.splits[split].patients = len(people)
    _evidence_warning(survey)
    return survey


def _open(manifest_path: str, folder: str, proportions, seed: int, survey: DataSurvey):
    if manifest_path:
        try:
            return read_manifest(manifest_path), {}
        except (OSError, ValueError) as exc:
            survey.problems.append(f"Cannot read the manifest: {exc}")
            return None, {}
    root = Path(folder)
    if not root.is_dir():
        survey.problems.append(f"The data folder {root} does not exist.")
        return None, {}
    manifest, series = yield from manifest_from_folder(root, proportions, seed)
    for orphan in orphan_labels(root, series):
        survey.problems.append(f"labels {orphan.relative_to(root)} match no series: no DICOM series beside them")
    if not series:
        survey.problems.append(f"The data folder {root} holds no DICOM image series.")
        return None, {}
    return manifest, {s.folder.resolve(): s for s in series}


def open_data(manifest_path: str = "", folder: str = "", proportions: Mapping[str, float] | None = None,
              seed: int = 0) -> Manifest:
    """The manifest a run uses (folder split exactly as the Data page showed it)."""
    if manifest_path:
        return read_manifest(manifest_path)
    manifest, _series = run_to_end(manifest_from_folder(Path(folder), proportions or {}, seed))
    if not manifest.cases:
        raise ValueError(f"The data folder {folder} holds no DICOM image series.")
    return manifest
