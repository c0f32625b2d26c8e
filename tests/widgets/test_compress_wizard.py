"""The compression wizard on real widgets, real child-process jobs, a tiny real UNet and tiny scans.

Screenshots of every page go to test-output/screenshots/wizard_*.png.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.compress_config import EXPERT, CompressConfig, problems
from app.core.models import open_model, sha256_file

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-output" / "screenshots"
RUN_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tests.core.model_fixtures import small_unet

    return small_unet(tmp_path_factory.mktemp("wizard-model") / "tiny-unet")


def model_hashes(card: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(card.parent.iterdir()) if p.is_file()}


def shoot(wizard, name: str) -> None:
    from PySide6.QtWidgets import QApplication

    QApplication.processEvents()   # let a message set a moment ago be laid out before the grab
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert wizard.grab().save(str(SHOTS / f"wizard_{name}.png"))


@pytest.fixture
def make_wizard(qtbot, job_manager, tiny_model, tmp_path):
    from app.session import OpenModel
    from widgets.compress_wizard import CompressWizard

    def make(**config_changes):
        config = CompressConfig(output=str(tmp_path / "out"), max_dice_drop="0.5", **config_changes)
        wizard = CompressWizard(job_manager, [OpenModel(open_model(tiny_model))], config)
        qtbot.addWidget(wizard)
        wizard.show()
        return wizard
    return make


def pick_model(qtbot, wizard) -> None:
    page = wizard.model_page
    page.chooser.setCurrentIndex(1)
    page.chooser.activated.emit(1)
    qtbot.waitUntil(lambda: page.summary is not None, timeout=120_000)


def choose_manifest(qtbot, wizard, manifest: Path) -> None:
    page = wizard.data_page
    page.manifest_choice.setChecked(True)
    page.manifest_edit.setText(str(manifest))
    page.manifest_edit.editingFinished.emit()
    qtbot.waitUntil(lambda: page.survey is not None and page.survey.manifest is not None, timeout=60_000)


def choose_expert(wizard, steps: dict[str, dict]) -> None:
    page = wizard.techniques_page
    page.preset_buttons[EXPERT].setChecked(True)
    for step, params in steps.items():
        page.step_checks[step].setChecked(True)
        for name, value in params.items():
            page._set_widget(page.param_widgets[(step, name)], value)
    page._steps_changed()


def to_run_page(qtbot, wizard, demo: Path, steps: dict[str, dict]) -> None:
    pick_model(qtbot, wizard)
    wizard.next()
    choose_manifest(qtbot, wizard, demo / "manifest.csv")
    wizard.next()
    choose_expert(wizard, steps)
    wizard.next()
    assert wizard.currentPage() is wizard.budget_page
    wizard.next()
    assert wizard.currentPage() is wizard.run_page


def test_wizard_end_to_end_every_page(qtbot, make_wizard, demo_tiny, tiny_model, tmp_path):
    before = model_hashes(tiny_model)
    wizard = make_wizard()
    pick_model(qtbot, wizard)
    page = wizard.model_page
    assert page.layers.rowCount() > 3 and "Conv" in page.layers.item(0, 1).text() + page.layers.item(1, 1).text()
    assert "parameters" in page.facts.text() and "CPUExecutionProvider" in page.facts.text()
    shoot(wizard, "1_model")
    wizard.next()

    choose_manifest(qtbot, wizard, demo_tiny / "manifest.csv")
    counts = wizard.data_page.counts
    assert sum(int(counts.item(r, 1).text()) for r in range(3)) == 3           # 3 series in all
    assert int(counts.item(2, 1).text()) >= 1                                   # eval has one
    warnings = [wizard.data_page.issues.item(i).text() for i in range(wizard.data_page.issues.count())]
    assert any("too few for a verdict" in w for w in warnings)
    shoot(wizard, "2_data")
    wizard.next()

    page = wizard.techniques_page
    page.preset_buttons["safe-int8"].setChecked(True)
    assert wizard.config.preset == "safe-int8" and not page.expert_box.isEnabled()
    shoot(wizard, "3_techniques_preset")
    choose_expert(wizard, {"prune_unstructured": {"sparsity": 0.3}, "finetune": {"steps": 4}})
    assert wizard.config.preset == EXPERT
    assert [s["step"] for s in wizard.config.steps] == ["prune_unstructured", "finetune"]
    assert wizard.config.steps[0]["sparsity"] == pytest.approx(0.3) and wizard.config.steps[1]["steps"] == 4
    shoot(wizard, "3_techniques_expert")
    from PySide6.QtWidgets import QScrollArea

    scroll = page.findChild(QScrollArea)
    scroll.verticalScrollBar().setValue(scroll.verticalScrollBar().maximum())  # the last techniques
    shoot(wizard, "3_techniques_expert_end")
    scroll.verticalScrollBar().setValue(0)
    wizard.next()

    budget = wizard.budget_page
    budget.dice_drop.setText("50 %")
    budget.lesion_mm.setText("6 mm")
    budget.run_name.setText("e2e")
    assert wizard.config.max_dice_drop == "50 %"
    shoot(wizard, "4_budget")
    wizard.next()

    run = wizard.run_page
    assert run.state == "running"
    qtbot.waitUntil(lambda: run.state != "running", timeout=RUN_TIMEOUT_MS)
    assert run.state == "finished", run.status.text()
    assert len(run.phase_bars) == 4 and all(b.value() == 1000 for b in run.phase_bars)
    assert len(run.losses) == 4   # one loss per fine-tuning step, charted live
    assert run.loss_curve.getData()[1] is not None and len(run.loss_curve.getData()[1]) == 4
    shoot(wizard, "5_run")
    wizard.next()

    results = wizard.results_page
    assert results.table.rowCount() == 2
    assert results.table.item(0, 1).text() == "original" and results.table.item(1, 1).text() == "expert"
    qtbot.waitUntil(lambda: results.plotted_points(results.latency_plot) == 2, timeout=5_000)
    assert results.plotted_points(results.size_plot) == 2
    variant_card = Path(results.result.rows[1].card_path)
    assert variant_card.is_file() and variant_card.parent.parent == tmp_path / "out" / "e2e"
    reopened = open_model(variant_card)
    assert reopened.card.lineage.parent_sha256 == open_model(tiny_model).weights_sha256
    shoot(wizard, "6_results")
    assert model_hashes(tiny_model) == before

    keep_to = tmp_path / "kept"
    results.destination.setText(str(keep_to))
    results.keep_boxes["expert"].setChecked(True)
    with qtbot.waitSignal(wizard.variants_kept, timeout=30_000) as kept:
        results.keep_button.click()
    assert [Path(p) for p in kept.args[0]] == [keep_to / variant_card.parent.name / "card.json"]
    open_model(kept.args[0][0])
    from app.core.audit import read_audit
    assert read_audit()[-1]["event"] == "accept" and read_audit()[-1]["name"] == "expert"
    with qtbot.waitSignal(wizard.compare_requested, timeout=5_000) as compare:
        results.compare_button.click()
    assert compare.args[0] == [str(tiny_model), kept.args[0][0]]


def test_smallest_preset_searches_until_the_time_limit(qtbot, make_wizard, demo_tiny, tmp_path):
    wizard = make_wizard(search_minutes="0.01")
    pick_model(qtbot, wizard)
    wizard.next()
    choose_manifest(qtbot, wizard, demo_tiny / "manifest.csv")
    wizard.next()
    wizard.techniques_page.preset_buttons["smallest"].setChecked(True)
    wizard.techniques_page.sensitivity.setChecked(True)
    wizard.next()
    advice = wizard.budget_page.advice_label   # the limit is too short for the student: said, not refused
    assert advice.isVisible() and advice.text().startswith("With 0.01 minutes the distilled student")
    wizard.budget_page.minutes.setText("60")
    assert not advice.isVisible()
    wizard.budget_page.minutes.setText("0.01")
    wizard.next()
    run = wizard.run_page
    qtbot.waitUntil(lambda: run.state != "running", timeout=RUN_TIMEOUT_MS)
    assert run.state == "finished", run.status.text()
    assert len(run.phase_bars) > 4                                  # one bar per search candidate
    assert [run.phases.itemAtPosition(r, 0).widget().text() for r in (1, 2)] == [
        "Per-layer sensitivity", "int8-percentile: quantize_int8_ort"]
    assert any("keep1-float" in run.phases.itemAtPosition(r, 0).widget().text() for r in range(len(run.phase_bars)))
    assert [b.value() for b in run.phase_bars[:3]] == [1000] * 3   # scans, sensitivity, the first candidate
    assert run.phase_bars[-3].text() == "not tried (time limit)"  # the time limit stopped the rest
    wizard.next()
    results = wizard.results_page
    rows = results.result.rows
    assert [r.name for r in rows][:2] == ["original", "int8-percentile"]
    assert any("not tried" in note for note in results.result.notes)
    assert "not tried" in results.evidence.text()
    qtbot.waitUntil(lambda: results.sensitivity_plot.isVisible(), timeout=5_000)
    assert len(results.result.sensitivity) > 3 and all(0.0 <= d <= 1.0 for _n, d in results.result.sensitivity)
    recommended = [r for r in rows if r.recommended]
    assert all(r.budget_met for r in recommended)
    assert results.table.item(1, 8).text().startswith("within budget" if rows[1].budget_met else "over")
    wizard.back()
    shoot(wizard, "5_run_search")
    open_model(rows[1].card_path)


def test_cancel_mid_run_leaves_no_output_and_a_killed_child_fails_the_job(qtbot, make_wizard, demo_tiny, tiny_model,
                                                                          tmp_path, job_manager):
    from app.jobs import JobState

    before = model_hashes(tiny_model)
    wizard = make_wizard()
    to_run_page(qtbot, wizard, demo_tiny, {"finetune": {"steps": 5000}})
    run = wizard.run_page
    qtbot.waitUntil(lambda: len(run.losses) >= 2, timeout=RUN_TIMEOUT_MS)   # mid fine-tuning
    run.cancel_button.click()
    qtbot.waitUntil(lambda: run.state == "cancelled", timeout=60_000)
    out = tmp_path / "out"
    assert not out.exists() or list(out.rglob("*")) == []
    assert "nothing was saved" in run.status.text()
    assert job_manager.record(run.handle.job_id).state is JobState.CANCELLED

    wizard.back()
    wizard.next()                      # the Run page starts a fresh run
    assert run.state == "running" and run.losses == []
    qtbot.waitUntil(lambda: len(run.losses) >= 1, timeout=RUN_TIMEOUT_MS)
    run.handle.kill()
    qtbot.waitUntil(lambda: run.state == "failed", timeout=60_000)
    assert job_manager.record(run.handle.job_id).state is JobState.FAILED
    assert "killed" in run.status.text() and "Nothing was saved" in run.status.text()
    assert not out.exists() or list(out.rglob("*")) == []
    assert model_hashes(tiny_model) == before


# ---------------------------------------------------------------- invalid input, page by page


def choose_folder(qtbot, wizard, folder: Path) -> None:
    page = wizard.data_page
    page.folder_choice.setChecked(True)
    page.folder_edit.setText(str(folder))
    page.folder_edit.editingFinished.emit()
    qtbot.waitUntil(lambda: not page.recount.isActive(), timeout=5_000)
    if not problems(wizard.config, "data"):   # a folder that passes the first checks is examined (a job)
        qtbot.waitUntil(lambda: page.survey is not None, timeout=60_000)


def scans_with_stray_labels(demo_tiny: Path, data: Path) -> Path:
    for case in ("CASE001", "CASE002", "CASE003"):
        shutil.copytree(demo_tiny / case / "CT", data / case / "CT")
        shutil.copyfile(demo_tiny / case / "nodules.nii.gz", data / case / "nodules.nii.gz")
    (data / "stray").mkdir()
    shutil.copyfile(demo_tiny / "CASE001" / "nodules.nii.gz", data / "stray" / "labels.nii.gz")
    return data


def test_invalid_input_is_refused_on_each_page_with_a_message(qtbot, make_wizard, demo_tiny, tmp_path):
    wizard = make_wizard(preset=EXPERT)
    wizard.next()
    assert wizard.currentPage() is wizard.model_page
    assert "Choose the model" in wizard.model_page.problem_label.text()
    pick_model(qtbot, wizard)
    wizard.next()

    empty = tmp_path / "no-scans"
    empty.mkdir()
    choose_folder(qtbot, wizard, empty)
    wizard.next()
    assert wizard.currentPage() is wizard.data_page
    assert "is empty" in wizard.data_page.problem_label.text()

    data = scans_with_stray_labels(demo_tiny, tmp_path / "scans")
    choose_folder(qtbot, wizard, data)
    assert sum(wizard.data_page.survey.splits[s].series for s in ("train", "calib", "eval")) == 3
    wizard.next()
    assert wizard.currentPage() is wizard.data_page
    assert "stray/labels.nii.gz match no series" in wizard.data_page.problem_label.text()
    shoot(wizard, "2_data_problem")
    shutil.rmtree(data / "stray")
    wizard.data_page.seed.setValue(7)          # any change examines the folder again
    qtbot.waitUntil(lambda: wizard.data_page.survey is not None, timeout=60_000)
    wizard.next()
    assert wizard.currentPage() is wizard.techniques_page

    wizard.next()
    assert wizard.currentPage() is wizard.techniques_page
    assert "at least one technique" in wizard.techniques_page.problem_label.text()
    wizard.techniques_page.preset_buttons["safe-int8"].setChecked(True)
    wizard.next()

    page = wizard.budget_page
    page.dice_drop.setText("two percent")
    page.lesion_mm.setText("large")
    wizard.next()
    assert wizard.currentPage() is page
    assert "max Dice drop: cannot read 'two percent'" in page.problem_label.text()
    assert "cannot read 'large'" in page.problem_label.text()
    shoot(wizard, "4_budget_problem")
    page.dice_drop.setText("2 %")
    page.lesion_mm.setText("0")
    page.nodules_only.setChecked(True)  # nodules are told apart from 6 mm only
    assert wizard.config.lost_nodules_only and not page.validatePage()
    assert "only lost nodules" in page.problem_label.text()
    page.lesion_mm.setText("6")
    assert wizard.config.max_dice_drop == "2 %" and page.validatePage()


# ---------------------------------------------------------------- recipes and remembered settings


def test_recipe_saved_from_the_wizard_loads_back_and_is_the_clis_format(qtbot, make_wizard, tmp_path):
    from compression.recipe import load_recipe as cli_load_recipe

    wizard = make_wizard()
    choose_expert(wizard, {"prune_unstructured": {"sparsity": 0.4}, "finetune": {"steps": 7}})
    wizard.config_model.set("max_dice_drop", "1.5 %")
    path = tmp_path / "mine.yaml"
    wizard.save_recipe(str(path))
    recipe = cli_load_recipe(path)            # what `main.py compress --recipe` reads
    assert [s["step"] for s in recipe.steps] == ["prune_unstructured", "finetune"]
    assert recipe.budget.max_dice_drop == pytest.approx(0.015) and recipe.budget.max_lost_lesions_large == 0
    other = make_wizard()
    other.load_recipe(str(path))
    assert other.config.preset == EXPERT and other.config.steps == wizard.config.steps
    assert other.techniques_page.step_checks["finetune"].isChecked() or other.currentPage() is not other.techniques_page
    other.load_recipe(str(REPO / "resources" / "recipes" / "safe-int8.yaml"))
    assert other.config.preset == "safe-int8"


def test_the_wizard_remembers_folders_and_choices(qtbot, make_wizard, demo_tiny):
    from widgets.compress_wizard import remembered_config

    wizard = make_wizard()
    wizard.config_model.set("data.manifest", str(demo_tiny / "manifest.csv"))
    wizard.config_model.set("preset", "fastest")
    wizard.config_model.set("max_dice_drop", "3 %")
    wizard.reject()
    again = remembered_config()
    assert again.data.manifest == str(demo_tiny / "manifest.csv")
    assert again.preset == "fastest" and again.max_dice_drop == "3 %"


WIZARD_SMOKE = """
import sys
from PySide6.QtWidgets import QApplication
app = QApplication([])
from app.compress_config import CompressConfig, DataChoice, run_plan, save_recipe, load_recipe
from app.jobs import JobManager
from widgets.compress_wizard import CompressWizard
jobs = JobManager()
config = CompressConfig(model=sys.argv[1], data=DataChoice(manifest=sys.argv[2]), output=sys.argv[3])
wizard = CompressWizard(jobs, [], config)
wizard.show()
from PySide6.QtCore import QElapsedTimer
timer = QElapsedTimer(); timer.start()
while wizard.model_page.summary is None and timer.elapsed() < 120000:
    app.processEvents()
wizard.next()
while wizard.data_page.survey is None and timer.elapsed() < 120000:
    app.processEvents()
for key in ("safe-int8", "smallest", "fastest"):
    wizard.techniques_page.preset_buttons[key].setChecked(True)
    run_plan(wizard.config)
save_recipe(wizard.config, sys.argv[3] + "/r.yaml")
load_recipe(sys.argv[3] + "/r.yaml")
print("LAYERS", wizard.model_page.layers.rowCount())
wizard.close()
jobs.shutdown()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime", "monai"))
print("HEAVY", ",".join(heavy))
"""


def test_the_wizard_never_imports_torch_in_the_gui_process(tiny_model, demo_tiny, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", MEDCOMPRESS_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", WIZARD_SMOKE, str(tiny_model), str(demo_tiny / "manifest.csv"),
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in done.stdout.splitlines())
    assert int(lines["LAYERS"]) > 3, done.stdout   # the layer table came from a child process
    assert lines.get("HEAVY", "") == "", f"the GUI process imported: {lines['HEAVY']}"


def test_results_page_charts_per_layer_sensitivity(qtbot, job_manager, tmp_path):
    from app.compress_job import CompressResult, VariantRow
    from widgets.compress_run_pages import ResultsPage
    from app.compress_config import CompressConfigModel

    rows = [VariantRow("original", "a/card.json", True, "—", 2_000_000, 10.0, 1.0, 0.8, 0.7, 0.9, "", 1.0, 0, True),
            VariantRow("int8", "b/card.json", False, "quantize_int8_ort", 600_000, 7.0, 1.4, 0.79, 0.7, 0.88, "",
                       0.97, 1, False, ["1 lost lesion(s) ≥ 6 mm (allowed 0)"], nodules_missed=0)]
    page = ResultsPage(CompressConfigModel(), job_manager)
    qtbot.addWidget(page)
    page.show()
    page.show_result(CompressResult(str(tmp_path), rows, "sufficient", "x",
                                    [("model.0.conv", 0.12), ("model.2.conv", 0.03)]))
    qtbot.waitUntil(lambda: page.sensitivity_plot.isVisible(), timeout=5_000)
    bars = [i for i in page.sensitivity_plot.getPlotItem().items if type(i).__name__ == "BarGraphItem"]
    assert len(bars) == 1 and list(bars[0].opts["height"]) == [0.12, 0.03]
    assert page.table.item(1, 5).text() == "0.790 [0.700, 0.880]"
    assert page.table.item(1, 8).text().startswith("over: 1 lost lesion")
    assert page.table.item(1, 7).text() == "1 · 0 nodules missed"  # the lost one was the original's false positive
    assert page.table.item(0, 7).text() == "0"
    assert not page.keep_boxes["int8"].isChecked()          # over budget: not kept unless the user says so
    assert page.size_plot.getAxis("bottom").labelText == "deployed size (MB)"


def test_tools_menu_opens_the_wizard_over_the_open_models(qtbot, tiny_model):
    from widgets.application import create_main_window

    window = create_main_window()
    qtbot.addWidget(window)
    window.session.open_model(str(tiny_model))
    qtbot.waitUntil(lambda: len(window.session.models) == 1, timeout=30_000)
    window.action_compress.trigger()
    wizard = window.workspace.compress_wizard
    assert wizard.isVisible() and wizard.model_page.chooser.count() == 2
    assert wizard.model_page.chooser.itemData(1) == str(tiny_model)
    wizard.reject()
    window.action_compress.trigger()                # again: the same wizard, from its first page
    assert window.workspace.compress_wizard is wizard and wizard.currentPage() is wizard.model_page
    wizard.reject()
    window.close()
