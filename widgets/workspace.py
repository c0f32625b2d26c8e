"""Puts the session's state on screen: series browser, viewer, Models dock, in one window."""
from __future__ import annotations

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QDockWidget, QFileDialog, QMessageBox

from app.session import Session
from widgets.main_window import MainWindow
from widgets.model_panel import ModelPanel
from widgets.viewer.series_browser import SeriesBrowser
from widgets.viewer.viewer_panel import ViewerPanel


class Workspace:
    """Connects one Session to one MainWindow. Holds no logic of its own: intents go to the
    session, the session's signals go to the widgets."""

    def __init__(self, window: MainWindow, session: Session):
        self.window, self.session = window, session
        self.viewer = ViewerPanel()
        self.browser = SeriesBrowser(window.jobs)
        self.models = ModelPanel(window)
        self.browser_dock = QDockWidget("Series", window)
        self.browser_dock.setObjectName("SeriesDock")
        self.browser_dock.setWidget(self.browser)
        window.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.browser_dock)
        # Series and Models share the left column as tabs: the scan keeps the width it needs.
        window.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, self.models)
        window.tabifyDockWidget(self.browser_dock, self.models)
        self.browser_dock.raise_()
        QTimer.singleShot(0, self._initial_dock_sizes)
        window.view_menu.addActions([self.browser_dock.toggleViewAction(), self.models.toggleViewAction()])
        window.help_menu.insertAction(window.help_menu.actions()[0], window._action(
            "&Shortcuts", self.show_shortcuts, "F1"))
        file_menu = window.menuBar().actions()[0].menu()
        file_menu.insertAction(window.action_open_model,
                               window._action("Open &labels (NIfTI/NRRD) for this series…", self.choose_labels))
        self._connect()

    def _initial_dock_sizes(self) -> None:
        self.window.resizeDocks([self.browser_dock], [320], Qt.Orientation.Horizontal)
        self.window.resizeDocks([self.window.job_panel], [110], Qt.Orientation.Vertical)

    def _connect(self) -> None:
        w, s = self.window, self.session
        w.open_path_requested.connect(s.open_path)
        w.open_model_requested.connect(s.open_model)
        self.models.open_requested.connect(w.choose_model)
        self.models.run_requested.connect(s.run_model)
        self.browser.series_activated.connect(s.open_series)
        s.index_changed.connect(self.browser.set_index)
        s.volume_opened.connect(self._show_volume)
        s.slices_loaded.connect(self.viewer.refresh_slices)
        s.overlay_ready.connect(self._add_overlay)
        s.lesions_ready.connect(lambda source, lesions, is_ai: self.viewer.set_lesions(lesions, source, is_ai))
        s.scores_ready.connect(lambda source, scores: self.viewer.set_scores(scores, source, True))
        s.model_opened.connect(self.models.add_model)
        s.model_opened.connect(lambda _model: self.models.raise_())
        s.findings_ready.connect(self.models.show_findings)
        s.status.connect(lambda text: w.statusBar().showMessage(text, 10_000))
        w.compare_requested.connect(self.show_compare)
        w.compress_requested.connect(self.show_compress_wizard)

    def _show_volume(self, volume, first_slice: int) -> None:
        self.viewer.set_volume(volume, first_slice)
        self.window.show_central(self.viewer)
        for warning in volume.warnings:
            self.window.statusBar().showMessage(f"Warning: {warning}", 15_000)
        title = volume.description.get("series") or volume.series_uid
        self.window.setWindowTitle(f"MedCompress — {title}")

    def _add_overlay(self, name: str, labels, is_ai: bool) -> None:
        colours, names = self._label_style(name)
        source = name if is_ai else "ground truth"
        self.viewer.add_label_overlay(name, labels, colours, is_ai=is_ai, source=source,
                                      label_names=names)

    def _label_style(self, name: str):
        for model in self.session.models:
            if model.name == name:
                labels = model.variant.card.labels
                return ({l.value: l.colour for l in labels if l.value},
                        {l.value: l.name for l in labels if l.value})
        return {1: "#2ecc71"}, {1: "nodule"}

    def show_compress_wizard(self) -> None:
        """Tools → Compress model…: one wizard at a time, over the models the session has open."""
        from widgets.compress_wizard import CompressWizard

        wizard = getattr(self, "compress_wizard", None)
        if wizard is None:
            wizard = CompressWizard(self.window.jobs, self.session.models, parent=self.window)
            wizard.variants_kept.connect(lambda paths: [self.session.open_model(p) for p in paths])
            wizard.compare_requested.connect(self.show_compare)   # card paths, the original first
            self.compress_wizard = wizard
        elif not wizard.isVisible():
            wizard.model_page.set_open_models(self.session.models)
            wizard.restart()
        wizard.show()
        wizard.raise_()

    def show_compare(self, model_paths: list[str] | None = None) -> None:
        """Tools → Compare models…: the compare view over the session's models and open series."""
        from widgets.compare_view import open_compare_view

        open_compare_view(self.window, self.session, model_paths)

    def choose_labels(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.window, "Open label map", "",
                                              "Label maps (*.nii *.nii.gz *.nrrd *.mha);;All files (*)")
        if path:
            self.session.add_label_file(path)

    def show_shortcuts(self) -> None:
        QMessageBox.information(self.window, "Keyboard and mouse", self.viewer.shortcuts_html())
