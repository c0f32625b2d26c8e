"""Cost of a model variant: what it weighs on disk, how much it computes, how fast it runs.

- **Deployed size** is the bytes of the files a stock runtime loads without our code: the
  ``.onnx`` file plus its external-data files for ONNX Runtime, the weights (or TorchScript)
  file for torch. A codebook archive that needs our code to unpack (weight clustering) is not
  deployable; it is reported beside, as the **archive size** (what a hospital downloads), and
  so is the deflated size of the deployed files when there is no such archive.
- **Parameters** (and how many are non-zero) and **MACs** per inference of the conv and
  linear layers (nearly all of a CNN's work), from forward hooks on the torch module or from
  the ONNX graph's shapes — one rule for both, so torch and ONNX variants compare.
- **Latency** is measured side by side: every contender runs in the same process, in
  interleaved rounds (so a noisy neighbour slows all of them alike), after a warm-up; the
  median of the rounds is reported with the speed-up against the first contender. ONNX
  Runtime sessions run with spinning off, as the application runs them.
- **Peak memory** is measured in a fresh child process per variant (its peak RSS after loading
  the model and running one batch, minus the same process's before loading).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np

from app.core.progress import Progress

CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3), "ConvTranspose": (0, 1),
            "Gemm": (0, 1)}


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    rounds: int
    speedup: float = 1.0  # the first contender's median / this one's


@dataclass
class Cost:
    name: str
    deployed_bytes: int
    deployed_files: list[str]
    archive_bytes: int  # the codebook archive when there is one, else the deployed files deflated
    archive_kind: str  # "codebook archive" | "deflated deployed files"
    parameters: int
    nonzero_parameters: int
    macs: int | None
    latency: LatencyStats | None = None
    peak_memory_mb: float | None = None
    provider: str = ""
    threads: int | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- size


def deployed_files(variant, with_filter: bool = True) -> list[Path]:
    """The files a stock runtime reads to run this variant as its format says (with the
    candidate filter of its lesion clean-up, when it has one and ``with_filter``: findings
    need it too). A torch int8 variant deploys its AOTInductor package, which stock torch loads."""
    main = Path(variant.main_file)
    extra = ([Path(variant.files["candidate_filter"])] if with_filter and "candidate_filter" in variant.files
             else [])
    if "aoti_package" in variant.files:
        return [Path(variant.files["aoti_package"]), *extra]
    if variant.format == "onnx":
        return [main, *onnx_external_files(main), *extra]
    if variant.format == "bundle":
        return sorted(p for p in main.rglob("*") if p.is_file())
    return [main, *extra]


def onnx_external_files(path: Path) -> list[Path]:
    """External-data files an ONNX model refers to (large models keep weights beside the graph)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return [path.parent / name for name in sorted(locations)]


def _all_tensors(graph):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.ByteSize():
                yield from _all_tensors(attribute.g)


def deployed_size(variant) -> int:
    return sum(p.stat().st_size for p in deployed_files(variant))


def network_size(variant) -> int:
    """The deployed bytes of the network itself: without the candidate filter its findings also
    need, which every variant of one model carries unchanged (so it dilutes the size ratio)."""
    return sum(p.stat().st_size for p in deployed_files(variant, with_filter=False))


def archive_size(variant) -> tuple[int, str]:
    """(bytes, what they are): the variant's codebook archive, else its deployed files deflated."""
    archive = variant.files.get("archive")
    if archive is not None and Path(archive).is_file():
        return Path(archive).stat().st_size, "codebook archive"
    compressor = zlib.compressobj(6)
    total = 0
    for path in deployed_files(variant):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                total += len(compressor.compress(block))
    total += len(compressor.flush())
    return total, "deflated deployed files"


# ---------------------------------------------------------------- parameters and MACs


def torch_parameters(module) -> tuple[int, int]:
    """(all, non-zero) parameter counts of a torch module."""
    total = nonzero = 0
    for p in module.parameters():
        total += p.numel()
        nonzero += int((p.detach() != 0).sum())
    return total, nonzero


def torch_macs(module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of the conv and linear layers in one forward pass, counted with hooks.

    The same rule as :func:`onnx_macs`, so torch and ONNX variants compare. (torch-pruning's
    ``count_ops_and_params`` charges a strided ConvTranspose stride² times its real work.)
    """
    import torch

    total = [0]

    def count(layer, inputs, output):
        weight = layer.weight
        if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd):
            total[0] += inputs[0].numel() * int(np.prod(weight.shape[1:]))
        elif isinstance(layer, torch.nn.modules.conv._ConvNd):
            total[0] += output.numel() * int(np.prod(weight.shape[1:]))
        else:
            total[0] += output.numel() * layer.in_features

    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            module(torch.zeros(tuple(input_shape)))
    finally:
        for hook in hooks:
            hook.remove()
    return int(total[0])


def onnx_parameters(path: Path) -> tuple[int, int]:
    """(all, non-zero) elements of an ONNX model's weight tensors (scalars such as scales left out)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    bookkeeping = _quantization_parameters(model.graph)
    total = nonzero = 0
    for tensor in model.graph.initializer:
        if len(tensor.dims) == 0 or int(np.prod(tensor.dims)) <= 1 or tensor.name in bookkeeping:
            continue
        values = numpy_helper.to_array(tensor)
        total += values.size
        nonzero += int(np.count_nonzero(values))
    for sparse in model.graph.sparse_initializer:
        total += int(np.prod(sparse.dims))
        nonzero += int(np.prod(sparse.values.dims))
    return total, nonzero


# Inputs that hold scales and zero points, not weights: per-channel int8 adds one per channel.
_QUANT_PARAMETER_INPUTS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
                           "QLinearConv": (1, 2, 4, 5, 6, 7), "ConvInteger": (2, 3),
                           "QLinearMatMul": (1, 2, 4, 5, 6, 7), "MatMulInteger": (2, 3)}


def _quantization_parameters(graph) -> set[str]:
    names = set()
    for node in graph.node:
        for index in _QUANT_PARAMETER_INPUTS.get(node.op_type, ()):
            if index < len(node.input):
                names.add(node.input[index])
    return names


def onnx_macs(path: Path, input_shape: Sequence[int]) -> int:
    """MACs of the Conv-family nodes (they are nearly all of a CNN's work) for one input shape."""
    import onnx

    model = onnx.load(str(path))
    _fix_input_shape(model, input_shape)
    shapes = _tensor_shapes(onnx.shape_inference.infer_shapes(model))
    macs = 0
    for node in model.graph.node:
        if node.op_type not in CONV_OPS:
            continue
        x_index, w_index = CONV_OPS[node.op_type]
        weight = shapes.get(node.input[w_index])
        spatial_shape = shapes.get(node.input[x_index] if node.op_type == "ConvTranspose" else node.output[0])
        if weight is None or spatial_shape is None:
            raise ValueError(f"{path}: cannot infer the shapes around {node.op_type} {node.name!r}")
        macs += int(np.prod(spatial_shape)) * _macs_per_element(node, weight)
    return macs


def _macs_per_element(node, weight: tuple[int, ...]) -> int:
    # Conv: per output (Cin/g · k); ConvTranspose: per input (Cout/g · k) — both weight[1:].
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return int(weight[1] if trans_b else weight[0])
    return int(np.prod(weight[1:]))


def _fix_input_shape(model, input_shape: Sequence[int]) -> None:
    initializers = {t.name for t in model.graph.initializer}
    graph_input = next(i for i in model.graph.input if i.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"the model takes {len(dims)}-D input, not {len(input_shape)}-D {tuple(input_shape)}")
    for dim, size in zip(dims, input_shape):
        dim.ClearField("dim_param")
        dim.dim_value = int(size)


def _tensor_shapes(model) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes.update({s.values.name: tuple(s.dims) for s in model.graph.sparse_initializer})
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes


def default_input_shape(card, whole_slice: int = 512) -> tuple[int, ...]:
    """One network input as the card describes it; a whole 2D slice of ``whole_slice`` pixels otherwise."""
    spec = card.input
    spatial = tuple(spec.patch_size) if spec.patch_size else (whole_slice,) * spec.dims
    return (1, spec.channels) + spatial


def shape_for(card, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with the channels ``card`` reads: a 2.5-D variant (``input.slice_context``) costs
    its neighbouring slices too, where its one-slice original reads one."""
    return (shape[0], card.input.channels) + tuple(shape[2:])


def static_cost(variant, name: str, input_shape: Sequence[int] | None = None) -> Cost:
    """Size, parameters and MACs of a variant (no timing)."""
    shape = tuple(input_shape or default_input_shape(variant.card))
    archive, kind = archive_size(variant)
    notes = []
    if variant.format == "onnx":
        params, nonzero = onnx_parameters(variant.main_file)
        macs = onnx_macs(variant.main_file, shape)
    else:
        from app.core.models import load_torch_module

        module = load_torch_module(variant)
        params, nonzero = torch_parameters(module)
        macs = torch_macs(module, shape)
    if nonzero < params:
        notes.append(f"{params - nonzero} zero weights: dense kernels still multiply them")
    return Cost(name, deployed_size(variant), [str(p) for p in deployed_files(variant)], archive, kind,
                params, nonzero, macs, notes=notes)


# ---------------------------------------------------------------- latency


def onnx_predictor(path: str | os.PathLike, threads: int | None = None,
                   providers: Sequence[str] = ("CPUExecutionProvider",)) -> tuple[Callable, str]:
    """A callable running one batch through an ONNX Runtime session set up as the app sets it up."""
    from compression.training import ort_session

    session = ort_session(path, threads, providers=providers)
    name = session.get_inputs()[0].name
    return (lambda batch: session.run(None, {name: batch})[0]), session.get_providers()[0]


def torch_predictor(module, threads: int | None = None, device: str = "cpu",
                    autocast: str | None = None) -> tuple[Callable, str]:
    """A callable running one batch through an eager torch module (optionally under bf16/fp16 autocast)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast or "")
    module = module.eval().to(device)

    def predict(batch: np.ndarray):
        if threads:
            torch.set_num_threads(int(threads))  # torch's pool is per process: set it before each run
        with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            out = module(torch.from_numpy(batch).to(device))
        # A GPU returns before its kernels finish: bringing the output home waits for them (and is
        # what the application pays), so a host clock around predict times the work, not the launch.
        return out if out.device.type == "cpu" else out.cpu()

    return predict, f"torch-{device}" + (f"-{autocast}" if autocast else "")


def torch_autocast_hint(variant) -> str | None:
    """"bf16" when the variant's card says it runs best as torch under bf16 autocast (the bf16 step)."""
    metrics = getattr(variant.card.lineage, "metrics", None) or {}
    hint = (metrics.get("compression") or {}).get("runtime_hint") or {}
    return hint.get("torch_autocast") if "weights" in variant.files else None


def variant_predictor(variant, device: str = "cpu", threads: int | None = None) -> tuple[Callable, str]:
    """How the application runs this variant: on the CPU its AOTInductor package when it carries one
    that may load (``app.core.inference.package_trusted``), ONNX Runtime for ONNX, torch (with its
    autocast hint) otherwise."""
    from app.core.inference import package_trusted

    if device == "cpu" and package_trusted(variant):
        from app.core.inference import AotiRunner

        runner = AotiRunner(variant, threads=threads)
        return runner.predict_batch, runner.provider
    autocast = torch_autocast_hint(variant)
    if autocast:
        from app.core.models import load_torch_module

        return torch_predictor(load_torch_module(variant.as_format("state_dict"), device), threads, device, autocast)
    if variant.format == "onnx":
        from app.core.inference import device_providers, resolve_providers
        import onnxruntime as ort

        providers = resolve_providers(device_providers(device), ort.get_available_providers())
        return onnx_predictor(variant.main_file, threads, providers)
    from app.core.models import load_torch_module

    return torch_predictor(load_torch_module(variant, device), threads, device)


def measure_latency(predictors: Mapping[str, Callable], batch: np.ndarray | Mapping[str, np.ndarray], *,
                    warmup: int = 2, rounds: int = 10) -> Generator[Progress, None, dict[str, LatencyStats]]:
    """Median latency per contender, measured in interleaved rounds in this one process.

    ``batch`` is every contender's input, or one per contender (by name: a 2.5-D variant reads
    more channels than its original). The first contender is the baseline every speed-up is
    relative to.
    """
    names = list(predictors)
    batches = {n: np.ascontiguousarray(batch[n] if isinstance(batch, Mapping) else batch, np.float32) for n in names}
    for _ in range(warmup):
        for name in names:
            predictors[name](batches[name])
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names:
            start = time.perf_counter()
            predictors[name](batches[name])
            samples[name].append((time.perf_counter() - start) * 1000.0)
        yield Progress((r + 1) / rounds, f"latency round {r + 1}/{rounds}")
    return _latency_stats(samples, names[0])


def _latency_stats(samples: dict[str, list[float]], baseline: str) -> dict[str, LatencyStats]:
    stats = {}
    for name, values in samples.items():
        p10, p90 = np.percentile(values, [10, 90])
        stats[name] = LatencyStats(statistics.median(values), float(p10), float(p90), len(values))
    for s in stats.values():
        s.speedup = stats[baseline].median_ms / s.median_ms
    return stats


# ---------------------------------------------------------------- peak memory


def peak_memory_mb(variant, input_shape: Sequence[int], threads: int | None = 1, timeout_s: float = 300) -> float:
    """Peak resident memory (MB) a fresh process adds by loading the variant and running one batch."""
    card_path = variant.card_path or variant.main_file
    command = [sys.executable, "-m", "compression.cost", "--memory-probe", str(card_path), variant.format,
               json.dumps(list(input_shape)), str(threads or 0)]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=root, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {card_path} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def _status_mb(field_name: str) -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _reset_peak_rss() -> None:
    # Importing torch peaks above what a small model needs; "5" resets the kernel's high-water mark.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def _memory_probe(card_path: str, fmt: str, shape_json: str, threads: str) -> dict:
    """Run in the child: import the runtimes first, so the figure is the model's, not the library's."""
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401

    from app.core.models import open_model

    variant = open_model(card_path, prefer=fmt)
    batch = np.zeros(tuple(json.loads(shape_json)), np.float32)
    _reset_peak_rss()
    before = _status_mb("VmRSS")
    predict, _ = variant_predictor(variant, "cpu", int(threads) or None)
    predict(batch)
    return {"peak_mb": _status_mb("VmHWM") - before}


# ---------------------------------------------------------------- all together


def compare_costs(variants: Sequence, names: Sequence[str], *, input_shape: Sequence[int] | None = None,
                  device: str = "cpu", threads: int | None = None, rounds: int = 10, warmup: int = 2,
                  memory: bool = True) -> Generator[Progress, None, list[Cost]]:
    """Size, parameters, MACs, side-by-side latency (and peak memory) of variants; the first is the
    baseline. Each reads ``input_shape`` with its own card's channels (:func:`shape_for`)."""
    shape = tuple(input_shape or default_input_shape(variants[0].card))
    shapes = [shape_for(variant.card, shape) for variant in variants]
    costs, predictors = [], {}
    for k, (variant, name) in enumerate(zip(variants, names)):
        yield Progress(0.2 * k / len(variants), f"sizing {name}")
        cost = static_cost(variant, name, shapes[k])
        predictors[name], cost.provider = variant_predictor(variant, device, threads)
        cost.threads = threads
        costs.append(cost)
    from app.core.progress import scaled

    batches = {name: np.zeros(s, np.float32) for name, s in zip(names, shapes)}
    latency = yield from scaled(measure_latency(predictors, batches, warmup=warmup, rounds=rounds), 0.2, 0.8, "")
    for k, cost in enumerate(costs):
        cost.latency = latency[cost.name]
        if memory:
            yield Progress(0.8 + 0.2 * k / len(costs), f"peak memory of {cost.name}")
            cost.peak_memory_mb = peak_memory_mb(variants[k], shapes[k], threads)
    return costs


def size_text(n_bytes: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{n_bytes} B"


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--memory-probe":
    print(json.dumps(_memory_probe(*sys.argv[2:])))
