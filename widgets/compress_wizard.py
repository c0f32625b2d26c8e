"""The compression wizard: Model → Data → Techniques → Budget and target → Run → Results.

Every page writes into one :class:`app.compress_config.CompressConfigModel` and reads back from
it; the pages hold no logic of their own. Anything slow (the model's layer table, counting the
scans, the run itself) is a job on the one job manager, so it shows in the Jobs panel and the
window never waits. Work that needs torch runs in a child process: this process never imports it.
"""
from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QButtonGroup, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog,
                               QFormLayout, QGridLayout, QGroupBox, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QListWidget, QListWidgetItem, QMessageBox, QPushButton, QRadioButton,
                               QScrollArea, QSpinBox, QTableWidget, QTableWidgetItem, QTextBrowser,
                               QVBoxLayout, QWidget, QWizard, QWizardPage)

from app.compress_config import (EXPERT, PRESETS, TECHNIQUES, CompressConfig, CompressConfigModel,
                                 Parameter, load_recipe, problems, save_recipe, search_advice)
from app.core.manifest import SPLITS
from app.jobs import JobManager
from app.settings import app_settings

PROBLEM_STYLE = "QLabel { color: #c0392b; font-weight: bold; }"
WARNING_COLOUR = "#b06000"
ADVICE_STYLE = f"QLabel {{ color: {WARNING_COLOUR}; }}"


def file_size_text(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "—"
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def count_text(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


class ConfigPage(QWizardPage):
    """A page over the shared config: refuses Next with the config's own problem messages."""

    page_key = ""

    def __init__(self, wizard_model: CompressConfigModel, jobs: JobManager, title: str, subtitle: str):
        super().__init__()
        self.config_model, self.jobs = wizard_model, jobs
        self.setTitle(title)
        self.setSubTitle(subtitle)
        self.problem_label = QLabel()
        self.problem_label.setObjectName("problems")
        self.problem_label.setStyleSheet(PROBLEM_STYLE)
        self.problem_label.setWordWrap(True)

    @property
    def config(self) -> CompressConfig:
        return self.config_model.config

    def page_problems(self) -> list[str]:
        return problems(self.config, self.page_key)

    def validatePage(self) -> bool:  # noqa: N802 - Qt override
        found = self.page_problems()
        self.problem_label.setText("\n".join(found))
        return not found


def _browse_row(edit: QLineEdit, button_text: str, chooser) -> QHBoxLayout:
    row = QHBoxLayout()
    row.addWidget(edit, 1)
    button = QPushButton(button_text)
    button.clicked.connect(chooser)
    row.addWidget(button)
    return row


# ---------------------------------------------------------------- 1 Model


class ModelPage(ConfigPage):
    page_key = "model"

    def __init__(self, wizard_model, jobs, open_models):
        super().__init__(wizard_model, jobs, "1 · Model", "Which model to compress. Its files are never changed: "
                         "every technique writes a new variant.")
        self.open_models = list(open_models)
        self.summary = None
        self.chooser = QComboBox()
        self.chooser.activated.connect(self._chosen_from_list)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("a model card (card.json) or a model file with its card beside it")
        self.path_edit.editingFinished.connect(lambda: self.set_model(self.path_edit.text().strip()))
        self.card_view = QTextBrowser()
        self.card_view.setMaximumHeight(170)
        self.facts = QLabel("Choose a model.")
        self.facts.setWordWrap(True)
        self.layers = QTableWidget(0, 4)
        self.layers.setHorizontalHeaderLabels(["layer", "type", "parameters", "weight shape"])
        self.layers.horizontalHeader().setStretchLastSection(True)
        self.layers.verticalHeader().setVisible(False)
        self.layers.verticalHeader().setDefaultSectionSize(22)
        self._layout()
        self._fill_chooser()

    def _layout(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        form.addRow("Loaded models", self.chooser)
        form.addRow("Model file", _browse_row(self.path_edit, "Browse…", self._browse))
        layout.addLayout(form)
        layout.addWidget(self.card_view)
        layout.addWidget(self.facts)
        layout.addWidget(self.layers, 1)
        layout.addWidget(self.problem_label)

    def set_open_models(self, open_models) -> None:
        self.open_models = list(open_models)
        self._fill_chooser()

    def _fill_chooser(self) -> None:
        self.chooser.clear()
        self.chooser.addItem("— choose a loaded model —", "")
        for model in self.open_models:
            path = model.variant.card_path or model.variant.main_file
            self.chooser.addItem(model.name, str(path))

    def _chosen_from_list(self, index: int) -> None:
        path = self.chooser.itemData(index)
        if path:
            self.set_model(path)

    def _browse(self) -> None:
        start = app_settings().value("wizard/model_folder", "")
        path, _ = QFileDialog.getOpenFileName(self, "Model to compress", str(start),
                                              "Model card or file (*.json *.onnx *.pt *.pth *.ts);;All files (*)")
        if path:
            app_settings().setValue("wizard/model_folder", str(Path(path).parent))
            self.set_model(path)

    def initializePage(self) -> None:  # noqa: N802 - Qt override
        if self.config.model and self.summary is None:
            self.set_model(self.config.model, force=True)

    def set_model(self, path: str, force: bool = False) -> None:
        if not path or (path == self.config.model and not force and self.summary is not None):
            return
        self.path_edit.setText(path)
        self.config_model.set("model", path)
        self.summary = None
        self.layers.setRowCount(0)
        found = self.page_problems()
        self.problem_label.setText("\n".join(found))
        if found:
            return
        self._show_card(path)
        self.facts.setText("Counting parameters and MACs (in a child process) …")
        from app.compress_job import describe_model
        self.jobs.submit(f"Describe {Path(path).parent.name}", describe_model, path, in_process=True,
                         owner="wizard:describe", on_result=self._described,
                         on_error=lambda message, _d: self.facts.setText(f"Could not read the model: {message}"))

    def _show_card(self, path: str) -> None:
        from app.core.models import open_model
        from app.session import OpenModel
        from widgets.model_panel import card_html
        try:
            self.variant = open_model(path)
        except Exception as exc:   # a bad card is the user's file problem: say so, do not crash
            self.problem_label.setText(f"Cannot open this model: {exc}")
            return
        self.card_view.setHtml(card_html(OpenModel(self.variant)))

    def _described(self, summary) -> None:
        self.summary = summary
        size = getattr(getattr(self, "variant", None), "size_bytes", None)
        shape = "×".join(str(n) for n in summary.macs_input[2:])
        self.facts.setText(
            f"<b>{count_text(summary.parameters)}</b> parameters · <b>{count_text(summary.macs)}</b> MACs per "
            f"{shape} input · files {file_size_text(size)} · providers on this machine: "
            f"{html.escape(', '.join(summary.providers))}" + (f" · {summary.note}" if summary.note else ""))
        self.wizard_providers(summary.providers)
        self.layers.setRowCount(len(summary.layers))
        for row, (name, kind, params, shape_text) in enumerate(summary.layers):
            for col, value in enumerate((name, kind, f"{params:,}", shape_text)):
                item = QTableWidgetItem(value)
                if col == 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.layers.setItem(row, col, item)
        self.layers.resizeColumnsToContents()

    def wizard_providers(self, providers: list[str]) -> None:
        wizard = self.wizard()
        if wizard is not None:
            wizard.providers = list(providers)


# ---------------------------------------------------------------- 2 Data


class DataPage(ConfigPage):
    page_key = "data"

    def __init__(self, wizard_model, jobs):
        super().__init__(wizard_model, jobs, "2 · Data", "Scans to calibrate, fine-tune and judge on, split by "
                         "patient so no patient is both learnt from and judged on.")
        self.survey = None
        self.manifest_choice = QRadioButton("A manifest (CSV: case, patient, series, labels, split)")
        self.folder_choice = QRadioButton("A folder of scans, split here by patient")
        self.manifest_edit, self.folder_edit = QLineEdit(), QLineEdit()
        self.split_boxes = {s: self._share_box() for s in SPLITS}
        self.seed = QSpinBox()
        self.seed.setRange(0, 2 ** 31 - 1)
        self.counts = QTableWidget(len(SPLITS), 5)
        self.counts.setHorizontalHeaderLabels(["patients", "series", "slices", "lesions", "labelled"])
        self.counts.setVerticalHeaderLabels(list(SPLITS))
        self.counts.setMaximumHeight(118)
        self.counts.verticalHeader().setDefaultSectionSize(24)
        self.counts.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.issues = QListWidget()
        self.issues.setWordWrap(True)
        self.issues.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.recount = QTimer(self, singleShot=True, interval=300)
        self.recount.timeout.connect(self.examine)
        self._layout()
        self._connect()

    def _share_box(self) -> QDoubleSpinBox:
        box = QDoubleSpinBox()
        box.setRange(0.0, 1.0)
        box.setSingleStep(0.05)
        box.setDecimals(2)
        return box

    def _layout(self) -> None:
        layout = QVBoxLayout(self)
        layout.addWidget(self.manifest_choice)
        layout.addLayout(_browse_row(self.manifest_edit, "Browse…", self._browse_manifest))
        layout.addWidget(self.folder_choice)
        layout.addLayout(_browse_row(self.folder_edit, "Browse…", self._browse_folder))
        shares = QHBoxLayout()
        for split, box in self.split_boxes.items():
            shares.addWidget(QLabel(split))
            shares.addWidget(box)
        shares.addWidget(QLabel("seed"))
        shares.addWidget(self.seed)
        shares.addStretch(1)
        layout.addLayout(shares)
        layout.addWidget(QLabel("<b>What each split holds</b>"))
        layout.addWidget(self.counts)
        layout.addWidget(QLabel("<b>Problems and warnings</b>"))
        layout.addWidget(self.issues, 1)
        layout.addWidget(self.problem_label)

    def _connect(self) -> None:
        self.manifest_choice.toggled.connect(self._mode_changed)
        self.manifest_edit.editingFinished.connect(lambda: self._set("data.manifest", self.manifest_edit.text().strip()))
        self.folder_edit.editingFinished.connect(lambda: self._set("data.folder", self.folder_edit.text().strip()))
        for split, box in self.split_boxes.items():
            box.valueChanged.connect(lambda value, s=split: self._set_share(s, value))
        self.seed.valueChanged.connect(lambda value: self._set("data.seed", int(value)))

    def initializePage(self) -> None:  # noqa: N802 - Qt override
        data = self.config.data
        self.manifest_edit.setText(data.manifest)
        self.folder_edit.setText(data.folder)
        (self.manifest_choice if data.manifest or not data.folder else self.folder_choice).setChecked(True)
        for split, box in self.split_boxes.items():
            box.blockSignals(True)
            box.setValue(float(data.proportions.get(split, 0.0)))
            box.blockSignals(False)
        self.seed.setValue(data.seed)
        self._mode_changed()
        self.examine()

    def _mode_changed(self) -> None:
        by_manifest = self.manifest_choice.isChecked()
        self.manifest_edit.setEnabled(by_manifest)
        self.folder_edit.setEnabled(not by_manifest)
        for box in self.split_boxes.values():
            box.setEnabled(not by_manifest)
        self.seed.setEnabled(not by_manifest)
        self._set("data.manifest", self.manifest_edit.text().strip() if by_manifest else "")
        self._set("data.folder", "" if by_manifest else self.folder_edit.text().strip())

    def _set(self, name: str, value) -> None:
        if self.config_model.get(name) != value:
            self.config_model.set(name, value)
            self.survey = None   # the counts shown no longer hold; Next waits for the new ones
            self.recount.start()

    def _set_share(self, split: str, value: float) -> None:
        shares = dict(self.config.data.proportions)
        shares[split] = float(value)
        self._set("data.proportions", shares)

    def _browse_manifest(self) -> None:
        start = app_settings().value("wizard/data_folder", "")
        path, _ = QFileDialog.getOpenFileName(self, "Manifest", str(start), "Manifest (*.csv);;All files (*)")
        if path:
            app_settings().setValue("wizard/data_folder", str(Path(path).parent))
            self.manifest_edit.setText(path)
            self._set("data.manifest", path)

    def _browse_folder(self) -> None:
        start = app_settings().value("wizard/data_folder", "")
        folder = QFileDialog.getExistingDirectory(self, "Folder of scans", str(start))
        if folder:
            app_settings().setValue("wizard/data_folder", folder)
            self.folder_edit.setText(folder)
            self._set("data.folder", folder)

    def examine(self) -> None:
        """Count the scans again (a light job); the page refuses Next until the count is in."""
        self.survey = None
        found = problems(self.config, "data")
        self._show_issues(found, [])
        if found:
            return
        from app.compress_data import survey_data
        data = self.config.data
        self.jobs.submit("Examine compression data", survey_data, data.manifest, data.folder,
                         dict(data.proportions), data.seed, owner="wizard:survey", on_result=self._surveyed,
                         on_error=lambda message, _d: self._show_issues([f"Cannot examine the data: {message}"], []))

    def _surveyed(self, survey) -> None:
        self.survey = survey
        for row, split in enumerate(SPLITS):
            counts = survey.splits[split]
            for col, value in enumerate((counts.patients, counts.series, counts.slices, counts.lesions, counts.labelled)):
                item = QTableWidgetItem(str(value))
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.counts.setItem(row, col, item)
        self._show_issues(survey.problems, survey.warnings)
        self.completeChanged.emit()

    def _show_issues(self, found: list[str], warnings: list[str]) -> None:
        self.issues.clear()
        for text in found:
            item = QListWidgetItem(f"✖ {text}")
            item.setForeground(Qt.GlobalColor.red)
            self.issues.addItem(item)
        for text in warnings:
            item = QListWidgetItem(f"⚠ {text}")
            item.setForeground(Qt.GlobalColor.darkYellow)
            self.issues.addItem(item)
        if not found and not warnings and self.survey is not None:
            self.issues.addItem("✔ No problems found.")

    def validatePage(self) -> bool:  # noqa: N802 - Qt override
        found = problems(self.config, "data")
        if not found and self.survey is None:
            found = ["Wait until the data have been examined."]
        elif not found:
            found = list(self.survey.problems)
        self.problem_label.setText("\n".join(found))
        return not found


# ---------------------------------------------------------------- 3 Techniques


class TechniquesPage(ConfigPage):
    page_key = "techniques"

    def __init__(self, wizard_model, jobs):
        super().__init__(wizard_model, jobs, "3 · Techniques", "A preset, or your own recipe. Each technique "
                         "says what it removes and what it risks.")
        self.preset_group = QButtonGroup(self)
        self.preset_buttons: dict[str, QRadioButton] = {}
        self.step_checks: dict[str, QCheckBox] = {}
        self.param_widgets: dict[tuple[str, str], QWidget] = {}
        self.sensitivity = QCheckBox("Measure each layer's sensitivity first (shown as a chart with the results)")
        self.expert_box = QGroupBox("Expert recipe: the checked techniques run in this order")
        self._layout()
        self.preset_group.buttonToggled.connect(self._preset_changed)
        self.sensitivity.toggled.connect(lambda on: self.config_model.set("sensitivity_first", bool(on)))

    def _layout(self) -> None:
        layout = QVBoxLayout(self)
        for preset in PRESETS:
            layout.addWidget(self._preset_button(preset.key, preset.title, preset.summary))
        layout.addWidget(self._preset_button(EXPERT, "Expert", "Choose the techniques and their parameters yourself."))
        grid = QGridLayout(self.expert_box)
        for row, tech in enumerate(TECHNIQUES):
            self._technique_row(grid, row, tech)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.expert_box)
        layout.addWidget(scroll, 1)
        layout.addWidget(self.sensitivity)
        layout.addWidget(self.problem_label)

    def _preset_button(self, key: str, title: str, summary: str) -> QWidget:
        box = QWidget()
        row = QHBoxLayout(box)
        row.setContentsMargins(0, 0, 0, 0)
        button = QRadioButton(title)
        button.setMinimumWidth(200)
        self.preset_group.addButton(button)
        self.preset_buttons[key] = button
        text = QLabel(summary)
        text.setWordWrap(True)
        text.setStyleSheet("color: #555;")
        row.addWidget(button)
        row.addWidget(text, 1)
        return box

    def _technique_row(self, grid: QGridLayout, row: int, tech) -> None:
        check = QCheckBox(tech.title)
        check.toggled.connect(self._steps_changed)
        self.step_checks[tech.step] = check
        grid.addWidget(check, 2 * row, 0)
        params = QHBoxLayout()
        for p in tech.parameters:
            params.addWidget(QLabel(p.label))
            widget = self._parameter_widget(p)
            self.param_widgets[(tech.step, p.name)] = widget
            params.addWidget(widget)
        params.addStretch(1)
        grid.addLayout(params, 2 * row, 1)
        explanation = QLabel(tech.explanation)
        explanation.setWordWrap(True)
        explanation.setStyleSheet("color: #555; margin-left: 22px; margin-bottom: 4px;")
        grid.addWidget(explanation, 2 * row + 1, 0, 1, 2)

    def _parameter_widget(self, p: Parameter) -> QWidget:
        if p.choices:
            widget = QComboBox()
            for choice in p.choices:
                widget.addItem(str(choice), choice)
            widget.setCurrentIndex(list(p.choices).index(p.default))
            widget.currentIndexChanged.connect(self._steps_changed)
        elif isinstance(p.default, int) and not isinstance(p.default, bool):
            widget = QSpinBox()
            widget.setRange(int(p.minimum or 0), int(p.maximum or 10 ** 6))
            widget.setValue(p.default)
            widget.valueChanged.connect(self._steps_changed)
        else:
            widget = QDoubleSpinBox()
            widget.setDecimals(4 if p.default < 0.01 else 2)
            widget.setRange(float(p.minimum or 0.0), float(p.maximum or 1e6))
            widget.setSingleStep(0.05 if (p.maximum or 2) <= 1 else 0.5)
            widget.setValue(p.default)
            widget.valueChanged.connect(self._steps_changed)
        widget.setEnabled(False)
        return widget

    def initializePage(self) -> None:  # noqa: N802 - Qt override
        self.show_config()

    def show_config(self) -> None:
        """Put the config's preset and expert steps on the page (after a recipe was loaded)."""
        config = self.config
        button = self.preset_buttons.get(config.preset)
        if button is not None:
            button.setChecked(True)
        for tech in TECHNIQUES:
            spec = next((s for s in config.steps if s.get("step") == tech.step), None)
            self.step_checks[tech.step].blockSignals(True)
            self.step_checks[tech.step].setChecked(spec is not None)
            self.step_checks[tech.step].blockSignals(False)
            for p in tech.parameters:
                if spec is not None and p.name in spec:
                    self._set_widget(self.param_widgets[(tech.step, p.name)], spec[p.name])
        self.sensitivity.setChecked(config.sensitivity_first)
        self._enable_expert(config.preset == EXPERT)

    @staticmethod
    def _set_widget(widget: QWidget, value) -> None:
        widget.blockSignals(True)
        if isinstance(widget, QComboBox):
            index = widget.findData(value)
            widget.setCurrentIndex(max(0, index))
        else:
            widget.setValue(value)
        widget.blockSignals(False)

    def _preset_changed(self, button, checked: bool) -> None:
        if not checked:
            return
        key = next(k for k, b in self.preset_buttons.items() if b is button)
        self.config_model.set("preset", key)
        self._enable_expert(key == EXPERT)

    def _enable_expert(self, on: bool) -> None:
        self.expert_box.setEnabled(on)
        for (step, _name), widget in self.param_widgets.items():
            widget.setEnabled(on and self.step_checks[step].isChecked())

    def _steps_changed(self, *_args) -> None:
        steps = []
        for tech in TECHNIQUES:
            if self.step_checks[tech.step].isChecked():
                spec = {"step": tech.step}
                for p in tech.parameters:
                    spec[p.name] = self._value(self.param_widgets[(tech.step, p.name)])
                steps.append(spec)
        self.config_model.set("steps", steps)
        self._enable_expert(self.config.preset == EXPERT)

    @staticmethod
    def _value(widget: QWidget):
        if isinstance(widget, QComboBox):
            return widget.currentData()
        return widget.value()


# ---------------------------------------------------------------- 4 Budget and target


BUDGET_HINT = (
    "A Dice drop of 0.02 (2 %) lets a variant's overlap with the ground truth be 2 points below the "
    "original's on the eval scans (without labels: its disagreement with the original). \"No lost "
    "lesions from 6 mm\" refuses any variant that misses a lesion of 6 mm or more (Lung-RADS mean "
    "diameter) that the original found; 0 means any size, empty means not checked. \"Only lost "
    "nodules\" lets the original's own false positives go: with labels, only the ground-truth "
    "nodules the original detects and the variant misses count; without labels every lost lesion "
    "still counts. The time limit stops a search preset after the candidate running when it comes.")


class BudgetPage(ConfigPage):
    page_key = "budget"

    def __init__(self, wizard_model, jobs):
        super().__init__(wizard_model, jobs, "4 · Budget and target", "How much accuracy a variant may lose, "
                         "where it will run, and where the results go.")
        self.dice_drop, self.lesion_mm, self.minutes = QLineEdit(), QLineEdit(), QLineEdit()
        self.dice_drop.setPlaceholderText("e.g. 0.02 or 2 %")
        self.lesion_mm.setPlaceholderText("e.g. 6 (mm); empty = not checked")
        self.nodules_only = QCheckBox("Only lost nodules count (labels tell them from the original's false positives)")
        self.device = QComboBox()
        self.threads = QSpinBox()
        self.threads.setRange(0, 256)
        self.threads.setSpecialValueText("all cores")
        self.output, self.run_name = QLineEdit(), QLineEdit()
        self.run_name.setPlaceholderText("(model, preset and time)")
        self.advice_label = QLabel()   # a warning that does not block Next (search_advice)
        self.advice_label.setObjectName("advice")
        self.advice_label.setWordWrap(True)
        self.advice_label.setStyleSheet(ADVICE_STYLE)
        self._layout()
        self._connect()

    def _layout(self) -> None:
        outer = QVBoxLayout(self)
        form = QFormLayout()
        outer.addLayout(form)
        form.addRow("Max Dice drop vs the original", self.dice_drop)
        form.addRow("No lost lesions from (mm)", self.lesion_mm)
        form.addRow("", self.nodules_only)
        form.addRow("Target device", self.device)
        form.addRow("Threads", self.threads)
        form.addRow("Search time limit (minutes)", self.minutes)
        form.addRow("", self.advice_label)
        form.addRow("Save variants under", _browse_row(self.output, "Browse…", self._browse_output))
        form.addRow("Run name", self.run_name)
        hint = QLabel(BUDGET_HINT)
        hint.setWordWrap(True)
        hint.setStyleSheet("color: #555;")
        outer.addWidget(hint)
        outer.addWidget(self.problem_label)
        outer.addStretch(1)

    def _connect(self) -> None:
        m = self.config_model
        self.dice_drop.textChanged.connect(lambda text: m.set("max_dice_drop", text))
        self.lesion_mm.textChanged.connect(lambda text: m.set("lost_lesion_mm", text))
        self.nodules_only.toggled.connect(lambda on: m.set("lost_nodules_only", bool(on)))
        self.minutes.textChanged.connect(lambda text: m.set("search_minutes", text))
        self.minutes.textChanged.connect(lambda _text: self._show_advice())
        self.device.currentIndexChanged.connect(lambda _i: m.set("device", self.device.currentData() or "cpu"))
        self.threads.valueChanged.connect(lambda n: m.set("threads", int(n) or None))
        self.output.textChanged.connect(lambda text: m.set("output", text.strip()))
        self.run_name.textChanged.connect(lambda text: m.set("name", text.strip()))

    def initializePage(self) -> None:  # noqa: N802 - Qt override
        c = self.config
        self.device.blockSignals(True)
        self.device.clear()
        self.device.addItem("This CPU", "cpu")
        providers = getattr(self.wizard(), "providers", []) or []
        if "CUDAExecutionProvider" in providers:
            self.device.addItem("CUDA GPU", "cuda")
        self.device.setCurrentIndex(max(0, self.device.findData(c.device)))
        self.device.blockSignals(False)
        for edit, text in ((self.dice_drop, c.max_dice_drop), (self.lesion_mm, c.lost_lesion_mm),
                           (self.minutes, c.search_minutes), (self.output, c.output), (self.run_name, c.name)):
            edit.setText(text)
        self.nodules_only.setChecked(c.lost_nodules_only)
        self.threads.setValue(c.threads or 0)
        self._show_advice()

    def _show_advice(self) -> None:
        advice = search_advice(self.config)
        self.advice_label.setText(advice)
        self.advice_label.setVisible(bool(advice))

    def page_problems(self) -> list[str]:
        return problems(self.config, "budget") + problems(self.config, "output")

    def _browse_output(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save variants under", self.output.text())
        if folder:
            self.output.setText(folder)


# ---------------------------------------------------------------- the wizard


class CompressWizard(QWizard):
    """The six pages over one config; ``compare_requested`` carries card paths (original first)."""

    compare_requested = Signal(list)
    variants_kept = Signal(list)

    def __init__(self, jobs: JobManager, open_models=(), config: CompressConfig | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        from widgets.compress_run_pages import ResultsPage, RunPage

        self.jobs = jobs
        self.providers: list[str] = []
        self.setWindowTitle("Compress a model")
        self.setWizardStyle(QWizard.WizardStyle.ClassicStyle)
        self.setOption(QWizard.WizardOption.NoBackButtonOnLastPage, True)
        self.resize(980, 760)
        self.config_model = CompressConfigModel(config or remembered_config())
        self.model_page = ModelPage(self.config_model, jobs, open_models)
        self.data_page = DataPage(self.config_model, jobs)
        self.techniques_page = TechniquesPage(self.config_model, jobs)
        self.budget_page = BudgetPage(self.config_model, jobs)
        self.run_page = RunPage(self.config_model, jobs)
        self.results_page = ResultsPage(self.config_model, jobs)
        for page in (self.model_page, self.data_page, self.techniques_page, self.budget_page,
                     self.run_page, self.results_page):
            self.addPage(page)
        self.run_page.finished_run.connect(self.results_page.show_result)
        self.results_page.compare_requested.connect(self.compare_requested)
        self.results_page.variants_kept.connect(self.variants_kept)
        self._recipe_buttons()

    @property
    def config(self) -> CompressConfig:
        return self.config_model.config

    def _recipe_buttons(self) -> None:
        self.setButtonText(QWizard.WizardButton.CustomButton1, "Load recipe…")
        self.setButtonText(QWizard.WizardButton.CustomButton2, "Save recipe…")
        self.setOption(QWizard.WizardOption.HaveCustomButton1, True)
        self.setOption(QWizard.WizardOption.HaveCustomButton2, True)
        self.customButtonClicked.connect(self._custom_button)

    def _custom_button(self, which: int) -> None:
        if which == QWizard.WizardButton.CustomButton1.value:
            self.choose_recipe_to_load()
        elif which == QWizard.WizardButton.CustomButton2.value:
            self.choose_recipe_to_save()

    def choose_recipe_to_load(self) -> None:
        folder = str(app_settings().value("wizard/recipe_folder", ""))
        path, _ = QFileDialog.getOpenFileName(self, "Load recipe", folder, "Recipe (*.yaml *.yml)")
        if path:
            self.load_recipe(path)

    def choose_recipe_to_save(self) -> None:
        folder = str(app_settings().value("wizard/recipe_folder", ""))
        path, _ = QFileDialog.getSaveFileName(self, "Save recipe", folder, "Recipe (*.yaml)")
        if path:
            self.save_recipe(path)

    def load_recipe(self, path: str) -> None:
        try:
            config = load_recipe(path, self.config)
        except ValueError as exc:
            QMessageBox.warning(self, "Recipe", str(exc))
            return
        app_settings().setValue("wizard/recipe_folder", str(Path(path).parent))
        self.config_model.replace(config)
        current = self.currentPage()
        if current is not None and current not in (self.run_page, self.results_page):
            current.initializePage()

    def save_recipe(self, path: str) -> None:
        save_recipe(self.config, path)
        app_settings().setValue("wizard/recipe_folder", str(Path(path).parent))

    def remember(self) -> None:
        remember_config(self.config)

    def done(self, result: int) -> None:
        """Closing the wizard cancels its run (the job manager waits for it on app exit)."""
        self.run_page.cancel_run()
        self.remember()
        super().done(result)


# ---------------------------------------------------------------- remembered choices

_REMEMBERED = ("data.manifest", "data.folder", "data.seed", "preset", "max_dice_drop", "lost_lesion_mm",
               "lost_nodules_only",
               "device", "search_minutes", "output", "sensitivity_first")


def remembered_config() -> CompressConfig:
    """A fresh config with the last folders and choices (QSettings), defaults otherwise."""
    from app.paths import data_root

    model = CompressConfigModel(CompressConfig(output=str(data_root() / "compressed")))
    settings = app_settings()
    for name in _REMEMBERED:
        value = settings.value(f"wizard/{name}")
        if value is None or value == "":
            continue
        current = model.get(name)
        if isinstance(current, bool):
            value = str(value).lower() in ("true", "1")
        elif isinstance(current, int):
            value = int(value)
        model.set(name, value)
    return model.config


def remember_config(config: CompressConfig) -> None:
    model = CompressConfigModel(config)
    settings = app_settings()
    for name in _REMEMBERED:
        settings.setValue(f"wizard/{name}", model.get(name))
    settings.sync()
