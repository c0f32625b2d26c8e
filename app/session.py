"""What the user has open: the scan index, the series in the viewer, its overlays, the models.

The session turns intents (open this path, show this series, run this model) into jobs on the
one job manager and announces what arrived through signals the widgets observe. It holds no
widget and imports none; heavy model work goes to the compute process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.compute import ComputeClient, run_model
from app.jobs import JobManager

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
DEMO_CASES = 2
DEMO_SEED = 2026
# The demo opens on the second study: its 23 mm part-solid nodule is one the demo UNet finds. The
# first study's two nodules are small solid ones (4 and 5 mm) that it misses (see the model card).
DEMO_SHOW_PATIENT = f"DEMO-{DEMO_SEED}-002"
GROUND_TRUTH = "Ground truth"
AI_NOTICE = "AI finding — research use only"


@dataclass
class OpenModel:
    """A model the user opened: the variant (files + card) and what it found per series."""

    variant: object   # app.core.models.ModelVariant
    findings: dict[str, object] = field(default_factory=dict)   # series key -> Findings

    @property
    def name(self) -> str:
        card = self.variant.card
        return f"{card.name} {card.version}".strip()

    @property
    def task(self) -> str:
        return self.variant.card.task


class Session(QObject):
    index_changed = Signal(object)            # DicomIndex
    volume_opened = Signal(object, int)       # Volume (still filling), first slice shown
    slices_loaded = Signal(int, int)          # k_lo, k_hi now filled
    volume_completed = Signal(object)         # Volume
    overlay_ready = Signal(str, object, bool)   # name, label map, is_ai
    lesions_ready = Signal(str, object, bool)   # source name, lesion list, is_ai
    scores_ready = Signal(str, object)          # source name, {class: probability}
    model_opened = Signal(object)             # OpenModel
    findings_ready = Signal(object, object)   # OpenModel, Findings
    status = Signal(str)

    def __init__(self, jobs: JobManager, compute: ComputeClient | None = None,
                 parent: QObject | None = None):
        super().__init__(parent)
        self.jobs = jobs
        self.compute = compute or ComputeClient()
        self.index = None
        self.series = None
        self.volume = None
        self.models: list[OpenModel] = []

    # -- scans ---------------------------------------------------------------------------------
    def open_path(self, path: str, then_show_first: bool = True, prefer_patient: str | None = None) -> None:
        """Index ``path`` and show its first image series (``prefer_patient``'s, if it has one)."""
        from app.core.dicom_index import index_path
        self.jobs.submit(f"Index {Path(path).name or path}", index_path, path, owner="index",
                         on_result=lambda index: self._indexed(index, then_show_first, prefer_patient))

    def _indexed(self, index, then_show_first: bool, prefer_patient: str | None = None) -> None:
        self.index = index
        self.index_changed.emit(index)
        images = index.image_series()
        broken = sum(not p.not_dicom for p in index.problems)
        counts = f"{len(images)} image series, {broken} unreadable DICOM file(s)"
        self.status.emit(f"Indexed: {counts}")
        if then_show_first and images:
            preferred = [s for s in images if s.patient_id == prefer_patient]
            self.open_series((preferred or images)[0])

    def open_series(self, series) -> None:
        if series.kind != "image":
            self._open_non_image(series)
            return
        from app.core.dicom_load import open_series
        self.jobs.submit(f"Open {series.description or series.series_uid}", open_series, series,
                         owner="series", on_result=lambda loader: self._series_opened(series, loader))

    def _series_opened(self, series, loader) -> None:
        self.series, self.volume = series, loader.volume
        self.volume_opened.emit(loader.volume, loader.first_slice)
        self.jobs.submit(f"Load {series.n_images} slices", loader.fill, owner="series",
                         on_progress=self._on_fill_progress, on_result=self._on_volume_complete)

    def _on_fill_progress(self, progress) -> None:
        # progress data carries the filled slice range: the viewer refreshes just those
        if isinstance(progress.data, tuple) and len(progress.data) == 2:
            self.slices_loaded.emit(int(progress.data[0]), int(progress.data[1]))

    def _on_volume_complete(self, volume) -> None:
        self.volume = volume
        self.volume_completed.emit(volume)
        self._load_ground_truth()

    def _open_non_image(self, series) -> None:
        """A SEG shows over the series it references; other objects cannot be shown as images."""
        if series.kind == "SEG" and self.series is not None and self.volume is not None \
                and series.referenced_series_uid == self.series.series_uid and self.volume.is_complete:
            self.jobs.submit("Load SEG overlay", _load_seg_labels, series.files[0], self.volume,
                             on_result=self._ground_truth_loaded)
        elif series.kind == "SEG":
            self.status.emit("This segmentation shows over its own series: open that series and "
                             "its SEG overlay loads with it.")
        else:
            self.status.emit(f"{series.kind} objects hold no image to show ({series.description}).")

    def _load_ground_truth(self) -> None:
        if self.index is None or self.series is None:
            return
        for seg in self.index.overlays_for(self.series.series_uid):
            if seg.kind == "SEG":
                self.jobs.submit("Load SEG overlay", _load_seg_labels, seg.files[0], self.volume,
                                 on_result=self._ground_truth_loaded)

    def _ground_truth_loaded(self, result) -> None:
        labels, lesions = result
        self.overlay_ready.emit(GROUND_TRUTH, labels, False)
        self.lesions_ready.emit(GROUND_TRUTH, lesions, False)

    def add_label_file(self, path: str) -> None:
        """A NIfTI / NRRD label map resampled onto the open volume (ground truth)."""
        if self.volume is None:
            self.status.emit("Open a series first, then its label file.")
            return
        self.jobs.submit(f"Load labels {Path(path).name}", _load_label_file, path, self.volume,
                         on_result=self._ground_truth_loaded)

    # -- models --------------------------------------------------------------------------------
    def open_model(self, path: str) -> None:
        from app.core.models import open_model
        self.jobs.submit(f"Open model {Path(path).name}", open_model, path,
                         on_result=self._model_opened)

    def _model_opened(self, variant) -> None:
        model = OpenModel(variant)
        self.models.append(model)
        self.model_opened.emit(model)

    def run_model(self, model: OpenModel, threads: int | None = None) -> None:
        if self.volume is None or not self.volume.is_complete:
            self.status.emit("Wait until the series has loaded, then run the model.")
            return
        lesions = self._segmentation_lesions() if model.task == "classification" else None
        if model.task == "classification" and not lesions:
            self.status.emit("Run a segmentation model first: the classifier scores its lesions.")
            return
        series_key = self.series.key
        self.jobs.submit(f"Run {model.name}", self.compute.run, run_model, self.volume,
                         model=str(model.variant.card_path or model.variant.main_file),
                         threads=threads, lesions=lesions, heavy=True, owner=f"run:{model.name}",
                         on_result=lambda findings: self._findings(model, series_key, findings))

    def _segmentation_lesions(self):
        for model in self.models:
            if model.task == "segmentation" and self.series.key in model.findings:
                return model.findings[self.series.key].lesions
        return None

    def _findings(self, model: OpenModel, series_key: str, findings) -> None:
        model.findings[series_key] = findings
        if self.series is None or self.series.key != series_key:
            return   # the user moved on to another series meanwhile
        self.findings_ready.emit(model, findings)
        source = f"{model.name} ({AI_NOTICE})"
        if findings.labels is not None:
            self.overlay_ready.emit(model.name, findings.labels, True)
            self.lesions_ready.emit(source, findings.lesions, True)
        if findings.study_scores:
            self.scores_ready.emit(source, dict(findings.study_scores))

    # -- the demo -------------------------------------------------------------------------------
    def open_demo(self, cases: int = DEMO_CASES) -> None:
        """The demo study and the demo models; the study is generated on first use."""
        from app.paths import demo_root
        for card in demo_model_cards():
            self.open_model(str(card))
        folder = demo_root()
        if (folder / "manifest.csv").is_file():
            self.open_path(str(folder), prefer_patient=DEMO_SHOW_PATIENT)
            return
        from app.core.demo_data import generate_demo_data
        self.status.emit("Generating the demo study (first run only) …")
        self.jobs.submit("Generate demo study", generate_demo_data, str(folder), cases=cases,
                         seed=DEMO_SEED, size="full", in_process=True,
                         on_result=lambda _summary: self.open_path(str(folder), prefer_patient=DEMO_SHOW_PATIENT))

    def close(self) -> None:
        self.compute.close()


def demo_model_cards() -> list[Path]:
    return sorted(RESOURCES.glob("models/*/card.json"))


def _load_seg_labels(path: str, volume):
    from app.core.lesions import lesion_table
    from app.core.masks import load_seg
    labels, _segments = load_seg(path, volume)
    return labels, lesion_table(labels, volume)


def _load_label_file(path: str, volume):
    from app.core.lesions import lesion_table
    from app.core.masks import load_label_file
    labels = load_label_file(path, volume)
    return labels, lesion_table(labels, volume)
