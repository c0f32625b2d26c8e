"""Manifests: split by patient, read/write, and the checks evaluation relies on."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.manifest import (
    Case,
    Manifest,
    build_manifest,
    check_manifest,
    read_manifest,
    refuse_overlap,
    split_by_patient,
    write_manifest,
)

patient_lists = st.lists(st.text("ABCDEFGH0123456789^", min_size=1, max_size=6), max_size=40)
proportion_sets = st.fixed_dictionaries({
    "train": st.floats(0, 1), "calib": st.floats(0, 1), "eval": st.floats(0.01, 1)})


@settings(max_examples=150, deadline=None)
@given(patient_lists, proportion_sets, st.integers(0, 2**32 - 1))
def test_every_patient_lands_in_exactly_one_split_reproducibly(patients, proportions, seed):
    first = split_by_patient(patients, proportions, seed)
    assert set(first) == set(patients)
    assert set(first.values()) <= {s for s, p in proportions.items() if p > 0}
    assert split_by_patient(list(reversed(patients)), proportions, seed) == first
    wanted = [s for s, p in proportions.items() if p > 0]
    if len(set(patients)) >= len(wanted):
        assert set(first.values()) == set(wanted)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3)), max_size=30), st.integers(0, 99))
def test_built_manifest_never_puts_a_patient_in_two_splits(pairs, seed):
    records = [(f"c{n}", f"P{p}", f"s{n}", "") for n, (p, _) in enumerate(pairs)]
    manifest = build_manifest(records, seed=seed)
    splits_of = {}
    for case in manifest.cases:
        splits_of.setdefault(case.patient, set()).add(case.split)
    assert all(len(s) == 1 for s in splits_of.values())


def test_proportions_are_followed():
    splits = split_by_patient([f"P{i}" for i in range(10)], seed=3)
    counts = {s: list(splits.values()).count(s) for s in ("train", "calib", "eval")}
    assert counts == {"train": 6, "calib": 2, "eval": 2}


def test_different_seeds_shuffle_differently():
    patients = [f"P{i}" for i in range(30)]
    assert split_by_patient(patients, seed=1) != split_by_patient(patients, seed=2)


def test_unknown_split_name_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        split_by_patient(["a"], {"test": 1.0})


def test_round_trip_and_file_checks(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "m1.nii.gz").write_bytes(b"x")
    manifest = Manifest(cases=[
        Case("c1", "P1", "s1", "m1.nii.gz", "train"),
        Case("c2", "P2", "missing_dir", "missing.nii.gz", "eval"),
        Case("c3", "P3", "1.2.840.99.1", "", "calib"),  # a SeriesInstanceUID needs no file
    ], root=tmp_path)
    path = tmp_path / "manifest.csv"
    write_manifest(manifest, path)
    again = read_manifest(path)
    assert again.cases == manifest.cases and again.root == tmp_path
    problems = check_manifest(again)
    assert len(problems) == 2
    assert "series not found" in problems[0] and "missing_dir" in problems[0]
    assert "label map not found" in problems[1]


def test_check_reports_patient_in_two_splits_duplicates_and_unknown_split(tmp_path):
    manifest = Manifest(cases=[
        Case("c1", "P1", "1.2.3.1", "", "train"),
        Case("c2", "P1", "1.2.3.2", "", "eval"),
        Case("c2", "P2", "1.2.3.3", "", "test"),
    ], root=tmp_path)
    problems = "\n".join(check_manifest(manifest))
    assert "patient P1 is in more than one split: train, eval" in problems
    assert "case c2: listed more than once" in problems
    assert "unknown split 'test'" in problems


def test_missing_column_is_a_clear_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("case,series,split\nc1,s1,eval\n")
    with pytest.raises(ValueError, match="no column patient"):
        read_manifest(path)


def test_refuse_overlap_names_the_patient_or_series(tmp_path):
    shared_patient = Manifest(cases=[
        Case("c1", "P1", "a", "", "calib"), Case("c2", "P1", "b", "", "eval")], root=tmp_path)
    with pytest.raises(ValueError, match="patient P1"):
        refuse_overlap(shared_patient)
    shared_series = Manifest(cases=[
        Case("c1", "P1", "x/../a", "", "train"), Case("c2", "P2", "a", "", "eval")], root=tmp_path)
    with pytest.raises(ValueError, match="series a"):
        refuse_overlap(shared_series)
    refuse_overlap(Manifest(cases=[
        Case("c1", "P1", "a", "", "train"), Case("c2", "P2", "b", "", "eval")], root=tmp_path))


def test_a_folder_index_becomes_cases_split_by_patient_with_their_labels(demo_tiny):
    from app.core.dicom_index import index_path
    from app.core.manifest import manifest_from_index
    from app.core.progress import run_to_end

    index = run_to_end(index_path(demo_tiny))
    manifest = manifest_from_index(index, demo_tiny, seed=3)
    assert sorted(c.case for c in manifest.cases) == ["CASE001", "CASE002", "CASE003"]
    assert all(c.series.endswith("/CT") and c.labels.endswith("nodules.nii.gz") for c in manifest.cases)
    assert not check_manifest(manifest)
    assert manifest_from_index(index, demo_tiny, seed=3).cases == manifest.cases
