"""The compare view: 2–4 variants' findings side by side on the same scan, linked, with every
lesion on which they disagree listed and one click away; before/after accuracy beside it.

Widgets only: what to compare goes out as signals (to :class:`app.compare.CompareService`),
what arrives (a :class:`~app.compare.CaseView`, a :class:`~compression.compare.ViewSummary`)
is drawn. Scroll, zoom, pan, window/level, crosshair and layout are linked by keeping the
panels' ViewerStates and view boxes in step.
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QColor
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QFileDialog, QHBoxLayout, QHeaderView, QLabel,
                               QLineEdit, QListWidget, QPushButton, QSplitter, QTableWidget, QTableWidgetItem,
                               QTabWidget, QToolBar, QVBoxLayout, QWidget)

from widgets.viewer.viewer_panel import ViewerPanel

DISAGREEMENT = "Disagreement"
# Same colours as the report's images: green only the reference, magenta only the other variant.
DISAGREEMENT_COLOURS = {1: "#2ecc71", 2: "#ff2fd0"}
DISAGREEMENT_OPACITY = 0.7   # above the findings' 0.45: the differences are what this view is for
VARIANT_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
AI_NOTICE = "AI findings — research use only"
# Field of view (mm) a jump to a disagreement zooms to: a nodule of a few mm must be visible at once.
JUMP_FIELD_MM = 70.0
# Rows: true misses strongest; lesions merged into or split from another one paler, and those the
# ground truth sides with the compared variant on (a dropped false positive, a found nodule).
KIND_COLOURS = {"missed": "#ffc9c9", "missed-pale": "#ffeded", "added": "#ffe2b8", "added-pale": "#fff4e4"}


# ---------------------------------------------------------------- linking the panels


def link_panels(panels: list[ViewerPanel]) -> None:
    """Keep every panel where the first is: position (scroll, crosshair), window/level, slab,
    crosshair, layout; and the same zoom and pan in each view (pyqtgraph view-box links)."""
    for source in panels:
        for target in panels:
            if target is source:
                continue
            s, t = source.state, target.state
            # Each setter returns early when nothing changes, so the echo stops after one hop.
            s.position_changed.connect(t.set_position)
            s.window_changed.connect(t.set_window)
            s.slab_changed.connect(t.set_slab_mm)
            s.crosshair_changed.connect(t.set_crosshair)
            s.layout_changed.connect(t.set_layout)
    for name in panels[0].mpr.views:
        ZoomLink([panel.mpr.views[name].view_box for panel in panels])


class ZoomLink:
    """The same centre and the same millimetres per screen pixel in every linked view box.

    (pyqtgraph's own X/Y links align screen edges instead, which shifts and rescales views
    whose boxes differ in size or keep an aspect ratio, as image views do.)"""

    def __init__(self, boxes: list):
        self.boxes = boxes
        self._busy = False
        for box in boxes:
            box.sigRangeChanged.connect(lambda source, *_: self.follow(source))

    def follow(self, source) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            (x0, x1), (y0, y1) = source.viewRange()
            width = max(1.0, source.width())
            mm_per_pixel = (x1 - x0) / width
            centre = ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
            for box in self.boxes:
                if box is not source:
                    half_w, half_h = box.width() * mm_per_pixel / 2.0, box.height() * mm_per_pixel / 2.0
                    box.setRange(xRange=(centre[0] - half_w, centre[0] + half_w),
                                 yRange=(centre[1] - half_h, centre[1] + half_h), padding=0)
        finally:
            self._busy = False


# ---------------------------------------------------------------- small pieces


def fill_table(widget: QTableWidget, table, highlight_column: int | None = None) -> None:
    """An app.core.report.Table into a read-only QTableWidget."""
    widget.clear()
    widget.setColumnCount(len(table.columns))
    widget.setRowCount(len(table.rows))
    widget.setHorizontalHeaderLabels(table.columns)
    for r, row in enumerate(table.rows):
        for c, value in enumerate(row):
            item = QTableWidgetItem(str(value))
            item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
            widget.setItem(r, c, item)
    widget.resizeColumnsToContents()
    widget.horizontalHeader().setStretchLastSection(True)
    widget.setToolTip(table.note)


def _table_widget() -> QTableWidget:
    widget = QTableWidget()
    widget.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    widget.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    widget.verticalHeader().setVisible(False)
    widget.verticalHeader().setDefaultSectionSize(20)   # compact rows: more of the list in view
    widget.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    return widget


class BarChart(pg.PlotWidget):
    """Grouped bars (a bar per variant in each category) with optional interval whiskers."""

    def __init__(self, parent=None):
        super().__init__(parent, background="w")
        self.setMinimumHeight(160)
        self.getPlotItem().showGrid(y=True, alpha=0.3)

    def show_series(self, series) -> None:
        plot = self.getPlotItem()
        plot.clear()
        note = f"<br><span style='font-size:7pt'>{series.note}</span>" if series.note else ""
        plot.setTitle(f"{series.title}{note}", color="#222", size="9pt")
        plot.setLabel("left", series.unit)
        legend = plot.legend or plot.addLegend(offset=(-5, 5), labelTextColor="#222", brush=(255, 255, 255, 200))
        legend.clear()
        width = 0.8 / max(1, len(series.values))
        x = np.arange(len(series.categories), dtype=float)
        for n, (name, values) in enumerate(series.values.items()):
            heights = np.nan_to_num(np.asarray(values, float))
            xs = x + (n - (len(series.values) - 1) / 2) * width
            bars = pg.BarGraphItem(x=xs, height=heights, width=width * 0.95,
                                   brush=VARIANT_COLOURS[n % len(VARIANT_COLOURS)], name=name)
            plot.addItem(bars)   # named: the legend lists it
            if series.errors and name in series.errors:
                low, high = (np.asarray(v, float) for v in series.errors[name])
                plot.addItem(pg.ErrorBarItem(x=xs, y=heights, top=high - heights, bottom=heights - low, beam=width / 3))
        plot.getAxis("bottom").setTicks([list(enumerate(series.categories))])
        if series.y_range is not None:
            plot.setYRange(*series.y_range, padding=0)
        else:
            plot.enableAutoRange(axis="y")


# ---------------------------------------------------------------- the view


class CompareView(QWidget):
    compare_requested = Signal(list, str, str)   # model paths, data path, split
    cancel_requested = Signal()
    case_requested = Signal(int)
    report_requested = Signal(str, str)           # html path, pdf path ("" = none)
    seg_requested = Signal(str)                   # folder

    def __init__(self, parent=None):
        super().__init__(parent)
        self.panels: list[ViewerPanel] = []
        self.titles: list[QLabel] = []
        self.names: list[str] = []
        self.locations: list = []
        self.current_case = -1
        self._pending_jump = None
        self.setup = self._build_setup()
        self.toolbar = self._build_toolbar()
        self.viewer_bar = QVBoxLayout()   # the reference panel's viewer toolbar drives every panel
        self.panel_row = QSplitter(Qt.Orientation.Horizontal)
        self.tabs = self._build_tabs()
        body = QSplitter(Qt.Orientation.Vertical)
        body.addWidget(self.panel_row)
        body.addWidget(self.tabs)
        body.setStretchFactor(0, 3)
        body.setStretchFactor(1, 1)
        body.setSizes([700, 260])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in (self.setup, self.toolbar):
            layout.addWidget(widget)
        layout.addLayout(self.viewer_bar)
        layout.addWidget(body, 1)

    # --- construction ----------------------------------------------------------------------------
    def _build_setup(self) -> QWidget:
        box = QWidget()
        row = QHBoxLayout(box)
        row.setContentsMargins(6, 4, 6, 4)
        self.model_list = QListWidget()
        self.model_list.setMaximumHeight(52)
        self.model_list.setToolTip("2–4 model cards; the first is the reference (usually the original)")
        add, remove = QPushButton("Add model…"), QPushButton("Remove")
        add.clicked.connect(self._choose_model)
        remove.clicked.connect(lambda: self.model_list.takeItem(self.model_list.currentRow()))
        buttons = QVBoxLayout()
        buttons.addWidget(add)
        buttons.addWidget(remove)
        self.data_edit = QLineEdit()
        self.data_edit.setPlaceholderText("manifest.csv, its folder, or one DICOM series folder")
        browse = QPushButton("Data…")
        browse.clicked.connect(self._choose_data)
        self.split_box = QComboBox()
        self.split_box.addItems(["eval", "calib", "train"])
        self.split_box.setToolTip("Manifest split to compare on (verdicts belong on eval)")
        self.compare_button = QPushButton("Compare")
        self.compare_button.clicked.connect(self._request_compare)
        self.cancel_button = QPushButton("Stop")
        self.cancel_button.setToolTip("Cancel the model runs of this comparison")
        self.cancel_button.clicked.connect(self.cancel_requested.emit)
        row.addWidget(QLabel("Models:"))
        row.addWidget(self.model_list, 2)
        row.addLayout(buttons)
        row.addWidget(QLabel("Data:"))
        row.addWidget(self.data_edit, 2)
        row.addWidget(browse)
        row.addWidget(self.split_box)
        row.addWidget(self.compare_button)
        row.addWidget(self.cancel_button)
        return box

    def _build_toolbar(self) -> QToolBar:
        bar = QToolBar("Compare")
        bar.addWidget(QLabel(" Case: "))
        self.case_box = QComboBox()
        self.case_box.setMinimumWidth(90)
        self.case_box.activated.connect(self.case_requested.emit)
        bar.addWidget(self.case_box)
        bar.addSeparator()
        self.disagreement_action = QAction("Disagreement overlay", self, checkable=True)
        self.disagreement_action.setToolTip("Voxels only the reference marks (green) or only the other variant (magenta)")
        self.disagreement_action.setChecked(True)
        self.disagreement_action.toggled.connect(self.set_disagreement_visible)
        bar.addAction(self.disagreement_action)
        self.findings_action = QAction("Findings", self, checkable=True)
        self.findings_action.setToolTip("Each variant's own label map")
        self.findings_action.setChecked(True)
        self.findings_action.toggled.connect(self.set_findings_visible)
        bar.addAction(self.findings_action)
        bar.addSeparator()
        bar.addAction("Report…", self._choose_report)
        bar.addAction("DICOM SEG…", self._choose_seg_folder)
        self.evidence_label = QLabel("")
        bar.addWidget(self.evidence_label)
        return bar

    def _build_tabs(self) -> QTabWidget:
        tabs = QTabWidget()
        tabs.setMinimumHeight(250)
        self.disagreement_table = _table_widget()
        self.disagreement_table.cellClicked.connect(lambda row, _col: self.jump_to_row(row))
        tabs.addTab(self.disagreement_table, "Disagreements")
        tabs.addTab(self._build_accuracy(), "Before / after accuracy")
        charts = QWidget()
        grid = QHBoxLayout(charts)
        self.charts = [BarChart() for _ in range(4)]
        for chart in self.charts:
            grid.addWidget(chart)
        tabs.addTab(charts, "Charts")
        return tabs

    def _build_accuracy(self) -> QWidget:
        """The whole-set verdicts on the left (every measure in view); per case and costs on the right."""
        self.accuracy_tables = [_table_widget() for _ in range(3)]
        self.accuracy_titles = [QLabel() for _ in range(3)]
        columns = QSplitter(Qt.Orientation.Horizontal)
        for group in ((0,), (1, 2)):
            holder = QWidget()
            column = QVBoxLayout(holder)
            column.setContentsMargins(2, 2, 2, 2)
            for n in group:
                self.accuracy_titles[n].setWordWrap(True)
                column.addWidget(self.accuracy_titles[n])
                column.addWidget(self.accuracy_tables[n], 1)
            columns.addWidget(holder)
        return columns

    # --- intents ----------------------------------------------------------------------------------
    def set_models(self, paths: list[str]) -> None:
        self.model_list.clear()
        self.model_list.addItems(paths)

    def model_paths(self) -> list[str]:
        return [self.model_list.item(n).text() for n in range(self.model_list.count())]

    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add a model to compare", "",
                                              "Model card or file (*.json *.onnx *.pt *.pth *.ts);;All files (*)")
        if path:
            self.model_list.addItem(path)

    def _choose_data(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Data: a manifest's folder or one DICOM series folder")
        if folder:
            self.data_edit.setText(folder)

    def _request_compare(self) -> None:
        self.compare_requested.emit(self.model_paths(), self.data_edit.text().strip(), self.split_box.currentText())

    def _choose_report(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the comparison report", "comparison.html", "HTML (*.html)")
        if path:
            self.report_requested.emit(path, str(path).rsplit(".", 1)[0] + ".pdf")

    def _choose_seg_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the DICOM SEG files")
        if folder:
            self.seg_requested.emit(folder)

    # --- what arrives --------------------------------------------------------------------------------
    def set_variants(self, names: list[str]) -> None:
        """One panel per variant, the reference first, linked to each other."""
        for panel in self.panels:
            panel.toolbar.deleteLater()
            panel.parentWidget().deleteLater()
        self.panels, self.titles, self.names = [], [], list(names)
        for n, name in enumerate(names):
            holder, panel, title = self._panel(name, n)
            self.panel_row.addWidget(holder)
            self.panels.append(panel)
            self.titles.append(title)
        self.panel_row.setSizes([1000] * len(self.panels))   # equal widths
        if self.panels:
            self.viewer_bar.addWidget(self.panels[0].toolbar)   # out of the panel: all panels equal in size
        if len(self.panels) > 1:
            link_panels(self.panels)

    def _panel(self, name: str, index: int):
        holder = QWidget()
        column = QVBoxLayout(holder)
        column.setContentsMargins(1, 0, 1, 0)
        column.setSpacing(0)
        role = "reference" if index == 0 else "compared"
        title = QLabel(f"<b>{name}</b> ({role}) — <span style='color:#b06000'>{AI_NOTICE}</span>")
        title.setStyleSheet(f"QLabel {{ border-bottom: 3px solid {VARIANT_COLOURS[index % 4]}; padding: 2px; }}")
        panel = ViewerPanel()
        panel.state.set_layout("1x1", "axial")   # side by side, one view each reads best
        panel.splitter.widget(1).hide()           # the comparison has its own lists below
        if index:
            panel.toolbar.hide()                  # linked: the first panel's toolbar drives them all
        column.addWidget(title)
        column.addWidget(panel, 1)
        return holder, panel, title

    def set_cases(self, labels: list[str]) -> None:
        self.case_box.clear()
        self.case_box.addItems(labels)

    def show_summary(self, summary) -> None:
        """The disagreement list, the accuracy tables and the charts of a finished comparison."""
        self.locations = list(summary.locations)
        fill_table(self.disagreement_table, summary.disagreements)
        for row, kind in enumerate(summary.kinds):
            colour = KIND_COLOURS.get(kind)
            for col in range(self.disagreement_table.columnCount()) if colour else ():
                self.disagreement_table.item(row, col).setBackground(QColor(colour))
        for title, widget, table in zip(self.accuracy_titles, self.accuracy_tables, summary.tables):
            title.setText(f"<b>{table.title}</b> — {table.note}")
            fill_table(widget, table)
        for chart, series in zip(self.charts, summary.charts):
            chart.show_series(series)
        self.evidence_label.setText(f"  {len(self.locations)} disagreement(s); evidence: {summary.evidence}")
        first = next((row for row, (case, _centre) in enumerate(self.locations) if case == 0), None)
        if first is not None:   # the first case opens on its most serious disagreement
            self.disagreement_table.selectRow(first)
            self._pending_jump = self.locations[first]

    def show_case(self, case) -> None:
        """A CaseView: the shared volume in every panel, each with its own findings."""
        self.current_case = case.case_index
        self.case_box.setCurrentIndex(case.case_index)
        for n, panel in enumerate(self.panels):
            panel.set_volume(case.volume)
            panel.add_label_overlay(self.names[n], case.labels[n], {1: VARIANT_COLOURS[n % 4]}, is_ai=True,
                                    source=self.names[n], label_names={1: "finding"})
            panel.set_lesions(case.lesions[n], self.names[n], is_ai=True)
            maps = case.disagreement_maps[n] if case.disagreement_maps[n] is not None else _reference_map(case)
            if maps is not None:
                panel.add_label_overlay(DISAGREEMENT, maps, DISAGREEMENT_COLOURS, is_ai=True, source=DISAGREEMENT,
                                        label_names={1: "only the reference", 2: "only this variant"})
                panel.overlay_state.update_label(DISAGREEMENT, opacity=DISAGREEMENT_OPACITY)
        self.set_disagreement_visible(self.disagreement_action.isChecked())
        self.set_findings_visible(self.findings_action.isChecked())
        if self._pending_jump is not None and self._pending_jump[0] == case.case_index:
            self._jump(self._pending_jump[1])
        self._pending_jump = None

    def set_disagreement_visible(self, shown: bool) -> None:
        for panel in self.panels:
            panel.overlay_state.update_label(DISAGREEMENT, visible=bool(shown))

    def set_findings_visible(self, shown: bool) -> None:
        for panel, name in zip(self.panels, self.names):
            panel.overlay_state.update_label(name, visible=bool(shown))

    def jump_to_row(self, row: int) -> None:
        """A disagreement clicked: its case in every panel, every view on its centre."""
        if not 0 <= row < len(self.locations):
            return
        case_index, centre = self.locations[row]
        if case_index != self.current_case:
            self._pending_jump = (case_index, centre)
            self.case_requested.emit(case_index)
            return
        self._jump(centre)

    def _jump(self, centre) -> None:
        """Every panel to the lesion (linked: moving the first moves all), zoomed in on it."""
        if not self.panels:
            return
        self.panels[0].jump_to(*centre)
        for view in self.panels[0].mpr.views.values():
            zoom_on(view, centre, JUMP_FIELD_MM)


def zoom_on(view, centre_kji, field_mm: float) -> None:
    """Show ``field_mm`` of a slice view round an array position (the view's mm coordinates)."""
    from app.core.display import VIEW_AXES

    if view.scan is None:
        return
    canonical = view.scan.to_canonical(centre_kji)
    _axis, rows, cols = VIEW_AXES[view.view]
    row_mm, col_mm = view.pixel_mm()
    x, y = (canonical[cols] + 0.5) * col_mm, (canonical[rows] + 0.5) * row_mm
    half = field_mm / 2.0
    view.view_box.setRange(xRange=(x - half, x + half), yRange=(y - half, y + half), padding=0)


def _reference_map(case):
    """The reference panel shows the disagreement with the other variant when there is only one."""
    others = [m for m in case.disagreement_maps if m is not None]
    return others[0] if len(others) == 1 else None


def connect_compare(view: CompareView, service) -> None:
    """Wire a CompareView to an app.compare.CompareService: intents out, results in."""
    view.compare_requested.connect(service.compare)
    view.cancel_requested.connect(service.cancel)
    view.case_requested.connect(service.show_case)
    view.report_requested.connect(lambda html, pdf: service.export_report(html, pdf or None))
    view.seg_requested.connect(service.export_seg)
    service.variants_ready.connect(view.set_variants)
    service.cases_ready.connect(view.set_cases)
    service.comparison_ready.connect(lambda _run, summary: view.show_summary(summary))
    service.case_ready.connect(view.show_case)


def open_compare_view(window, session, model_paths: list[str] | None = None) -> CompareView:
    """Tools → Compare models…: the one compare view of the window, shown in its central area,
    filled with the session's open models (classifiers are compared on the first segmentation
    model's lesions) and the open series' folder."""
    import os

    from app.compare import CompareService

    view = getattr(window, "compare_view", None)
    if view is None:
        view = CompareView()
        view.service = CompareService(window.jobs, session.compute, parent=view)
        connect_compare(view, view.service)
        view.service.status.connect(lambda text: window.statusBar().showMessage(text, 15_000))
        view.service.exported.connect(lambda text: window.statusBar().showMessage(text, 15_000))
        window.compare_view = view
    paths = model_paths or [str(m.variant.card_path or m.variant.main_file) for m in session.models]
    if paths:
        view.set_models(paths)
    files = getattr(session.series, "files", None) or []
    if files and not view.data_edit.text():
        view.data_edit.setText(os.path.commonpath([os.path.dirname(str(f)) for f in files]))
    window.show_central(view)
    return view
