"""The wizard's config, its recipe YAML, the data survey and keeping variants — without widgets."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.compress_config import (EXPERT, TECHNIQUES, CompressConfig, DataChoice, from_recipe, load_recipe,
                                 parse_fraction, parse_mm, problems, run_plan, save_recipe, search_advice,
                                 to_recipe)
from app.compress_data import survey_data
from app.core.progress import run_to_end


@pytest.mark.parametrize("text, value", [("0.02", 0.02), ("2 %", 0.02), ("2%", 0.02), (" .5 ", 0.5), ("1e-2", 0.01)])
def test_a_dice_drop_reads_as_a_fraction_or_a_percentage(text, value):
    assert parse_fraction(text, "max Dice drop") == pytest.approx(value)


@pytest.mark.parametrize("text", ["two percent", "", "0.02.1", "150 %", "-1"])
def test_a_dice_drop_that_cannot_parse_is_refused_by_name(text):
    with pytest.raises(ValueError, match="max Dice drop"):
        parse_fraction(text, "max Dice drop")


def test_lesion_size_reads_mm_and_empty_means_not_checked():
    assert parse_mm("6 mm", "size") == 6.0 and parse_mm("", "size") is None
    with pytest.raises(ValueError, match="cannot read 'big'"):
        parse_mm("big", "size")


def test_every_page_has_its_own_messages(tmp_path):
    config = CompressConfig(max_dice_drop="lots", search_minutes="0")
    assert problems(config, "model") == ["Choose the model to compress."]
    assert problems(config, "data") == ["Choose a manifest (CSV) or a folder of scans."]
    budget = problems(config, "budget")
    assert any("cannot read 'lots'" in p for p in budget) and any("search time limit" in p for p in budget)
    empty = tmp_path / "empty"
    empty.mkdir()
    config.data = DataChoice(folder=str(empty))
    assert problems(config, "data") == [f"The data folder {empty} is empty: it holds no scans."]
    config.preset = EXPERT
    assert problems(config, "techniques") == ["Add at least one technique to the expert recipe."]
    with pytest.raises(ValueError, match="Choose the model"):
        run_plan(config)


def test_a_search_too_short_for_its_student_is_warned_of_not_refused():
    short = CompressConfig(preset="smallest", search_minutes="10")
    assert "will not be tried: it starts only with 20 minutes or more left" in search_advice(short)
    assert problems(short, "budget") == []
    assert search_advice(CompressConfig(preset="fastest", search_minutes="19")) != ""
    assert search_advice(CompressConfig(preset="smallest", search_minutes="20")) == ""
    assert search_advice(CompressConfig(preset="safe-int8", search_minutes="10")) == ""   # no search
    assert search_advice(CompressConfig(preset="smallest")) == ""   # the default limit lets it start


def test_technique_parameters_are_the_steps_own():
    """The expert page's parameters must be ones the pipeline's steps accept."""
    from compression.pipeline import step_parameters

    checked = 0
    for technique in TECHNIQUES:
        try:
            known = step_parameters(technique.step)
        except ImportError:
            continue   # a step not built yet: the recipe check refuses it before anything runs
        assert {p.name for p in technique.parameters} <= set(known), technique.step
        checked += 1
    assert checked >= 5


def test_recipe_round_trip_keeps_steps_and_budget(tmp_path):
    config = CompressConfig(preset=EXPERT, steps=[{"step": "finetune", "steps": 3, "lr": 0.001}],
                            max_dice_drop="2 %", lost_lesion_mm="")
    path = tmp_path / "r.yaml"
    save_recipe(config, path)
    back = load_recipe(path)
    assert back.preset == EXPERT and back.steps == config.steps
    assert back.max_dice_drop == "0.02" and back.lost_lesion_mm == ""
    assert from_recipe(to_recipe(CompressConfig(preset="safe-int8"))).preset == "safe-int8"


def test_a_recipe_the_schema_refuses_is_one_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("schema_version: '1.0'\nname: x\nsteps: [{step: melt}]\n")
    with pytest.raises(ValueError, match="steps"):
        load_recipe(path)


def test_survey_counts_a_folder_split_by_patient_and_warns_on_a_small_eval_split(demo_tiny):
    survey = run_to_end(survey_data(folder=str(demo_tiny), proportions={"train": 0.34, "calib": 0.33, "eval": 0.33},
                                    seed=0))
    assert survey.problems == []
    assert sum(s.series for s in survey.splits.values()) == 3
    assert sum(s.patients for s in survey.splits.values()) == 3
    assert all(s.slices == 32 * s.series for s in survey.splits.values())
    assert sum(s.lesions for s in survey.splits.values()) > 0
    assert any("too few for a verdict" in w for w in survey.warnings)


def test_labels_of_another_shape_match_no_series(demo_tiny, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    data = tmp_path / "data"
    shutil.copytree(demo_tiny, data)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 20, 20), np.uint8)), str(data / "CASE002" / "nodules.nii.gz"))
    survey = run_to_end(survey_data(manifest_path=str(data / "manifest.csv")))
    assert len(survey.problems) == 1 and "case CASE002: labels nodules.nii.gz (5, 20, 20) match no series" in survey.problems[0]


def test_keeping_variants_moves_the_chosen_deletes_the_rest_and_audits(tmp_path):
    from app.compress_job import VariantRow, keep_variants
    from app.core.audit import read_audit

    run = tmp_path / "run"
    rows = [VariantRow("original", "/models/a/card.json", True, "—", 1, None, None, None, None, None, "", 1.0, 0, True)]
    for name in ("a", "b"):
        (run / name).mkdir(parents=True)
        (run / name / "card.json").write_text("{}")
        rows.append(VariantRow(name, str(run / name / "card.json"), False, "finetune", 1, None, None, None, None,
                               None, "", 1.0, 0, True, weights_sha256=name * 8))
    kept = keep_variants(str(run), ["b"], str(tmp_path / "kept"), rows)
    assert kept == [str(tmp_path / "kept" / "b" / "card.json")] and Path(kept[0]).is_file()
    assert not run.exists()
    event = read_audit()[-1]
    assert event["event"] == "accept" and event["name"] == "b" and event["weights_sha256"] == "b" * 8


def test_phase_progress_maps_onto_the_whole_run_and_passes_loss_on():
    from app.compress_job import PhaseClock, in_phase
    from app.core.progress import Progress

    def training():
        yield Progress(0.5, "step 1", {"loss": 0.7, "step": 1})
        return "trained"

    clock = PhaseClock(["load", "train", "judge"], [1.0, 2.0, 1.0])
    ticks = []
    gen = in_phase(clock, 1, training())
    while True:
        try:
            ticks.append(next(gen))
        except StopIteration as done:
            assert done.value == "trained"
            break
    assert ticks[0].fraction == pytest.approx(0.25 + 0.5 * 0.5)
    assert ticks[0].data["phase"] == 1 and ticks[0].data["loss"] == 0.7 and ticks[0].data["iteration"] == 1
    assert ticks[-1].fraction == pytest.approx(0.75) and ticks[0].message == "train: step 1"


def test_a_lesion_size_the_evaluation_cannot_count_is_refused():
    assert problems(CompressConfig(lost_lesion_mm="6 mm"), "budget") == []
    assert problems(CompressConfig(lost_lesion_mm="0"), "budget") == []
    found = problems(CompressConfig(lost_lesion_mm="4"), "budget")
    assert len(found) == 1 and "any size (write 0) or from 6 mm" in found[0]


def test_only_lost_nodules_round_trips_and_needs_the_6_mm_limit(tmp_path):
    config = CompressConfig(preset="safe-int8", lost_lesion_mm="6", lost_nodules_only=True)
    assert problems(config, "budget") == []
    recipe = to_recipe(config)
    assert recipe["budget"] == {"max_dice_drop": 0.02, "max_lost_nodules_large": 0}
    save_recipe(config, tmp_path / "r.yaml")
    back = load_recipe(tmp_path / "r.yaml")
    assert (back.lost_lesion_mm, back.lost_nodules_only) == ("6", True)
    assert from_recipe(to_recipe(CompressConfig()), back).lost_nodules_only is False  # a plain recipe clears it
    for size in ("0", ""):
        found = problems(CompressConfig(lost_lesion_mm=size, lost_nodules_only=True), "budget")
        assert len(found) == 1 and "only lost nodules" in found[0]
