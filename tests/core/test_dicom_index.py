"""Indexing real DICOM: pydicom's corpus and DICOMDIR sets, written series, broken copies, zips."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.core.dicom_fixtures import SeriesSpec, bundled_test_file, bundled_test_files, write_ct_series
from app.core.dicom_header import InstanceHeader, read_header, read_header_with_pydicom
from app.core.dicom_index import add_info_cli, index_path
from app.core.progress import Progress, run_to_end


def _index(path, **kw):
    return run_to_end(index_path(path, **kw))


def _reasons(index) -> dict[str, str]:
    return {os.path.basename(p.path.split("::")[-1]): p.reason for p in index.problems}


@pytest.fixture
def ct_folder(tmp_path):
    written = write_ct_series(tmp_path / "ct", SeriesSpec(shape=(6, 32, 32)))
    return tmp_path / "ct", written


# ---------------------------------------------------------------------- header reading

def test_fast_header_reader_agrees_with_pydicom_on_the_corpus():
    from pydicom.data.data_manager import DATA_ROOT

    charset_files = sorted(str(p) for p in Path(DATA_ROOT, "charset_files").glob("*.dcm"))
    compared = 0
    for path in bundled_test_files("**/*") + charset_files:
        try:
            fast = read_header(path)
        except ValueError:
            continue
        if fast.read_by != "fast":
            continue
        with open(path, "rb") as fp:
            slow = read_header_with_pydicom(path, fp, os.path.getsize(path))
        for f in dataclasses.fields(InstanceHeader):
            if f.name in ("read_by", "pixel_offset", "pixel_length"):
                continue
            assert getattr(fast, f.name) == getattr(slow, f.name), (path, f.name)
        compared += 1
    assert compared >= 100  # the fast reader must actually take most of the corpus


def test_fast_header_records_where_pixel_data_starts():
    h = read_header(bundled_test_file("CT_small.dcm"))
    with open(h.path, "rb") as fp:
        fp.seek(h.pixel_offset)
        assert fp.read(4) == b"\xe0\x7f\x10\x00"
    assert h.pixel_length == 128 * 128 * 2 and h.has_pixels


# ----------------------------------------------------------------------- DICOMDIR sets

def test_dicomdir_lists_its_patients_and_series():
    index = _index(bundled_test_file("dicomdirtests/DICOMDIR"))
    assert {p.patient_id for p in index.patients} == {"77654033", "98890234"}
    series = index.image_series()
    assert sum(s.n_images for s in series) == 31
    assert all(os.path.isfile(f) for s in series for f in s.files)
    # 98892001 has two differently oriented scouts in one series: split, not mixed
    scouts = [s for s in series if s.description == "Scout"]
    assert sorted(s.key[-2:] for s in scouts)[0] == "#2" and len(scouts) == 2


def test_tiny_alpha_dicomdir_indexes_the_same_as_its_folder():
    by_dir = _index(bundled_test_file("dicomdirtests/TINY_ALPHA/DICOMDIR"))
    by_walk = _index(Path(bundled_test_file("dicomdirtests/TINY_ALPHA/DICOMDIR")).parent)
    assert [s.files for s in by_dir.all_series()] == [s.files for s in by_walk.all_series()]
    assert sum(len(s.files) for s in by_dir.all_series()) == 50


def test_corpus_kinds_and_seg_overlay_reference():
    index = _index(Path(bundled_test_file("CT_small.dcm")).parent)
    kinds = {s.kind for s in index.all_series()}
    assert {"image", "SR", "SEG", "RTSTRUCT", "other"} <= kinds
    seg = next(s for s in index.all_series() if s.kind == "SEG")
    assert seg.referenced_series_uid
    assert index.overlays_for(seg.referenced_series_uid) == [seg]
    rtstruct = next(s for s in index.all_series() if s.kind == "RTSTRUCT")
    assert rtstruct.referenced_series_uid == "1.2.826.0.1.3680043.8.498.2010020400001.2.1.1"
    multiframe = [s for s in index.image_series() if s.n_images > 1 and len(s.files) == 1]
    assert multiframe, "multi-frame objects count as series"
    reasons = _reasons(index)
    assert "truncated" in reasons["MR_truncated.dcm"]
    assert "not a DICOM file" in reasons["README.txt"]
    assert "duplicate instance" in reasons["MR_small_RLE.dcm"]


# ------------------------------------------------------------------ splitting series

def test_one_series_uid_is_split_by_image_size(tmp_path):
    main = write_ct_series(tmp_path / "a", SeriesSpec(shape=(5, 32, 32)))
    write_ct_series(tmp_path / "b", SeriesSpec(shape=(2, 16, 24), series_uid=main.series_uid,
                                               study_uid="1.2.3.4"))
    index = _index(tmp_path)
    parts = sorted(index.all_series(), key=lambda s: s.key)
    assert [s.key for s in parts] == [main.series_uid, main.series_uid + "#2"]
    assert [(s.n_images, s.rows, s.columns) for s in parts] == [(5, 32, 32), (2, 16, 24)]
    assert all(s.notes for s in parts)


# ------------------------------------------------------------------------ bad input

def test_every_broken_file_is_reported_and_the_rest_still_indexes(ct_folder, tmp_path):
    folder, written = ct_folder
    junk = folder / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    data = Path(bundled_test_file("CT_small.dcm")).read_bytes()
    (junk / "truncated.dcm").write_bytes(data[: len(data) - 5000])
    (junk / "garbage_header.dcm").write_bytes(data[:132] + os.urandom(600) + data[732:])
    (junk / "empty.dcm").write_bytes(b"")
    shutil.copy(written.paths[0], junk / "zz_copy.dcm")  # the same SOP instance again
    _write_without_pixels(junk / "no_pixels.dcm", written.paths[1])
    _write_with_rows(junk / "wrong_rows.dcm", written.paths[2], rows=64)
    index = _index(folder)
    reasons = _reasons(index)
    assert "not a DICOM file" in reasons["notes.txt"]
    assert "truncated" in reasons["truncated.dcm"]
    assert "garbage_header.dcm" in reasons and reasons["garbage_header.dcm"]
    assert "empty.dcm" in reasons
    assert "duplicate instance" in reasons["zz_copy.dcm"]
    assert reasons["no_pixels.dcm"] == "no pixel data"
    assert "damaged header" in reasons["wrong_rows.dcm"] and "64 x 32" in reasons["wrong_rows.dcm"]
    (series,) = index.image_series()
    assert series.n_images == 6


def _write_without_pixels(target: Path, source: str) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target)


def _write_with_rows(target: Path, source: str, rows: int) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.Rows = rows
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target)


def test_indexing_never_writes_to_input(ct_folder, tmp_path):
    folder, _ = ct_folder
    shutil.copy(bundled_test_file("MR_truncated.dcm"), folder)
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
    before = _fingerprints(tmp_path)
    _index(folder)
    _index(archive)
    assert _fingerprints(tmp_path) == before


def _fingerprints(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size)
    return out


# ------------------------------------------------------------------------------- zips

def test_zip_is_read_in_place_with_junk_reported(ct_folder, tmp_path):
    folder, written = ct_folder
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"DICOM/{p.name}")
        zf.writestr("DICOM/readme.txt", "burned by a CD writer")
    extracted_before = set(os.listdir(tmp_path))
    index = _index(archive)
    (series,) = index.image_series()
    assert series.n_images == 6
    assert all(f.startswith(f"{archive}::DICOM/") for f in series.files)
    assert "not a DICOM file" in _reasons(index)["readme.txt"]
    assert set(os.listdir(tmp_path)) == extracted_before  # nothing extracted to disk


def test_zip_bomb_is_refused_with_a_message(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * (8 * 2**20))  # 8 MiB of zeros deflate to ~8 KiB
    assert archive.stat().st_size < 100_000
    index = _index(archive, max_uncompressed_bytes=2**20)
    assert index.all_series() == []
    (problem,) = index.problems
    assert "zip refused" in problem.reason and "cap" in problem.reason


# ------------------------------------------------------------------- progress, cancel

def test_progress_rises_and_closing_cancels(tmp_path):
    for n in range(3):
        write_ct_series(tmp_path / f"s{n}", SeriesSpec(shape=(50, 8, 8), seed=n))
    job = index_path(tmp_path)
    fractions = [p.fraction for p in _take(job, 3)]
    assert all(isinstance(f, float) for f in fractions[1:])
    assert fractions[1:] == sorted(fractions[1:])
    job.close()  # the job runner cancels by closing the generator at a yield
    with pytest.raises(StopIteration):
        next(job)


def _take(job, n: int) -> list[Progress]:
    return [next(job) for _ in range(n)]


# -------------------------------------------------------------------------------- CLI

def _cli(argv):
    parser = argparse.ArgumentParser()
    add_info_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_info_cli_prints_the_index_and_exit_codes(ct_folder, tmp_path, capsys):
    folder, written = ct_folder
    assert _cli(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert written.series_uid in out and "6 x 32x32" in out and "1 patient(s), 1 series" in out
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    assert _cli(["info", str(tmp_path / "empty")]) == 2
    assert "a.txt: not a DICOM file" in capsys.readouterr().out


def test_series_entry_carries_sortable_headers(ct_folder):
    folder, written = ct_folder
    (series,) = _index(folder).image_series()
    assert len(series.instances) == len(series.files) == 6
    positions = np.array([h.position for h in series.instances])
    assert np.allclose(sorted(positions[:, 2]), [p[2] for p in written.positions])


def test_randomly_damaged_copies_never_crash_indexing_or_loading(tmp_path):
    from app.core.dicom_load import SeriesLoadError, load_series

    import io

    import pydicom

    ds = pydicom.dcmread(bundled_test_file("CT_small.dcm"))
    rng = np.random.default_rng(7)
    for n in range(60):
        # each copy its own instance and series, so every survivor is also loaded
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.{n + 1}"
        ds.SeriesInstanceUID = f"1.2.826.0.2.{n + 1}"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        data = bytearray(buffer.getvalue())
        for at in rng.integers(0, 1200, size=int(rng.integers(1, 12))):  # the header region
            data[at] = int(rng.integers(0, 256))
        cut = len(data) if n % 3 else int(rng.integers(200, len(data)))
        (tmp_path / f"damaged{n:02d}.dcm").write_bytes(bytes(data[:cut]))
    index = _index(tmp_path)
    listed = {f for s in index.all_series() for f in s.files} | {p.path for p in index.problems}
    assert len(listed) == 60 and all(p.reason for p in index.problems)
    loaded = 0
    for series in index.image_series():
        try:
            run_to_end(load_series(series))
            loaded += 1
        except SeriesLoadError as exc:
            assert series.key in str(exc)
    assert loaded >= 10


def test_dates_are_yyyymmdd_or_empty():
    index = _index(Path(bundled_test_file("CT_small.dcm")).parent)
    assert all(s.date == "" or (len(s.date) == 8 and s.date.isdigit())
               for s in index.all_series())
