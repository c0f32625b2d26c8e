"""Data manifests: which scans make up a data set, and which part of it each one serves.

A manifest is a CSV with the columns ``case,patient,series,labels,split``:

- ``series``: a path relative to the manifest's folder (a DICOM series folder or file) or a
  SeriesInstanceUID;
- ``labels``: a path relative to the manifest's folder to a label map (NIfTI), or empty;
- ``split``: ``train`` and ``calib`` feed fine-tuning, distillation and calibration; ``eval``
  feeds every verdict.

Splits are made **by patient**, so no patient's scans can leak from the data a model was fitted
on into the data it is judged on; evaluation calls :func:`refuse_overlap` to make sure.
"""
from __future__ import annotations

import csv
import io
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from app.core.atomic import write_text_atomic

SPLITS = ("train", "calib", "eval")
COLUMNS = ("case", "patient", "series", "labels", "split")
DEFAULT_PROPORTIONS: Mapping[str, float] = {"train": 0.6, "calib": 0.2, "eval": 0.2}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


@dataclass(frozen=True)
class Case:
    case: str
    patient: str
    series: str  # path relative to the manifest's folder, or a SeriesInstanceUID
    labels: str = ""  # path relative to the manifest's folder, or "" when unlabelled
    split: str = "eval"

    @property
    def series_is_uid(self) -> bool:
        return bool(_UID.match(self.series))


@dataclass
class Manifest:
    cases: list[Case]
    root: Path = field(default_factory=Path)  # the folder relative paths start from

    def cases_in(self, split: str) -> list[Case]:
        return [c for c in self.cases if c.split == split]

    def series_path(self, case: Case) -> Path | None:
        """The series' location on disk, or None when the manifest names it by UID."""
        return None if case.series_is_uid else self.root / case.series

    def labels_path(self, case: Case) -> Path | None:
        return self.root / case.labels if case.labels else None


# ---------------------------------------------------------------------------- splitting


def _split_counts(n: int, proportions: Mapping[str, float]) -> dict[str, int]:
    """Patients per split: largest remainders, then at least one per wanted split if n allows."""
    wanted = {s: float(p) for s, p in proportions.items() if p > 0}
    total = sum(wanted.values())
    exact = {s: n * p / total for s, p in wanted.items()}
    counts = {s: int(v) for s, v in exact.items()}
    by_remainder = sorted(wanted, key=lambda s: (-(exact[s] - counts[s]), list(wanted).index(s)))
    for s in by_remainder[: n - sum(counts.values())]:
        counts[s] += 1
    for s in wanted:  # a split asked for but rounded to nothing borrows from the largest
        donor = max(counts, key=lambda d: counts[d])
        if counts[s] == 0 and counts[donor] > 1:
            counts[s], counts[donor] = 1, counts[donor] - 1
    return counts


def split_by_patient(patients: Sequence[str], proportions: Mapping[str, float] = DEFAULT_PROPORTIONS,
                     seed: int = 0) -> dict[str, str]:
    """Assign every distinct patient to exactly one split, reproducibly for a seed.

    The result depends only on the *set* of patients, the proportions and the seed (not on the
    order patients are given in). Each split with a positive proportion gets at least one
    patient when there are at least as many patients as such splits.
    """
    unknown = [s for s in proportions if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}; splits are {', '.join(SPLITS)}")
    if any(p < 0 for p in proportions.values()) or sum(proportions.values()) <= 0:
        raise ValueError("split proportions must be non-negative and not all zero")
    unique = sorted(set(patients))
    random.Random(seed).shuffle(unique)
    assignment, start = {}, 0
    for split, count in _split_counts(len(unique), proportions).items():
        for patient in unique[start:start + count]:
            assignment[patient] = split
        start += count
    return assignment


def build_manifest(records: Iterable[tuple[str, str, str, str]],
                   proportions: Mapping[str, float] = DEFAULT_PROPORTIONS, seed: int = 0,
                   root: str | os.PathLike = ".") -> Manifest:
    """A manifest from (case, patient, series, labels) records, split by patient with ``seed``."""
    records = list(records)
    splits = split_by_patient([r[1] for r in records], proportions, seed)
    cases = [Case(case, patient, series, labels or "", splits[patient])
             for case, patient, series, labels in records]
    return Manifest(cases=cases, root=Path(root))


LABEL_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def is_label_file(path: Path) -> bool:
    return path.name.lower().endswith(LABEL_SUFFIXES)


def labels_beside(series_dir: Path, root: Path) -> Path | None:
    """The label map of a series: in its folder or the case folder above it, the semantic map
    preferred over an instance map."""
    for folder in (series_dir, series_dir.parent):
        found = sorted(p for p in folder.iterdir() if p.is_file() and is_label_file(p))
        semantic = [p for p in found if "instance" not in p.name.lower()]
        if found:
            return (semantic or found)[0]
        if folder == root:
            break
    return None


def manifest_from_index(index, root: str | os.PathLike,
                        proportions: Mapping[str, float] = DEFAULT_PROPORTIONS, seed: int = 0) -> Manifest:
    """The image series of a DICOM index under ``root`` as cases, split by patient with ``seed``;
    a case is named after its top folder, labels are the map found beside each series."""
    root = Path(root)
    records: list[tuple[str, str, str, str]] = []
    for series in index.image_series():
        if not series.files:
            continue
        series_dir = Path(series.files[0]).parent
        relative = series_dir.relative_to(root).as_posix()
        case = relative.split("/")[0] if relative != "." else root.name
        if any(r[0] == case for r in records):
            case = relative.replace("/", "_")
        labels = labels_beside(series_dir, root)
        records.append((case, series.patient_id or case, relative,
                        labels.relative_to(root).as_posix() if labels else ""))
    return build_manifest(records, proportions, seed, root=root)


# ---------------------------------------------------------------------------- files


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest CSV; relative paths in it start from the CSV's folder."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or []) and c != "labels"]
        if missing:
            raise ValueError(f"{path}: the manifest has no column {', '.join(missing)} "
                             f"(expected {','.join(COLUMNS)})")
        cases = [Case(*(((row.get(c) or "").strip()) for c in COLUMNS)) for row in reader]
    return Manifest(cases=cases, root=path.parent)


def write_manifest(manifest: Manifest, path: str | os.PathLike) -> None:
    """Write the manifest CSV atomically (paths are written as stored, relative to its root)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for c in manifest.cases:
        writer.writerow([c.case, c.patient, c.series, c.labels, c.split])
    write_text_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------- checks


def _file_problems(manifest: Manifest, case: Case) -> list[str]:
    problems = []
    series = manifest.series_path(case)
    if not case.series:
        problems.append(f"case {case.case}: no series given")
    elif series is not None and not series.exists():
        problems.append(f"case {case.case}: series not found: {series}")
    labels = manifest.labels_path(case)
    if labels is not None and not labels.is_file():
        problems.append(f"case {case.case}: label map not found: {labels}")
    return problems


def _patients_in_several_splits(cases: Sequence[Case]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {}
    for c in cases:
        if c.split not in splits.setdefault(c.patient, []):
            splits[c.patient].append(c.split)
    return {p: s for p, s in splits.items() if len(s) > 1}


def check_manifest(manifest: Manifest) -> list[str]:
    """Every problem of a manifest as a sentence the user can act on; [] when it is sound."""
    problems, seen = [], set()
    for c in manifest.cases:
        if c.case in seen:
            problems.append(f"case {c.case}: listed more than once")
        seen.add(c.case)
        if not c.patient:
            problems.append(f"case {c.case}: no patient given")
        if c.split not in SPLITS:
            problems.append(f"case {c.case}: unknown split {c.split!r} (use {', '.join(SPLITS)})")
        problems += _file_problems(manifest, c)
    for patient, splits in _patients_in_several_splits(manifest.cases).items():
        problems.append(f"patient {patient} is in more than one split: {', '.join(splits)}")
    return problems


def _series_key(manifest: Manifest, case: Case) -> str:
    """The same series named two ways (./a/../b, b) must compare equal."""
    path = manifest.series_path(case)
    return case.series if path is None else os.path.normpath(os.path.abspath(path))


def refuse_overlap(manifest: Manifest, eval_split: str = "eval",
                   fit_splits: Sequence[str] = ("train", "calib")) -> None:
    """Raise ValueError if a patient or series of ``eval_split`` also appears in ``fit_splits``."""
    judged = manifest.cases_in(eval_split)
    fitted = [c for c in manifest.cases if c.split in fit_splits]
    fit_patients = {c.patient for c in fitted}
    fit_series = {_series_key(manifest, c) for c in fitted}
    for c in judged:
        if c.patient in fit_patients:
            raise ValueError(f"patient {c.patient} (case {c.case}) is in '{eval_split}' and also in "
                             f"{'/'.join(fit_splits)}: a verdict on scans the model was fitted on would not be fair")
        if _series_key(manifest, c) in fit_series:
            raise ValueError(f"series {c.series} (case {c.case}) is in '{eval_split}' and also in "
                             f"{'/'.join(fit_splits)}: a verdict on scans the model was fitted on would not be fair")
