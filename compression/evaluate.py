"""Evaluation: how well each model variant does on held-out scans, and how far it strays from the original.

The GUI's compare view, the compression wizard, the search and the CLI all call this module,
so a number means the same thing wherever it appears. Results are plain dataclasses: one
:class:`CaseRow` per variant × eval case, and per variant a set of :class:`Verdict`\\ s
(point estimate + paired-bootstrap 95 % interval over cases).

- Against ground truth (when the case has labels): Dice, HD95 (mm, with the real spacing),
  per-lesion sensitivity and false positives, separately for lesions ≥ 6 mm (Lung-RADS mean
  diameter); accuracy and AUC for classifiers given per-lesion truth.
- Against the original (fidelity, always): Dice between the two masks, lesions lost and
  gained (with the one lesion-matching rule of :mod:`app.core.lesions`), class flips.
- Every interval is paired: the same seeded resamples of cases serve every variant, so a
  difference between variants is judged on the same scans.
- Below 30 eval cases or 50 lesions ≥ 6 mm there is not enough evidence for an interval to
  mean much: the comparison says "insufficient evidence" and still shows the point estimates.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence

import numpy as np

from app.core.progress import Progress

LARGE_LESION_MM = 6.0  # Lung-RADS: nodules from 6 mm mean diameter change management
MIN_EVAL_CASES = 30
MIN_LARGE_LESIONS = 50
BOOTSTRAP_RESAMPLES = 2000
NAN = float("nan")


# ---------------------------------------------------------------- result objects


@dataclass
class CaseRow:
    """One variant on one eval case. NaN where a measure does not apply (no labels, a classifier)."""

    case: str
    patient: str
    variant: str
    # against ground truth
    dice: float = NAN
    hd95_mm: float = NAN
    true_lesions: int = 0
    true_lesions_large: int = 0
    detected: int = 0
    detected_large: int = 0
    false_positives: int = 0
    # against the original (the reference variant)
    fidelity_dice: float = NAN
    reference_lesions: int = 0
    reference_lesions_large: int = 0
    lesions_lost: int = 0
    lesions_lost_large: int = 0
    lesions_lost_large_true: int = 0  # of those, lesions that overlap a ground-truth lesion (labels only)
    # Ground-truth nodules >= 6 mm the original detects and this variant does not (labels only),
    # by the sensitivity rule: the nodules a reader would miss. The original may reach one with
    # a piece under 6 mm, or with a lesion the variant still overlaps elsewhere, which the
    # lost-lesion count above does not see.
    nodules_missed_large: int = 0
    lesions_gained: int = 0
    lesions_gained_large: int = 0
    # classifiers, per lesion: (truth or None, predicted class, score of each class)
    classified: list[tuple[str | None, str, dict[str, float]]] = field(default_factory=list)
    class_flips: int = 0
    # seconds the runner reported for this case
    network_s: float = NAN
    total_s: float = NAN


@dataclass
class Verdict:
    """A point estimate with its paired-bootstrap 95 % interval (None when evidence is insufficient)."""

    metric: str
    point: float
    low: float | None = None
    high: float | None = None
    higher_is_better: bool = True
    note: str = ""

    def text(self, digits: int = 3) -> str:
        if self.point is None or (isinstance(self.point, float) and math.isnan(self.point)):
            return "n/a"
        point = f"{self.point:.{digits}f}"
        if self.low is None or self.high is None:
            return f"{point} ({self.note or 'no interval'})"
        return f"{point} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


@dataclass
class VariantResult:
    name: str
    is_reference: bool
    rows: list[CaseRow]
    verdicts: dict[str, Verdict] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        verdict = self.verdicts.get(metric)
        return NAN if verdict is None else verdict.point


@dataclass
class Comparison:
    """Variants × eval cases; ``variants[reference_index]`` is the original the others are judged against."""

    variants: list[VariantResult]
    reference_index: int
    cases: list[str]
    large_lesions: int  # ground-truth lesions ≥ 6 mm (the reference's own when unlabelled)
    sufficient: bool
    evidence: str  # "sufficient" or "insufficient evidence: ..." in words
    seed: int = 0
    resamples: int = BOOTSTRAP_RESAMPLES

    @property
    def reference(self) -> VariantResult:
        return self.variants[self.reference_index]

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)


@dataclass(frozen=True)
class Budget:
    """What a compressed variant may cost in accuracy, judged against the original on the eval split.

    A limit left as None is not checked. Dice drop is the original's Dice against ground truth
    minus the variant's; without labels it is 1 - fidelity Dice (disagreement with the original).
    """

    max_dice_drop: float | None = 0.01
    max_lost_lesions_large: int | None = 0
    # Ground-truth nodules >= 6 mm the original detects and the variant misses: the original's
    # own false positives may go. Without labels nothing tells them apart, so every lost lesion
    # >= 6 mm counts.
    max_lost_nodules_large: int | None = None
    max_lost_lesions: int | None = None
    min_fidelity_dice: float | None = None
    max_sensitivity_drop: float | None = None
    max_accuracy_drop: float | None = None
    max_class_flip_rate: float | None = None


# ---------------------------------------------------------------- per-case measures


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foregrounds (label > 0); two empty masks agree perfectly (1.0)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def hd95_mm(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the two surfaces, in mm.

    0 when both masks are empty, NaN when only one is (no distance exists). Works on the
    bounding box of both masks: every surface voxel lies inside it, so cropping is exact.
    """
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return NAN
    box = _union_box(a | b)
    a, b = a[box], b[box]
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = _distance_to(surface_b, spacing)[surface_a]
    to_a = _distance_to(surface_a, spacing)[surface_b]
    return float(np.percentile(np.concatenate([to_b, to_a]), 95))


def _union_box(mask: np.ndarray) -> tuple[slice, ...]:
    points = np.argwhere(mask)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(points.min(0), points.max(0)))


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    # border_value=0: a mask touching the box edge has its edge voxels on its surface.
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _distance_to(surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(~surface, sampling=tuple(float(s) for s in spacing))


@dataclass
class _LesionMap:
    """A label map's lesions as an instance map plus which ids are ≥ 6 mm."""

    instances: np.ndarray
    ids: list[int]
    large: set[int]


def lesion_map(labels: np.ndarray, volume, min_diameter_mm: float = LARGE_LESION_MM) -> _LesionMap:
    from app.core.lesions import label_instances, lesion_table

    labels = np.asarray(labels)
    instances, _ = label_instances(labels)
    lesions = lesion_table(labels, volume, instances=instances)
    return _LesionMap(instances, [l.lesion_id for l in lesions],
                      {l.lesion_id for l in lesions if l.mean_diameter_mm >= min_diameter_mm})


def _match(reference: _LesionMap, test: _LesionMap):
    from app.core.lesions import match_lesions

    return match_lesions(reference.instances, test.instances)


def truth_measures(row: CaseRow, predicted: np.ndarray, truth: np.ndarray, volume,
                   predicted_lesions: _LesionMap, truth_lesions: _LesionMap) -> set[int]:
    """Fill the ground-truth columns of ``row``; returns the ground-truth lesions it detects."""
    row.dice = dice(predicted, truth)
    row.hd95_mm = hd95_mm(predicted, truth, volume.spacing)
    match = _match(truth_lesions, predicted_lesions)
    found = {ref for ref, _, _ in match.matched}
    row.true_lesions = len(truth_lesions.ids)
    row.true_lesions_large = len(truth_lesions.large)
    row.detected = len(found)
    row.detected_large = len(found & truth_lesions.large)
    row.false_positives = len(match.added)
    return found


def fidelity_measures(row: CaseRow, predicted: np.ndarray, original: np.ndarray,
                      predicted_lesions: _LesionMap, original_lesions: _LesionMap,
                      original_true: set[int] | None = None) -> None:
    """Fill the columns that compare a variant with the original on the same scan.

    ``original_true``: the original's lesions that overlap a ground-truth lesion. A lost lesion
    is any of the original's findings the variant does not reproduce, its false positives
    included (fidelity); the lost *true* lesions are the nodules a reader would miss.
    """
    row.fidelity_dice = dice(predicted, original)
    match = _match(original_lesions, predicted_lesions)
    row.reference_lesions = len(original_lesions.ids)
    row.reference_lesions_large = len(original_lesions.large)
    row.lesions_lost = len(match.missed)
    row.lesions_lost_large = len(set(match.missed) & original_lesions.large)
    row.lesions_lost_large_true = len(set(match.missed) & original_lesions.large & (original_true or set()))
    row.lesions_gained = len(match.added)
    row.lesions_gained_large = len(set(match.added) & predicted_lesions.large)


def classification_measures(row: CaseRow, scores: dict[int, dict[str, float]],
                            original: dict[int, dict[str, float]], truth: dict[int, str] | None) -> None:
    """Per-lesion predicted class (and truth when known); class flips against the original."""
    truth = truth or {}
    for lesion_id in sorted(scores):
        predicted = max(scores[lesion_id], key=scores[lesion_id].get)
        row.classified.append((truth.get(lesion_id), predicted, dict(scores[lesion_id])))
        if lesion_id in original and max(original[lesion_id], key=original[lesion_id].get) != predicted:
            row.class_flips += 1


def segmentation_rows(case, findings: Sequence, names: Sequence[str], reference_index: int = 0) -> list[CaseRow]:
    """One row per variant for one case, from each variant's findings on it (same order as ``names``)."""
    volume = case.volume
    maps = [lesion_map(f.labels, volume) for f in findings]
    truth = None if getattr(case, "labels", None) is None else np.asarray(case.labels)
    truth_lesions = None if truth is None else lesion_map(truth, volume)
    original = findings[reference_index]
    original_true = (None if truth is None else
                     {int(i) for i in np.unique(maps[reference_index].instances[truth > 0]) if i})
    rows, detected = [], []
    for name, found, lesions in zip(names, findings, maps):
        row = CaseRow(case=case.case, patient=case.patient, variant=name, **_seconds(found))
        if truth is not None:
            detected.append(truth_measures(row, found.labels, truth, volume, lesions, truth_lesions))
        fidelity_measures(row, found.labels, original.labels, lesions, maps[reference_index], original_true)
        rows.append(row)
    if truth is not None:
        found_by_original = detected[reference_index] & truth_lesions.large
        for row, found in zip(rows, detected):
            row.nodules_missed_large = len(found_by_original - found)
    return rows


def classification_rows(case, findings: Sequence, names: Sequence[str], reference_index: int = 0) -> list[CaseRow]:
    truth = getattr(case, "lesion_classes", None)
    original = findings[reference_index].lesion_scores
    rows = []
    for name, found in zip(names, findings):
        row = CaseRow(case=case.case, patient=case.patient, variant=name, **_seconds(found))
        classification_measures(row, found.lesion_scores, original, truth)
        rows.append(row)
    return rows


def _seconds(findings) -> dict[str, float]:
    timing = getattr(findings, "timing", None)
    if timing is None:
        return {}
    return {"network_s": float(timing.network_s), "total_s": float(timing.total_s)}


# ---------------------------------------------------------------- bootstrap


def bootstrap_indices(n_cases: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n_cases) case indices drawn with replacement; shared by every variant (paired)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_cases, size=(resamples, n_cases))


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    samples = np.asarray(samples, float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return NAN, NAN
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def _column(rows: Sequence[CaseRow], name: str) -> np.ndarray:
    return np.array([getattr(r, name) for r in rows], float)


# A statistic maps per-case columns (each (resamples, cases) or (cases,)) to one value per resample.
def _mean(col: str) -> Callable:
    def statistic(columns):
        values = columns[col]
        with warnings.catch_warnings():  # a resample drawing only NaN cases (e.g. no HD95) gives NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(values, axis=-1)
    return statistic


def _ratio(numerator: str, denominator: str) -> Callable:
    def statistic(columns):
        den = columns[denominator].sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, columns[numerator].sum(axis=-1) / np.maximum(den, 1), NAN)
    return statistic


def _total(col: str) -> Callable:
    return lambda columns: columns[col].sum(axis=-1)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    statistic: Callable
    columns: tuple[str, ...]
    higher_is_better: bool
    needs_truth: bool  # only meaningful when the cases carry labels


SEGMENTATION_METRICS = (
    MetricSpec("dice", _mean("dice"), ("dice",), True, True),
    MetricSpec("hd95_mm", _mean("hd95_mm"), ("hd95_mm",), False, True),
    MetricSpec("sensitivity", _ratio("detected", "true_lesions"), ("detected", "true_lesions"), True, True),
    MetricSpec("sensitivity_large", _ratio("detected_large", "true_lesions_large"),
               ("detected_large", "true_lesions_large"), True, True),
    MetricSpec("false_positives_per_case", _mean("false_positives"), ("false_positives",), False, True),
    MetricSpec("fidelity_dice", _mean("fidelity_dice"), ("fidelity_dice",), True, False),
    MetricSpec("lesions_lost", _total("lesions_lost"), ("lesions_lost",), False, False),
    MetricSpec("lesions_lost_large", _total("lesions_lost_large"), ("lesions_lost_large",), False, False),
    MetricSpec("lesions_lost_large_true", _total("lesions_lost_large_true"), ("lesions_lost_large_true",), False, True),
    MetricSpec("nodules_missed_large", _total("nodules_missed_large"), ("nodules_missed_large",), False, True),
    MetricSpec("lesions_gained", _total("lesions_gained"), ("lesions_gained",), False, False),
    MetricSpec("lesions_gained_large", _total("lesions_gained_large"), ("lesions_gained_large",), False, False),
)
# Paired differences against the original: positive = the variant is worse.
DROPS = (("dice_drop", "dice"), ("sensitivity_large_drop", "sensitivity_large"), ("sensitivity_drop", "sensitivity"))


def _resampled(rows: Sequence[CaseRow], columns: Sequence[str], indices: np.ndarray) -> dict[str, np.ndarray]:
    return {c: _column(rows, c)[indices] for c in columns}


def _whole(rows: Sequence[CaseRow], columns: Sequence[str]) -> dict[str, np.ndarray]:
    return {c: _column(rows, c) for c in columns}


def _point(spec: MetricSpec, rows: Sequence[CaseRow]) -> float:
    return float(spec.statistic(_whole(rows, spec.columns)))


def _verdict(name: str, point: float, samples: np.ndarray | None, higher_is_better: bool,
             sufficient: bool) -> Verdict:
    if not sufficient or samples is None or math.isnan(point):
        return Verdict(name, point, None, None, higher_is_better,
                       "insufficient evidence" if not sufficient else "")
    low, high = percentile_interval(samples)
    return Verdict(name, point, low, high, higher_is_better)


# ---------------------------------------------------------------- summaries


def evidence_rule(n_cases: int, large_lesions: int) -> tuple[bool, str]:
    reasons = []
    if n_cases < MIN_EVAL_CASES:
        reasons.append(f"{n_cases} eval cases (fewer than {MIN_EVAL_CASES})")
    if large_lesions < MIN_LARGE_LESIONS:
        reasons.append(f"{large_lesions} lesions ≥ {LARGE_LESION_MM:g} mm (fewer than {MIN_LARGE_LESIONS})")
    if reasons:
        return False, "insufficient evidence: " + " and ".join(reasons)
    return True, "sufficient"


def _has_truth(rows: Sequence[CaseRow]) -> bool:
    return any(not math.isnan(r.dice) for r in rows) or any(t is not None for r in rows for t, _, _ in r.classified)


def _segmentation_verdicts(rows, reference_rows, indices, sufficient) -> dict[str, Verdict]:
    verdicts: dict[str, Verdict] = {}
    truth = _has_truth(rows)
    for spec in SEGMENTATION_METRICS:
        if spec.needs_truth and not truth:
            continue
        samples = spec.statistic(_resampled(rows, spec.columns, indices))
        verdicts[spec.name] = _verdict(spec.name, _point(spec, rows), samples, spec.higher_is_better, sufficient)
    for drop, metric in DROPS if truth else ():
        spec = next(s for s in SEGMENTATION_METRICS if s.name == metric)
        samples = (spec.statistic(_resampled(reference_rows, spec.columns, indices))
                   - spec.statistic(_resampled(rows, spec.columns, indices)))
        point = _point(spec, reference_rows) - _point(spec, rows)
        verdicts[drop] = _verdict(drop, point, samples, False, sufficient)
    if not truth:  # without labels, a Dice drop can only mean disagreement with the original
        fidelity = verdicts["fidelity_dice"]
        verdicts["dice_drop"] = Verdict("dice_drop", 1.0 - fidelity.point,
                                        None if fidelity.high is None else 1.0 - fidelity.high,
                                        None if fidelity.low is None else 1.0 - fidelity.low,
                                        False, fidelity.note or "1 - fidelity Dice (no labels)")
    return verdicts


def summarise(rows_by_variant: dict[str, list[CaseRow]], reference: str, *, seed: int = 0,
              resamples: int = BOOTSTRAP_RESAMPLES, large_lesions: int | None = None) -> Comparison:
    """Verdicts for every variant from its per-case rows (all variants on the same cases, same order)."""
    names = list(rows_by_variant)
    reference_rows = rows_by_variant[reference]
    cases = [r.case for r in reference_rows]
    for name in names:
        if [r.case for r in rows_by_variant[name]] != cases:
            raise ValueError(f"variant {name} was not evaluated on the same cases as {reference}")
    if large_lesions is None:
        large_lesions = _large_lesion_count(reference_rows)
    sufficient, evidence = evidence_rule(len(cases), large_lesions)
    indices = bootstrap_indices(len(cases), resamples, seed) if cases else np.zeros((resamples, 0), int)
    classifier = any(r.classified for r in reference_rows)
    results = []
    for name in names:
        rows = rows_by_variant[name]
        if classifier:
            verdicts = _classification_verdicts(rows, reference_rows, indices, sufficient)
        else:
            verdicts = _segmentation_verdicts(rows, reference_rows, indices, sufficient)
        results.append(VariantResult(name, name == reference, rows, verdicts))
    return Comparison(results, names.index(reference), cases, large_lesions, sufficient, evidence, seed, resamples)


def _large_lesion_count(reference_rows: Sequence[CaseRow]) -> int:
    """Ground-truth lesions ≥ 6 mm; the original's own when there is no ground truth."""
    if _has_truth(reference_rows) and not any(r.classified for r in reference_rows):
        return int(sum(r.true_lesions_large for r in reference_rows))
    if any(r.classified for r in reference_rows):
        return int(sum(len(r.classified) for r in reference_rows))
    return int(sum(r.reference_lesions_large for r in reference_rows))


# ---------------------------------------------------------------- classifiers


def accuracy(items: Sequence[tuple[str | None, str, dict]]) -> float:
    judged = [(t, p) for t, p, _ in items if t is not None]
    return NAN if not judged else sum(t == p for t, p in judged) / len(judged)


def auc(items: Sequence[tuple[str | None, str, dict]]) -> float:
    """Macro one-vs-rest ROC AUC (Mann–Whitney), over classes with both positives and negatives."""
    judged = [(t, s) for t, _, s in items if t is not None]
    if not judged:
        return NAN
    values = []
    for name in judged[0][1]:
        positive = np.array([s[name] for t, s in judged if t == name])
        negative = np.array([s[name] for t, s in judged if t != name])
        if positive.size and negative.size:
            values.append(_mann_whitney_auc(positive, negative))
    return float(np.mean(values)) if values else NAN


def _mann_whitney_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    return float((ranks[: positive.size].sum() - positive.size * (positive.size + 1) / 2)
                 / (positive.size * negative.size))


def flip_rate(rows: Sequence[CaseRow]) -> float:
    total = sum(len(r.classified) for r in rows)
    return NAN if total == 0 else sum(r.class_flips for r in rows) / total


CLASSIFICATION_METRICS: dict[str, tuple[Callable, bool]] = {
    "accuracy": (lambda rows: accuracy([item for r in rows for item in r.classified]), True),
    "auc": (lambda rows: auc([item for r in rows for item in r.classified]), True),
    "class_flip_rate": (flip_rate, False),
}


def _classification_verdicts(rows, reference_rows, indices, sufficient) -> dict[str, Verdict]:
    verdicts = {}
    # The resamples loop in Python: lesions are pooled per resample, which does not vectorise.
    picks = [[rows[i] for i in sample] for sample in indices] if sufficient else []
    reference_picks = [[reference_rows[i] for i in sample] for sample in indices] if sufficient else []
    for name, (statistic, higher) in CLASSIFICATION_METRICS.items():
        point = statistic(rows)
        samples = np.array([statistic(p) for p in picks]) if sufficient else None
        verdicts[name] = _verdict(name, point, samples, higher, sufficient)
    drop_samples = (np.array([accuracy(_items(r)) - accuracy(_items(p)) for r, p in zip(reference_picks, picks)])
                    if sufficient else None)
    drop = accuracy(_items(reference_rows)) - accuracy(_items(rows))
    verdicts["accuracy_drop"] = _verdict("accuracy_drop", drop, drop_samples, False, sufficient)
    return verdicts


def _items(rows):
    return [item for r in rows for item in r.classified]


# ---------------------------------------------------------------- budget


def budget_failures(result: VariantResult, budget: Budget) -> list[str]:
    """Which limits of the budget a variant breaks, in words; [] when it keeps to all of them.

    Judged on the point estimates (the intervals are shown beside them): with fewer eval
    cases than the evidence rule asks for, a pass is provisional and the comparison says so.
    """
    # With labels, the lost-lesion count says how many lie on a nodule: a reader tells a missed
    # nodule from an original's false alarm the variant no longer raises.
    on_truth = result.value("lesions_lost_large_true")
    of_them = ("" if math.isnan(on_truth) else
               f"; {on_truth:.0f} of them on a ground-truth nodule, the rest the original's false positives")
    checks = (
        ("dice_drop", budget.max_dice_drop, "Dice drop {v:.4f} exceeds {limit:g}", 1),
        ("lesions_lost_large", budget.max_lost_lesions_large,
         "{v:.0f} lost lesion(s) ≥ 6 mm (allowed {limit:g})" + of_them, 1),
        ("lesions_lost", budget.max_lost_lesions, "{v:.0f} lost lesion(s) (allowed {limit:g})", 1),
        ("fidelity_dice", budget.min_fidelity_dice, "fidelity Dice {v:.4f} below {limit:g}", -1),
        ("sensitivity_large_drop", budget.max_sensitivity_drop, "sensitivity drop {v:.4f} exceeds {limit:g}", 1),
        ("accuracy_drop", budget.max_accuracy_drop, "accuracy drop {v:.4f} exceeds {limit:g}", 1),
        ("class_flip_rate", budget.max_class_flip_rate, "class flips {v:.4f} exceed {limit:g}", 1),
    )
    if budget.max_lost_nodules_large is not None:
        if math.isnan(on_truth):  # no labels: every lost lesion counts
            checks += (("lesions_lost_large", budget.max_lost_nodules_large,
                        "{v:.0f} lost lesion(s) ≥ 6 mm, counted as nodules: no labels tell the "
                        "original's false positives apart (allowed {limit:g})", 1),)
        else:
            checks += (("nodules_missed_large", budget.max_lost_nodules_large,
                        "{v:.0f} ground-truth nodule(s) ≥ 6 mm the original detects and this variant "
                        "misses (allowed {limit:g})", 1),)
    failures = []
    for metric, limit, message, sign in checks:
        value = result.value(metric)
        if limit is None or math.isnan(value):
            continue
        if (value - limit) * sign > 1e-12:
            failures.append(message.format(v=value, limit=limit))
    return failures


# ---------------------------------------------------------------- running the models


def check_eval_split(manifest) -> None:
    """Refuse a manifest whose eval split shares a patient or series with calib/train."""
    from app.core.manifest import refuse_overlap

    refuse_overlap(manifest, "eval", ("train", "calib"))


def variant_name(variant, taken: Sequence[str] = ()) -> str:
    """A short unique display name: the card's name and version, numbered when repeated."""
    base = f"{variant.card.name} {variant.card.version}".strip()
    name, n = base, 2
    while name in taken:
        name, n = f"{base} ({n})", n + 1
    return name


def evaluate(variants: Sequence, cases: Sequence, *, manifest=None, reference_index: int = 0,
             names: Sequence[str] | None = None, device: str = "cpu", threads: int | None = None,
             seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
             make_runner: Callable | None = None) -> Generator[Progress, None, Comparison]:
    """Run every variant on every eval case and compare them with ``variants[reference_index]``.

    ``cases`` are eval cases (``compression.data.CaseData``: case, patient, volume, labels).
    When ``manifest`` is given its eval split is checked against calib/train first. Each case
    is run through all variants before the next is loaded, so only one case's label maps are
    held at a time.
    """
    if manifest is not None:
        check_eval_split(manifest)
    if not variants:
        raise ValueError("evaluate needs at least one model variant")
    if not cases:
        raise ValueError("there are no eval cases to judge the variants on")
    names = list(names) if names else _names(variants)
    runners = yield from _open_runners(variants, names, device, threads, make_runner)
    rows_by_variant: dict[str, list[CaseRow]] = {n: [] for n in names}
    for index, case in enumerate(cases):
        findings = []
        for k, runner in enumerate(runners):
            start = 0.05 + 0.9 * (index + k / len(runners)) / len(cases)
            stop = 0.05 + 0.9 * (index + (k + 1) / len(runners)) / len(cases)
            findings.append((yield from _run_case(runner, case, start, stop, f"case {case.case}, {names[k]}: ")))
        for row in _case_rows(case, findings, names, reference_index):
            rows_by_variant[row.variant].append(row)
    yield Progress(0.97, "bootstrap intervals")
    return summarise(rows_by_variant, names[reference_index], seed=seed, resamples=resamples)


def _names(variants) -> list[str]:
    names: list[str] = []
    for v in variants:
        names.append(variant_name(v, names))
    return names


def _open_runners(variants, names, device, threads, make_runner):
    if make_runner is None:
        from app.core.inference import make_runner
    from compression.cost import torch_autocast_hint

    runners = []
    for k, variant in enumerate(variants):
        yield Progress(0.05 * k / len(variants), f"loading {names[k]}")
        autocast = torch_autocast_hint(variant)  # a bf16 variant is judged as it runs: torch under autocast
        options = {"backend": "torch", "autocast": autocast} if autocast else {}
        runners.append(make_runner(variant.as_format("state_dict") if autocast else variant, device=device,
                                   threads=threads, **options))
    return runners


def _run_case(runner, case, start: float, stop: float, prefix: str):
    """One variant's findings on one case (a classifier looks at the ground-truth lesions)."""
    from app.core.progress import scaled

    if runner.card.task == "classification":
        run = runner.run(case.volume, lesions=_classifier_lesions(case))
    else:
        run = runner.run(case.volume)
    return (yield from scaled(run, start, stop, prefix))


def _classifier_lesions(case):
    from app.core.lesions import lesion_table

    if getattr(case, "labels", None) is None:
        raise ValueError(f"case {case.case}: a lesion classifier needs lesions, and the case has no label map")
    return lesion_table(np.asarray(case.labels), case.volume)


def _case_rows(case, findings, names, reference_index) -> list[CaseRow]:
    if findings[reference_index].labels is None:
        return classification_rows(case, findings, names, reference_index)
    return segmentation_rows(case, findings, names, reference_index)


# ---------------------------------------------------------------- tables


TABLE_METRICS = ("dice", "dice_drop", "hd95_mm", "sensitivity_large", "false_positives_per_case",
                 "fidelity_dice", "lesions_lost_large", "lesions_lost_large_true", "nodules_missed_large",
                 "lesions_gained_large", "accuracy", "auc", "accuracy_drop", "class_flip_rate")


def comparison_table(comparison: Comparison, extra: dict[str, dict[str, str]] | None = None) -> str:
    """The comparison as a plain-text table: one row per variant, point [95 % interval] per metric."""
    metrics = [m for m in TABLE_METRICS if any(m in v.verdicts for v in comparison.variants)]
    extra = extra or {}
    extra_columns = [c for values in extra.values() for c in values]
    extra_columns = list(dict.fromkeys(extra_columns))
    header = ["variant", *metrics, *extra_columns]
    body = []
    for v in comparison.variants:
        cells = [v.name + (" (original)" if v.is_reference else "")]
        cells += [v.verdicts[m].text() if m in v.verdicts else "" for m in metrics]
        cells += [extra.get(v.name, {}).get(c, "") for c in extra_columns]
        body.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(comparison.cases)} eval cases, {comparison.large_lesions} lesions ≥ "
                 f"{LARGE_LESION_MM:g} mm; paired bootstrap 95 % intervals ({comparison.resamples} "
                 f"resamples, seed {comparison.seed}); {comparison.evidence}")
    return "\n".join(lines)


PER_CASE_FIELDS = ("dice", "fidelity_dice", "false_positives", "true_lesions_large", "detected_large",
                   "lesions_lost_large", "lesions_lost_large_true", "nodules_missed_large", "lesions_gained_large")


def comparison_record(comparison: Comparison) -> dict[str, Any]:
    """JSON-ready summary (for reports and the audit log), with each variant's per-case rows so
    that a drop can be traced to the scans it came from (case names only, no patient IDs)."""
    return {
        "cases": len(comparison.cases), "large_lesions": comparison.large_lesions,
        "evidence": comparison.evidence, "seed": comparison.seed,
        "variants": {v.name: {m: {"point": _json_float(d.point), "low": _json_float(d.low),
                                   "high": _json_float(d.high), "note": d.note}
                              for m, d in v.verdicts.items()} for v in comparison.variants},
        "per_case": {v.name: [{"case": row.case, **{f: _json_float(getattr(row, f)) for f in PER_CASE_FIELDS}}
                              for row in v.rows] for v in comparison.variants},
    }


def _json_float(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)
