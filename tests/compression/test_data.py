"""Case data for compression: real DICOM series and label maps from a manifest, sliced as inference does."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from app.core.inference import prepare
from app.core.manifest import Case, Manifest, read_manifest
from app.core.progress import run_to_end

from compression.data import DataError, LazyCases, load_cases, slice_tensors, split_by_labels
from tests.compression.tiny import phantom_case, tiny_card


def test_load_cases_reads_the_manifests_dicom_series_and_labels(demo_tiny):
    manifest = read_manifest(demo_tiny / "manifest.csv")
    ticks = []
    job = load_cases(manifest, [c.split for c in manifest.cases])
    while True:
        try:
            ticks.append(next(job))
        except StopIteration as done:
            cases = done.value
            break
    assert [c.case for c in cases] == [c.case for c in manifest.cases]
    assert len(ticks) == len(cases) and ticks[-1].fraction == 1.0
    labelled = [c for c in cases if c.labels is not None]
    assert labelled and all(c.labels.shape == c.volume.shape and set(np.unique(c.labels)) <= {0, 1} for c in labelled)
    assert any(c.labels.any() for c in labelled)


def test_a_missing_series_is_a_clear_per_case_error(tmp_path):
    manifest = Manifest([Case("c1", "p1", "nowhere", "", "train")], root=tmp_path)
    with pytest.raises(DataError, match="case c1: series not found"):
        run_to_end(load_cases(manifest, "train"))


def test_lazy_cases_read_each_scan_when_reached_and_check_every_series_up_front(demo_tiny, tmp_path):
    manifest = read_manifest(demo_tiny / "manifest.csv")
    lazy = LazyCases(manifest, "eval")
    assert len(lazy) == len(manifest.cases_in("eval")) > 0
    first, again = lazy[0], lazy[0]
    assert first is not again  # read anew, not held: evaluation keeps one scan at a time
    assert np.array_equal(first.volume.voxels, again.volume.voxels)
    eager = run_to_end(load_cases(manifest, "eval"))
    assert [c.case for c in lazy] == [c.case for c in eager] and len(lazy[0:1]) == 1
    assert np.array_equal(lazy[0].labels, eager[0].labels)
    broken = Manifest([*manifest.cases, Case("c9", "p9", "nowhere", "", "eval")], root=manifest.root)
    with pytest.raises(DataError, match="case c9: series not found"):
        LazyCases(broken, "eval")  # at once, before any compression runs


def test_a_file_that_is_no_scan_is_a_clear_per_case_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    manifest = Manifest([Case("c2", "p2", "notes.txt", "", "calib")], root=tmp_path)
    with pytest.raises(DataError, match="case c2: cannot read series"):
        run_to_end(load_cases(manifest, "calib"))


def test_slices_are_preprocessed_exactly_as_inference_prepares_them():
    case = phantom_case(5, slices=4)
    x, y = slice_tensors([case], tiny_card(), with_labels=True)
    assert x.shape == (4, 1, 64, 64) and x.dtype == np.float32
    assert np.array_equal(x[:, 0], prepare(case.volume, tiny_card()).array)
    assert np.array_equal(y, case.labels)


def test_a_2p5d_card_gets_each_slice_with_its_neighbours_and_the_edges_repeat():
    from compression.data import reference_input

    case = phantom_case(5, slices=4)
    card = dataclasses.replace(tiny_card(), input=dataclasses.replace(tiny_card().input, channels=3, slice_context=1))
    x, y = slice_tensors([case], card, with_labels=True, dtype=np.float16)
    assert x.shape == (4, 3, 64, 64) and x.dtype == np.float16
    array = prepare(case.volume, tiny_card()).array.astype(np.float16)
    for k in range(4):
        assert np.array_equal(x[k], array[[max(k - 1, 0), k, min(k + 1, 3)]])
    assert np.array_equal(y, case.labels)
    assert np.array_equal(reference_input(x, 1)[:, 0], array)  # a one-slice teacher reads the centre
    with pytest.raises(ValueError, match="3 channels cannot feed a model of 2"):
        reference_input(x, 2)


def test_a_seeded_sample_keeps_lesion_slices_in_the_asked_proportion():
    # phantom 2 has no slice without a nodule: its share of background passes to the next cases
    cases = [phantom_case(s, slices=8) for s in (2, 0, 1)]
    assert not (~cases[0].labels.reshape(8, -1).any(axis=1)).any()
    x, y = slice_tensors(cases, tiny_card(), with_labels=True, max_slices=8, foreground_fraction=0.5, seed=1)
    assert len(x) == 8
    assert y.reshape(8, -1).any(axis=1).sum() == 4
    again, _ = slice_tensors(cases, tiny_card(), with_labels=True, max_slices=8, foreground_fraction=0.5, seed=1)
    assert np.array_equal(x, again)


def test_an_unlabelled_case_draws_its_lesion_share_where_the_guide_sees_lesion():
    labelled = phantom_case(0, slices=8)
    unlabelled = dataclasses.replace(labelled, labels=None)
    seen = np.isin(np.arange(8), [2, 5])  # where a reference model sees lesion
    calls = []

    def guide(x):
        calls.append(x.shape)
        return seen

    whole = prepare(unlabelled.volume, tiny_card()).array

    def drawn(x):
        return sorted(next(k for k in range(8) if np.array_equal(whole[k], s)) for s in x[:, 0])

    x, _ = slice_tensors([unlabelled], tiny_card(), with_labels=False, max_slices=4, seed=0, guide=guide)
    assert calls == [(8, 1, 64, 64)]  # every slice, as the network reads them
    assert len(drawn(x)) == 4 and {2, 5} <= set(drawn(x))
    blind = [drawn(slice_tensors([unlabelled], tiny_card(), with_labels=False, max_slices=4, seed=s)[0])
             for s in range(5)]
    assert any(not {2, 5} <= set(d) for d in blind)  # unguided, the draw is blind to them
    slice_tensors([labelled], tiny_card(), with_labels=True, max_slices=4, seed=0, guide=guide)
    assert len(calls) == 1  # a labelled case is drawn by its labels


def test_slices_of_a_lazy_split_match_the_loaded_split_and_labels_are_known_without_reading(demo_tiny):
    cases = read_manifest(demo_tiny / "manifest.csv").cases  # all three as train, the last without labels
    manifest = Manifest([dataclasses.replace(c, split="train") for c in cases[:-1]]
                        + [dataclasses.replace(cases[-1], split="train", labels="")], root=demo_tiny)
    lazy = LazyCases(manifest, "train")
    with_labels, without = split_by_labels(lazy)
    assert isinstance(with_labels, LazyCases) and (len(with_labels), len(without)) == (2, 1)
    assert [c.labels is not None for c in lazy] == lazy.labelled()
    eager = run_to_end(load_cases(manifest, "train"))
    for budget in (None, 6):
        x_lazy, _ = slice_tensors(lazy, tiny_card(), with_labels=False, max_slices=budget, seed=3)
        x_eager, _ = slice_tensors(eager, tiny_card(), with_labels=False, max_slices=budget, seed=3)
        assert np.array_equal(x_lazy, x_eager)
    assert len(x_lazy) == 6


def test_labels_are_demanded_only_when_asked_for():
    unlabelled = dataclasses.replace(phantom_case(6), labels=None)
    x, y = slice_tensors([unlabelled], tiny_card(), with_labels=False)
    assert y is None and len(x) == 8
    with pytest.raises(DataError, match="case6"):
        slice_tensors([unlabelled], tiny_card(), with_labels=True)


def test_cutting_slices_reports_each_case_so_a_long_read_shows_progress_and_can_stop():
    from compression.data import cut_slices

    cases = [phantom_case(s, slices=4) for s in range(3)]
    job = cut_slices(cases, tiny_card(), with_labels=True)
    ticks = [next(job) for _ in range(3)]
    assert [t.fraction for t in ticks] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert "case2" in ticks[-1].message
    job.close()  # a cancelled job stops between cases


def test_a_budget_smaller_than_the_number_of_cases_takes_what_it_asks_and_no_more():
    cases = [phantom_case(s, slices=4) for s in range(5)]  # the budget runs out before the last cases
    for budget in (1, 2, 3):
        x, y = slice_tensors(cases, tiny_card(), with_labels=True, max_slices=budget, seed=0)
        assert len(x) == len(y) == budget
