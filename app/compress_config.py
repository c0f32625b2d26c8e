"""What the compression wizard edits: one plain config, its recipe YAML, and its checks per page.

The wizard's pages write into a :class:`CompressConfig` (through :class:`CompressConfigModel`,
which announces every change), never read each other's widgets. The same config becomes the
recipe YAML the CLI takes (``python main.py compress --recipe``), and comes back from one.
Budgets are kept as the text the user typed, so a value that cannot be read is refused with a
message instead of being silently replaced.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.core.manifest import DEFAULT_PROPORTIONS, SPLITS
from compression.evaluate import LARGE_LESION_MM   # "large" lesions: Lung-RADS mean diameter

PAGES = ("model", "data", "techniques", "budget", "output")
EXPERT = "expert"


@dataclass(frozen=True)
class Preset:
    key: str                     # the preset recipe resources/recipes/<key>.yaml (compression.recipe)
    title: str
    summary: str
    search_for: str = ""         # "size" | "latency": try candidates (compression.search) within the time limit


PRESETS = (
    Preset("safe-int8", "Safe int8",
           "Stores weights and activations as 8-bit integers, calibrated on your scans: about 4× "
           "smaller, no retraining; risks a small loss of contrast detail."),
    Preset("smallest", "Smallest within budget",
           "Tries int8, a small student distilled from your model and stored in 4 bits, channel pruning "
           "with fine-tuning and sparsity, cheapest first, until the time limit; recommends the smallest "
           "variant within your budget. The student trains in half of the time left when it starts, if that "
           "is 10 minutes or more: the demo's 26× smaller student took about 35 minutes on 2 cores, and a "
           "shorter run learns less. "
           "Students and pruning risk faint nodules.",
           "size"),
    Preset("fastest", "Fastest on this machine",
           "Tries int8, a distilled student and channel pruning with fine-tuning, timed on this machine, "
           "until the time limit; recommends the fastest variant within your budget. The student trains "
           "in half of the time left when it starts, if that is 10 minutes or more.",
           "latency"),
)


def preset(key: str) -> Preset:
    for p in PRESETS:
        if p.key == key:
            return p
    raise KeyError(key)


@dataclass(frozen=True)
class Parameter:
    name: str
    label: str
    default: Any
    choices: tuple = ()          # a combo box when given
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Technique:
    step: str                    # the name in compression.pipeline.STEP_REGISTRY
    title: str
    explanation: str             # one plain sentence: what it removes, what it risks
    parameters: tuple[Parameter, ...] = ()


# In the order a recipe runs them: weights are removed and re-learnt in float, then stored smaller.
TECHNIQUES = (
    Technique("prune_unstructured", "Weight pruning",
              "Sets the smallest weights to zero; the file shrinks only when stored sparse, and too much "
              "pruning blurs small structures.",
              (Parameter("sparsity", "fraction of weights zeroed", 0.5, minimum=0.0, maximum=0.95),
               Parameter("finetune_steps", "fine-tuning steps after", 0, minimum=0, maximum=100000))),
    Technique("prune_channels", "Channel pruning",
              "Removes whole filters, so the network gets smaller and faster; it risks missing faint "
              "or small nodules unless fine-tuned afterwards.",
              (Parameter("ratio", "fraction of channels", 0.25, minimum=0.0, maximum=0.9),
               Parameter("finetune_steps", "fine-tuning steps after", 50, minimum=0, maximum=100000))),
    Technique("sparsity_train", "Sparsity training (network slimming)",
              "Trains with a penalty that drives whole channels to zero, then removes them: smaller and "
              "faster, at the cost of training time and possibly faint detail.",
              (Parameter("steps", "steps", 100, minimum=1, maximum=100000),
               Parameter("max_ratio", "at most this share of a layer", 0.75, minimum=0.0, maximum=0.95))),
    Technique("finetune", "Fine-tuning",
              "Trains the compressed model a little on your labelled scans to win back accuracy; "
              "it may over-fit a small training split.",
              (Parameter("steps", "steps", 50, minimum=1, maximum=100000),
               Parameter("lr", "learning rate", 5e-4, minimum=0.0, maximum=1.0))),
    Technique("distill", "Distillation",
              "Trains a narrower network to copy the original's outputs, labels optional: fewer channels "
              "everywhere, and it inherits the original's mistakes.",
              (Parameter("width", "student width", 0.5, minimum=0.1, maximum=1.0),
               Parameter("steps", "steps", 300, minimum=1, maximum=100000),
               Parameter("temperature", "temperature", 1.0, minimum=0.1, maximum=20.0),
               Parameter("weight_bits", "weight bits (0: float)", 0, choices=(0, 4, 8)),
               Parameter("slice_context", "neighbouring slices read on each side (2D)", 0, choices=(0, 1, 2, 3)))),
    Technique("cluster_weights", "Weight clustering",
              "Lets weights share a few values so the archive compresses well; speed is unchanged and "
              "too few clusters coarsen the output.",
              (Parameter("clusters", "clusters", 16, minimum=2, maximum=256),)),
    Technique("half_precision", "Half precision",
              "Stores weights in 16 bits (half the size); on a CPU it runs no faster, and very small "
              "activations may underflow.",
              (Parameter("precision", "type", "fp16", choices=("fp16", "bf16")),)),
    Technique("qat_finetune", "Quantization-aware fine-tuning",
              "Fine-tunes with int8 rounding simulated so the int8 step after it loses less; it needs "
              "labelled or teacher data and must be followed by int8 quantization.",
              (Parameter("steps", "steps", 50, minimum=1, maximum=100000),)),
    Technique("quantize_int8_ort", "int8 quantization (ONNX Runtime)",
              "Stores weights and activations as 8-bit integers calibrated on your scans; about 4× "
              "smaller, and rare intensities may be rounded away. Mode 'weights' stores only the "
              "weights in 8 bits and computes in float: as small, at float speed (what pays for "
              "pruned or distilled networks on CPUs); with 4 bits, half that again, but it coarsens a "
              "network not distilled for 4-bit weights.",
              (Parameter("mode", "mode", "static", choices=("static", "dynamic", "weights")),
               Parameter("per_channel", "per channel", True, choices=(True, False)),
               Parameter("calibrate", "calibration", "percentile", choices=("percentile", "minmax", "entropy")),
               Parameter("bits", "weight bits (mode 'weights')", 8, choices=(8, 4)))),
    Technique("calibrate_output", "Output calibration",
              "Matches the compressed network's confidence to the original's on your calib scans (no "
              "labels), so faint lesions it sees are not dropped as too small or too unsure; it may "
              "also bring back some of the original's false alarms.",
              (Parameter("foreground_weight", "weight of lesion pixels", 3.0, minimum=1.0, maximum=1000.0),)),
    Technique("refit_filter", "Candidate-filter refit",
              "Retrains the second network, which drops false candidates, on the compressed model's "
              "outputs so it keeps what the original keeps (no labels); kept only if it does better on calib.",
              (Parameter("max_cases", "train scans read", 48, minimum=1, maximum=10000),
               Parameter("epochs", "epochs", 8, minimum=1, maximum=200),
               Parameter("gained_weight", "weight of an added lesion", 0.2,
                         minimum=0.0, maximum=10.0))),
    Technique("compress_filter", "Candidate-filter compression",
              "Shrinks the second network that drops false candidates, in models that have one: fewer of "
              "its ensemble members and int8 weights. A coarser filter may drop a faint nodule or keep "
              "a vessel; models without a filter are left as they are.",
              (Parameter("members", "ensemble members kept (0: all)", 0, minimum=0, maximum=16),
               Parameter("int8", "int8 weights", True, choices=(True, False)),
               Parameter("weight_bits", "bits per weight", 8, choices=(8, 4)))),
)


def technique(step: str) -> Technique:
    for t in TECHNIQUES:
        if t.step == step:
            return t
    raise KeyError(step)


@dataclass
class DataChoice:
    manifest: str = ""           # a manifest CSV, or
    folder: str = ""             # a folder of scans split by patient here
    proportions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PROPORTIONS))
    seed: int = 0


@dataclass
class CompressConfig:
    model: str = ""              # the card (or model file) of the variant to compress
    data: DataChoice = field(default_factory=DataChoice)
    preset: str = "safe-int8"    # a Preset key, or EXPERT
    steps: list[dict] = field(default_factory=list)   # expert: [{"step": name, **params}]
    sensitivity_first: bool = False
    max_dice_drop: str = "0.02"  # as typed: "0.02", "2 %"
    lost_lesion_mm: str = "6"    # no lost lesion at or above this size; "" = not checked
    lost_nodules_only: bool = False  # count only nodules (from 6 mm) the original finds and the variant misses
    device: str = "cpu"
    threads: int | None = None
    # Long enough for the search presets' student to be tried: it starts only with twice its 10
    # minutes left, after the int8 candidates (search_advice).
    search_minutes: str = "60"
    output: str = ""
    name: str = ""              # the run's name: the output sub-folder
    search_finetune_steps: int = 200    # fine-tuning per pruned candidate in a search

    def copy(self) -> "CompressConfig":
        return copy.deepcopy(self)


# ---------------------------------------------------------------- reading typed values


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_fraction(text: str, what: str) -> float:
    """ "0.02", "2 %", "2%" → 0.02; anything else raises ValueError naming ``what``."""
    match = re.fullmatch(rf"\s*({_NUMBER})\s*(%?)\s*", text or "")
    if not match:
        raise ValueError(f"{what}: cannot read {text!r} — write a number such as 0.02 or 2 %")
    value = float(match.group(1)) / (100.0 if match.group(2) else 1.0)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what}: {text!r} is outside 0–1 (0 %–100 %)")
    return value


def parse_mm(text: str, what: str) -> float | None:
    """ "6", "6 mm" → 6.0; "" → None (not checked)."""
    if not (text or "").strip():
        return None
    match = re.fullmatch(rf"\s*({_NUMBER})\s*(mm)?\s*", text)
    if not match or float(match.group(1)) < 0:
        raise ValueError(f"{what}: cannot read {text!r} — write a size in mm such as 6")
    return float(match.group(1))


def parse_minutes(text: str) -> float:
    match = re.fullmatch(rf"\s*({_NUMBER})\s*(min)?\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"search time limit: cannot read {text!r} — write minutes, such as 10")
    return float(match.group(1))


def search_advice(config: CompressConfig) -> str:
    """A warning, not a problem: a search preset's time limit too short for its distilled student,
    which the search starts only with ``STUDENT_START_SECONDS`` left (compression.search)."""
    from compression.search import STUDENT_START_SECONDS

    if config.preset == EXPERT or not preset(config.preset).search_for:
        return ""
    try:
        minutes = parse_minutes(config.search_minutes)
    except ValueError:
        return ""   # the Budget page's problems say why
    needed = STUDENT_START_SECONDS / 60.0
    if minutes >= needed:
        return ""
    return (f"With {minutes:g} minutes the distilled student, the candidate that makes a model far smaller "
            f"and faster, will not be tried: it starts only with {needed:.0f} minutes or more left, after "
            f"the int8 candidates. The demo's student trained for about 35 minutes on 2 cores; allow an "
            f"hour or more.")


@dataclass(frozen=True)
class BudgetValues:
    max_dice_drop: float
    lost_lesion_mm: float | None
    nodules_only: bool = False  # the original's own false positives may go (needs labels)

    def as_dict(self) -> dict:
        """The budget as compression.evaluate.Budget's fields (lesions ≥ 6 mm are 'large')."""
        budget: dict[str, Any] = {"max_dice_drop": self.max_dice_drop}
        if self.lost_lesion_mm is None:
            budget["max_lost_lesions_large"] = None
        elif self.lost_lesion_mm <= 0:
            budget["max_lost_lesions"] = 0
            budget["max_lost_lesions_large"] = 0
        elif self.nodules_only:
            budget["max_lost_lesions_large"] = None
            budget["max_lost_nodules_large"] = 0
        else:
            budget["max_lost_lesions_large"] = 0
        return budget


def parse_lesion_size(text: str) -> float | None:
    """The evaluation counts lost lesions of any size or from 6 mm (Lung-RADS): 0, 6 or empty."""
    size = parse_mm(text, "no lost lesions from")
    if size is not None and size not in (0.0, LARGE_LESION_MM):
        raise ValueError(f"no lost lesions from: {text!r} — the evaluation counts lost lesions of any size "
                         f"(write 0) or from {LARGE_LESION_MM:g} mm, Lung-RADS (write {LARGE_LESION_MM:g})")
    return size


def parse_lesion_limit(config: CompressConfig) -> float | None:
    """The lost-lesion size, checked against "only lost nodules" (which needs the 6 mm limit)."""
    size = parse_lesion_size(config.lost_lesion_mm)
    if config.lost_nodules_only and size != LARGE_LESION_MM:
        raise ValueError(f"only lost nodules: the evaluation tells nodules from the original's false positives "
                         f"for lesions from {LARGE_LESION_MM:g} mm; write {LARGE_LESION_MM:g} in \"no lost lesions from\"")
    return size


def budget_values(config: CompressConfig) -> BudgetValues:
    return BudgetValues(parse_fraction(config.max_dice_drop, "max Dice drop"), parse_lesion_limit(config),
                        config.lost_nodules_only)


# ---------------------------------------------------------------- checks per page


def problems(config: CompressConfig, page: str) -> list[str]:
    """What stops the wizard leaving ``page``, as sentences the user can act on; [] when fine."""
    return {"model": _model_problems, "data": _data_problems, "techniques": _technique_problems,
            "budget": _budget_problems, "output": _output_problems}[page](config)


def all_problems(config: CompressConfig) -> list[str]:
    return [p for page in PAGES for p in problems(config, page)]


def _model_problems(config: CompressConfig) -> list[str]:
    if not config.model:
        return ["Choose the model to compress."]
    if not Path(config.model).exists():
        return [f"The model file {config.model} does not exist."]
    return []


def _data_problems(config: CompressConfig) -> list[str]:
    data = config.data
    if not data.manifest and not data.folder:
        return ["Choose a manifest (CSV) or a folder of scans."]
    found = []
    if data.manifest and not Path(data.manifest).is_file():
        found.append(f"The manifest {data.manifest} does not exist.")
    if not data.manifest:
        folder = Path(data.folder)
        if not folder.is_dir():
            found.append(f"The data folder {folder} does not exist.")
        elif not any(p.is_file() for p in folder.rglob("*")):
            found.append(f"The data folder {folder} is empty: it holds no scans.")
    if any(data.proportions.get(s, 0) < 0 for s in SPLITS) or data.proportions.get("eval", 0) <= 0:
        found.append("The eval split needs a share above zero, and no share may be negative.")
    return found


def _technique_problems(config: CompressConfig) -> list[str]:
    if config.preset == EXPERT:
        if not config.steps:
            return ["Add at least one technique to the expert recipe."]
        unknown = [s.get("step") for s in config.steps if s.get("step") not in {t.step for t in TECHNIQUES}]
        return [f"Unknown technique {u!r}." for u in unknown]
    if config.preset not in {p.key for p in PRESETS}:
        return [f"Unknown preset {config.preset!r}."]
    return []


def _budget_problems(config: CompressConfig) -> list[str]:
    found = []
    for check in (lambda: parse_fraction(config.max_dice_drop, "max Dice drop"),
                  lambda: parse_lesion_limit(config),
                  lambda: parse_minutes(config.search_minutes)):
        try:
            check()
        except ValueError as exc:
            found.append(str(exc))
    if config.device not in ("cpu", "cuda"):
        found.append(f"Unknown target device {config.device!r} (cpu or cuda).")
    return found


def _output_problems(config: CompressConfig) -> list[str]:
    if not config.output:
        return ["Choose where the compressed variants go."]
    if Path(config.output).exists() and not Path(config.output).is_dir():
        return [f"{config.output} is a file, not a folder."]
    return []


# ---------------------------------------------------------------- the recipe YAML


def preset_steps(key: str) -> list[dict]:
    """The steps of a preset recipe, as the CLI reads them (compression.recipe)."""
    from compression.recipe import load_preset

    return [dict(step) for step in load_preset(key).steps]


def run_plan(config: CompressConfig) -> dict:
    """Everything the compression job needs, as plain values; ValueError lists what is wrong."""
    found = all_problems(config)
    if found:
        raise ValueError("\n".join(found))
    budget = budget_values(config)
    search_for = "" if config.preset == EXPERT else preset(config.preset).search_for
    if search_for:
        recipes = []
    else:
        name = EXPERT if config.preset == EXPERT else config.preset
        steps = [dict(s) for s in config.steps] if config.preset == EXPERT else preset_steps(config.preset)
        recipes = [{"name": name, "steps": steps}]
    return {"model": config.model, "data": _data_dict(config.data), "recipes": recipes,
            "search": {"objectives": [search_for], "finetune_steps": config.search_finetune_steps} if search_for else None,
            "budget": budget.as_dict(), "lost_lesion_mm": budget.lost_lesion_mm,
            "sensitivity_first": config.sensitivity_first, "device": config.device,
            "threads": config.threads, "time_limit_s": 60.0 * parse_minutes(config.search_minutes),
            "output": config.output, "run_name": config.name or default_run_name(config),
            "recipe": to_recipe(config)}


def _data_dict(data: DataChoice) -> dict:
    out: dict[str, Any] = {"seed": data.seed, "proportions": dict(data.proportions)}
    if data.manifest:
        out["manifest"] = data.manifest
    else:
        out["folder"] = data.folder
    return out


def to_recipe(config: CompressConfig) -> dict:
    """The config's steps and budget as a recipe document (resources/recipe.schema.json): the
    same YAML the CLI's ``compress --recipe`` takes. Model, data and target are the CLI's
    arguments, not part of a recipe; the wizard remembers them in its settings instead."""
    steps = [dict(s) for s in config.steps] if config.preset == EXPERT else preset_steps(config.preset)
    name = re.sub(r"[^A-Za-z0-9._-]", "-", config.name or config.preset).strip("-.") or "wizard"
    recipe: dict[str, Any] = {"schema_version": "1.0", "name": name,
                              "description": "Written by the MedCompress compression wizard.", "steps": steps}
    try:
        recipe["budget"] = {k: v for k, v in budget_values(config).as_dict().items() if v is not None}
    except ValueError:
        pass   # an unreadable budget stays out of the file; the Budget page says why
    return recipe


def from_recipe(recipe: dict, base: CompressConfig | None = None) -> CompressConfig:
    """A config from a recipe document; what a recipe does not hold keeps ``base``'s values."""
    config = (base or CompressConfig()).copy()
    steps = [dict(s) for s in recipe.get("steps") or []]
    if recipe.get("name") in {p.key for p in PRESETS} and steps == preset_steps(recipe["name"]):
        config.preset, config.steps = recipe["name"], []
    else:
        config.preset, config.steps = EXPERT, steps
    budget = recipe.get("budget") or {}
    if "max_dice_drop" in budget and budget["max_dice_drop"] is not None:
        config.max_dice_drop = f"{budget['max_dice_drop']:g}"
    config.lost_nodules_only = False
    if budget.get("max_lost_lesions") == 0:
        config.lost_lesion_mm = "0"
    elif budget.get("max_lost_lesions_large") == 0:
        config.lost_lesion_mm = "6"
    elif budget.get("max_lost_nodules_large") == 0:
        config.lost_lesion_mm, config.lost_nodules_only = "6", True
    else:
        config.lost_lesion_mm = ""   # no lesion limit in the recipe: not checked
    return config


def save_recipe(config: CompressConfig, path: str | Path) -> None:
    """Checked against the published schema, then written atomically."""
    from compression.recipe import recipe_from_dict, save_recipe as write

    write(recipe_from_dict(to_recipe(config), str(path)), path)


def load_recipe(path: str | Path, base: CompressConfig | None = None) -> CompressConfig:
    """Read and check a recipe (ValueError with the file and field at fault)."""
    from compression.recipe import load_recipe as read

    return from_recipe(read(path).as_dict(), base)


def default_run_name(config: CompressConfig) -> str:
    import time

    model = Path(config.model).parent.name if Path(config.model).name == "card.json" else Path(config.model).stem
    return f"{model}-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------- the observable model


class CompressConfigModel(QObject):
    """Holds the wizard's config; every edit goes through ``set`` and is announced."""

    changed = Signal(str)   # the field that changed ("data.seed", "preset", ... or "*" for all)

    def __init__(self, config: CompressConfig | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.config = config or CompressConfig()

    def set(self, name: str, value: Any) -> None:
        target, attr = self._owner(name)
        if getattr(target, attr) == value:
            return
        setattr(target, attr, value)
        self.changed.emit(name)

    def get(self, name: str) -> Any:
        target, attr = self._owner(name)
        return getattr(target, attr)

    def replace(self, config: CompressConfig) -> None:
        self.config = config
        self.changed.emit("*")

    def _owner(self, name: str):
        parts = name.split(".")
        target = self.config
        for part in parts[:-1]:
            target = getattr(target, part)
        if not hasattr(target, parts[-1]):
            raise AttributeError(f"the compression config has no field {name!r}")
        return target, parts[-1]
