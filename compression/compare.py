"""Compare model variants on the same scans: findings, lesion disagreements, before/after accuracy.

One comparison = 2–4 variants (the first, usually the original, is the reference) × the cases
of a study or of a manifest's eval split. It runs in two parts so the GUI can drive the first
part as one heavy job per variant × case through its compute process, and the CLI in-process:

1. :func:`collect_findings` — each variant's findings on each case, from the
   :class:`~app.core.findings_cache.FindingsCache` or by running the model (``run``);
2. :func:`assemble` — per case, the lesion disagreements of every variant against the
   reference (:mod:`app.core.disagreement`) and the evaluation rows; then the verdicts with
   paired-bootstrap intervals (:mod:`compression.evaluate`), plus size and latency.

Findings are read back from the cache case by case, so the whole data set's label maps never
need to be in memory at once (see the arithmetic in :mod:`app.core.findings_cache`). Tables,
charts, reports and exports of a finished comparison: :mod:`compression.compare_report`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Sequence

import numpy as np

from app.core.disagreement import DEFAULT_VOLUME_CHANGE_PCT, Disagreement, findings_disagreements
from app.core.findings_cache import FindingsCache, series_key
from app.core.progress import Progress, as_progress
from compression import evaluate
from compression.data import CaseData

MIN_VARIANTS, MAX_VARIANTS = 2, 4
# A job body that runs one variant on one volume: a generator yielding Progress, returning Findings.
RunVariant = Callable[..., Generator[Progress, None, object]]


class CompareError(ValueError):
    """The comparison cannot be made as asked; the message says why in the user's words."""


@dataclass
class CaseComparison:
    """One case: where each variant's findings live in the cache, and its disagreements."""

    case: CaseData
    key: str  # series key in the findings cache
    disagreements: dict[str, list[Disagreement]] = field(default_factory=dict)  # other variant -> list


@dataclass
class ComparisonRun:
    variants: list  # app.core.models.ModelVariant, reference first unless reference_index says otherwise
    names: list[str]
    reference_index: int
    cases: list[CaseComparison]
    evaluation: evaluate.Comparison
    cache: FindingsCache
    volume_change_pct: float = DEFAULT_VOLUME_CHANGE_PCT
    # Lesion-type classifiers compared on the reference segmentation's lesions (optional).
    classifiers: list = field(default_factory=list)
    classifier_names: list[str] = field(default_factory=list)
    classifier_evaluation: evaluate.Comparison | None = None

    @property
    def reference_name(self) -> str:
        return self.names[self.reference_index]

    @property
    def others(self) -> list[str]:
        return [n for i, n in enumerate(self.names) if i != self.reference_index]

    def findings(self, case_index: int, variant_index: int):
        """A variant's findings on a case, from the cache (reloaded from disk if evicted)."""
        variant = self.variants[variant_index]
        found = self.cache.get(cache_id(variant), self.cases[case_index].key)
        if found is None:
            raise CompareError(f"the findings of {self.names[variant_index]} on case "
                               f"{self.cases[case_index].case.case} are no longer in the cache")
        return found

    def all_disagreements(self) -> list[tuple[int, str, Disagreement]]:
        """(case index, other variant, disagreement), most serious first across every case."""
        from app.core.disagreement import seriousness_key

        items = [(ci, name, d) for ci, case in enumerate(self.cases)
                 for name, found in case.disagreements.items() for d in found]
        order = self.names + self.classifier_names
        return sorted(items, key=lambda t: (seriousness_key(t[2]), t[0], order.index(t[1])))

    def size_bytes(self) -> list[int]:
        """Deployed size: the file each variant runs from."""
        return [_deployed_size(v) for v in self.variants]

    def latency_s(self) -> list[float]:
        """Mean seconds per case (load to post-processing) each variant's runner reported."""
        return [_mean([r.total_s for r in result.rows]) for result in self.evaluation.variants]

    def network_s(self) -> list[float]:
        """Mean seconds per case in the network alone (the first case also pays the model's loading
        in ``latency_s``; this does not)."""
        return [_mean([r.network_s for r in result.rows]) for result in self.evaluation.variants]


def _deployed_size(variant) -> int:
    try:
        return int(variant.main_file.stat().st_size)
    except (OSError, KeyError):
        return int(variant.size_bytes)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ---------------------------------------------------------------- choosing variants


def variant_names(variants: Sequence) -> list[str]:
    """Display names ("name version"), made unique: two copies of one model stay apart."""
    names: list[str] = []
    for variant in variants:
        base = f"{variant.card.name} {variant.card.version}".strip()
        name, n = base, 2
        while name in names:
            name, n = f"{base} #{n}", n + 1
        names.append(name)
    return names


def split_by_task(models: Sequence) -> tuple[list, list]:
    """(segmentation variants, lesion-type classifiers), each in the order given."""
    return ([m for m in models if m.card.task == "segmentation"],
            [m for m in models if m.card.task == "classification"])


def check_variants(variants: Sequence, classifiers: Sequence = ()) -> None:
    """2–4 segmentation variants; or 2–4 classifier variants judged on one segmentation's lesions."""
    if classifiers and not MIN_VARIANTS <= len(classifiers) <= MAX_VARIANTS:
        raise CompareError(f"choose {MIN_VARIANTS} to {MAX_VARIANTS} classifier variants, not {len(classifiers)}")
    least = 1 if classifiers else MIN_VARIANTS
    if not least <= len(variants) <= MAX_VARIANTS:
        raise CompareError(f"choose {MIN_VARIANTS} to {MAX_VARIANTS} model variants, not {len(variants)}"
                           + (" (a classifier needs a segmentation model to find its lesions)" if not variants else ""))
    if any(v.card.task != "segmentation" for v in variants):
        raise CompareError("the first list holds segmentation models; classifiers are compared on their lesions")


# ---------------------------------------------------------------- cases


def load_compare_cases(path: str | Path, split: str = "eval") -> Generator[Progress, None, list[CaseData]]:
    """The cases to compare on: a manifest's ``split`` (a manifest.csv or the folder holding
    one), or a single series folder (one unlabelled case). Each case's ``series`` is the
    series folder's full path, so its findings can be exported as SEG referencing its files."""
    from app.core.manifest import read_manifest

    path = Path(path)
    manifest_path = path if path.is_file() and path.suffix == ".csv" else path / "manifest.csv"
    if not manifest_path.is_file():
        if not path.exists():
            raise CompareError(f"{path}: no such file or folder")
        volume = yield from load_study_volume(path)
        return [CaseData(path.name or "study", "", str(path), volume, None)]
    manifest = read_manifest(manifest_path)
    wanted = manifest.cases_in(split)
    if not wanted:
        raise CompareError(f"{manifest_path}: no cases in the {split!r} split")
    cases = []
    for number, case in enumerate(wanted, 1):
        cases.append((yield from _manifest_case(manifest, case)))
        yield Progress(number / len(wanted), f"loaded {case.case}")
    return cases


def _manifest_case(manifest, case) -> Generator[Progress, None, CaseData]:
    series = manifest.series_path(case)
    if series is None or not series.exists():
        raise CompareError(f"case {case.case}: series {case.series} is not a folder on this machine")
    volume = yield from load_study_volume(series)
    labels_path = manifest.labels_path(case)
    labels = None if labels_path is None else _labels_on(volume, labels_path, case.case)
    return CaseData(case.case, case.patient, str(series), volume, labels)


def load_study_volume(path: Path) -> Generator[Progress, None, object]:
    """The image series in ``path`` with its DICOM UIDs (the application's indexer and loader);
    SimpleITK when that loader cannot read it, so a comparison still runs (without SOP UIDs)."""
    try:
        from app.core.dicom_index import index_path
        from app.core.dicom_load import load_series

        index = yield from index_path(path)
        images = index.image_series()
        if len(images) != 1:
            raise CompareError(f"{path}: holds {len(images)} image series; give the folder of one")
        return (yield from load_series(images[0]))
    except CompareError:
        raise
    except Exception:  # noqa: BLE001 - the loader is optional here; SimpleITK reads plain CT series
        from app.core.demo_models import read_series_volume

        return read_series_volume(path)


def _labels_on(volume, path: Path, case: str) -> np.ndarray:
    """A label map on the volume's grid, as 0/1 (nodule) like the ground truth of the evaluation."""
    from app.core.demo_models import read_labels

    try:
        from app.core.masks import load_label_file

        labels = load_label_file(path, volume)
        labels = getattr(labels, "labels", labels)
    except ImportError:
        labels = read_labels(path, volume.shape)
    except Exception as exc:  # noqa: BLE001 - one clear per-case error
        raise CompareError(f"case {case}: cannot read label map {path} ({exc})") from exc
    return (np.asarray(labels) > 0).astype(np.uint8)


# ---------------------------------------------------------------- running the variants


class InProcessRunner:
    """Runs variants in this process (the CLI): one loaded runner per variant, reused per case."""

    def __init__(self, threads: int | None = None, backend: str | None = None):
        self.threads, self.backend = threads, backend
        self._runners: dict[str, object] = {}

    def __call__(self, variant, volume, lesions=None):
        from app.core.inference import make_runner

        key = str(variant.card_path or variant.main_file)
        if key not in self._runners:
            self._runners[key] = make_runner(variant, threads=self.threads, backend=self.backend)
        findings = yield from self._runners[key].run(volume, lesions=lesions)
        return findings


def cache_id(variant) -> str:
    """Whose findings these are: the weights' SHA-256, plus a digest of the card, since the card
    decides pre-processing (a new HU window on the same weights gives other findings)."""
    import hashlib
    import json

    from app.core.model_card import card_to_dict

    card = card_to_dict(variant.card)
    card.pop("lineage", None)   # metrics and provenance do not change what the model finds
    digest = hashlib.sha256(json.dumps(card, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{variant.weights_sha256 or 'unknown-weights'}-{digest}"


def findings_for(variant, volume, cache: FindingsCache, run: RunVariant):
    """Job body: one variant's findings on one volume, from the cache or by running it (then cached)."""
    key = series_key(volume)
    found = cache.get(cache_id(variant), key)
    if found is not None:
        yield Progress(1.0, "from the findings cache")
        return found
    found = yield from run(variant, volume)
    cache.put(cache_id(variant), key, found)
    return found


def classifier_key(volume, segmenter) -> str:
    """A classifier's findings depend on the lesions it was shown: key them by the segmenter too."""
    return f"{series_key(volume)}-on-{cache_id(segmenter)}"


def classifier_findings_for(classifier, volume, cache: FindingsCache, run: RunVariant, segmenter):
    """Job body: a lesion-type classifier on the reference segmentation's lesions (cached)."""
    key = classifier_key(volume, segmenter)
    found = cache.get(cache_id(classifier), key)
    if found is not None:
        yield Progress(1.0, "from the findings cache")
        return found
    lesions_from = cache.get(cache_id(segmenter), series_key(volume))
    if lesions_from is None:
        raise CompareError(f"run {segmenter.card.name} first: the classifier scores its lesions")
    found = yield from run(classifier, volume, lesions=lesions_from.lesions)
    cache.put(cache_id(classifier), key, found)
    return found


def collect_findings(variants: Sequence, cases: Sequence[CaseData], cache: FindingsCache,
                     run: RunVariant, classifiers: Sequence = (), reference_index: int = 0
                     ) -> Generator[Progress, None, None]:
    """Every variant on every case, one at a time, into the cache; classifiers after the
    segmentations, on the reference's lesions."""
    total = max(1, (len(variants) + len(classifiers)) * len(cases))
    done = 0
    for case in cases:
        jobs = [(v, findings_for(v, case.volume, cache, run)) for v in variants]
        jobs += [(c, classifier_findings_for(c, case.volume, cache, run, variants[reference_index]))
                 for c in classifiers]
        for variant, gen in jobs:
            while True:
                try:
                    step = as_progress(next(gen))
                except StopIteration:
                    break
                fraction = (done + (step.fraction or 0.0)) / total
                yield Progress(fraction, f"{variant.card.name} on {case.case}: {step.message}")
            done += 1


# ---------------------------------------------------------------- the comparison


def assemble(variants: Sequence, cases: Sequence[CaseData], cache: FindingsCache, *, reference_index: int = 0,
             volume_change_pct: float = DEFAULT_VOLUME_CHANGE_PCT, seed: int = 0,
             resamples: int = evaluate.BOOTSTRAP_RESAMPLES, classifiers: Sequence = ()
             ) -> Generator[Progress, None, ComparisonRun]:
    """Disagreements and verdicts from the cached findings, case by case."""
    all_names = variant_names(list(variants) + list(classifiers))
    names, classifier_names = all_names[:len(variants)], all_names[len(variants):]
    rows: dict[str, list] = {name: [] for name in names}
    classifier_rows: dict[str, list] = {name: [] for name in classifier_names}
    compared = []
    for number, case in enumerate(cases, 1):
        key = series_key(case.volume)
        findings = [_cached(cache, v, key, case) for v in variants]
        for row in evaluate.segmentation_rows(case, findings, names, reference_index):
            rows[row.variant].append(row)
        reference = findings[reference_index]
        disagreements = {name: findings_disagreements(reference, found, case.volume,
                                                      volume_change_pct=volume_change_pct, truth_labels=case.labels)
                         for i, (name, found) in enumerate(zip(names, findings)) if i != reference_index}
        if classifiers:
            disagreements.update(_type_flips(cache, classifiers, classifier_names, variants[reference_index],
                                             reference, case, classifier_rows))
        compared.append(CaseComparison(case, key, disagreements))
        yield Progress(number / max(1, len(cases)), f"compared {case.case}")
    summary = evaluate.summarise(rows, names[reference_index], seed=seed, resamples=resamples)
    classifier_summary = (evaluate.summarise(classifier_rows, classifier_names[0], seed=seed, resamples=resamples)
                          if classifiers else None)
    return ComparisonRun(list(variants), names, reference_index, compared, summary, cache, volume_change_pct,
                         list(classifiers), classifier_names, classifier_summary)


def _type_flips(cache, classifiers, names, segmenter, reference, case, rows) -> dict[str, list[Disagreement]]:
    """Type flips of each classifier against the first, on the reference segmentation's lesions."""
    from app.core.disagreement import class_flips

    key = classifier_key(case.volume, segmenter)
    found = [_cached(cache, c, key, case) for c in classifiers]
    for row in evaluate.classification_rows(case, found, names):
        rows[row.variant].append(row)
    return {name: class_flips(reference.lesions, found[0].lesion_scores, other.lesion_scores)
            for name, other in zip(names[1:], found[1:])}


def _cached(cache: FindingsCache, variant, key: str, case: CaseData):
    found = cache.get(cache_id(variant), key)
    if found is None:
        raise CompareError(f"{variant.card.name} has not been run on case {case.case} yet")
    return found


def compare(variants: Sequence, cases: Sequence[CaseData], cache: FindingsCache, run: RunVariant | None = None,
            **options) -> Generator[Progress, None, ComparisonRun]:
    """Both parts in one generator (the CLI; tests)."""
    from app.core.progress import scaled

    classifiers = options.pop("classifiers", ())
    check_variants(variants, classifiers)
    if not cases:
        raise CompareError("no cases to compare on")
    reference_index = options.get("reference_index", 0)
    yield from scaled(collect_findings(variants, cases, cache, run or InProcessRunner(), classifiers,
                                       reference_index), 0.0, 0.8)
    result = yield from scaled(assemble(variants, cases, cache, classifiers=classifiers, **options), 0.8, 1.0)
    return result
