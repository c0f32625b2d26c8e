"""tools/eval_manifest.py: widening the eval split with more generated cases, never leaking a
training patient into it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from app.core.manifest import Case, Manifest, read_manifest, write_manifest

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "eval_manifest.py"


def _tool():
    spec = importlib.util.spec_from_file_location("eval_manifest", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, rows) -> Path:
    folder.mkdir(parents=True)
    for case, *_ in rows:
        (folder / case).mkdir()
        (folder / case / "labels.nii.gz").write_bytes(b"x")
    manifest = Manifest([Case(c, p, f"{c}", f"{c}/labels.nii.gz", s) for c, p, s in rows], root=folder)
    write_manifest(manifest, folder / "manifest.csv")
    return folder / "manifest.csv"


def test_extra_cases_join_eval_and_paths_still_point_at_their_files(tmp_path):
    base = _write(tmp_path / "base", [("CASE001", "P5-1", "train"), ("CASE002", "P5-2", "eval")])
    extra = _write(tmp_path / "more" / "s6", [("CASE001", "P6-1", "train"), ("CASE002", "P6-2", "calib")])
    out = tmp_path / "wide" / "manifest.csv"
    assert _tool().main([str(out), str(base), str(extra)]) == 0
    wide = read_manifest(out)
    assert [(c.case, c.split) for c in wide.cases] == [
        ("ACASE001", "train"), ("ACASE002", "eval"), ("BCASE001", "eval"), ("BCASE002", "eval")]
    assert all(wide.series_path(c).is_dir() and wide.labels_path(c).is_file() for c in wide.cases)
    assert (wide.series_path(wide.cases[2]).resolve() == (tmp_path / "more" / "s6" / "CASE001").resolve())


def test_a_patient_in_two_manifests_is_refused(tmp_path):
    base = _write(tmp_path / "base", [("CASE001", "P-1", "train")])
    extra = _write(tmp_path / "extra", [("CASE009", "P-1", "eval")])
    with pytest.raises(SystemExit, match="patient P-1 is also in"):
        _tool().main([str(tmp_path / "wide" / "manifest.csv"), str(base), str(extra)])
    assert not (tmp_path / "wide").exists()


def test_calib_cases_join_calib_and_a_calib_patient_cannot_be_in_eval(tmp_path):
    base = _write(tmp_path / "base", [("CASE001", "P5-1", "train"), ("CASE002", "P5-2", "calib")])
    extra = _write(tmp_path / "s6", [("CASE001", "P6-1", "train")])
    calib = _write(tmp_path / "s8", [("CASE001", "P8-1", "eval"), ("CASE002", "P8-2", "train")])
    out = tmp_path / "wide" / "manifest.csv"
    assert _tool().main([str(out), str(base), str(extra), "--calib", str(calib)]) == 0
    assert [(c.case, c.split) for c in read_manifest(out).cases] == [
        ("ACASE001", "train"), ("ACASE002", "calib"), ("BCASE001", "eval"), ("CCASE001", "calib"), ("CCASE002", "calib")]
    leaked = _write(tmp_path / "s9", [("CASE001", "P6-1", "calib")])  # an eval patient offered as calib
    with pytest.raises(SystemExit, match="patient P6-1 is also in"):
        _tool().main([str(tmp_path / "w2" / "manifest.csv"), str(base), str(extra), "--calib", str(leaked)])


def test_train_cases_join_train_and_a_train_patient_cannot_be_in_eval(tmp_path):
    base = _write(tmp_path / "base", [("CASE001", "P5-1", "train"), ("CASE002", "P5-2", "eval")])
    train = _write(tmp_path / "s9", [("CASE001", "P9-1", "eval"), ("CASE002", "P9-2", "calib")])
    out = tmp_path / "big" / "manifest.csv"
    assert _tool().main([str(out), str(base), "--train", str(train)]) == 0
    assert [(c.case, c.split) for c in read_manifest(out).cases] == [
        ("ACASE001", "train"), ("ACASE002", "eval"), ("BCASE001", "train"), ("BCASE002", "train")]
    leaked = _write(tmp_path / "s10", [("CASE001", "P5-2", "train")])  # an eval patient offered as train
    with pytest.raises(SystemExit, match="patient P5-2 is also in"):
        _tool().main([str(tmp_path / "b2" / "manifest.csv"), str(base), "--train", str(leaked)])


def test_unlabelled_train_cases_join_train_without_their_labels(tmp_path):
    base = _write(tmp_path / "base", [("CASE001", "P5-1", "train"), ("CASE002", "P5-2", "eval")])
    train = _write(tmp_path / "s9", [("CASE001", "P9-1", "eval")])
    fresh = _write(tmp_path / "s13", [("CASE001", "P13-1", "eval"), ("CASE002", "P13-2", "calib")])
    out = tmp_path / "big" / "manifest.csv"
    assert _tool().main([str(out), str(base), "--train", str(train), "--unlabelled-train", str(fresh)]) == 0
    cases = read_manifest(out).cases
    assert [(c.case, c.split, bool(c.labels)) for c in cases] == [
        ("ACASE001", "train", True), ("ACASE002", "eval", True), ("BCASE001", "train", True),
        ("CCASE001", "train", False), ("CCASE002", "train", False)]
    assert (fresh.parent / "CASE001" / "labels.nii.gz").is_file()  # nothing removed from the source
    leaked = _write(tmp_path / "s14", [("CASE001", "P5-2", "train")])  # an eval patient offered as unlabelled train
    with pytest.raises(SystemExit, match="patient P5-2 is also in"):
        _tool().main([str(tmp_path / "b2" / "manifest.csv"), str(base), "--unlabelled-train", str(leaked)])


def test_a_repeated_option_adds_its_manifests_instead_of_keeping_the_last(tmp_path):
    """``--train S9 --train S10`` once kept only S10: a 184-scan set was silently built with 64."""
    base = _write(tmp_path / "base", [("CASE001", "P5-1", "train"), ("CASE002", "P5-2", "eval")])
    s9 = _write(tmp_path / "s9", [("CASE001", "P9-1", "eval")])
    s10 = _write(tmp_path / "s10", [("CASE001", "P10-1", "eval")])
    s11 = _write(tmp_path / "s11", [("CASE001", "P11-1", "eval")])
    out = tmp_path / "big" / "manifest.csv"
    assert _tool().main([str(out), str(base), "--train", str(s9), "--train", str(s10), str(s11)]) == 0
    assert [(c.case, c.split) for c in read_manifest(out).cases] == [
        ("ACASE001", "train"), ("ACASE002", "eval"), ("BCASE001", "train"), ("CCASE001", "train"),
        ("DCASE001", "train")]
