"""The Models dock: each opened model's card (intended use first), size, and a Run button."""
from __future__ import annotations

import html

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QComboBox, QDockWidget, QLabel, QPushButton, QSpinBox,
                               QHBoxLayout, QTextBrowser, QVBoxLayout, QWidget)

from app.session import AI_NOTICE, OpenModel


def card_html(model: OpenModel) -> str:
    """What a clinician must see before trusting a finding, then what an engineer needs."""
    variant, card = model.variant, model.variant.card
    e = html.escape
    labels = ", ".join(f"<span style='color:{e(str(l.colour))}'>■</span> {e(l.name)}"
                       for l in card.labels if l.value != 0 or card.task == "classification") or "—"
    lineage = card.lineage
    runs = [variant.main_file, *([variant.files["candidate_filter"]] if "candidate_filter" in variant.files else [])]
    rows = [
        ("Task", card.task), ("Labels", None), ("Format", variant.format),
        ("Size", f"{sum(p.stat().st_size for p in runs) / 1e6:.1f} MB runs ({' + '.join(p.name for p in runs)}); "
                 f"{variant.size_bytes / 1e6:.1f} MB in all files"),
        ("Input", input_text(card.input, card.roi)),
        *([("Lesion clean-up", card.postprocessing.describe())] if card.task == "segmentation" else []),
        ("Weights SHA-256", (variant.weights_sha256 or "")[:16] + "…"),
        ("Training data", card.training_data),
    ]
    metrics = getattr(lineage, "metrics", None) or {}
    body = "".join(f"<tr><td><b>{e(k)}</b></td><td>{labels if v is None else e(str(v))}</td></tr>"
                   for k, v in rows)
    metric_text = ", ".join(f"{e(str(k))} {e(_number_text(v))}" for k, v in list(metrics.items())[:8]
                            if not isinstance(v, dict))
    return (f"<h3>{e(model.name)}</h3>"
            f"<p style='background:#7a4b00;color:white;padding:4px'><b>Intended use:</b> "
            f"{e(card.intended_use)}</p>"
            f"<table cellspacing=4>{body}</table>"
            + (f"<p><b>Recorded metrics:</b> {metric_text}</p>" if metric_text else ""))


_ROI_WORDS = {"lesion_centres": "around each lesion centre", "slice": "from each slice"}


def input_text(spec, roi=None) -> str:
    """What the network sees, in words: "2D whole slices, native spacing, 1 channel (axes NCHW)";
    a classifier's patches are cut around its ROIs (``roi``), not slid over the scan."""
    times = "×".join
    if spec.patch_size:
        extent = f"{times(str(v) for v in spec.patch_size)} patches"
        if roi is not None:
            extent += " " + _ROI_WORDS.get(roi.source, f"from {roi.source}")
        elif spec.overlap:
            extent += f" ({spec.overlap:.0%} overlap)"
    else:
        extent = "whole slices" if spec.dims == 2 else "whole volumes"
    spacing = (f"resampled to {times(f'{v:g}' for v in spec.target_spacing)} mm" if spec.target_spacing
               else "native spacing")
    channels = f"{spec.channels} channel" + ("s" if spec.channels != 1 else "")
    if spec.slice_context:  # 2.5-D: say what the channels are
        k = spec.slice_context
        channels += f": each slice with {k} neighbour{'s' if k > 1 else ''} on either side"
    return f"{spec.dims}D {extent}, {spacing}, {channels} (axes {spec.axes})"


def _number_text(value) -> str:
    """Metrics as a reader wants them: 3 significant digits, intervals as [lo, hi]."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_number_text(v) for v in value) + "]"
    return str(value)


def findings_html(model: OpenModel, findings) -> str:
    t = findings.timing
    lesions = len(findings.lesions or [])
    parts = [f"<p><b>{html.escape(AI_NOTICE)}</b></p>",
             f"<p>{lesions} lesion(s) found. Provider: {html.escape(findings.provider or '?')}.</p>",
             "<p>Time: "
             f"load {t.load_s:.2f} s · pre-process {t.preprocess_s:.2f} s · "
             f"network {t.network_s:.2f} s · post-process {t.postprocess_s:.2f} s · "
             f"<b>total {t.total_s:.2f} s</b></p>"]
    if findings.study_scores:
        scores = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in findings.study_scores.items())
        parts.append(f"<p>Study scores: {scores}</p>")
    return "".join(parts)


class ModelPanel(QDockWidget):
    run_requested = Signal(object, int)   # OpenModel, threads
    open_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__("Models", parent)
        self.setObjectName("ModelPanel")
        self.models: list[OpenModel] = []
        self.chooser = QComboBox()
        self.chooser.currentIndexChanged.connect(self._show_current)
        self.card_view = QTextBrowser()
        self.findings_view = QLabel("No findings yet.")
        self.findings_view.setWordWrap(True)
        self.threads = QSpinBox()
        self.threads.setRange(1, 64)
        self.threads.setValue(2)
        self.threads.setPrefix("threads ")
        self.run_button = QPushButton("Run on this series")
        self.run_button.setEnabled(False)
        self.run_button.clicked.connect(self._run)
        open_button = QPushButton("Open model…")
        open_button.clicked.connect(self.open_requested.emit)
        buttons = QHBoxLayout()
        buttons.addWidget(open_button)
        buttons.addWidget(self.threads)
        buttons.addWidget(self.run_button)
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.addWidget(self.chooser)
        layout.addWidget(self.card_view, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.findings_view)
        self.setWidget(body)

    def add_model(self, model: OpenModel) -> None:
        self.models.append(model)
        self.chooser.addItem(model.name)
        self.chooser.setCurrentIndex(len(self.models) - 1)

    def current(self) -> OpenModel | None:
        index = self.chooser.currentIndex()
        return self.models[index] if 0 <= index < len(self.models) else None

    def show_findings(self, model: OpenModel, findings) -> None:
        if model is self.current():
            self.findings_view.setText(findings_html(model, findings))

    def _show_current(self) -> None:
        model = self.current()
        self.run_button.setEnabled(model is not None)
        if model is not None:
            self.card_view.setHtml(card_html(model))
            self.findings_view.setText("No findings yet." if not model.findings else
                                       findings_html(model, next(reversed(model.findings.values()))))

    def _run(self) -> None:
        model = self.current()
        if model is not None:
            self.run_requested.emit(model, self.threads.value())
