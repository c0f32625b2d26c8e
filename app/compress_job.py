"""The compression run behind the wizard, as job bodies for the job manager's child processes.

``compress_run(plan)`` loads the scans, optionally measures per-layer sensitivity, runs each
recipe of the plan (``compression.pipeline.run_steps``), judges every new variant against the
original on the eval split (``compression.evaluate``) and measures its cost
(``compression.cost``). Everything is written inside the job's scratch folder and moved to the
output folder only at the very end, so a cancelled, failed or killed run leaves no file behind
(the supervisor removes the scratch folder however the job ends). The source model's files are
hashed before and after: a run that changed them fails loudly.

Progress carries structured data for the wizard's Run page::

    {"plan": [phase names], "done": k}              first (again, with k phases done, if the plan grows)
    {"phase": i, "phase_fraction": f, "eta_s": s}    per tick
    {"loss": x, "iteration": n}                     with a tick during fine-tuning/distillation

Qt-free: the child process imports this module.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

from app.core.progress import Progress

LATENCY_ROUNDS = 5
COST_SLICE = 256   # latency is timed on one whole 256×256 slice (fully convolutional nets scale with pixels)


@dataclass
class VariantRow:
    """One variant as the Results page lists it (plain values: it crosses the process pipe)."""

    name: str
    card_path: str
    is_original: bool
    steps: str
    deployed_bytes: int
    latency_ms: float | None
    speedup: float | None
    dice: float | None
    dice_low: float | None
    dice_high: float | None
    dice_note: str
    fidelity: float | None
    lost_lesions: int | None
    budget_met: bool
    budget_failures: list[str] = field(default_factory=list)
    recommended: bool = False
    weights_sha256: str = ""
    # ground-truth nodules >= 6 mm the original detects and this one misses; None without labels
    nodules_missed: int | None = None


@dataclass
class CompressResult:
    run_folder: str
    rows: list[VariantRow]
    evidence: str
    source_sha256: str
    sensitivity: list[tuple[str, float]] | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- progress plumbing


class PhaseClock:
    """Maps each phase's own 0..1 onto the whole run, and estimates the time left."""

    def __init__(self, names: list[str], weights: list[float]):
        self.names, total = names, sum(weights)
        self.starts = [sum(weights[:i]) / total for i in range(len(weights))]
        self.widths = [w / total for w in weights]
        self.started = time.monotonic()

    def tick(self, phase: int, fraction: float | None, message: str, extra: dict | None = None) -> Progress:
        f = 0.0 if fraction is None else min(1.0, max(0.0, fraction))
        overall = self.starts[phase] + self.widths[phase] * f
        data = {"phase": phase, "phase_fraction": f, "eta_s": self.eta(overall), **(extra or {})}
        label = self.names[phase].split(":")[0]   # "expert", not "expert: prune_unstructured → finetune"
        return Progress(overall, f"{label}: {message}" if message else label, data)

    def eta(self, overall: float) -> float | None:
        elapsed = time.monotonic() - self.started
        if overall < 0.02 or elapsed < 1.0:
            return None
        return elapsed * (1.0 - overall) / overall


def in_phase(clock: PhaseClock, phase: int, gen: Generator) -> Generator[Progress, None, Any]:
    """Re-emit a library generator's progress as ticks of ``phase``; passes loss values on."""
    while True:
        try:
            p = next(gen)
        except StopIteration as done:
            yield clock.tick(phase, 1.0, "done")
            return done.value
        extra = None
        if isinstance(p.data, dict) and "loss" in p.data:
            extra = {"loss": float(p.data["loss"]), "iteration": int(p.data.get("step", 0))}
        yield clock.tick(phase, p.fraction, p.message, extra)


# ---------------------------------------------------------------- the run


def plan_phases(plan: dict) -> tuple[list[str], list[float]]:
    """Phase names and relative weights: loading, sensitivity, one per recipe, evaluation, cost."""
    names, weights = ["Load scans"], [1.0]
    if plan.get("sensitivity_first"):
        names, weights = names + ["Per-layer sensitivity"], weights + [1.5]
    for recipe in plan["recipes"]:
        steps = " → ".join(s["step"] for s in recipe["steps"])
        names.append(f"{recipe['name']}: {steps}")
        weights.append(1.0 + 0.5 * len(recipe["steps"]))
    return names + ["Evaluate on eval scans", "Measure size and latency"], weights + [2.0, 1.0]


def search_recipes(plan: dict, sensitivity=None) -> list[dict]:
    """A search preset's candidates (compression.search), cheapest and safest first."""
    from app.core.models import open_model
    from compression.search import candidate_recipes

    found = candidate_recipes(plan["search"]["objectives"], sensitivity,
                              finetune_steps=int(plan["search"].get("finetune_steps", 200)),
                              candidate_filter="candidate_filter" in open_model(plan["model"]).files)
    return [dataclasses.asdict(c) for c in found]  # back into a Candidate with Candidate(**recipe)


def source_fingerprint(variant) -> str:
    """One hash over every file of the source model: it must be the same after the run."""
    import hashlib

    from app.core.models import sha256_file
    digest = hashlib.sha256()
    for role in sorted(variant.files):
        if variant.files[role].is_file():
            digest.update(f"{role}:{sha256_file(variant.files[role])}".encode())
    if variant.card_path is not None:
        digest.update(sha256_file(variant.card_path).encode())
    return digest.hexdigest()


def compress_run(plan: dict, scratch: Path | None = None) -> Generator[Progress, None, CompressResult]:
    """The whole run (a job body): yields progress, returns a :class:`CompressResult`."""
    from app.core.models import open_model

    plan = dict(plan)
    if plan.get("search"):
        plan["recipes"] = search_recipes(plan)
    names, weights = plan_phases(plan)
    run = Run(plan, PhaseClock(names, weights))
    yield Progress(0.0, "starting", {"plan": names})
    original = open_model(plan["model"])
    fingerprint = source_fingerprint(original)
    own_scratch = scratch is None
    work = Path(tempfile.mkdtemp(prefix="medcompress-run-")) if own_scratch else Path(scratch)
    try:
        result = yield from run.everything(original, work)
        if source_fingerprint(original) != fingerprint:
            raise RuntimeError(f"the source model's files changed during the run ({plan['model']}); "
                               "nothing was saved")
        result.source_sha256 = fingerprint
        return result
    finally:
        if own_scratch:
            shutil.rmtree(work, ignore_errors=True)


class Run:
    """One compression run's steps, in order; ``phase`` counts the phases done so far."""

    def __init__(self, plan: dict, clock: PhaseClock):
        self.plan, self.clock = plan, clock
        self.phase, self.notes, self.sensitivity = 0, [], None
        self.recommended: set[str] | None = None

    def everything(self, original, work: Path):
        manifest, data, eval_cases = yield from self.load(original)
        if self.plan.get("sensitivity_first"):
            yield from self.measure_sensitivity(original, data)
        if self.plan.get("search"):
            variants = yield from self.search(original, data, eval_cases, work / "variants")
        else:
            variants = yield from self.recipes(original, data, work / "variants")
        comparison = yield from in_phase(self.clock, self.phase, _evaluate(original, variants, eval_cases,
                                                                            manifest, self.plan))
        costs = yield from in_phase(self.clock, self.phase + 1, _costs(original, variants, self.plan))
        rows = _rows(original, variants, comparison, costs, self.plan, self.recommended)
        run_folder = _publish(work / "variants", Path(self.plan["output"]), self.plan["run_name"])
        for row in rows[1:]:
            row.card_path = str(run_folder / Path(row.card_path).parent.name / "card.json")
        yield Progress(1.0, f"{len(variants)} variant(s) written to {run_folder}",
                       {"phase": self.phase + 1, "phase_fraction": 1.0, "eta_s": 0.0})
        return CompressResult(str(run_folder), rows, comparison.evidence, "", self.sensitivity, self.notes)

    def load(self, original):
        from compression.data import load_cases
        from compression.pipeline import StepData

        from app.compress_data import open_data

        d = self.plan["data"]
        manifest = open_data(d.get("manifest", ""), d.get("folder", ""), d.get("proportions"), int(d.get("seed", 0)))
        splits = ("train", "calib", "eval")
        cases = yield from in_phase(self.clock, 0, load_cases(manifest, splits))
        in_order = [c for c in manifest.cases if c.split in splits]   # load_cases keeps the manifest's order
        by_split = {s: [c for c, m in zip(cases, in_order) if m.split == s] for s in splits}
        data = StepData(train=by_split["train"], calib=by_split["calib"] or by_split["train"], teacher=original,
                        device=self.plan["device"], threads=self.plan.get("threads"), seed=int(d.get("seed", 0)))
        self.phase = 1
        return manifest, data, by_split["eval"]

    def measure_sensitivity(self, original, data):
        table = yield from in_phase(self.clock, self.phase, _sensitivity(original, data, self.notes))
        self.sensitivity = sensitivity_rows(table)
        self.phase += 1
        if self.plan.get("search") and self.sensitivity:
            self.plan["recipes"] = search_recipes(self.plan, table)
            names, weights = plan_phases(self.plan)
            self.clock = PhaseClock(names, weights)
            yield Progress(self.clock.starts[self.phase], "the most sensitive layers get candidates of their own",
                           {"plan": names, "done": self.phase})

    def recipes(self, original, data, out_dir: Path):
        from compression.pipeline import run_steps

        variants = []
        for recipe in self.plan["recipes"]:
            name = f"{original.card.name}-{recipe['name']}"
            variant = yield from in_phase(self.clock, self.phase, run_steps(
                original, recipe["steps"], data, out_dir, name=name,
                recipe={**self.plan["recipe"], "steps": recipe["steps"]}))
            variants.append((recipe, variant))
            self.phase += 1
        return variants

    def search(self, original, data, eval_cases, out_dir: Path):
        """compression.search over the candidates, one progress bar per candidate."""
        from compression.evaluate import Budget
        from compression.search import Candidate, pipeline_runner, search

        recipes = self.plan["recipes"]
        candidates = [Candidate(**r) for r in recipes]
        runner = pipeline_runner(original, data, eval_cases, out_dir, Budget(**self.plan["budget"]),
                                 device=self.plan["device"], threads=self.plan.get("threads"),
                                 seed=data.seed, latency_rounds=LATENCY_ROUNDS)
        result = yield from self.spread(search(candidates, runner, Budget(**self.plan["budget"]),
                                               objectives=self.plan["search"]["objectives"],
                                               time_limit_s=self.plan.get("time_limit_s")), len(recipes))
        self.notes += [f"{t.candidate.name} could not run: {t.error}" for t in result.trials if t.error]
        self.notes += [f"{c.name} was not tried: " + (f"what was left of the time limit could not give its training "
                                                      f"the {c.min_seconds / 60:.0f} minutes it needs"
                                                      if c.min_seconds else "the time limit came first")
                       for c in result.not_tried]
        self.recommended = {t.candidate.name for t in result.front}
        by_name = {r["name"]: r for r in recipes}
        self.phase += len(recipes)
        # as each ran: a student's training carries the time limit the search gave it
        return [({**by_name[t.candidate.name], "steps": t.candidate.steps, "why": t.candidate.why}, t.variant)
                for t in result.trials if t.variant is not None]

    def spread(self, gen, count: int):
        """A generator over ``count`` equal parts (the search's candidates), as that many phases."""
        while True:
            try:
                p = next(gen)
            except StopIteration as done:
                return done.value
            f = 0.0 if p.fraction is None else p.fraction * count
            part = min(count - 1, int(f))
            extra = None
            if isinstance(p.data, dict) and "loss" in p.data:
                extra = {"loss": float(p.data["loss"]), "iteration": int(p.data.get("step", 0))}
            yield self.clock.tick(self.phase + part, f - part, p.message, extra)


def _sensitivity(original, data, notes: list[str]):
    """compression.sensitivity's table (int8 damage, one layer at a time) on the calib scans."""
    from compression.sensitivity import layer_sensitivity

    table = yield from layer_sensitivity(original, data, method="quantize")
    notes += list(table.notes)
    return table


def sensitivity_rows(table) -> list[tuple[str, float]]:
    """(layer, fidelity drop), in network order, for the Results page's bar chart."""
    return [(row.layer, float(row.drop)) for row in table] if table is not None else []


def _evaluate(original, variants, eval_cases, manifest, plan):
    from compression.evaluate import evaluate

    names = ["original"] + [r["name"] for r, _v in variants]
    return (yield from evaluate([original] + [v for _r, v in variants], eval_cases, manifest=manifest,
                                names=names, device=plan["device"], threads=plan.get("threads"),
                                seed=int(plan["data"].get("seed", 0))))


def _costs(original, variants, plan):
    from compression.cost import compare_costs, default_input_shape
    from compression.search import deployable_baseline

    names = ["original"] + [r["name"] for r, _v in variants]
    shape = default_input_shape(original.card, whole_slice=COST_SLICE)
    # the original as deployed without us (its ONNX in ORT), so the runtime's speed is not credited
    baseline = deployable_baseline(original)
    return (yield from compare_costs([baseline] + [v for _r, v in variants], names, input_shape=shape,
                                     device=plan["device"], threads=plan.get("threads"),
                                     rounds=LATENCY_ROUNDS, warmup=1, memory=False))


def _finite(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _rows(original, variants, comparison, costs, plan, recommended: set[str] | None) -> list[VariantRow]:
    from compression.evaluate import Budget, budget_failures

    budget = Budget(**plan["budget"])
    rows = []
    for k, (name, variant, steps) in enumerate([("original", original, "—")] + [
            (r["name"], v, " → ".join(s["step"] for s in r["steps"])) for r, v in variants]):
        result, cost = comparison.variant(name), costs[k]
        dice = result.verdicts.get("dice")
        failures = [] if k == 0 else budget_failures(result, budget)
        rows.append(VariantRow(
            name=name, card_path=str(variant.card_path), is_original=k == 0, steps=steps,
            deployed_bytes=int(cost.deployed_bytes),
            latency_ms=cost.latency.median_ms if cost.latency else None,
            speedup=cost.latency.speedup if cost.latency else None,
            dice=_finite(dice.point) if dice else None, dice_low=_finite(dice.low) if dice else None,
            dice_high=_finite(dice.high) if dice else None, dice_note=dice.note if dice else "",
            fidelity=_finite(result.value("fidelity_dice")) if k else 1.0,
            lost_lesions=_count(result, "lesions_lost_large") if k else 0, budget_met=not failures,
            budget_failures=failures, weights_sha256=variant.weights_sha256,
            nodules_missed=_count(result, "nodules_missed_large")))
    _recommend(rows, (plan.get("search") or {}).get("objectives", ["all"])[0], recommended)
    return rows


def _count(result, metric: str) -> int | None:
    value = _finite(result.value(metric))
    return None if value is None else int(round(value))


def _recommend(rows: list[VariantRow], objective: str, front: set[str] | None) -> None:
    """Mark the choice: every variant within budget, or the search front's smallest / fastest."""
    within = [r for r in rows[1:] if r.budget_met and (front is None or r.name in front)]
    if objective == "size" and within:
        within = [min(within, key=lambda r: r.deployed_bytes)]
    elif objective == "latency" and within:
        within = [min(within, key=lambda r: r.latency_ms if r.latency_ms is not None else math.inf)]
    for row in within:
        row.recommended = True


def _publish(variants_dir: Path, output: Path, run_name: str) -> Path:
    """Move the finished variants into ``output/run_name`` in one rename (copy first across disks)."""
    output.mkdir(parents=True, exist_ok=True)
    final = output / run_name
    if final.exists():
        raise FileExistsError(f"{final} exists already: compression never overwrites earlier results")
    variants_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(variants_dir, final)
    except OSError:   # another file system: copy beside the target, then rename into place
        staging = Path(tempfile.mkdtemp(prefix=f".{run_name}.", suffix=".part", dir=output))
        try:
            shutil.copytree(variants_dir, staging, dirs_exist_ok=True)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


# ---------------------------------------------------------------- after the run


def keep_variants(run_folder: str, keep: list[str], destination: str, rows: list[VariantRow]) -> list[str]:
    """Keep the chosen variants (moved to ``destination``), delete the others; audit each kept one.

    Returns the kept variants' card paths.
    """
    from app.core.audit import append_audit

    run, target = Path(run_folder), Path(destination)
    kept = []
    for row in rows:
        if row.is_original:
            continue
        folder = Path(row.card_path).parent
        if row.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        final = _move_variant(folder, target) if target.resolve() != run.resolve() else folder
        kept.append(str(final / "card.json"))
        append_audit("accept", variant=str(final), name=row.name, weights_sha256=row.weights_sha256,
                     budget_met=row.budget_met, budget_failures=row.budget_failures, steps=row.steps)
    if run.is_dir() and not any(run.iterdir()):
        run.rmdir()
    return kept


def _move_variant(folder: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    final = target / folder.name
    if final.exists():
        raise FileExistsError(f"{final} exists already; choose another folder")
    try:
        os.rename(folder, final)
    except OSError:
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=target))
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        os.rename(staging, final)
        shutil.rmtree(folder, ignore_errors=True)
    return final


# ---------------------------------------------------------------- the Model page


@dataclass
class ModelSummary:
    parameters: int
    macs: int | None
    macs_input: tuple[int, ...]
    layers: list[tuple[str, str, int, str]]   # name, type, parameters, weight shape
    providers: list[str]
    note: str = ""


def describe_model(path: str) -> ModelSummary:
    """Parameters, MACs, layers and this machine's providers (runs where torch may be imported)."""
    import onnxruntime as ort

    from app.core.models import load_torch_module, open_model

    variant = open_model(path)
    providers = usable_providers(ort.get_available_providers())
    if "weights" not in variant.files and "torchscript" not in variant.files:
        return _describe_onnx(variant, providers)
    module = load_torch_module(variant.as_format("state_dict" if "weights" in variant.files else "torchscript"))
    layers = [(name, type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)),
               "×".join(str(d) for d in m.weight.shape) if getattr(m, "weight", None) is not None else "")
              for name, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))]
    from compression.cost import default_input_shape, torch_macs

    shape = default_input_shape(variant.card, whole_slice=COST_SLICE)
    return ModelSummary(sum(p.numel() for p in module.parameters()), torch_macs(module, shape),
                        tuple(shape), layers, providers)


def usable_providers(built: list[str]) -> list[str]:
    """ONNX Runtime lists the providers it was built with; GPU ones need a GPU that is there."""
    import torch

    gpu = torch.cuda.is_available()
    return [p for p in built if gpu or p not in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]


def _describe_onnx(variant, providers) -> ModelSummary:
    from compression.cost import default_input_shape, onnx_macs, onnx_parameters

    shape = default_input_shape(variant.card, whole_slice=COST_SLICE)
    params, _nonzero = onnx_parameters(variant.main_file)
    return ModelSummary(params, onnx_macs(variant.main_file, shape), tuple(shape), [], providers,
                        "ONNX only: no layer table without the torch weights")
