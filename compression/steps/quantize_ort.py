"""int8 post-training quantization through ONNX Runtime: dynamic, or static QDQ calibrated on the user's scans.

What pays on a CPU (measured here): static QDQ, per-channel int8 weights, **uint8** activations;
ONNX Runtime then fuses each DequantizeLinear→Conv→QuantizeLinear into one QLinearConv. Its
default settings left most UNet Convs in float (no speed-up) and dynamic int8 weights ran 3×
*slower*; the step checks the optimised graph and says how many Convs really run in int8.
ConvTranspose has no int8 CPU kernel: its weights are still stored in int8 (DequantizeLinear
feeds a float ConvTranspose), which made the demo UNet's file 31 % smaller for +2 % latency.

``mode="weights"`` stores only the weights in int8 (per output channel, symmetric) behind a
DequantizeLinear, and computes in float: the file is about 4× smaller and the speed is the float
model's. For narrow networks (pruned or distilled) static int8 is *slower* than float here — the
quantize/dequantize work no longer hides behind small convolutions — so this is what pays there.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from app.core.progress import Progress

from compression.pipeline import StepData, WorkingModel

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class _SliceReader:
    """Feeds calibration slices one at a time (the CalibrationDataReader protocol)."""

    def __init__(self, input_name: str, x: np.ndarray):
        self._items = iter([{input_name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self._items, None)

    def rewind(self):  # the protocol asks for it; one pass is all a calibrator needs here
        pass


def quantize_int8_ort(model: WorkingModel, data: StepData, *, mode: str = "static", per_channel: bool = True,
                      calibrate: str = "minmax", percentile: float = 99.999, exclude: list | tuple = (),
                      activation_type: str = "QUInt8", weight_type: str = "QInt8",
                      op_types: list | tuple = ("Conv", "ConvTranspose"),
                      calib_slices: int = 16, reduce_range: bool = False, min_conv_share: float = 0.9):
    """Quantize to int8 with ONNX Runtime; the result is the deployable ONNX of the variant.

    ``exclude``: layers kept in float, as torch module names (``model.0.conv``) or ONNX node names
    (e.g. the most sensitive layers from :mod:`compression.sensitivity`).
    """
    from onnxruntime.quantization import QuantType

    if mode not in ("static", "dynamic", "weights"):
        raise ValueError(f"mode must be 'static', 'dynamic' or 'weights', not {mode!r}")
    if calibrate not in CALIBRATION_METHODS:
        raise ValueError(f"calibrate must be one of {', '.join(CALIBRATION_METHODS)}, not {calibrate!r}")
    source = _float_onnx(model)
    yield Progress(0.1, "float ONNX ready")
    prepared = _preprocess(source, model)
    excluded = _onnx_node_names(prepared, exclude, model)
    target = model.scratch("model.int8.onnx")
    common = dict(per_channel=per_channel, reduce_range=reduce_range, weight_type=getattr(QuantType, weight_type),
                  nodes_to_exclude=excluded, op_types_to_quantize=list(op_types))
    if mode == "dynamic":
        _dynamic(prepared, target, common)
    elif mode == "weights":
        quantized = int8_weights_only(prepared, target, excluded, tuple(op_types))
        yield Progress(0.7, f"{quantized} weight tensors stored in int8")
    else:
        yield Progress(0.2, f"calibrating ({calibrate}) on {calib_slices} calibration slices")
        _static(prepared, target, model, data, common, calibrate, percentile, activation_type, calib_slices)
    yield Progress(0.8, "checking what ONNX Runtime runs in int8")
    _check_and_report(model, data, source, target, mode, calibrate, excluded, min_conv_share,
                      activation_type, weight_type, per_channel, tuple(op_types))
    model.onnx_path, model.module = target, None  # the float torch model no longer describes this variant
    model.storage = "dense"
    yield Progress(1.0, "int8 model ready")
    return model


def _float_onnx(model: WorkingModel) -> Path:
    if model.module is None:
        if model.onnx_path is None:
            raise ValueError("quantize_int8_ort needs a float torch model or ONNX model")
        return model.onnx_path
    from compression.export import export_onnx

    path = model.scratch("float.onnx")
    model.metrics["float_onnx_verification"] = export_onnx(model.module, path, model.example_shape)
    return path


def _preprocess(source: Path, model: WorkingModel) -> Path:
    """ORT's recommended pre-pass (shape inference, graph clean-up); the float model if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = model.scratch("float.pre.onnx")
    try:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
        return target
    except Exception as exc:  # the pre-pass is an optimisation, never a reason to fail
        model.notes.append(f"ORT's quantization pre-processing failed ({type(exc).__name__}); quantized the export as is.")
        return source


def _onnx_node_names(path: Path, exclude, model: WorkingModel) -> list[str]:
    """Map torch layer names (via their ``.weight`` initializer) or node names to ONNX node names."""
    import onnx

    graph = onnx.load(str(path)).graph
    by_node = {n.name for n in graph.node}
    by_weight = {n.input[1]: n.name for n in graph.node if len(n.input) > 1}
    names = []
    for layer in exclude:
        node = layer if layer in by_node else by_weight.get(f"{layer}.weight")
        if node is None:
            model.skipped.append((layer, "asked to exclude it from quantization, but the ONNX graph has no such layer"))
        else:
            names.append(node)
    return names


def _dynamic(prepared: Path, target: Path, common: dict) -> None:
    from onnxruntime.quantization import quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(str(prepared), str(target), **common)


def _static(prepared, target, model, data, common, calibrate, percentile, activation_type, calib_slices) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from compression.training import ort_session

    split = "calib" if data.calib else "train"
    if split == "train":
        model.notes.append("No calibration scans were given; calibrated on the train scans instead.")
    x, _ = data.slices(split, model.card, with_labels=False, max_slices=calib_slices)
    reader = _SliceReader(ort_session(prepared).get_inputs()[0].name, x)
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibrate]
    extra = {"CalibPercentile": percentile} if calibrate == "percentile" else {}
    with _quiet_quantizer():
        quantize_static(str(prepared), str(target), reader, quant_format=QuantFormat.QDQ,
                        activation_type=getattr(QuantType, activation_type), calibrate_method=method,
                        extra_options=extra, **common)


@contextlib.contextmanager
def _quiet_quantizer():
    """ORT's quantizer prints calibration progress and logs a warning per parameter-free norm to the
    root logger ("Expected bias ... to be an initializer"); neither is news to the user."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _check_and_report(model, data, source, target, mode, calibrate, excluded, min_conv_share,
                      activation_type, weight_type, per_channel, op_types) -> None:
    from compression.export import quantized_conv_share

    share = quantized_conv_share(target)
    fidelity = _fidelity(model, data, source, target)
    static = mode == "static"
    model.metrics["int8_ort"] = {"mode": mode, "calibrate": calibrate if static else None,
                                 "activation_type": activation_type if static else ("dynamic" if mode == "dynamic" else "float"),
                                 "weight_type": weight_type, "per_channel": per_channel, "excluded": excluded,
                                 **{k: v for k, v in share.items() if k != "ops"}, "fidelity_dice_calib": fidelity}
    if mode == "weights":
        model.notes.append(
            f"int8 weights only: every {'/'.join(op_types)} weight is stored in int8 (per output channel) and "
            f"dequantized to float in the graph; ONNX Runtime computes in float, at the float model's speed. "
            f"Mask Dice vs the float model on calibration slices {fidelity:.4f}.")
    else:
        model.notes.append(
            f"int8 ({mode}{', ' + calibrate if static else ''}): ONNX Runtime runs {share['quantized_convs']} of "
            f"{share['quantized_convs'] + share['float_convs']} Convs in int8 ({share['share']:.0%}); "
            f"{share['conv_transpose']} ConvTranspose run in float (no int8 CPU kernel"
            f"{'; weights stored int8' if 'ConvTranspose' in op_types else ''}); "
            f"mask Dice vs the float model on calibration slices {fidelity:.4f}.")
    if excluded:
        model.notes.append(f"{len(excluded)} layer(s) kept in float on purpose: {', '.join(excluded)}.")
    if mode != "weights" and share["share"] < min_conv_share:
        model.notes.append(f"Fewer than {min_conv_share:.0%} of the Convs run in int8: expect little or no speed-up.")
    if mode == "dynamic":
        model.notes.append("Dynamic int8 quantizes activations at run time; on CPUs it is often slower than float "
                           "for convolutions (measured 3× slower here); prefer static.")


def int8_weights_only(source: Path, target: Path, exclude=(), op_types=("Conv", "ConvTranspose")) -> int:
    """Rewrite ``source`` so that each weight of ``op_types`` is an int8 initializer (symmetric,
    one scale per output channel) feeding a DequantizeLinear; returns how many were rewritten.
    Conv weights are (out, in/groups, ...) — channel axis 0; ConvTranspose weights are
    (in, out/groups, ...) — axis 1. A weight several nodes share (the candidate filter runs one
    net on four flipped views) is dequantized once, when all its users are of one such type."""
    import onnx
    from onnx import helper, numpy_helper

    from app.core.atomic import atomic_output

    graph_model = onnx.load(str(source))
    graph = graph_model.graph
    graph_inputs = {i.name for i in graph.input}
    initializers = {init.name: init for init in graph.initializer if init.name not in graph_inputs}
    _fold_weight_identities(graph, initializers)
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    new_nodes, count, done = [], 0, set()
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else None
        if (node.op_type in op_types and weight in initializers and weight not in done
                and all(u.op_type == node.op_type and u.name not in exclude and list(u.input).index(weight) == 1
                        for u in users[weight])):
            done.add(weight)
            w = numpy_helper.to_array(initializers[weight]).astype(np.float32)
            axis = 1 if node.op_type == "ConvTranspose" else 0
            reduce = tuple(i for i in range(w.ndim) if i != axis)
            scale = np.maximum(np.abs(w).max(axis=reduce), 1e-12) / 127.0
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            graph.initializer.remove(initializers[weight])
            graph.initializer.extend([numpy_helper.from_array(q, f"{weight}_int8"),
                                      numpy_helper.from_array(scale.astype(np.float32), f"{weight}_scale"),
                                      numpy_helper.from_array(np.zeros_like(scale, np.int8), f"{weight}_zero")])
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{weight}_int8", f"{weight}_scale", f"{weight}_zero"],
                                              [weight], name=f"{weight}_dequantize", axis=axis))
            count += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    with atomic_output(target) as tmp:
        onnx.save(graph_model, str(tmp))
    return count


def _fold_weight_identities(graph, initializers: dict) -> None:
    """Let nodes read an initializer directly where the torch exporter put an Identity between
    (it does for weights one module shares across calls, e.g. the filter's four views)."""
    graph_outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in initializers and n.output[0] not in graph_outputs}
    if not alias:
        return
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)


def _fidelity(model, data, source, target) -> float:
    """Dice between the float and int8 models' masks on the calibration slices."""
    from compression.training import mask_dice, masks_from_logits, onnx_logits

    split = "calib" if data.calib else "train"
    x, _ = data.slices(split, model.card, with_labels=False, max_slices=16)
    return mask_dice(masks_from_logits(onnx_logits(source, x)), masks_from_logits(onnx_logits(target, x)))
