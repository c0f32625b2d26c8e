"""Accuracy-aware search: try candidate recipes, keep every result, return the Pareto front.

Given an accuracy budget, an objective (deployed size, latency on this machine's provider, or
both) and a time limit, the search runs candidate recipes one after another — cheap, safe ones
first — and keeps every trial, including those that broke the budget or failed to run (with
why). Its answer is the set of trials within budget that no other trial within budget beats on
every objective *and* on accuracy: the trade-offs left to choose from, not just the first
recipe that passed.

Size and latency are compared with the original as deployed without us (its ONNX file in ONNX
Runtime when it has one); latency as a ratio measured side by side in the same run as each
candidate (the machine's load drifts between candidates; a ratio taken in one run does not).
When a per-layer sensitivity table is given (``compression.sensitivity``), the layers that
suffer most from quantization are kept in float in extra candidates.

The time limit stops new candidates; it cannot stop one that has started. A candidate that
trains for long (the distilled student: 35 minutes on 2 cores for the demo UNet's) therefore
carries a ``time_share``: its training gets that share of the time left when it starts, and
trains as many of its steps as fit (``TrainConfig.time_limit_s``). The trial records the limit
it ran under, so its variant's recipe says how it was made.
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Generator, Sequence

from app.core.progress import Progress, scaled
from compression.evaluate import Budget

# Objective name -> the trial value it minimises.
OBJECTIVES = {"size": "deployed_bytes", "latency": "latency_ratio", "accuracy": "dice_drop"}


# Steps that take a ``time_limit_s`` and train as much as fits in it (compression.steps.distill).
TIMED_STEPS = frozenset({"distill"})
# The least time the student's distillation is started with in a time-limited search, and its
# share of the time left when it starts: so it starts only with STUDENT_START_SECONDS left.
STUDENT_MIN_SECONDS = 600.0
STUDENT_TIME_SHARE = 0.5
STUDENT_START_SECONDS = STUDENT_MIN_SECONDS / STUDENT_TIME_SHARE


@dataclass
class Candidate:
    name: str
    steps: list[dict[str, Any]]
    why: str = ""  # what the candidate tries, in a sentence
    # Under a search time limit, the share of the time left when it starts that its training
    # (TIMED_STEPS) may take; 0: it runs as written. Without a limit it always runs as written.
    time_share: float = 0.0
    # ... and the least that share may be: with less, it is not started (too little training to
    # be worth judging) and the search goes on with the next candidate.
    min_seconds: float = 0.0


@dataclass
class Trial:
    candidate: Candidate
    values: dict[str, float] = field(default_factory=dict)  # deployed_bytes, latency_ratio, dice_drop, ...
    failures: list[str] = field(default_factory=list)  # budget limits broken, in words
    error: str = ""  # the candidate could not be run (a step refused); the traceback's last line
    variant: Any = None  # the ModelVariant written, when one was
    seconds: float = 0.0

    @property
    def within_budget(self) -> bool:
        return not self.error and not self.failures


@dataclass
class SearchResult:
    trials: list[Trial]  # every candidate tried, in the order tried
    front: list[Trial]  # within budget and non-dominated on the objectives plus accuracy
    objectives: tuple[str, ...]
    not_tried: list[Candidate]  # left when the time limit came
    seconds: float

    def table(self) -> str:
        return trials_table(self)


# ---------------------------------------------------------------- the front


def _key(trial: Trial, objectives: Sequence[str]) -> tuple[float, ...]:
    return tuple(trial.values.get(OBJECTIVES[o], math.inf) for o in objectives)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is no worse than b everywhere and better somewhere (all objectives minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(trials: Sequence[Trial], objectives: Sequence[str]) -> list[Trial]:
    """Trials within budget that no other trial within budget dominates (ties are all kept)."""
    axes = tuple(dict.fromkeys([*objectives, "accuracy"]))
    eligible = [t for t in trials if t.within_budget]
    keys = [_key(t, axes) for t in eligible]
    front = [t for t, k in zip(eligible, keys) if not any(dominates(other, k) for other in keys)]
    return sorted(front, key=lambda t: _key(t, axes))


# ---------------------------------------------------------------- candidates


def int8_steps(calibrate: str = "percentile", exclude: Sequence[str] = ()) -> dict:
    step = {"step": "quantize_int8_ort", "mode": "static", "per_channel": True, "calibrate": calibrate}
    if exclude:
        step["exclude"] = list(exclude)
    return step


def candidate_recipes(objectives: Sequence[str] = ("size", "latency"), sensitivity: Any = None,
                      finetune_steps: int = 200, candidate_filter: bool = False,
                      student: bool = True) -> list[Candidate]:
    """Candidates from cheapest and safest to the most aggressive (a time limit cuts the end).

    ``candidate_filter``: the model carries a candidate filter (a second network every variant
    deploys). When size counts, every candidate then also stores the filter's weights in int8
    (``compress_filter``: 3.4× smaller for the demo UNet's, one calib decision in 338 moved by
    at most 0.014), or the unchanged filter would cap every size ratio.

    ``student``: after the int8 candidates, a distilled student (:func:`student_candidate`), the
    only technique here that reached the issue's size and speed targets on the demo UNet. It
    trains for minutes to an hour, so under a time limit it takes half of the time left when it
    starts, and the pruning candidates after it still get their turn."""
    candidates = [
        Candidate("int8-percentile", [int8_steps("percentile")], "static int8, percentile calibration"),
        Candidate("int8-minmax", [int8_steps("minmax")], "static int8, min/max calibration"),
    ]
    candidates += _sensitivity_candidates(sensitivity)
    if student:
        candidates.append(student_candidate())
    for ratio in (0.3, 0.5, 0.6, 0.7):
        prune = {"step": "prune_channels", "ratio": ratio, "finetune_steps": finetune_steps // 2}
        candidates.append(Candidate(f"prune{int(ratio * 100)}-ft-int8",
                                    [prune, {"step": "finetune", "steps": finetune_steps}, int8_steps()],
                                    f"remove {ratio:.0%} of channels, fine-tune, static int8"))
    if "size" in objectives:
        candidates.append(Candidate("prune80-unstructured", [{"step": "prune_unstructured", "sparsity": 0.8,
                                                              "finetune_steps": finetune_steps}],
                                    "80 % unstructured sparsity, stored sparse (size only, no speed-up)"))
    if candidate_filter and "size" in objectives:
        candidates = [c if _stores_filter(c) else
                      replace(c, name=c.name + "+filter-int8", steps=c.steps + [{"step": "compress_filter"}],
                              why=c.why + "; candidate filter weights in int8") for c in candidates]
    return candidates


def student_candidate(time_share: float = STUDENT_TIME_SHARE, min_seconds: float = STUDENT_MIN_SECONDS) -> Candidate:
    """The ``smallest`` preset's recipe as a candidate: a 0.35-width student distilled from the
    original (quantization-aware), stored in 4 bits, its output calibrated, its filter in 4 bits."""
    from compression.recipe import load_preset

    recipe = load_preset("smallest")
    return Candidate("student-4bit", recipe.steps,
                     "a narrow student distilled from the original and stored in 4 bits (the smallest preset)",
                     time_share=time_share, min_seconds=min_seconds)


def _stores_filter(candidate: Candidate) -> bool:
    return any(s.get("step") == "compress_filter" for s in candidate.steps)


def _sensitivity_candidates(sensitivity: Any) -> list[Candidate]:
    """Keep the layers quantization hurts most in float: the top 1 and the top 3 of the table."""
    layers = most_sensitive_layers(sensitivity)
    return [Candidate(f"int8-keep{k}-float", [int8_steps("percentile", layers[:k])],
                      f"static int8 with the {k} most sensitive layer(s) left in float: {', '.join(layers[:k])}")
            for k in (1, 3) if len(layers) >= k]


def most_sensitive_layers(sensitivity: Any) -> list[str]:
    """Layer names ordered by fidelity drop; accepts rows (dicts/objects) with layer + drop fields."""
    if not sensitivity:
        return []
    rows = getattr(sensitivity, "rows", sensitivity)

    def field_of(row, *names):
        for name in names:
            value = row.get(name) if isinstance(row, dict) else getattr(row, name, None)
            if value is not None:
                return value
        return None

    scored = [(field_of(r, "layer", "name"), field_of(r, "fidelity_drop", "drop", "dice_drop")) for r in rows]
    scored = [(layer, float(drop)) for layer, drop in scored if layer is not None and drop is not None]
    return [layer for layer, _ in sorted(scored, key=lambda s: -s[1])]


# ---------------------------------------------------------------- the search


def search(candidates: Sequence[Candidate], run_candidate: Callable[[Candidate], Generator],
           budget: Budget, *, objectives: Sequence[str] = ("size", "latency"), time_limit_s: float | None = None,
           clock: Callable[[], float] = time.monotonic) -> Generator[Progress, None, SearchResult]:
    """Try ``candidates`` in order until done or out of time; return every trial and the Pareto front.

    ``run_candidate(candidate)`` is a generator that yields Progress and returns
    ``(values, failures, variant)``: ``values`` holds the objective values (see OBJECTIVES) and
    accuracy measures; ``failures`` the budget limits broken. A candidate that raises is kept
    as a trial with its error; the search goes on with the next.
    """
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r} (choose from {', '.join(OBJECTIVES)})")
    start = clock()
    trials: list[Trial] = []
    skipped: list[Candidate] = []  # too little time left for their training
    for index, candidate in enumerate(candidates):
        if time_limit_s is not None and clock() - start >= time_limit_s:
            return _result(trials, objectives, skipped + list(candidates[index:]), clock() - start)
        span = (index / len(candidates), (index + 1) / len(candidates))
        if time_limit_s is not None:
            fitted = fitted_to_time(candidate, time_limit_s - (clock() - start))
            if fitted is None:
                skipped.append(candidate)
                continue
            candidate = fitted
        trials.append((yield from _trial(candidate, run_candidate, clock, span, f"{candidate.name}: ")))
    yield Progress(1.0, f"{len(trials)} candidates tried")
    return _result(trials, objectives, skipped, clock() - start)


def fitted_to_time(candidate: Candidate, seconds_left: float) -> Candidate | None:
    """The candidate with its training limited to its share of the time left (see Candidate.time_share);
    None when that share is under its ``min_seconds``."""
    if candidate.time_share <= 0:
        return candidate
    limit = max(1, round(candidate.time_share * seconds_left))
    if limit < candidate.min_seconds:
        return None
    steps = [{**s, "time_limit_s": limit} if s.get("step") in TIMED_STEPS else s for s in candidate.steps]
    return replace(candidate, steps=steps, why=f"{candidate.why}; training limited to {limit} s "
                                             f"({candidate.time_share:.0%} of the time left)")


def _trial(candidate: Candidate, run_candidate, clock, span, prefix) -> Generator[Progress, None, Trial]:
    began = clock()
    trial = Trial(candidate)
    try:
        trial.values, trial.failures, trial.variant = yield from scaled(run_candidate(candidate), *span, prefix)
    except (GeneratorExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # a step that refuses (an unknown layer, no calib data) fails only its candidate
        if type(exc).__name__ == "Cancelled":
            raise
        trial.error = traceback.format_exception_only(type(exc), exc)[-1].strip()
    trial.seconds = clock() - began
    return trial


def _result(trials, objectives, not_tried, seconds) -> SearchResult:
    return SearchResult(trials, pareto_front(trials, objectives), tuple(objectives), not_tried, seconds)


# ---------------------------------------------------------------- the real evaluator


def pipeline_runner(parent, step_data, eval_cases: Sequence, out_dir: Path, budget: Budget, *,
                    device: str = "cpu", threads: int | None = None, seed: int = 0, latency_shape=None,
                    latency_rounds: int = 5, resamples: int = 1000) -> Callable[[Candidate], Generator]:
    """``run_candidate`` that compresses with the pipeline, evaluates on ``eval_cases`` and times it.

    Each candidate's variant is written to ``out_dir/<candidate name>``; its latency is measured
    in the same run as the parent's, and reported as a ratio (variant / original).
    """
    def run_candidate(candidate: Candidate):
        from compression.pipeline import run_steps

        variant = yield from scaled(run_steps(parent, candidate.steps, step_data, Path(out_dir),
                                              name=candidate.name, recipe={"steps": candidate.steps}),
                                    0.0, 0.6, "")
        values, failures = yield from scaled(_judge(parent, variant, eval_cases, budget, device, threads, seed,
                                                    resamples), 0.6, 0.9, "evaluating: ")
        yield Progress(0.9, "latency side by side with the original")
        values.update(_latency_ratio(parent, variant, device, threads, latency_shape, latency_rounds))
        return values, failures, variant

    return run_candidate


def _judge(parent, variant, eval_cases, budget, device, threads, seed, resamples):
    from compression import evaluate as ev
    from compression.cost import deployed_size

    baseline = deployable_baseline(parent)
    comparison = yield from ev.evaluate([parent, variant], eval_cases, names=["original", "candidate"],
                                        device=device, threads=threads, seed=seed, resamples=resamples)
    result = comparison.variant("candidate")
    values = {name: verdict.point for name, verdict in result.verdicts.items()}
    values["deployed_bytes"] = float(deployed_size(variant))
    values["size_ratio"] = deployed_size(baseline) / values["deployed_bytes"]
    return values, ev.budget_failures(result, budget)


def deployable_baseline(parent):
    """The original as it would be deployed without us: its ONNX form when it has one (ORT fp32).

    Candidates are written with an ONNX file and run in ONNX Runtime, so comparing them with
    eager torch would credit the runtime's speed to the compression.
    """
    return parent.as_format("onnx") if parent.format != "onnx" and "onnx" in parent.files else parent


def _latency_ratio(parent, variant, device, threads, shape, rounds) -> dict[str, float]:
    from app.core.progress import run_to_end
    from compression.cost import default_input_shape, measure_latency, shape_for, variant_predictor

    import numpy as np

    shape = tuple(shape or default_input_shape(parent.card))
    predictors = {"original": variant_predictor(deployable_baseline(parent), device, threads)[0],
                  "candidate": variant_predictor(variant, device, threads)[0]}
    batches = {"original": np.zeros(shape, np.float32),
               "candidate": np.zeros(shape_for(variant.card, shape), np.float32)}
    stats = run_to_end(measure_latency(predictors, batches, warmup=1, rounds=rounds))
    return {"latency_ms": stats["candidate"].median_ms, "original_latency_ms": stats["original"].median_ms,
            "latency_ratio": stats["candidate"].median_ms / stats["original"].median_ms}


# ---------------------------------------------------------------- reporting


def trials_table(result: SearchResult) -> str:
    front = {id(t) for t in result.front}
    lines = [f"{'candidate':<26} {'size':>10} {'latency':>8} {'Dice drop':>9}  verdict"]
    for trial in result.trials:
        size = trial.values.get("deployed_bytes")
        latency = trial.values.get("latency_ratio")
        drop = trial.values.get("dice_drop")
        verdict = ("error: " + trial.error if trial.error else "; ".join(trial.failures) if trial.failures
                   else "Pareto front" if id(trial) in front else "within budget, dominated")
        lines.append(f"{trial.candidate.name:<26} {_fmt(size, '{:,.0f}'):>10} {_fmt(latency, '{:.2f}x'):>8} "
                     f"{_fmt(drop, '{:.4f}'):>9}  {verdict}")
    for candidate in result.not_tried:
        lines.append(f"{candidate.name:<26} {'':>10} {'':>8} {'':>9}  not tried (time limit)")
    return "\n".join(lines)


def _fmt(value, pattern: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)
