"""Recipes: YAML + published schema, clear refusals naming the field, presets, save/load round trip."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from compression import recipe as rc
from compression.evaluate import Budget

GOOD = """\
schema_version: "1.0"
name: my-int8
steps:
  - step: quantize_int8_ort
    mode: static
budget:
  max_dice_drop: 0.02
  max_lost_lesions_large: 0
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_recipe_reads_into_steps_and_a_budget(tmp_path):
    recipe = rc.load_recipe(_write(tmp_path, GOOD))
    assert recipe.name == "my-int8"
    assert recipe.steps == [{"step": "quantize_int8_ort", "mode": "static"}]
    assert recipe.budget == Budget(max_dice_drop=0.02, max_lost_lesions_large=0)
    assert recipe.source == tmp_path / "r.yaml"


def test_a_limit_left_out_is_not_checked(tmp_path):
    recipe = rc.load_recipe(_write(tmp_path, GOOD.replace("  max_lost_lesions_large: 0\n", "")))
    assert recipe.budget.max_lost_lesions_large is None and recipe.budget.max_dice_drop == 0.02


def test_a_nodule_budget_reads_and_saves_back(tmp_path):
    text = GOOD.replace("  max_lost_lesions_large: 0\n", "  max_lost_lesions_large: null\n  max_lost_nodules_large: 0\n")
    recipe = rc.load_recipe(_write(tmp_path, text))
    assert recipe.budget == Budget(max_dice_drop=0.02, max_lost_lesions_large=None, max_lost_nodules_large=0)
    rc.save_recipe(recipe, tmp_path / "saved.yaml")
    assert rc.load_recipe(tmp_path / "saved.yaml").budget == recipe.budget


@pytest.mark.parametrize("bad, field, words", [
    ("  max_dice_drop: lots\n", "budget.max_dice_drop", "not of type"),
    ("  max_dice_drop: -0.1\n", "budget.max_dice_drop", "less than the minimum"),
    ("  max_lost_lesions_large: 0.5\n", "budget.max_lost_lesions_large", "not of type"),
    ("  max_dice_loss: 0.01\n", "budget", "a budget may set: max_dice_drop"),
])
def test_a_budget_that_cannot_parse_is_refused_naming_the_field(tmp_path, bad, field, words):
    text = GOOD[: GOOD.index("budget:")] + "budget:\n" + bad
    with pytest.raises(rc.RecipeError) as caught:
        rc.load_recipe(_write(tmp_path, text))
    message = str(caught.value)
    assert f"recipe field {field}:" in message and words in message and "r.yaml" in message


def test_unknown_step_names_and_broken_files_are_refused_in_words(tmp_path):
    with pytest.raises(rc.RecipeError, match=r"recipe field steps\.0\.step: 'quantise' is not one of"):
        rc.load_recipe(_write(tmp_path, GOOD.replace("quantize_int8_ort", "quantise")))
    with pytest.raises(rc.RecipeError, match="not valid YAML"):
        rc.load_recipe(_write(tmp_path, "steps: [unclosed\n"))
    with pytest.raises(rc.RecipeError, match="cannot read the recipe"):
        rc.load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(rc.RecipeError, match=r"recipe field \(top level\): 'steps' is a required property"):
        rc.load_recipe(_write(tmp_path, 'schema_version: "1.0"\nname: x\n'))


def test_save_then_load_gives_the_same_recipe_and_writes_atomically(tmp_path):
    recipe = rc.Recipe(name="pruned", description="one step", budget=Budget(max_dice_drop=0.005),
                       steps=[{"step": "prune_unstructured", "sparsity": 0.7}])
    rc.save_recipe(recipe, tmp_path / "out" / "pruned.yaml")
    again = rc.load_recipe(tmp_path / "out" / "pruned.yaml")
    assert again.as_dict() == recipe.as_dict()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pruned.yaml"]  # no temporary left
    with pytest.raises(rc.RecipeError):
        rc.save_recipe(rc.Recipe(name="bad name!", steps=[{"step": "finetune"}]), tmp_path / "bad.yaml")
    assert not (tmp_path / "bad.yaml").exists()


def test_the_schema_is_published_as_json_schema_2020_12():
    schema = json.loads(rc.SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["$schema"].endswith("2020-12/schema")
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(schema)
    budget_fields = set(schema["properties"]["budget"]["properties"])
    assert budget_fields == set(Budget.__dataclass_fields__)  # the schema and the code agree


@pytest.mark.parametrize("name", rc.PRESETS)
def test_presets_load_and_keep_the_default_budget(name):
    recipe = rc.load_preset(name)
    assert recipe.name == name
    assert recipe.budget.max_dice_drop == 0.01 and recipe.budget.max_lost_lesions_large == 0
    steps = [s["step"] for s in recipe.steps]
    assert "quantize_int8_ort" in steps  # every preset stores the network in int8...
    # ...last: after it only steps that work on the ONNX file (output calibration, the filter)
    assert set(steps[steps.index("quantize_int8_ort"):]) <= {"quantize_int8_ort", "calibrate_output", "compress_filter"}
    assert rc.resolve_recipe(name).as_dict() == recipe.as_dict()


@pytest.mark.parametrize("name", rc.PRESETS)
def test_preset_steps_take_the_parameters_they_are_given(name):
    recipe = rc.load_preset(name)
    for spec in recipe.steps:
        module = f"compression.steps.{_module_of(spec['step'])}"
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not in this checkout yet")
    rc.check_steps(recipe)


def _module_of(step: str) -> str:
    from compression.pipeline import STEP_REGISTRY

    return STEP_REGISTRY[step].target[0].rsplit(".", 1)[-1]


def test_check_steps_names_the_step_and_the_unknown_parameter():
    recipe = rc.Recipe(name="x", steps=[{"step": "finetune", "steps": 3}, {"step": "finetune", "epochz": 2}])
    with pytest.raises(rc.RecipeError, match=r"step 2: .*unknown parameter 'epochz'"):
        rc.check_steps(recipe)


def test_a_recipe_dict_from_yaml_round_trips_through_the_lineage_form():
    recipe = rc.recipe_from_dict(yaml.safe_load(GOOD))
    assert rc.recipe_from_dict(recipe.as_dict()).as_dict() == recipe.as_dict()
