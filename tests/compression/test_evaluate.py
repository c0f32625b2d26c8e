"""Evaluation: metrics against ground truth, fidelity against the original, paired intervals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from app.core.manifest import Case as ManifestCase, Manifest
from compression import evaluate as ev
from tests.compression.eval_fixtures import ELSEWHERE, LARGE, SMALL, Case, FixedFindings, labels_with, volume

SHAPE = (8, 40, 40)


def _brute_force_hd95(a, b, spacing):
    from scipy import ndimage

    def surface(m):
        return np.argwhere(m & ~ndimage.binary_erosion(m, border_value=0)) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


def test_hd95_uses_the_real_spacing_and_matches_brute_force():
    spacing = (2.0, 0.8, 0.5)
    a = np.zeros((6, 20, 20), bool)
    b = np.zeros_like(a)
    a[1:5, 4:12, 4:12] = True
    b[2:5, 6:15, 5:13] = True
    assert ev.hd95_mm(a, b, spacing) == pytest.approx(_brute_force_hd95(a, b, spacing), abs=1e-9)
    shifted = np.roll(a, 3, axis=2)  # 3 columns of 0.5 mm each
    assert ev.hd95_mm(a, shifted, spacing) == pytest.approx(1.5, abs=1e-9)


def test_hd95_and_dice_of_empty_masks():
    empty, full = np.zeros((3, 5, 5)), np.ones((3, 5, 5))
    assert ev.hd95_mm(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(ev.hd95_mm(empty, full, (1, 1, 1)))
    assert ev.dice(empty, empty) == 1.0
    assert ev.dice(empty, full) == 0.0


def _case(name="c1", patient="p1", truth=(LARGE, SMALL)):
    return Case(name, patient, volume(SHAPE), labels_with(SHAPE, truth))


def test_lesions_of_6_mm_and_more_are_counted_separately():
    case = _case()
    original = FixedFindings(labels_with(SHAPE, (LARGE, SMALL)))
    variant = FixedFindings(labels_with(SHAPE, (LARGE, ELSEWHERE)))  # misses the small one, adds one
    reference_row, row = ev.segmentation_rows(case, [original, variant], ["original", "int8"])
    assert (row.true_lesions, row.true_lesions_large) == (2, 1)
    assert (row.detected, row.detected_large) == (1, 1)
    assert row.false_positives == 1
    assert (row.lesions_lost, row.lesions_lost_large) == (1, 0)  # the small lesion, against the original
    assert (row.lesions_gained, row.lesions_gained_large) == (1, 1)  # ELSEWHERE is 8 mm across
    assert reference_row.fidelity_dice == 1.0 and reference_row.lesions_lost == 0
    assert 0.0 < row.fidelity_dice < 1.0
    assert 0.0 < row.dice < 1.0 and row.hd95_mm > 0


def test_a_lost_lesion_is_told_apart_from_a_lost_false_positive_of_the_original():
    case = _case(truth=(LARGE,))
    original = FixedFindings(labels_with(SHAPE, (LARGE, ELSEWHERE)))  # ELSEWHERE: the original's false positive
    variant = FixedFindings(labels_with(SHAPE, (SMALL,)))  # reproduces neither
    _, row = ev.segmentation_rows(case, [original, variant], ["original", "student"])
    assert row.lesions_lost_large == 2  # fidelity: both of the original's findings are gone
    assert row.lesions_lost_large_true == 1  # one of them was a nodule
    unlabelled = Case("c2", "p2", volume(SHAPE), None)
    _, row = ev.segmentation_rows(unlabelled, [original, variant], ["original", "student"])
    assert (row.lesions_lost_large, row.lesions_lost_large_true) == (2, 0)


def test_losing_a_large_lesion_breaks_the_budget_and_says_why():
    case = _case()
    original = FixedFindings(labels_with(SHAPE, (LARGE, SMALL)))
    variant = FixedFindings(labels_with(SHAPE, (SMALL,)))
    rows = ev.segmentation_rows(case, [original, variant], ["original", "pruned"])
    comparison = ev.summarise({"original": [rows[0]], "pruned": [rows[1]]}, "original")
    pruned = comparison.variant("pruned")
    assert pruned.value("lesions_lost_large") == 1
    failures = ev.budget_failures(pruned, ev.Budget(max_dice_drop=0.01, max_lost_lesions_large=0))
    assert any("lost lesion" in f for f in failures) and any("Dice drop" in f for f in failures)
    assert ev.budget_failures(comparison.reference, ev.Budget()) == []


def test_a_nodule_budget_lets_the_originals_false_positives_go_but_not_its_nodules():
    original = FixedFindings(labels_with(SHAPE, (LARGE, ELSEWHERE)))  # ELSEWHERE: the original's false positive

    def judged(case, variant):
        rows = ev.segmentation_rows(case, [original, variant], ["original", "student"])
        return ev.summarise({"original": [rows[0]], "student": [rows[1]]}, "original").variant("student")

    nodules_only = ev.Budget(max_dice_drop=None, max_lost_lesions_large=None, max_lost_nodules_large=0)
    keeps_the_nodule = judged(_case(truth=(LARGE,)), FixedFindings(labels_with(SHAPE, (LARGE,))))
    assert keeps_the_nodule.value("lesions_lost_large") == 1  # fidelity still counts the false positive
    assert ev.budget_failures(keeps_the_nodule, nodules_only) == []
    assert ev.budget_failures(keeps_the_nodule, ev.Budget(max_dice_drop=None)) == [  # the default counts every one
        "1 lost lesion(s) ≥ 6 mm (allowed 0); 0 of them on a ground-truth nodule, the rest the original's "
        "false positives"]
    loses_the_nodule = judged(_case(truth=(LARGE,)), FixedFindings(labels_with(SHAPE, (ELSEWHERE,))))
    assert ev.budget_failures(loses_the_nodule, nodules_only) == [
        "1 ground-truth nodule(s) ≥ 6 mm the original detects and this variant misses (allowed 0)"]
    unlabelled = judged(Case("c2", "p2", volume(SHAPE), None), FixedFindings(labels_with(SHAPE, (LARGE,))))
    [failure] = ev.budget_failures(unlabelled, nodules_only)  # no labels: the false positive counts as a nodule
    assert failure.startswith("1 lost lesion(s) ≥ 6 mm, counted as nodules")


def test_a_nodule_the_original_finds_with_a_small_piece_still_counts_when_the_variant_misses_it():
    """The lost-lesion count looks at the original's lesions >= 6 mm; a nodule it reaches with a
    piece under 6 mm falls through it. The nodule budget counts the nodules themselves."""
    case = _case(truth=(LARGE,))
    piece = ((4, 12, 12), 1.2)  # ~2.4 mm: inside the 10 mm nodule, too small to count as a lesion >= 6 mm
    original = FixedFindings(labels_with(SHAPE, (piece,)))
    misses = FixedFindings(labels_with(SHAPE, (ELSEWHERE,)))
    reference_row, row = ev.segmentation_rows(case, [original, misses], ["original", "student"])
    assert reference_row.detected_large == 1 and row.detected_large == 0
    assert (row.lesions_lost_large, row.lesions_lost_large_true) == (0, 0)  # the piece is under 6 mm
    assert (reference_row.nodules_missed_large, row.nodules_missed_large) == (0, 1)
    finds_it = FixedFindings(labels_with(SHAPE, (LARGE,)))
    assert ev.segmentation_rows(case, [original, finds_it], ["original", "student"])[1].nodules_missed_large == 0
    comparison = ev.summarise({"original": [reference_row], "student": [row]}, "original")
    nodules_only = ev.Budget(max_dice_drop=None, max_lost_lesions_large=None, max_lost_nodules_large=0)
    assert ev.budget_failures(comparison.variant("student"), nodules_only) == [
        "1 ground-truth nodule(s) ≥ 6 mm the original detects and this variant misses (allowed 0)"]
    assert ev.budget_failures(comparison.variant("student"), ev.Budget(max_dice_drop=None)) == []  # the lesion count misses it


def _rows(n_cases, dice_ref, dice_var, large_per_case=2, lost_large=0):
    rows = {"original": [], "variant": []}
    for i in range(n_cases):
        for name, value in (("original", dice_ref[i]), ("variant", dice_var[i])):
            rows[name].append(ev.CaseRow(case=f"c{i}", patient=f"p{i}", variant=name, dice=value, hd95_mm=1.0,
                                         true_lesions=large_per_case, true_lesions_large=large_per_case,
                                         detected=large_per_case, detected_large=large_per_case,
                                         fidelity_dice=1.0 if name == "original" else 0.95,
                                         lesions_lost_large=lost_large if name == "variant" else 0))
    return rows


def test_few_cases_give_insufficient_evidence_but_still_a_point_estimate():
    rows = _rows(5, [0.8] * 5, [0.7] * 5)
    comparison = ev.summarise(rows, "original")
    assert not comparison.sufficient and "insufficient evidence" in comparison.evidence
    assert "5 eval cases" in comparison.evidence
    drop = comparison.variant("variant").verdicts["dice_drop"]
    assert drop.point == pytest.approx(0.1)
    assert drop.low is None and drop.high is None and drop.note == "insufficient evidence"
    assert "insufficient evidence" in ev.comparison_table(comparison)


def test_enough_cases_and_lesions_give_seeded_paired_intervals():
    rng = np.random.default_rng(1)
    ref = rng.uniform(0.6, 0.9, 40)
    var = ref - rng.uniform(0.0, 0.02, 40)  # never better, by up to 0.02
    comparison = ev.summarise(_rows(40, ref, var), "original", seed=3)
    assert comparison.sufficient and comparison.large_lesions == 80
    drop = comparison.variant("variant").verdicts["dice_drop"]
    assert 0.0 <= drop.low <= drop.point <= drop.high <= 0.02  # paired: case-to-case spread cancels
    unpaired_width = np.ptp(np.percentile(ref, [2.5, 97.5]))
    assert drop.high - drop.low < unpaired_width / 5
    again = ev.summarise(_rows(40, ref, var), "original", seed=3).variant("variant").verdicts["dice_drop"]
    assert (again.low, again.high) == (drop.low, drop.high)


def test_identical_variant_has_a_zero_width_drop_interval():
    ref = np.linspace(0.5, 0.9, 30)
    comparison = ev.summarise(_rows(30, ref, ref, large_per_case=2), "original")
    drop = comparison.variant("variant").verdicts["dice_drop"]
    assert drop.low == drop.high == drop.point == 0.0


def test_unlabelled_cases_judge_the_dice_drop_by_disagreement_with_the_original():
    case = Case("c1", "p1", volume(SHAPE), None)
    original = FixedFindings(labels_with(SHAPE, (LARGE,)))
    variant = FixedFindings(labels_with(SHAPE, (((4, 12, 13), 5.0),)))  # shifted by one column
    rows = ev.segmentation_rows(case, [original, variant], ["a", "b"])
    assert math.isnan(rows[1].dice)
    verdicts = ev.summarise({"a": [rows[0]], "b": [rows[1]]}, "a").variant("b").verdicts
    assert "dice" not in verdicts
    assert verdicts["dice_drop"].point == pytest.approx(1 - rows[1].fidelity_dice)


def test_evaluation_refuses_a_patient_in_both_eval_and_train():
    manifest = Manifest([ManifestCase("a", "P1", "1.2.3.4", "", "train"),
                         ManifestCase("b", "P1", "1.2.3.5", "", "eval")])

    def never(*args, **kwargs):
        raise AssertionError("no model may run on an unfair split")

    with pytest.raises(ValueError, match="patient P1"):
        ev.evaluate([object()], [_case()], manifest=manifest, make_runner=never).send(None)


def test_accuracy_auc_and_class_flips():
    items = [("solid", "solid", {"solid": 0.9, "gg": 0.1}), ("gg", "gg", {"solid": 0.2, "gg": 0.8}),
             ("gg", "solid", {"solid": 0.6, "gg": 0.4}), ("solid", "solid", {"solid": 0.7, "gg": 0.3})]
    assert ev.accuracy(items) == 0.75
    assert ev.auc(items) == pytest.approx(1.0)  # every solid scores higher on "solid" than every gg
    row = ev.CaseRow("c", "p", "v")
    ev.classification_measures(row, {1: {"solid": 0.4, "gg": 0.6}, 2: {"solid": 0.9, "gg": 0.1}},
                               {1: {"solid": 0.7, "gg": 0.3}, 2: {"solid": 0.8, "gg": 0.2}}, {1: "solid"})
    assert row.class_flips == 1 and row.classified[0][0] == "solid" and row.classified[1][0] is None


def test_evaluate_runs_real_runners_and_torch_agrees_with_onnx(tmp_path):
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from tests.core.model_fixtures import small_unet

    card = small_unet(tmp_path / "unet")
    variants = [open_model(card, prefer="state_dict"), open_model(card, prefer="onnx")]
    cases = [_case("c1", "p1"), _case("c2", "p2", truth=(LARGE,))]
    progress = []
    gen = ev.evaluate(variants, cases, names=["torch", "onnx"], threads=1, resamples=200)
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as done:
            comparison = done.value
            break
    fractions = [p.fraction for p in progress if p.fraction is not None]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0
    onnx = comparison.variant("onnx")
    assert [r.case for r in onnx.rows] == ["c1", "c2"]
    assert onnx.value("fidelity_dice") > 0.99
    assert onnx.value("lesions_lost_large") == 0
    assert not math.isnan(onnx.value("dice")) and onnx.rows[0].network_s > 0
    record = ev.comparison_record(comparison)
    assert record["variants"]["onnx"]["fidelity_dice"]["low"] is None  # 2 cases: no interval
    rows = record["per_case"]["onnx"]
    assert [r["case"] for r in rows] == [row.case for row in onnx.rows]
    assert rows[0]["dice"] == pytest.approx(onnx.rows[0].dice) and rows[0]["lesions_lost_large"] == 0
    json.dumps(record)  # plain JSON: the audit log and the .evaluation.json files take it as it is
