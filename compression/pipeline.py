"""Run a list of compression steps on a copy of a model variant and write the result as a new variant.

A step is a generator function ``step(model: WorkingModel, data: StepData, **params)`` that yields
:class:`Progress` (every yield is a cancel point) and returns the :class:`WorkingModel` it
changed. :func:`run_steps` gives the steps a private copy of the parent, records what each did
(params, parameters and MACs before/after, seconds), and writes the new variant folder
atomically: everything goes to a hidden temporary folder that is renamed into place only when
all is written and verified, so a cancel or a failure leaves nothing behind.

This module imports no torch at import time (the GUI reads the step names from it).
"""
from __future__ import annotations

import importlib
import inspect
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Generator

import numpy as np

from app.core.environment import cpu_flags, package_versions
from app.core.model_card import Lineage, ModelCard, save_card
from app.core.models import ModelVariant, open_model, sha256_file
from app.core.progress import Progress, scaled

from compression.data import CaseData, slice_tensors, split_by_labels


@dataclass
class WorkingModel:
    """What flows from one step to the next: always a private copy, never the parent's objects."""

    card: ModelCard
    module: Any = None  # float torch.nn.Module while one exists
    onnx_path: Path | None = None  # set once a step produced the deployable ONNX (e.g. int8)
    extra_files: dict[str, Path] = field(default_factory=dict)  # role -> file, e.g. {"archive": clustered .npz}
    notes: list[str] = field(default_factory=list)  # plain sentences: what each step did, and what it did not
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, reason) a technique could not handle
    history: list[dict] = field(default_factory=list)  # per step: name, params, params/MACs before/after, seconds
    work_dir: Path | None = None  # scratch folder inside the variant's temporary folder
    metrics: dict = field(default_factory=dict)  # step results for the card (sparsity, sizes, conv share ...)
    weights_dtype: str = "float32"  # how the state_dict is stored ("bfloat16" after the bf16 step)
    runtime_hint: dict = field(default_factory=dict)  # how to run it best, e.g. {"torch_autocast": "bf16"}
    storage: str = "dense"  # "sparse": write ONNX sparse initializers where they pay (unstructured pruning)
    original: Any = None  # the parent's float module, frozen: the reference for label-free recovery
    deploy: str = "onnx"  # what a stock runtime loads: "onnx", or "torch" (state_dict; e.g. bf16 weights)
    parent: Any = None  # the ModelVariant being compressed (read-only: steps may run it as the reference)

    def require_module(self, step: str):
        if self.module is None:
            raise StepError(f"{step} needs the float torch model, but an earlier step left only "
                            f"{'an ONNX model' if self.onnx_path else 'no model'}; put {step} before quantization")
        return self.module

    def scratch(self, name: str) -> Path:
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="medcompress-step-"))
        return self.work_dir / name

    @property
    def example_shape(self) -> tuple[int, ...]:
        """A whole-slice input for export and counting; the card's patch when it has one."""
        spec = self.card.input
        spatial = tuple(spec.patch_size) if spec.patch_size else (64,) * spec.dims
        return (1, spec.channels) + spatial


@dataclass
class StepData:
    train: list[CaseData]
    calib: list[CaseData]
    teacher: ModelVariant | None = None
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def has_labels(self, split: str = "train") -> bool:
        cases = getattr(self, split)
        return bool(len(cases)) and not len(split_by_labels(cases)[1])

    def slices(self, split: str, card: ModelCard, *, with_labels: bool, max_slices: int | None = None):
        """Pre-processed (x, y) of ``train`` or ``calib``, cached per request."""
        key = (split, card.preprocessing, card.input, with_labels, max_slices)
        if key not in self._cache:
            cases = getattr(self, split)
            if not cases:
                raise StepError(f"no {split} cases were given; this step needs the user's {split} scans")
            self._cache[key] = slice_tensors(cases, card, with_labels=with_labels, max_slices=max_slices, seed=self.seed)
        return self._cache[key]


class StepError(ValueError):
    """A step cannot run as asked (wrong order, unknown parameter, missing data)."""


# ---------------------------------------------------------------- the steps

_STEP_MODULES = {
    "finetune": ("compression.steps.finetune", "finetune"),
    "prune_unstructured": ("compression.steps.prune_unstructured", "prune_unstructured"),
    "prune_channels": ("compression.steps.prune_channels", "prune_channels"),
    "sparsity_train": ("compression.steps.sparsity_train", "sparsity_train"),
    "cluster_weights": ("compression.steps.cluster_weights", "cluster_weights"),
    "quantize_int8_ort": ("compression.steps.quantize_ort", "quantize_int8_ort"),
    "quantize_int8_torch": ("compression.steps.quantize_torch", "quantize_int8_torch"),
    "qat_finetune": ("compression.steps.qat", "qat_finetune"),
    "half_precision": ("compression.steps.half_precision", "half_precision"),
    "distill": ("compression.steps.distill", "distill"),
    "compress_filter": ("compression.steps.compress_filter", "compress_filter"),
    "calibrate_output": ("compression.steps.calibrate_output", "calibrate_output"),
    "refit_filter": ("compression.steps.refit_filter", "refit_filter"),
}


def _lazy(module: str, name: str) -> Callable:
    """A step that imports its module (and torch) only when it runs."""
    def step(model, data, **params):
        return getattr(importlib.import_module(module), name)(model, data, **params)
    step.__name__ = name
    step.target = (module, name)
    return step


STEP_REGISTRY: dict[str, Callable] = {name: _lazy(*target) for name, target in _STEP_MODULES.items()}


def step_function(name: str) -> Callable:
    if name not in STEP_REGISTRY:
        raise StepError(f"unknown compression step {name!r} (known: {', '.join(sorted(STEP_REGISTRY))})")
    step = STEP_REGISTRY[name]
    target = getattr(step, "target", None)
    return getattr(importlib.import_module(target[0]), target[1]) if target else step


def step_parameters(name: str) -> dict[str, Any]:
    """A step's parameters and their defaults (for recipe checks and the wizard's forms)."""
    signature = inspect.signature(step_function(name))
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in list(signature.parameters.values())[2:]}


def check_step(spec: dict) -> None:
    """Raise StepError for an unknown step or parameter (before anything runs)."""
    if "step" not in spec:
        raise StepError(f"a step needs a 'step' name: {spec}")
    known = step_parameters(spec["step"])
    unknown = [k for k in spec if k != "step" and k not in known]
    if unknown:
        raise StepError(f"step {spec['step']}: unknown parameter {unknown[0]!r} (known: {', '.join(known)})")


# ---------------------------------------------------------------- running


def working_copy(parent: ModelVariant, work_dir: Path) -> WorkingModel:
    """A private copy: the torch model freshly loaded from the parent's files, its ONNX copied."""
    from app.core.models import load_torch_module

    model = WorkingModel(card=parent.card, work_dir=work_dir, parent=parent)
    if "candidate_filter" in parent.files:  # the lesion clean-up's second network goes along unchanged
        model.extra_files["candidate_filter"] = parent.files["candidate_filter"]
    if "weights" in parent.files and parent.card.architecture is not None:
        model.module = load_torch_module(parent.as_format("state_dict"))
        model.original = load_torch_module(parent.as_format("state_dict"))
    elif "torchscript" in parent.files:
        model.module = load_torch_module(parent.as_format("torchscript"))
        model.original = load_torch_module(parent.as_format("torchscript"))
    elif "onnx" in parent.files:
        model.onnx_path = work_dir / "parent.onnx"
        shutil.copyfile(parent.files["onnx"], model.onnx_path)
    else:
        raise StepError(f"{parent.card_path}: the variant has neither torch weights nor ONNX to compress")
    return model


def run_steps(parent: ModelVariant, steps: list[dict], data: StepData, out_dir: Path, *, name: str | None = None,
              recipe: dict | None = None) -> Generator[Progress, None, ModelVariant]:
    """Apply ``steps`` to a copy of ``parent``; write the variant folder ``out_dir/name`` atomically."""
    for spec in steps:
        check_step(spec)
    name = name or _default_name(parent, steps)
    final = Path(out_dir) / name
    if final.exists():
        raise FileExistsError(f"{final}: a variant of that name exists already; variants are never overwritten")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".part", dir=final.parent))
    try:
        (tmp / "work").mkdir()
        model = working_copy(parent, tmp / "work")
        for number, spec in enumerate(steps):
            start, stop = 0.9 * number / len(steps), 0.9 * (number + 1) / len(steps)
            model = yield from scaled(_run_one(model, spec, data), start, stop, f"{spec['step']}: ")
        yield Progress(0.9, "writing the variant")
        yield from scaled(write_variant(model, parent, tmp, name, recipe or {"steps": steps}, data), 0.9, 1.0)
        shutil.rmtree(tmp / "work", ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:  # cancel (GeneratorExit/Cancelled) or failure: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    yield Progress(1.0, f"variant written to {final}")
    return open_model(final / "card.json")


def _default_name(parent: ModelVariant, steps: list[dict]) -> str:
    return "-".join([parent.card.name] + [s["step"].replace("_", "") for s in steps])


def _run_one(model: WorkingModel, spec: dict, data: StepData):
    params = {k: v for k, v in spec.items() if k != "step"}
    before = _counts(model)
    start = time.perf_counter()
    model = yield from STEP_REGISTRY[spec["step"]](model, data, **params)
    record = {"step": spec["step"], "params": params, "seconds": round(time.perf_counter() - start, 2),
              **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in _counts(model).items()}}
    model.history.append(record)
    return model


MACS_SHAPE_2D = (256, 256)  # MACs are stated for one 256×256 slice (a fully convolutional net scales with pixels)


def _counts(model: WorkingModel) -> dict:
    if model.module is None:
        return {}
    from compression.export import macs_and_params

    spec = model.card.input
    spatial = tuple(spec.patch_size) if spec.patch_size else (MACS_SHAPE_2D if spec.dims == 2 else (64, 64, 64))
    macs, params = macs_and_params(model.module, (1, spec.channels) + spatial)
    return {"macs": macs, "params": params, "macs_input": list(spatial)}


# ---------------------------------------------------------------- writing


def _module_fits_architecture(model: WorkingModel) -> bool:
    """True when the module's state_dict loads into the card's architecture (not after channel pruning)."""
    if model.module is None or model.card.architecture is None:
        return False
    from app.core.models import ModelError, build_network

    try:
        reference = build_network(model.card.architecture).state_dict()
    except ModelError:
        return False
    state = model.module.state_dict()
    return reference.keys() == state.keys() and all(reference[k].shape == state[k].shape for k in state)


def write_variant(model: WorkingModel, parent: ModelVariant, folder: Path, name: str, recipe: dict,
                  data: StepData) -> Generator[Progress, None, None]:
    """Files, verification and card into ``folder`` (the caller renames it into place)."""
    files, verification = {}, {}
    if model.deploy == "torch":
        files.update(_write_torch_files(model, folder, verification, torchscript=False))
        if "weights" not in files:
            raise StepError("a variant deployed as torch weights needs a module that fits the card's architecture")
    elif model.onnx_path is not None:
        shutil.copyfile(model.onnx_path, folder / "model.onnx")
    else:
        from compression.export import export_onnx

        verification["onnx"] = export_onnx(model.module, folder / "model.onnx", model.example_shape)
        if model.storage == "sparse":
            verification["onnx_sparse"] = _store_sparse(model, folder)
    if model.deploy == "onnx":
        files["onnx"] = "model.onnx"
        yield Progress(0.5, "ONNX written")
        if model.module is not None:
            files.update(_write_torch_files(model, folder, verification))
    for role, path in model.extra_files.items():
        shutil.copyfile(path, folder / path.name)
        files[role] = path.name
    yield Progress(0.8, "torch files written")
    card = _variant_card(model, parent, folder, name, files, recipe, data, verification)
    save_card(card, folder / "card.json")


def _store_sparse(model: WorkingModel, folder: Path) -> dict:
    """Rewrite model.onnx with sparse initializers where they pay, and check ORT still agrees."""
    from compression.export import verify_onnx, write_sparse_onnx, example_input

    dense = folder / "model.onnx"
    dense_bytes = dense.stat().st_size
    stats = write_sparse_onnx(dense, dense)
    stats.update(dense_file_bytes=dense_bytes, stored_file_bytes=dense.stat().st_size)
    model.metrics["sparse_storage"] = stats
    if stats["sparse_tensors"] == 0:
        model.notes.append("No weight tensor was sparse enough (> 2/3 zeros) for sparse storage to pay; stored dense.")
    else:
        model.notes.append(f"{stats['sparse_tensors']} weight tensors stored as ONNX sparse initializers: file "
                           f"{dense_bytes} → {stats['stored_file_bytes']} bytes. ONNX Runtime densifies them at load, "
                           "so memory and latency are those of the dense model.")
    return verify_onnx(dense, model.module, example_input(model.example_shape))


def _write_torch_files(model: WorkingModel, folder: Path, verification: dict, torchscript: bool = True) -> dict:
    import torch

    from app.core.models import save_state_dict
    from compression.export import export_torchscript

    files = {}
    if torchscript:
        verification["torchscript"] = export_torchscript(model.module, folder / "model.ts", model.example_shape)
        files["torchscript"] = "model.ts"
    if _module_fits_architecture(model):
        dtype = getattr(torch, model.weights_dtype)
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.module.state_dict().items()}
        save_state_dict(state, folder / "model.pt")
        files["weights"] = "model.pt"
    return files


def _variant_card(model, parent, folder, name, files, recipe, data, verification) -> ModelCard:
    compression = {"history": model.history, "notes": model.notes, "skipped": [list(s) for s in model.skipped],
                   "verification": verification, **model.metrics}
    if model.runtime_hint:
        compression["runtime_hint"] = model.runtime_hint
    lineage = Lineage(
        weights_sha256=sha256_file(folder / files.get("onnx", files.get("weights"))), parent_sha256=parent.weights_sha256 or None,
        recipe=_jsonable(recipe), seed=int(data.seed), metrics=_jsonable({"compression": compression}),
        package_versions=package_versions(), cpu_flags=cpu_flags(),
        threads=data.threads, provider="onnxruntime-CPUExecutionProvider" if "onnx" in files else f"torch-{data.device}")
    architecture = model.card.architecture if "weights" in files else None
    steps = ", ".join(h["step"] for h in model.history) or "no steps"
    description = f"{parent.card.description} Compressed from {parent.card.name} {parent.card.version} by: {steps}.".strip()
    return replace(model.card, name=name, files=files, architecture=architecture, lineage=lineage, description=description)


def _jsonable(value):
    """Cards are JSON: numpy scalars, tuples and paths become plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


