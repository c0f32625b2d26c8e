"""Index a folder, DICOMDIR, zip or single file into Patient → Study → Series, headers only.

A CD export or PACS dump can hold thousands of files, junk among them; indexing reads only
headers (``dicom_header.read_header`` stops before Pixel Data), never writes, and turns every
file it cannot use into a ``Problem`` with the reason, so the rest still indexes. Zips are read
in place, with a cap on their declared uncompressed size: zipfile never inflates a member past
its declared size, so the cap bounds the work a zip bomb can cause.
"""
from __future__ import annotations

import os
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Callable, Generator, Iterable

from app.core.dicom_header import (DICOMDIR_CLASS, IMPLICIT_VR_LE, NATIVE_SYNTAXES,
                                   InstanceHeader, read_header)
from app.core.progress import Progress

ZIP_MEMBER_SEPARATOR = "::"
DICOM_SUFFIXES = ("", ".dcm", ".dicom", ".dic", ".ima")
_PROGRESS_EVERY = 64  # files between progress reports (each one is a cancel point)


@dataclass
class Problem:
    path: str
    reason: str

    @property
    def not_dicom(self) -> bool:
        """A file that is not DICOM and was never meant to be (a report, a mask, a text file):
        skipped, not broken. A .dcm file or an extensionless CD file that fails to parse is a
        real problem."""
        suffix = PurePosixPath(self.path.split(ZIP_MEMBER_SEPARATOR)[-1]).suffix.lower()
        meant_as_dicom = suffix in DICOM_SUFFIXES or suffix[1:].isdigit()
        return self.reason.startswith("not a DICOM file") and not meant_as_dicom


@dataclass
class SeriesEntry:
    key: str
    series_uid: str
    modality: str
    description: str
    date: str
    number: int | None
    kind: str
    files: list[str]
    n_images: int
    rows: int
    columns: int
    study_uid: str
    patient_id: str
    referenced_series_uid: str | None = None
    # Header data of each file, aligned with ``files``; the loader sorts and reads from these.
    instances: list[InstanceHeader] = field(default_factory=list, repr=False)
    # Why this entry exists apart from others of the same SeriesInstanceUID (localizer, size).
    notes: list[str] = field(default_factory=list)

    @property
    def is_multiframe(self) -> bool:
        return len(self.instances) == 1 and self.instances[0].number_of_frames > 1


@dataclass
class StudyEntry:
    study_uid: str
    date: str
    description: str
    series: list[SeriesEntry]


@dataclass
class PatientEntry:
    patient_id: str
    patient_name: str
    studies: list[StudyEntry]


@dataclass
class DicomIndex:
    patients: list[PatientEntry]
    problems: list[Problem]

    def all_series(self) -> list[SeriesEntry]:
        return [s for p in self.patients for st in p.studies for s in st.series]

    def image_series(self) -> list[SeriesEntry]:
        return [s for s in self.all_series() if s.kind == "image"]

    def find(self, key: str) -> SeriesEntry:
        for series in self.all_series():
            if series.key == key:
                return series
        raise KeyError(f"no series {key!r} in the index")

    def overlays_for(self, series_uid: str) -> list[SeriesEntry]:
        """SEG objects that can be laid over the given image series."""
        return [s for s in self.all_series()
                if s.kind == "SEG" and s.referenced_series_uid == series_uid]


# ------------------------------------------------------------------------------ sources

@dataclass
class _Source:
    """One thing to read a header from: a file, or a member of an open zip."""

    path: str
    opener: Callable | None = None
    size: int | None = None


def index_path(path, *, max_uncompressed_bytes: int = 8 * 2**30
               ) -> Generator[Progress, None, DicomIndex]:
    """Index ``path`` (folder, recursively; DICOMDIR; zip; or one file). A job generator."""
    path = os.fspath(path)
    problems: list[Problem] = []
    zips: list[zipfile.ZipFile] = []
    try:
        yield Progress(None, f"Listing {path}")
        sources = _sources_for(path, problems, zips, max_uncompressed_bytes)
        headers = yield from _read_headers(sources, problems, zips, max_uncompressed_bytes)
        yield Progress(1.0, "Grouping series")
        return build_index(headers, problems)
    finally:
        for archive in zips:
            archive.close()


def _sources_for(path: str, problems, zips, cap: int) -> list[_Source]:
    if not os.path.exists(path):
        problems.append(Problem(path, "does not exist"))
        return []
    if os.path.isdir(path):
        return [_Source(p) for p in _walk_files(path, problems)]
    if _is_zip(path):
        return _zip_sources(path, problems, zips, cap)
    if os.path.basename(path).upper() == "DICOMDIR":
        return [_Source(p) for p in _dicomdir_files(path, problems)]
    return [_Source(path)]


def _walk_files(folder: str, problems: list[Problem]) -> list[str]:
    found: list[str] = []
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            problems.append(Problem(current, f"cannot list folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif entry.is_file() and entry.name.upper() != "DICOMDIR":
                # DICOMDIR only lists files the walk finds anyway.
                found.append(entry.path)
    return sorted(found)


def _is_zip(path: str) -> bool:
    if path.lower().endswith(".zip"):
        return True
    try:
        with open(path, "rb") as fp:
            return fp.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _zip_sources(path: str, problems, zips, cap: int) -> list[_Source]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        problems.append(Problem(path, f"not a readable zip archive ({exc})"))
        return []
    zips.append(archive)
    members = [m for m in archive.infolist() if not m.is_dir()]
    declared = sum(m.file_size for m in members)
    if declared > cap:
        problems.append(Problem(path, f"zip refused: it would expand to {declared / 2**30:.1f} GiB,"
                                      f" more than the {cap / 2**30:.1f} GiB cap"))
        return []
    return [_zip_member_source(path, archive, m, problems) for m in members
            if os.path.basename(m.filename).upper() != "DICOMDIR"]


def _zip_member_source(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, problems):
    name = f"{path}{ZIP_MEMBER_SEPARATOR}{info.filename}"
    return _Source(name, opener=lambda: archive.open(info), size=info.file_size)


def _dicomdir_files(path: str, problems: list[Problem]) -> list[str]:
    """Files a DICOMDIR lists; a broken DICOMDIR falls back to walking its folder."""
    import pydicom
    from pydicom.fileset import FileSet

    try:
        listed = [inst.path for inst in FileSet(pydicom.dcmread(path))]
    except Exception as exc:  # noqa: BLE001 - any failure: say why, then walk the folder
        problems.append(Problem(path, f"DICOMDIR unreadable ({_first_line(exc)}); "
                                      "scanning its folder instead"))
        return _walk_files(os.path.dirname(os.path.abspath(path)), problems)
    present = [p for p in listed if os.path.isfile(p)]
    for missing in sorted(set(listed) - set(present)):
        problems.append(Problem(missing, "listed in the DICOMDIR but missing"))
    return sorted(set(present))


# ------------------------------------------------------------------------------ headers

def _read_headers(sources: list[_Source], problems, zips, cap: int):
    headers: list[InstanceHeader] = []
    total = len(sources)
    for n, source in enumerate(sources):
        if n % _PROGRESS_EVERY == 0:
            yield Progress(n / max(total, 1), f"Reading headers {n}/{total}")
        header, reason = _read_one(source)
        if header is not None:
            headers.append(header)
        elif source.opener is None and _looks_like_zip(source.path):
            # A zip without the .zip name: read it in place like any other.
            nested = _zip_sources(source.path, problems, zips, cap)
            headers += yield from _read_headers(nested, problems, zips, cap)
        else:
            problems.append(Problem(source.path, reason))
    return headers


def _read_one(source: _Source) -> tuple[InstanceHeader | None, str]:
    try:
        return read_header(source.path, opener=source.opener, size=source.size), ""
    except ValueError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one odd file must never stop the indexing
        # e.g. OSError, an encrypted zip member (RuntimeError), a value pydicom chokes on
        return None, f"cannot read: {_first_line(exc)}"


def _looks_like_zip(path: str) -> bool:
    return not path.lower().endswith(".zip") and _is_zip(path)


# ----------------------------------------------------------------------------- grouping

def build_index(headers: Iterable[InstanceHeader], problems: list[Problem]) -> DicomIndex:
    """Group headers into patients, studies and series; unusable ones become problems."""
    usable = _drop_duplicates([h for h in headers if _usable(h, problems)], problems)
    by_series: dict[str, list[InstanceHeader]] = defaultdict(list)
    for h in usable:
        by_series[h.series_uid].append(h)
    entries = [e for uid in by_series for e in _series_entries(uid, by_series[uid])]
    return DicomIndex(_patients(entries, usable), problems)


def _usable(h: InstanceHeader, problems: list[Problem]) -> bool:
    reason = _unusable_reason(h)
    if reason:
        problems.append(Problem(h.path, reason))
    return reason is None and h.sop_class_uid != DICOMDIR_CLASS


def _unusable_reason(h: InstanceHeader) -> str | None:
    if h.sop_class_uid == DICOMDIR_CLASS:
        return None
    if not h.series_uid:
        return "no Series Instance UID"
    if h.kind != "image":
        return None
    if h.has_pixels is False:
        return "no pixel data"
    return _size_mismatch(h) or _truncation(h)


def _size_mismatch(h: InstanceHeader) -> str | None:
    """Native pixel data whose length contradicts Rows x Columns x Bits: a damaged header."""
    if h.pixel_length is None or h.transfer_syntax not in NATIVE_SYNTAXES \
            or h.bits_allocated not in (8, 16, 32, 64):
        return None
    expected = (h.rows * h.columns * h.samples_per_pixel * h.number_of_frames
                * h.bits_allocated // 8)
    if h.pixel_length in (expected, expected + 1):
        return None
    return (f"pixel data holds {h.pixel_length} bytes but Rows x Columns x Bits Allocated "
            f"({h.rows} x {h.columns} x {h.bits_allocated}) needs {expected}: damaged header")


def _truncation(h: InstanceHeader) -> str | None:
    if h.pixel_offset is None or h.pixel_length is None or h.file_size < 0:
        return None
    header_bytes = 8 if h.transfer_syntax == IMPLICIT_VR_LE else 12
    end = h.pixel_offset + header_bytes + h.pixel_length
    if end > h.file_size:
        return (f"truncated: pixel data needs {end - h.file_size} more bytes "
                f"than the file's {h.file_size}")
    return None


def _drop_duplicates(headers: list[InstanceHeader], problems: list[Problem]):
    first: dict[str, InstanceHeader] = {}
    kept = []
    for h in sorted(headers, key=lambda h: h.path):
        if h.sop_uid in first:
            problems.append(Problem(h.path, "duplicate instance: same SOP Instance UID as "
                                            f"{first[h.sop_uid].path} (that one is used)"))
            continue
        first[h.sop_uid] = h
        kept.append(h)
    return kept


def _series_entries(uid: str, members: list[InstanceHeader]) -> list[SeriesEntry]:
    """One SeriesInstanceUID → entries split by image geometry (localizers, odd sizes)."""
    groups = sorted(_geometry_groups(members).values(), key=lambda g: (-len(g), g[0].path))
    entries = []
    for n, group in enumerate(groups):
        key = uid if n == 0 else f"{uid}#{n + 1}"
        entries.append(_entry(key, group))
    if len(groups) > 1:
        for e in entries:
            e.notes.append(f"series {uid} was split into {len(groups)} parts by orientation, "
                           f"image size or multi-frame object")
    return entries


def _geometry_groups(members: list[InstanceHeader]) -> dict[tuple, list[InstanceHeader]]:
    groups: dict[tuple, list[InstanceHeader]] = defaultdict(list)
    for h in members:
        if h.kind != "image":
            groups[("object", h.kind)].append(h)
        elif h.number_of_frames > 1:
            groups[("frames", h.sop_uid)].append(h)  # each multi-frame object is a volume
        else:
            orientation = tuple(round(v, 3) for v in h.orientation) if h.orientation else None
            groups[("image", h.rows, h.columns, orientation)].append(h)
    return groups


def _entry(key: str, group: list[InstanceHeader]) -> SeriesEntry:
    group = sorted(group, key=lambda h: (h.instance_number or 0, h.path))
    h = group[0]
    n_images = h.number_of_frames if len(group) == 1 else len(group)
    return SeriesEntry(
        key=key, series_uid=h.series_uid, modality=h.modality,
        description=h.series_description, date=dicom_date(h.series_date or h.study_date),
        number=h.series_number, kind=h.kind, files=[m.path for m in group],
        n_images=n_images if h.kind == "image" else len(group), rows=h.rows,
        columns=h.columns, study_uid=h.study_uid, patient_id=h.patient_id,
        referenced_series_uid=h.referenced_series_uid, instances=group)


def _patients(entries: list[SeriesEntry], headers: list[InstanceHeader]) -> list[PatientEntry]:
    first_of_study = {}
    for h in headers:
        first_of_study.setdefault(h.study_uid, h)
    by_patient: dict[str, dict[str, list[SeriesEntry]]] = defaultdict(lambda: defaultdict(list))
    for e in entries:
        by_patient[e.patient_id][e.study_uid].append(e)
    patients = []
    for pid in sorted(by_patient):
        studies = [_study(uid, series, first_of_study[uid]) for uid, series in
                   by_patient[pid].items()]
        studies.sort(key=lambda s: (s.date, s.study_uid))
        name = first_of_study[studies[0].study_uid].patient_name
        patients.append(PatientEntry(pid, name, studies))
    return patients


def _study(uid: str, series: list[SeriesEntry], h: InstanceHeader) -> StudyEntry:
    series.sort(key=lambda s: (s.number if s.number is not None else 1 << 30, s.key))
    return StudyEntry(uid, dicom_date(h.study_date), h.study_description, series)


def dicom_date(text: str) -> str:
    """YYYYMMDD, or "" — old ACR-NEMA files write 1997.04.24."""
    digits = "".join(ch for ch in text if ch.isdigit())
    return digits if len(digits) == 8 else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


# ---------------------------------------------------------------------------------- CLI

def add_info_cli(subparsers) -> None:
    """Register ``info PATH``: print the index; exit 0, or 2 when nothing readable was found."""
    parser = subparsers.add_parser("info", help="list the patients, studies and series in PATH")
    parser.add_argument("path", help="folder, DICOMDIR, zip or DICOM file")
    parser.set_defaults(func=run_info)


def run_info(args) -> int:
    from app.core.progress import run_to_end

    index = run_to_end(index_path(args.path))
    for line in describe_index(index):
        print(line)
    return 0 if index.all_series() else 2


def describe_index(index: DicomIndex) -> list[str]:
    lines = []
    for patient in index.patients:
        lines.append(f"Patient {patient.patient_id or '(no ID)'}  {patient.patient_name}")
        for study in patient.studies:
            lines.append(f"  Study {study.date or '(no date)'}  {study.description}  "
                         f"[{study.study_uid}]")
            lines += [f"    {_series_line(s)}" for s in study.series]
    n = len(index.all_series())
    lines.append(f"{len(index.patients)} patient(s), {n} series, {len(index.problems)} problem(s)")
    lines += [f"  problem: {p.path}: {p.reason}" for p in index.problems]
    return lines


def _series_line(s: SeriesEntry) -> str:
    size = f"{s.n_images} x {s.rows}x{s.columns}" if s.kind == "image" else f"{s.n_images} object(s)"
    ref = f" -> {s.referenced_series_uid}" if s.referenced_series_uid else ""
    number = s.number if s.number is not None else "-"
    return f"#{number} {s.kind:<8} {s.modality:<4} {size:<16} {s.description}  [{s.key}]{ref}"
