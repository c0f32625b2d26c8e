"""The compare service: 2–4 model variants on a study or an eval split, as jobs, for the compare view.

It turns intents (compare these models on this data, show that case, export the report) into
jobs on the one job manager and announces results through signals; it holds no widget. Each
variant × case runs as one heavy job through the compute process (one at a time; findings go
to the on-disk cache, so a second comparison runs nothing again); the disagreements and
verdicts are then assembled in a light job (:mod:`compression.compare`). Volumes are loaded
once and shared by every variant's job and view.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.compute import ComputeClient, run_model
from app.jobs import JobManager

OWNER = "compare"


@dataclass
class CaseView:
    """What the views show for one case: the shared volume, each variant's labels and lesions,
    and each variant's voxel disagreement map against the reference (None for the reference)."""

    case_index: int
    volume: object
    labels: list
    lesions: list
    disagreement_maps: list


def findings_cache_root() -> Path:
    from app.paths import data_root

    return data_root() / "findings-cache"


class CompareService(QObject):
    variants_ready = Signal(object)      # list of names
    cases_ready = Signal(object)         # list of case labels (de-identified)
    comparison_ready = Signal(object, object)   # compression.compare.ComparisonRun, ViewSummary
    case_ready = Signal(object)          # CaseView
    exported = Signal(str)               # what was written, in words
    status = Signal(str)

    def __init__(self, jobs: JobManager, compute: ComputeClient | None = None, cache=None,
                 threads: int | None = None, parent: QObject | None = None):
        super().__init__(parent)
        from app.core.findings_cache import FindingsCache

        self.jobs, self.threads = jobs, threads
        self.compute = compute or ComputeClient()
        self.cache = cache or FindingsCache(findings_cache_root())
        self.variants: list = []
        self.classifiers: list = []   # lesion-type classifiers, run on the reference's lesions
        self.cases: list = []
        self.run = None
        self._pending = 0
        self._failed = False
        self._generation = 0   # results of an earlier comparison arriving late are ignored
        self._running: dict[int, int] = {}   # job id of a model run -> the comparison it belongs to
        jobs.cancelled.connect(self._job_cancelled)

    # -- starting a comparison -------------------------------------------------------------
    def compare(self, model_paths: list[str], data_path: str, split: str = "eval") -> None:
        """Open the models, load the cases, run every variant on every case, assemble."""
        self.jobs.submit("Compare: open models and cases", _open_models_and_cases, list(model_paths),
                         data_path, split, owner=OWNER, on_result=self._opened,
                         on_error=lambda message, _detail: self.status.emit(f"Compare: {message}"))

    def compare_loaded(self, models: list, cases: list) -> None:
        """Compare variants already opened on cases already loaded (e.g. the open study)."""
        from compression.compare import CompareError, check_variants, split_by_task

        try:
            check_variants(*split_by_task(models))
        except CompareError as exc:
            self.status.emit(str(exc))
            return
        self._opened((models, cases))

    def _opened(self, result) -> None:
        from compression.compare import split_by_task, variant_names

        models, self.cases = result
        self.variants, self.classifiers = split_by_task(models)
        self.cancel()   # a new comparison replaces one still running
        self.run, self._failed = None, False
        self._generation += 1
        self.variants_ready.emit(variant_names(self.variants))
        self.cases_ready.emit([f"Case {n}" for n in range(1, len(self.cases) + 1)])
        self._pending = (len(self.variants) + len(self.classifiers)) * len(self.cases)
        for case in self.cases:
            for variant in self.variants:
                self._run_variant(variant, case, self._generation)
            for classifier in self.classifiers:   # heavy jobs run in order: after the segmentations
                self._run_variant(classifier, case, self._generation, lesions_from=self.variants[0])

    def _run_variant(self, variant, case, generation: int, lesions_from=None) -> None:
        from compression.compare import classifier_findings_for, findings_for

        run = _ComputeRun(self.compute, self.threads)
        body, extra = (findings_for, ()) if lesions_from is None else (classifier_findings_for, (lesions_from,))
        handle = self.jobs.submit(f"Compare: {variant.card.name} {variant.card.version} on {case.case}", body,
                                  variant, case.volume, self.cache, run, *extra, heavy=True,
                                  on_result=lambda _findings: self._one_done(generation),
                                  on_error=lambda message, _detail: self._one_failed(generation, message))
        self._running[handle.job_id] = generation

    def cancel(self) -> None:
        """Stop the comparison: every model run still queued or running is cancelled."""
        for job_id in list(self._running):
            self.jobs.cancel(job_id)

    def _job_cancelled(self, job_id: int) -> None:
        generation = self._running.pop(job_id, None)
        if generation is not None:
            self._one_failed(generation, "cancelled")

    def _one_done(self, generation: int) -> None:
        self._running = {j: g for j, g in self._running.items() if not self.jobs.record(j).state.is_final}
        if generation != self._generation:
            return
        self._pending -= 1
        if self._pending == 0 and not self._failed:
            self._assemble()

    def _one_failed(self, generation: int, message: str) -> None:
        if generation == self._generation and not self._failed:
            self._failed = True
            self.cancel()   # the comparison cannot be completed: the remaining runs would be wasted
            self.status.emit(f"Compare stopped: {message}")

    def _assemble(self) -> None:
        self.jobs.submit("Compare: disagreements and accuracy", assemble_for_view, self.variants, self.cases,
                         self.cache, self.classifiers, owner=OWNER, on_result=self._assembled)

    def _assembled(self, result) -> None:
        run, summary = result
        self.run = run
        self.comparison_ready.emit(run, summary)
        self.status.emit(f"Compared {len(run.names)} variants on {len(run.cases)} case(s): "
                         f"{len(run.all_disagreements())} disagreement(s)")
        if run.cases:
            self.show_case(0)

    # -- showing a case ----------------------------------------------------------------------
    def show_case(self, case_index: int) -> None:
        """Read the case's findings (cache, maybe from disk) and disagreement maps in a light job."""
        if self.run is None:
            return
        self.jobs.submit(f"Compare: show case {case_index + 1}", case_view, self.run, case_index,
                         owner="compare-case", on_result=self.case_ready.emit)

    # -- exports -----------------------------------------------------------------------------
    def export_report(self, html_path: str, pdf_path: str | None = None, identify: bool = False) -> None:
        if self.run is None:
            self.status.emit("Run a comparison first.")
            return
        from compression.compare_report import write_reports

        self.jobs.submit("Compare: write the report", write_reports, self.run, html_path, pdf_path, identify,
                         on_result=lambda paths: self.exported.emit("Report written: " + ", ".join(map(str, paths))))

    def export_seg(self, folder: str) -> None:
        from compression.compare_report import export_segs

        if self.run is None:
            self.status.emit("Run a comparison first.")
            return
        self.jobs.submit("Compare: export DICOM SEG", export_segs, self.run, Path(folder),
                         on_result=lambda paths: self.exported.emit(f"{len(paths)} DICOM SEG file(s) in {folder}"))


class _ComputeRun:
    """The run strategy of :func:`compression.compare.findings_for`: the model runs in the
    compute process (the GUI process never imports torch or ONNX Runtime)."""

    def __init__(self, compute: ComputeClient, threads: int | None):
        self.compute, self.threads = compute, threads

    def __call__(self, variant, volume, lesions=None):
        model = str(variant.card_path or variant.main_file)
        findings = yield from self.compute.run(run_model, volume, model=model, threads=self.threads, lesions=lesions)
        return findings


def _open_models_and_cases(model_paths: list[str], data_path: str, split: str):
    from app.core.models import open_model
    from compression.compare import check_variants, load_compare_cases, split_by_task

    models = [open_model(path) for path in model_paths]
    check_variants(*split_by_task(models))
    cases = yield from load_compare_cases(data_path, split)
    return models, cases


def assemble_for_view(variants, cases, cache, classifiers=()):
    from compression.compare import assemble
    from compression.compare_report import view_summary

    run = yield from assemble(variants, cases, cache, classifiers=classifiers)
    return run, view_summary(run)


def case_view(run, case_index: int) -> CaseView:
    from app.core.disagreement import voxel_disagreement

    findings = [run.findings(case_index, v) for v in range(len(run.variants))]
    reference = findings[run.reference_index].labels
    maps = [None if v == run.reference_index else voxel_disagreement(reference, f.labels)
            for v, f in enumerate(findings)]
    return CaseView(case_index, run.cases[case_index].case.volume, [f.labels for f in findings],
                    [f.lesions for f in findings], maps)
