"""Recipes: ordered compression steps with their parameters, plus the accuracy budget the result must keep.

A recipe is a YAML file checked against the published schema ``resources/recipe.schema.json``;
the CLI and the compression wizard read and write the same files. For example::

    schema_version: "1.0"
    name: safe-int8
    steps:
      - step: quantize_int8_ort
        mode: static
        per_channel: true
    budget:
      max_dice_drop: 0.01          # vs the original, on the eval split
      max_lost_lesions_large: 0    # no lesion >= 6 mm the original found may be lost
      # max_lost_nodules_large: 0  # or only no ground-truth nodule the original detects: its
      #                            # own false positives may go (labels needed to tell them apart)

Presets ship in ``resources/recipes/`` (``safe-int8``, ``smallest``, ``fastest``).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from app.core.atomic import write_text_atomic
from compression.evaluate import Budget

SCHEMA_VERSION = "1.0"
RESOURCES = Path(__file__).resolve().parents[1] / "resources"
SCHEMA_PATH = RESOURCES / "recipe.schema.json"
PRESETS_DIR = RESOURCES / "recipes"
PRESETS = ("safe-int8", "smallest", "fastest")


class RecipeError(ValueError):
    """A recipe cannot be used; the message names the file and the field."""


@dataclass
class Recipe:
    name: str
    steps: list[dict[str, Any]]
    budget: Budget = field(default_factory=Budget)
    description: str = ""
    source: Path | None = None  # the file it was read from, if any
    schema_version: str = SCHEMA_VERSION

    def as_dict(self) -> dict[str, Any]:
        """The YAML/JSON form (what lineage records and files hold); budget limits left unset are left out."""
        data: dict[str, Any] = {"schema_version": self.schema_version, "name": self.name}
        if self.description:
            data["description"] = self.description
        data["steps"] = [dict(s) for s in self.steps]
        data["budget"] = {k: v for k, v in asdict(self.budget).items() if v is not None}
        return data


# ---------------------------------------------------------------- checking


def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_recipe_dict(data: Any, source: str = "<recipe>") -> None:
    """Check ``data`` against the published schema; RecipeError names the first field at fault."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "(top level)"
        raise RecipeError(f"{source}: recipe field {where}: {_plain_message(first)}")


def _plain_message(error) -> str:
    if error.validator == "additionalProperties" and error.path and error.path[-1] == "budget":
        return f"{error.message} (a budget may set: {', '.join(f.name for f in fields(Budget))})"
    if error.validator == "additionalProperties" and not error.path:
        return f"{error.message} (a recipe has: schema_version, name, description, steps, budget)"
    return error.message


def check_steps(recipe: Recipe) -> None:
    """Each step exists and takes the parameters given (asked of the steps themselves, before anything runs)."""
    from compression.pipeline import StepError, check_step

    source = str(recipe.source or recipe.name)
    for number, spec in enumerate(recipe.steps, 1):
        try:
            check_step(spec)
        except StepError as exc:
            raise RecipeError(f"{source}: step {number}: {exc}") from exc
        except ImportError as exc:
            raise RecipeError(f"{source}: step {number} ({spec.get('step')}) is not available here: {exc}") from exc


# ---------------------------------------------------------------- reading and writing


def recipe_from_dict(data: Any, source: str = "<recipe>") -> Recipe:
    validate_recipe_dict(data, source)
    budget = Budget(**{f.name: data.get("budget", {}).get(f.name) for f in fields(Budget)})
    return Recipe(name=data["name"], steps=[dict(s) for s in data["steps"]], budget=budget,
                  description=data.get("description", ""), schema_version=data["schema_version"])


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file (YAML; JSON is YAML too)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({_first_line(exc)})") from exc
    recipe = recipe_from_dict(data, str(path))
    recipe.source = path
    return recipe


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Check, then write the YAML atomically."""
    import yaml

    data = recipe.as_dict()
    validate_recipe_dict(data, str(path))
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def preset_path(name: str) -> Path:
    return PRESETS_DIR / f"{name}.yaml"


def load_preset(name: str) -> Recipe:
    if not preset_path(name).is_file():
        raise RecipeError(f"no preset recipe {name!r} (presets: {', '.join(list_presets())})")
    return load_recipe(preset_path(name))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A recipe file, or the name of a preset (``safe-int8``) when no such file exists."""
    path = Path(name_or_path)
    if path.is_file():
        return load_recipe(path)
    if str(name_or_path) in list_presets():
        return load_preset(str(name_or_path))
    raise RecipeError(f"{name_or_path}: no such recipe file, and no preset of that name "
                      f"(presets: {', '.join(list_presets())})")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
