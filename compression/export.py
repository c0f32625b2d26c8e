"""Export a torch model to the files a stock runtime loads, and prove the export is faithful.

ONNX is verified against torch on identical inputs with stated tolerances (MONAI's
``convert_to_onnx(verify=True)`` idea); TorchScript likewise. Helpers here also read ONNX graphs
for what compression claims: sparse storage, Conv shapes, and which Convs ONNX Runtime really
runs in int8 after its own graph optimisation.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from app.core.atomic import atomic_output

# fp32 torch vs ONNX Runtime / TorchScript on the same input: kernels sum in different orders.
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-3
OPSET = 17


class ExportError(RuntimeError):
    """An export does not reproduce its torch model within the stated tolerance."""


def example_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A fixed random input in the networks' [0, 1] intensity range."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@contextlib.contextmanager
def _quiet_export():
    """The tracer's warnings (constant shapes, deprecations) are about its own internals, not the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _dynamic_axes(rank: int, dynamic_spatial: bool) -> dict:
    axes = {0: "batch"}
    if dynamic_spatial:
        axes.update({i: f"dim{i}" for i in range(2, rank)})
    return {"image": axes, "logits": axes}


def export_onnx(module, path: str | os.PathLike, example_shape: tuple[int, ...], *, dynamic_spatial: bool = True,
                verify: bool = True, atol: float = ONNX_ATOL, rtol: float = ONNX_RTOL) -> dict:
    """Write ``module`` as ONNX (opset 17, input ``image``, output ``logits``) atomically.

    Returns the verification record {max_abs_diff, atol, rtol, input_shape}; raises ExportError
    when ONNX Runtime and torch disagree beyond ``atol + rtol·|torch|`` on the same input.
    """
    import torch

    module = module.eval()
    example = torch.from_numpy(example_input(example_shape))
    with atomic_output(path) as tmp, _quiet_export():
        torch.onnx.export(module, example, str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes=_dynamic_axes(len(example_shape), dynamic_spatial),
                          opset_version=OPSET, dynamo=False)
    if not verify:
        return {"verified": False}
    return verify_onnx(path, module, example.numpy(), atol, rtol)


def verify_onnx(path, module, x: np.ndarray, atol: float = ONNX_ATOL, rtol: float = ONNX_RTOL) -> dict:
    import torch

    from compression.training import ort_session

    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).float().numpy()
    session = ort_session(path)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    return _compare(expected, got, atol, rtol, f"{path}: ONNX Runtime", x.shape)


def _compare(expected: np.ndarray, got: np.ndarray, atol: float, rtol: float, what: str, shape) -> dict:
    if expected.shape != got.shape:
        raise ExportError(f"{what} gives shape {got.shape}, torch {expected.shape}")
    diff = np.abs(expected - got)
    worst = float(diff.max()) if diff.size else 0.0
    if not np.all(diff <= atol + rtol * np.abs(expected)):
        raise ExportError(f"{what} differs from torch by up to {worst:.3g} (tolerance {atol:g} + {rtol:g}·|torch|)")
    return {"verified": True, "max_abs_diff": worst, "atol": atol, "rtol": rtol, "input_shape": list(shape)}


def export_torchscript(module, path: str | os.PathLike, example_shape: tuple[int, ...], *, verify: bool = True,
                       atol: float = ONNX_ATOL, rtol: float = ONNX_RTOL) -> dict:
    """Trace ``module`` to TorchScript atomically and check the traced module on a fresh input."""
    import torch

    module = module.eval()
    example = torch.from_numpy(example_input(example_shape))
    with torch.inference_mode(), _quiet_export():
        traced = torch.jit.trace(module, example, check_trace=False)
    with atomic_output(path) as tmp, _quiet_export():
        torch.jit.save(traced, str(tmp))
    if not verify:
        return {"verified": False}
    other = torch.from_numpy(example_input(example_shape, seed=1))
    with _quiet_export():
        loaded = torch.jit.load(str(path))
    with torch.inference_mode():
        return _compare(module(other).float().numpy(), loaded(other).float().numpy(), atol, rtol,
                        f"{path}: TorchScript", tuple(other.shape))


# ---------------------------------------------------------------- reading graphs


def conv_weight_shapes(path) -> dict[str, tuple[int, ...]]:
    """Conv node name -> weight shape (dense or sparse initializer)."""
    import onnx

    model = onnx.load(str(path))
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    shapes.update({s.values.name: tuple(s.dims) for s in model.graph.sparse_initializer})
    return {n.name: shapes.get(n.input[1], ()) for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")}


def unused_prefix(graph, base: str, fill: str | None = None) -> str:
    """``base``, lengthened by ``fill`` (default: its last character) until no node input/output
    or initializer of ``graph`` starts with it: names made as prefix + anything cannot clash with
    the graph's own (or with those an earlier pass of the same rewrite added)."""
    taken = {i.name for i in graph.initializer} | {n for node in graph.node for n in (*node.input, *node.output)}
    prefix = base
    while any(name.startswith(prefix) for name in taken):
        prefix += fill or base[-1]
    return prefix


def op_counts(path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


QUANTIZED_CONV_OPS = ("QLinearConv", "ConvInteger")
FLOAT_CONV_OPS = ("Conv", "FusedConv", "NchwcConv")


def optimized_graph_ops(path, level: str = "extended") -> Counter:
    """Op types in the graph ONNX Runtime really runs after its optimisations (saved to a temp file)."""
    import tempfile

    from compression.training import ort_session

    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        ort_session(path, optimized_path=optimized, level=level)
        return op_counts(optimized)


def quantized_conv_share(path) -> dict:
    """How many 2D/3D convolutions ORT runs in int8 vs float in its optimised graph.

    ConvTranspose is counted apart: ORT's CPU provider has no int8 kernel for it, so it stays
    float whatever the quantizer does.
    """
    ops = optimized_graph_ops(path)
    quantized = sum(ops[o] for o in QUANTIZED_CONV_OPS)
    floating = sum(ops[o] for o in FLOAT_CONV_OPS)
    total = quantized + floating
    return {"quantized_convs": quantized, "float_convs": floating, "conv_transpose": ops["ConvTranspose"],
            "share": quantized / total if total else 0.0, "ops": dict(ops)}


# ---------------------------------------------------------------- sparse storage


# A sparse initializer stores each non-zero as its value plus an int64 index (ONNX Runtime
# accepts no narrower index type), so fp32 pays only when fewer than 1/3 of the values remain.
SPARSE_PAYS_ABOVE = 2.0 / 3.0


def sparse_storage_pays(sparsity: float, value_bytes: int = 4) -> bool:
    """nnz·(value + 8-byte index) < n·value  ⇔  sparsity > 8 / (value + 8): 2/3 for fp32, 8/9 for int8."""
    return sparsity > 8.0 / (value_bytes + 8.0)


def write_sparse_onnx(source, target, min_elements: int = 256) -> dict:
    """Rewrite weight initializers as ONNX sparse initializers where that makes the file smaller.

    ONNX Runtime densifies them at load, so this shrinks the file (download, disk), not the
    runtime memory, and not the latency. Returns {sparse_tensors, dense_tensors, nonzeros, total}.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    keep, sparse, stats = [], [], {"sparse_tensors": 0, "dense_tensors": 0, "nonzeros": 0, "total": 0}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        nz = np.flatnonzero(array.ravel())
        stats["nonzeros"] += len(nz)
        stats["total"] += array.size
        value_bytes = array.dtype.itemsize
        if array.size >= min_elements and array.dtype == np.float32 and sparse_storage_pays(1 - len(nz) / array.size, value_bytes):
            values = numpy_helper.from_array(array.ravel()[nz], init.name)
            indices = numpy_helper.from_array(nz.astype(np.int64), init.name + "_indices")
            sparse.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
            stats["sparse_tensors"] += 1
        else:
            keep.append(init)
            stats["dense_tensors"] += 1
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.sparse_initializer.extend(sparse)
    with atomic_output(target) as tmp:
        onnx.save(model, str(tmp))
    return stats


# ---------------------------------------------------------------- counting


def macs_and_params(module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """Multiply-accumulates and parameters of one forward pass at ``input_shape`` (torch-pruning's counter)."""
    import torch
    import torch_pruning as tp

    example = torch.zeros(input_shape)
    was_training = module.training
    module.eval()
    with torch.inference_mode():
        macs, params = tp.utils.count_ops_and_params(module, example)
    module.train(was_training)
    return int(macs), int(params)
