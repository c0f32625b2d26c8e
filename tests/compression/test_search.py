"""Accuracy-aware search: every candidate kept, the Pareto front returned, the time limit honoured."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from app.core.progress import run_to_end
from compression import evaluate as ev
from compression import search as se
from tests.compression.eval_fixtures import LARGE, SMALL, Case, FixedFindings, labels_with, volume

SHAPE = (8, 40, 40)


def _cases():
    balls = [(LARGE, SMALL), (LARGE,), (((4, 25, 20), 3.5), SMALL)]
    return [Case(f"c{i}", f"p{i}", volume(SHAPE, seed=i), labels_with(SHAPE, b)) for i, b in enumerate(balls)]


def _segmenter(weights: np.ndarray):
    """A tiny real 'network': a 3×3×3 filter over the window-normalised scan, thresholded."""
    from scipy import ndimage

    def segment(case):
        image = np.clip((case.volume.voxels.astype(np.float32) + 1000) / 1400, 0, 1)
        return (ndimage.convolve(image, weights, mode="nearest") > 0.5).astype(np.uint8)

    return segment


def _scan_with_nodules(case):
    """Soft tissue where the truth has nodules, so the filter's output follows the truth."""
    voxels = np.where(case.labels > 0, 40, case.volume.voxels).astype(np.int16)
    from dataclasses import replace

    return Case(case.case, case.patient, replace(case.volume, voxels=voxels), case.labels)


def _cheap_runner(cases):
    """Compress a filter by magnitude pruning + uniform quantization; judge it with the real evaluation."""
    rng = np.random.default_rng(0)
    original = np.abs(rng.normal(1.0, 0.6, (3, 3, 3))) / 27 * 1.0
    reference = [_segmenter(original)(c) for c in cases]

    def run_candidate(candidate):
        sparsity, bits = candidate.steps[0]["sparsity"], candidate.steps[0]["bits"]
        weights = original.copy()
        weights[np.abs(weights) < np.quantile(np.abs(weights), sparsity)] = 0
        scale = np.abs(weights).max() / (2 ** (bits - 1) - 1)
        weights = np.round(weights / scale) * scale
        rows = {"original": [], "candidate": []}
        for case, ref in zip(cases, reference):
            yield ev_progress(case)
            found = [FixedFindings(ref), FixedFindings(_segmenter(weights)(case))]
            for row in ev.segmentation_rows(case, found, ["original", "candidate"]):
                rows[row.variant].append(row)
        result = ev.summarise(rows, "original", resamples=100).variant("candidate")
        kept = np.count_nonzero(weights)
        values = {m: v.point for m, v in result.verdicts.items()}
        values.update(deployed_bytes=kept * bits / 8 + 4, latency_ratio=kept / weights.size)
        return values, ev.budget_failures(result, BUDGET), None

    return run_candidate


def ev_progress(case):
    from app.core.progress import Progress

    return Progress(None, f"case {case.case}")


BUDGET = ev.Budget(max_dice_drop=0.2, max_lost_lesions_large=None)


def _candidates():
    return [se.Candidate(f"s{int(s * 100)}-b{b}", [{"sparsity": s, "bits": b}])
            for s, b in itertools.product((0.0, 0.3, 0.6, 0.8), (8, 4, 2))]


def test_search_keeps_every_trial_and_returns_a_front_none_of_which_is_dominated():
    cases = [_scan_with_nodules(c) for c in _cases()]
    result = run_to_end(se.search(_candidates(), _cheap_runner(cases), BUDGET, objectives=("size", "latency")))
    assert len(result.trials) == 12 >= 6 and not result.not_tried
    assert len(result.front) >= 2
    axes = ("size", "latency", "accuracy")
    keys = {id(t): se._key(t, axes) for t in result.trials}
    within = [t for t in result.trials if t.within_budget]
    assert any(not t.within_budget for t in result.trials)  # the budget really bit
    for member in result.front:
        assert member.within_budget
        assert not any(se.dominates(keys[id(o)], keys[id(member)]) for o in within)
    for trial in within:  # and nothing left off the front was undominated
        if trial not in result.front:
            assert any(se.dominates(keys[id(m)], keys[id(trial)]) for m in result.front)
    assert "Pareto front" in result.table()


def test_the_time_limit_stops_the_search_and_lists_what_was_not_tried():
    now = [0.0]

    def run_candidate(candidate):  # each candidate takes 3 s of the simulated clock
        yield from ()
        now[0] += 3.0
        return {"deployed_bytes": 1.0, "latency_ratio": 1.0, "dice_drop": 0.0}, [], None

    candidates = [se.Candidate(f"c{i}", []) for i in range(6)]
    result = run_to_end(se.search(candidates, run_candidate, BUDGET, time_limit_s=7, clock=lambda: now[0]))
    # c2 starts at 6 s, inside the limit; c3 would start at 9 s.
    assert [t.candidate.name for t in result.trials] == ["c0", "c1", "c2"]
    assert [c.name for c in result.not_tried] == ["c3", "c4", "c5"]
    assert [t.seconds for t in result.trials] == [3.0, 3.0, 3.0]
    assert "not tried (time limit)" in result.table()


def test_a_candidate_that_fails_is_kept_with_its_error_and_the_search_goes_on():
    def run_candidate(candidate):
        yield from ()
        if candidate.name == "broken":
            raise ValueError("layer conv3 cannot be quantized")
        return {"deployed_bytes": 10.0, "latency_ratio": 0.5, "dice_drop": 0.0}, [], None

    candidates = [se.Candidate("broken", []), se.Candidate("fine", [])]
    result = run_to_end(se.search(candidates, run_candidate, BUDGET))
    assert result.trials[0].error == "ValueError: layer conv3 cannot be quantized"
    assert [t.candidate.name for t in result.front] == ["fine"]


def test_a_trial_out_of_budget_never_reaches_the_front_however_small():
    def run_candidate(candidate):
        yield from ()
        size = {"tiny": 1.0, "ok": 50.0}[candidate.name]
        return {"deployed_bytes": size, "latency_ratio": 1.0, "dice_drop": 0.0}, \
            (["Dice drop 0.3 exceeds 0.01"] if candidate.name == "tiny" else []), None

    result = run_to_end(se.search([se.Candidate("tiny", []), se.Candidate("ok", [])], run_candidate, BUDGET))
    assert [t.candidate.name for t in result.front] == ["ok"]


def test_unknown_objectives_are_refused():
    with pytest.raises(ValueError, match="unknown objective 'speed'"):
        run_to_end(se.search([], lambda c: iter(()), BUDGET, objectives=("speed",)))


def test_candidates_use_the_sensitivity_table_to_keep_layers_in_float():
    table = [{"layer": "model.0.conv", "fidelity_drop": 0.002}, {"layer": "model.2.conv", "fidelity_drop": 0.08},
             {"layer": "model.1.conv", "fidelity_drop": 0.01}, {"layer": "model.3.conv", "fidelity_drop": 0.0}]
    candidates = se.candidate_recipes(("size",), sensitivity=table)
    guided = {c.name: c.steps[0].get("exclude") for c in candidates if "keep" in c.name}
    assert guided == {"int8-keep1-float": ["model.2.conv"],
                      "int8-keep3-float": ["model.2.conv", "model.1.conv", "model.0.conv"]}
    assert len(candidates) >= 6 and all(c.steps for c in candidates)


def test_the_pipeline_runner_writes_and_judges_real_variants(tmp_path):
    from app.core.models import open_model
    from compression.data import cases_from_arrays
    from compression.pipeline import StepData
    from tests.core.model_fixtures import small_unet

    parent = open_model(small_unet(tmp_path / "unet"), prefer="state_dict")
    scans = _cases()
    cases = cases_from_arrays([c.volume for c in scans], [c.labels for c in scans])
    data = StepData(train=cases[:2], calib=cases[:2], threads=1)
    runner = se.pipeline_runner(parent, data, cases[2:], tmp_path / "out", BUDGET, threads=1,
                                latency_shape=(1, 1, 32, 32), latency_rounds=2, resamples=50)
    candidates = [se.Candidate("sparse90", [{"step": "prune_unstructured", "sparsity": 0.9}]),
                  se.Candidate("unknown", [{"step": "prune_unstructured", "sparsity": 0.5, "colour": "red"}])]
    result = run_to_end(se.search(candidates, runner, BUDGET))
    sparse = result.trials[0]
    assert not sparse.error, sparse.error
    assert (tmp_path / "out" / "sparse90" / "card.json").is_file()
    assert sparse.values["deployed_bytes"] > 0 and sparse.values["latency_ratio"] > 0
    assert 0.0 <= sparse.values["fidelity_dice"] <= 1.0
    assert "colour" in result.trials[1].error


def test_candidates_read_the_sensitivity_module_s_own_table():
    from compression.sensitivity import LayerSensitivity, SensitivityTable

    table = SensitivityTable("quantize", [LayerSensitivity("model.0.conv", "Conv2d", 160, 0.01, 0.99),
                                          LayerSensitivity("model.2.conv", "ConvTranspose2d", 290, 0.2, 0.8)])
    assert se.most_sensitive_layers(table) == ["model.2.conv", "model.0.conv"]
    names = [c.name for c in se.candidate_recipes(("latency",), sensitivity=table)]
    assert "int8-keep1-float" in names and "int8-keep3-float" not in names  # only 2 layers to keep
    assert se.most_sensitive_layers(SensitivityTable("quantize")) == []


def test_a_model_with_a_candidate_filter_gets_it_in_int8_in_every_size_candidate():
    plain = se.candidate_recipes(("size",), student=False)
    with_filter = se.candidate_recipes(("size",), candidate_filter=True, student=False)
    assert [c.name + "+filter-int8" for c in plain] == [c.name for c in with_filter]
    assert all(c.steps[-1] == {"step": "compress_filter"} and c.steps[:-1] == p.steps
               for c, p in zip(with_filter, plain))
    student = next(c for c in se.candidate_recipes(("size",), candidate_filter=True) if c.name == "student-4bit")
    assert student.steps[-1] == {"step": "compress_filter", "weight_bits": 4}  # its own, in 4 bits: not twice
    latency_only = se.candidate_recipes(("latency",), candidate_filter=True, student=False)
    assert not any(s["step"] == "compress_filter" for c in latency_only for s in c.steps)  # speed: the filter is ms


def test_the_student_candidate_is_the_smallest_preset_after_the_int8_ones():
    from compression.recipe import load_preset

    names = [c.name for c in se.candidate_recipes(("size",))]
    assert names.index("student-4bit") == 2 and names[:2] == ["int8-percentile", "int8-minmax"]
    student = se.candidate_recipes(("latency",))[2]
    assert student.steps == load_preset("smallest").steps and student.time_share == 0.5
    assert student.min_seconds == se.STUDENT_MIN_SECONDS == 600
    assert "student-4bit" not in [c.name for c in se.candidate_recipes(("size",), student=False)]


def test_under_a_time_limit_the_student_trains_in_its_share_of_the_time_left():
    now, given = [0.0], {}

    def run_candidate(candidate):  # each candidate takes 30 s of the simulated clock
        yield from ()
        given[candidate.name] = candidate
        now[0] += 30.0
        return {"deployed_bytes": 1.0, "latency_ratio": 1.0, "dice_drop": 0.0}, [], None

    steps = [{"step": "distill", "steps": 20000}, {"step": "quantize_int8_ort", "mode": "weights"}]
    candidates = [se.Candidate("int8", [{"step": "quantize_int8_ort"}]), se.Candidate("student", steps, "a student",
                                                                                      time_share=0.5)]
    result = run_to_end(se.search(candidates, run_candidate, BUDGET, time_limit_s=600, clock=lambda: now[0]))
    student = given["student"]
    # It starts at 30 s: half of the 570 s left, for its distillation only.
    assert student.steps == [{"step": "distill", "steps": 20000, "time_limit_s": 285}, steps[1]]
    assert "training limited to 285 s" in student.why
    assert result.trials[1].candidate is student and candidates[1].steps[0] == {"step": "distill", "steps": 20000}
    assert given["int8"] is candidates[0]
    run_to_end(se.search(candidates, run_candidate, BUDGET, clock=lambda: now[0]))  # no limit: as written
    assert given["student"] is candidates[1]


def test_a_student_whose_share_would_be_too_short_is_not_started_and_the_search_goes_on():
    now, ran = [0.0], []

    def run_candidate(candidate):
        yield from ()
        ran.append(candidate.name)
        now[0] += 100.0
        return {"deployed_bytes": 1.0, "latency_ratio": 1.0, "dice_drop": 0.0}, [], None

    candidates = [se.Candidate("int8", []), se.Candidate("student", [{"step": "distill"}], time_share=0.5,
                                                         min_seconds=300), se.Candidate("prune", [])]
    result = run_to_end(se.search(candidates, run_candidate, BUDGET, time_limit_s=600, clock=lambda: now[0]))
    # At 100 s, half of the 500 s left is 250 s, under the student's 300: it is skipped, pruning runs.
    assert ran == ["int8", "prune"] and [c.name for c in result.not_tried] == ["student"]
    assert "student" in result.table() and "not tried (time limit)" in result.table()
