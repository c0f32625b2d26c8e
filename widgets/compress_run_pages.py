"""The wizard's last two pages: the run (progress per step, time left, log, loss, Cancel) and
the results (table, Pareto plots, keep / save / compare).

The run is one child-process job on the job manager; this page only draws what its progress
reports (see ``app.compress_job`` for the progress data) and never waits on it.
"""
from __future__ import annotations

import math
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QGridLayout, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QPlainTextEdit, QProgressBar, QPushButton, QSplitter, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from app.compress_config import run_plan
from widgets.compress_wizard import PROBLEM_STYLE, ConfigPage, file_size_text

LOG_LINES = 2000
REDRAW_MS = 150
LOSS_TITLE = "Fine-tuning / distillation loss"
LOSS_LOG_EVERY = 10
ORIGINAL_COLOUR, WITHIN_COLOUR, OUTSIDE_COLOUR = "#2c3e50", "#27ae60", "#c0392b"


def eta_text(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "estimating the time left …"
    if seconds < 60:
        return f"about {max(1, round(seconds))} s left"
    return f"about {round(seconds / 60)} min left"


def _bar() -> QProgressBar:
    bar = QProgressBar()
    bar.setRange(0, 1000)
    bar.setTextVisible(True)
    bar.setFormat("%p%")
    return bar


# ---------------------------------------------------------------- 5 Run


class RunPage(ConfigPage):
    page_key = "run"
    finished_run = Signal(object)   # app.compress_job.CompressResult

    def __init__(self, wizard_model, jobs):
        super().__init__(wizard_model, jobs, "5 · Run", "The work runs in a process of its own: the window "
                         "stays usable, and Cancel leaves no half-written file.")
        self.handle = None
        self.result = None
        self.state = "idle"   # idle | running | finished | failed | cancelled
        self.phase_bars: list[QProgressBar] = []
        self.phases_seen: set[int] = set()
        self.pending_log: list[str] = []
        self.last_message, self.chart_stale = "", False
        self.redraw = QTimer(self, singleShot=True, interval=REDRAW_MS)
        self.redraw.timeout.connect(self._redraw)
        self.losses: list[float] = []
        self.overall = _bar()
        self.eta = QLabel("")
        self.eta.setMinimumWidth(150)   # a changing text must not re-lay-out the page on every tick
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel run")
        self.cancel_button.clicked.connect(self.cancel_run)
        self.phases = QGridLayout()
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(LOG_LINES)
        self.log.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.loss_plot = pg.PlotWidget(background="w")
        self.loss_plot.setLabel("left", "loss")
        self.loss_plot.setLabel("bottom", "training step")
        self.loss_plot.setTitle(LOSS_TITLE, color="#333")
        self.loss_curve = self.loss_plot.plot([], [], pen=pg.mkPen("#2980b9", width=2))
        self._layout()
        jobs.cancelled.connect(self._job_cancelled)

    def _layout(self) -> None:
        layout = QVBoxLayout(self)
        phases = QWidget()
        phases.setLayout(self.phases)
        layout.addWidget(phases)
        overall = QHBoxLayout()
        overall.addWidget(QLabel("<b>Overall</b>"))
        overall.addWidget(self.overall, 1)
        overall.addWidget(self.eta)
        overall.addWidget(self.cancel_button)
        layout.addLayout(overall)
        layout.addWidget(self.status)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.log)
        split.addWidget(self.loss_plot)
        split.setSizes([520, 420])
        layout.addWidget(split, 1)
        layout.addWidget(self.problem_label)

    # -- starting ------------------------------------------------------------------------------
    def initializePage(self) -> None:  # noqa: N802 - Qt override
        if self.state != "running":
            self.start()

    def start(self) -> None:
        self._reset()
        try:
            plan = run_plan(self.config)
        except ValueError as exc:
            self._set_state("failed", f"Cannot start: {exc}")
            return
        wizard = self.wizard()
        if wizard is not None and hasattr(wizard, "remember"):
            wizard.remember()
        from app.compress_job import compress_run
        what = (f"a search for the {plan['search']['objectives'][0]} within budget" if plan.get("search")
                else f"{len(plan['recipes'])} recipe(s)")
        self.log.appendPlainText(f"Run {plan['run_name']}: {what} on {plan['model']}")
        self._set_state("running", "Running …")
        self.handle = self.jobs.submit(f"Compress {Path(plan['model']).parent.name}", compress_run, plan,
                                       in_process=True, owner="wizard:compress", on_progress=self.on_progress,
                                       on_result=self._finished, on_error=self._failed)

    def _reset(self) -> None:
        self.result, self.losses = None, []
        self.pending_log, self.last_message, self.chart_stale = [], "", False
        self.loss_curve.setData([], [])
        self.loss_plot.setTitle(LOSS_TITLE, color="#333")
        self.log.clear()
        self.overall.setValue(0)
        self.eta.setText("")
        self._set_phases([])

    def _set_phases(self, names: list[str]) -> None:
        while self.phases.count():
            item = self.phases.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self.phase_bars, self.phases_seen = [], set()
        for row, name in enumerate(names):
            label = QLabel(name)
            bar = _bar()
            bar.setMaximumHeight(16)
            self.phases.addWidget(label, row, 0)
            self.phases.addWidget(bar, row, 1)
            self.phase_bars.append(bar)
        self.phases.setColumnStretch(1, 1)

    # -- progress ------------------------------------------------------------------------------
    def on_progress(self, progress) -> None:
        data = progress.data if isinstance(progress.data, dict) else {}
        if "plan" in data:
            self._set_phases(list(data["plan"]))
            for k in range(int(data.get("done", 0))):
                self._show_phase(k, 1.0)
        if progress.fraction is not None:
            self.overall.setValue(int(1000 * progress.fraction))
        if "phase" in data and 0 <= data["phase"] < len(self.phase_bars):
            self._show_phase(int(data["phase"]), float(data.get("phase_fraction", 0.0)))
        if "eta_s" in data:
            self.eta.setText(eta_text(data["eta_s"]))
        if "loss" in data:
            self.losses.append(float(data["loss"]))
            self.chart_stale = True
        if progress.message and progress.message != self.last_message and self._worth_logging(data):
            self.last_message = progress.message
            self.pending_log.append(progress.message)
        if not self.redraw.isActive():
            self.redraw.start()

    @staticmethod
    def _worth_logging(data: dict) -> bool:
        """Training steps go to the chart; the log keeps every LOSS_LOG_EVERY-th of them."""
        iteration = data.get("iteration")
        return iteration is None or iteration == 1 or iteration % LOSS_LOG_EVERY == 0

    def _redraw(self) -> None:
        """Chart and log are drawn at most every REDRAW_MS: a burst of progress costs one paint."""
        if self.chart_stale:
            self.loss_curve.setData(list(range(1, len(self.losses) + 1)), self.losses)
            self.chart_stale = False
        if self.pending_log:
            self.log.appendPlainText("\n".join(self.pending_log))
            self.pending_log = []
            self.log.verticalScrollBar().setValue(self.log.verticalScrollBar().maximum())

    def _show_phase(self, phase: int, fraction: float) -> None:
        """Phases run in order: one that reports means every earlier one that ran is done."""
        for k in self.phases_seen:
            if k < phase:
                self.phase_bars[k].setValue(1000)
        self.phases_seen.add(phase)
        self.phase_bars[phase].setValue(int(1000 * fraction))

    # -- ending ----------------------------------------------------------------------------------
    def cancel_run(self) -> None:
        if self.handle is not None and self.state == "running":
            self.status.setText("Cancelling … (nothing will be saved)")
            self.handle.cancel()

    def _finished(self, result) -> None:
        self.result = result
        for k, bar in enumerate(self.phase_bars):
            if k in self.phases_seen:
                bar.setValue(1000)
            else:
                bar.setValue(0)   # a reset bar (-1) shows no text at all
                bar.setFormat("not tried (time limit)")
        self.overall.setValue(1000)
        self.eta.setText("")
        if not self.losses:
            self.loss_plot.setTitle("No fine-tuning or distillation in this run", color="#777")
        self._set_state("finished", f"Done: {len(result.rows) - 1} variant(s) in {result.run_folder}. "
                        "Next shows the results.")
        self.finished_run.emit(result)

    def _failed(self, message: str, _detail: str) -> None:
        self._set_state("failed", f"The run failed: {message} (details in the Jobs panel). Nothing was saved.")

    def _job_cancelled(self, job_id: int) -> None:
        if self.handle is not None and job_id == self.handle.job_id:
            self._set_state("cancelled", "Cancelled: nothing was saved. Back to change the settings, or "
                            "return to this page to run again.")

    def _set_state(self, state: str, text: str) -> None:
        self._redraw()
        self.state = state
        self.status.setText(text)
        self.status.setStyleSheet(PROBLEM_STYLE if state == "failed" else "")
        self.cancel_button.setEnabled(state == "running")
        self.log.appendPlainText(text)
        self.completeChanged.emit()

    def isComplete(self) -> bool:  # noqa: N802 - Qt override
        return self.state == "finished"

    def page_problems(self) -> list[str]:
        return [] if self.state == "finished" else ["The run has not finished."]


# ---------------------------------------------------------------- 6 Results

COLUMNS = ("keep", "variant", "steps", "deployed size", "latency", "Dice [95 % CI]", "fidelity Dice",
           "lost lesions ≥ 6 mm", "budget")


def dice_text(row) -> str:
    if row.dice is None:
        return "—"
    if row.dice_low is None or row.dice_high is None:
        return f"{row.dice:.3f} ({row.dice_note or 'no interval'})"
    return f"{row.dice:.3f} [{row.dice_low:.3f}, {row.dice_high:.3f}]"


def lost_text(row) -> str:
    """Lost lesions ≥ 6 mm, and with labels the nodules ≥ 6 mm the original detects and this one
    misses (the original's own false positives are among the lost, never among the missed)."""
    if row.lost_lesions is None:
        return "—"
    if row.nodules_missed is None or row.is_original:
        return str(row.lost_lesions)
    return f"{row.lost_lesions} · {row.nodules_missed} nodule{'' if row.nodules_missed == 1 else 's'} missed"


def latency_text(row) -> str:
    if row.latency_ms is None:
        return "—"
    speed = f" ({row.speedup:.2f}×)" if row.speedup and not row.is_original else ""
    return f"{row.latency_ms:.1f} ms{speed}"


def budget_text(row) -> str:
    if row.is_original:
        return "original"
    if row.budget_met:
        return "within budget" + (" · recommended" if row.recommended else "")
    return "over: " + "; ".join(row.budget_failures)


def _frame(plot: pg.PlotWidget, xs: list[float], ys: list[float]) -> None:
    """Axes that show every point with room for its name; accuracy stays within 0..1."""
    if not xs or not ys:
        return
    x_pad = max(0.25 * (max(xs) - min(xs)), 0.1 * abs(max(xs)), 1e-3)
    y_pad = max(0.15 * (max(ys) - min(ys)), 0.05)
    plot.setXRange(max(0.0, min(xs) - x_pad), max(xs) + x_pad, padding=0)
    plot.setYRange(max(0.0, min(ys) - y_pad), min(1.05, max(ys) + y_pad), padding=0)


class ResultsPage(ConfigPage):
    page_key = "results"
    compare_requested = Signal(list)   # card paths, the original first
    variants_kept = Signal(list)       # card paths of the kept variants

    def __init__(self, wizard_model, jobs):
        super().__init__(wizard_model, jobs, "6 · Results", "Every variant against the original on the eval "
                         "scans. Keep the ones you want; the others are deleted.")
        self.result, self.drawn = None, False
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setWordWrap(False)
        self.keep_boxes: dict[str, QCheckBox] = {}
        self.latency_plot = self._plot("latency (ms)")
        self.size_plot = self._plot("deployed size (MB)")
        self.sensitivity_plot = pg.PlotWidget(background="w", title="Per-layer sensitivity (Dice drop)")
        self.sensitivity_plot.hide()
        self.evidence = QLabel("")
        self.evidence.setWordWrap(True)
        self.destination = QLineEdit()
        self.keep_button = QPushButton("Keep checked variants")
        self.keep_button.clicked.connect(self.keep_checked)
        self.compare_button = QPushButton("Compare selected")
        self.compare_button.clicked.connect(self.compare_selected)
        self._layout()

    def _plot(self, x_label: str) -> pg.PlotWidget:
        plot = pg.PlotWidget(background="w")
        plot.setLabel("bottom", x_label)
        plot.setLabel("left", "accuracy (Dice)")
        for axis in ("left", "bottom"):
            plot.getAxis(axis).enableAutoSIPrefix(False)   # "Dice (x0.001)" reads as a different metric
        plot.getAxis("left").setWidth(64)   # room for "0.045" and the axis title side by side
        plot.showGrid(x=True, y=True, alpha=0.2)
        plot.addLegend(offset=(-10, 10), labelTextColor="#333")
        return plot

    def _layout(self) -> None:
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.evidence)
        plots = QHBoxLayout()
        plots.addWidget(self.latency_plot)
        plots.addWidget(self.size_plot)
        plots.addWidget(self.sensitivity_plot)
        layout.addLayout(plots, 2)
        actions = QHBoxLayout()
        actions.addWidget(QLabel("Save kept variants in"))
        actions.addWidget(self.destination, 1)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        actions.addWidget(browse)
        actions.addWidget(self.keep_button)
        actions.addWidget(self.compare_button)
        layout.addLayout(actions)
        layout.addWidget(self.problem_label)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save kept variants in", self.destination.text())
        if folder:
            self.destination.setText(folder)

    # -- showing -----------------------------------------------------------------------------------
    def show_result(self, result) -> None:
        """Keep the result; it is drawn when the page is shown, not while the run page is busy."""
        self.result, self.drawn = result, False
        if self.isVisible():
            self.initializePage()

    def initializePage(self) -> None:  # noqa: N802 - Qt override
        if self.result is None or self.drawn:
            return
        self.drawn = True
        result = self.result
        self.destination.setText(result.run_folder)
        self.evidence.setText(f"Evidence: {result.evidence}" + "".join(f"<br>{n}" for n in result.notes))
        self._fill_table(result.rows)
        # the plots are drawn on the next turn of the event loop: two short pauses, not one long one
        QTimer.singleShot(0, self, self._draw_charts)

    def _draw_charts(self) -> None:
        self._fill_plots(self.result.rows)
        self._fill_sensitivity(self.result.sensitivity)

    def _fill_table(self, rows) -> None:
        self.table.setRowCount(len(rows))
        self.keep_boxes = {}
        for r, row in enumerate(rows):
            cells = ("", row.name, row.steps, file_size_text(row.deployed_bytes), latency_text(row), dice_text(row),
                     "—" if row.fidelity is None else f"{row.fidelity:.3f}",
                     lost_text(row), budget_text(row))
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(text)   # the recipe and the budget verdict may be cut to fit
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if c == len(cells) - 1 and not row.is_original:
                    item.setForeground(QColor(WITHIN_COLOUR if row.budget_met else OUTSIDE_COLOUR))
                self.table.setItem(r, c, item)
            if not row.is_original:
                box = QCheckBox()
                box.setChecked(row.budget_met)
                self.keep_boxes[row.name] = box
                self.table.setCellWidget(r, 0, box)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)   # the recipe takes what is left
        rows_height = sum(self.table.rowHeight(r) for r in range(len(rows)))
        height = self.table.horizontalHeader().height() + rows_height + 2 * self.table.frameWidth() + 20
        self.table.setMaximumHeight(min(height, 280))   # the plots get the room a short table leaves

    def accuracy(self, row) -> float | None:
        """Dice against ground truth when the eval scans are labelled, else fidelity to the original."""
        use_dice = all(r.dice is not None for r in self.result.rows)
        return row.dice if use_dice else row.fidelity

    def _fill_plots(self, rows) -> None:
        use_dice = all(r.dice is not None for r in rows)
        unit, scale = ("MB", 1e6) if max(r.deployed_bytes for r in rows) >= 1e6 else ("kB", 1e3)
        self.size_plot.setLabel("bottom", f"deployed size ({unit})")
        for plot, x_of in ((self.latency_plot, lambda r: r.latency_ms),
                           (self.size_plot, lambda r: r.deployed_bytes / scale)):
            plot.clear()
            plot.setLabel("left", "Dice vs ground truth" if use_dice else "fidelity Dice vs the original")
            for label, pick, symbol, colour in (
                    ("original", lambda r: r.is_original, "star", ORIGINAL_COLOUR),
                    ("within budget", lambda r: not r.is_original and r.budget_met, "o", WITHIN_COLOUR),
                    ("over budget", lambda r: not r.is_original and not r.budget_met, "x", OUTSIDE_COLOUR)):
                chosen = [r for r in rows if pick(r) and x_of(r) is not None and self.accuracy(r) is not None]
                if chosen:
                    plot.plot([x_of(r) for r in chosen], [self.accuracy(r) for r in chosen], pen=None,
                              symbol=symbol, symbolSize=16 if symbol == "star" else 11,
                              symbolBrush=colour, symbolPen=colour, name=label)
            for k, r in enumerate(rows):
                if x_of(r) is not None and self.accuracy(r) is not None:
                    # alternate sides, so two variants at the same point keep readable names
                    text = pg.TextItem(r.name, color="#333", anchor=(1.05, 1.1) if k % 2 else (-0.05, 1.1))
                    text.setPos(x_of(r), self.accuracy(r))
                    plot.addItem(text, ignoreBounds=True)
            _frame(plot, [x_of(r) for r in rows if x_of(r) is not None],
                   [self.accuracy(r) for r in rows if self.accuracy(r) is not None])

    def plotted_points(self, plot: pg.PlotWidget) -> int:
        """How many variants a plot shows (tests read the plot itself)."""
        return sum(len(item.getData()[0]) for item in plot.getPlotItem().listDataItems())

    def _fill_sensitivity(self, sensitivity) -> None:
        """One bar per layer in network order: the fidelity lost when that layer alone is int8."""
        self.sensitivity_plot.clear()
        if not sensitivity:
            self.sensitivity_plot.hide()
            return
        drops = [d for _n, d in sensitivity]
        self.sensitivity_plot.addItem(pg.BarGraphItem(x=list(range(1, len(drops) + 1)), height=drops,
                                                      width=0.7, brush="#8e44ad"))
        worst_name, worst = max(sensitivity, key=lambda row: row[1])
        self.sensitivity_plot.setTitle(f"Per-layer sensitivity (int8 one layer at a time)<br>"
                                       f"most sensitive: {worst_name} ({worst:.3f})", color="#333", size="9pt")
        self.sensitivity_plot.setLabel("bottom", "layer (network order)")
        self.sensitivity_plot.setLabel("left", "fidelity Dice drop")
        self.sensitivity_plot.show()

    # -- keeping and comparing -------------------------------------------------------------------
    def checked_names(self) -> list[str]:
        return [name for name, box in self.keep_boxes.items() if box.isChecked()]

    def keep_checked(self) -> None:
        if self.result is None:
            return
        from app.compress_job import keep_variants
        self.keep_button.setEnabled(False)
        self.problem_label.setText("")
        self.jobs.submit("Keep compressed variants", keep_variants, self.result.run_folder, self.checked_names(),
                         self.destination.text().strip() or self.result.run_folder, self.result.rows,
                         on_result=self._kept, on_error=self._keep_failed)

    def _kept(self, paths: list[str]) -> None:
        self.problem_label.setStyleSheet("")
        self.problem_label.setText(f"Kept {len(paths)} variant(s); recorded in the audit log.")
        self.kept_paths = list(paths)
        self.variants_kept.emit(list(paths))

    def _keep_failed(self, message: str, _detail: str) -> None:
        self.keep_button.setEnabled(True)
        self.problem_label.setStyleSheet(PROBLEM_STYLE)
        self.problem_label.setText(f"Could not keep the variants: {message}")

    def compare_selected(self) -> None:
        if self.result is None:
            return
        chosen = set(self.checked_names())
        kept = getattr(self, "kept_paths", None)
        paths = [self.result.rows[0].card_path]
        if kept is not None:
            paths += [p for p in kept if Path(p).parent.name in {Path(r.card_path).parent.name for r in
                                                                 self.result.rows if r.name in chosen}]
        else:
            paths += [r.card_path for r in self.result.rows[1:] if r.name in chosen]
        self.compare_requested.emit(paths)

    def page_problems(self) -> list[str]:
        return []
