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
import functools
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
                      calib_slices: int = 16, reduce_range: bool = False, min_conv_share: float = 0.9,
                      bits: int = 8):
    """Quantize to int8 with ONNX Runtime; the result is the deployable ONNX of the variant.

    ``bits``: with ``mode="weights"``, 4 stores the weights as 4-bit indices into a 16-value
    codebook per tensor instead of int8 (half the bytes; see :func:`weights_only`).
    ``exclude``: layers kept in float, as torch module names (``model.0.conv``) or ONNX node names
    (e.g. the most sensitive layers from :mod:`compression.sensitivity`).
    """
    from onnxruntime.quantization import QuantType

    if mode not in ("static", "dynamic", "weights"):
        raise ValueError(f"mode must be 'static', 'dynamic' or 'weights', not {mode!r}")
    if bits not in (4, 8) or (bits == 4 and mode != "weights"):
        raise ValueError(f"bits must be 8, or 4 with mode 'weights' (4-bit weights, float compute); not {bits} "
                         f"with mode {mode!r}")
    if calibrate not in CALIBRATION_METHODS:
        raise ValueError(f"calibrate must be one of {', '.join(CALIBRATION_METHODS)}, not {calibrate!r}")
    source = float_onnx(model, "quantize_int8_ort")
    yield Progress(0.1, "float ONNX ready")
    prepared = _preprocess(source, model)
    excluded = _onnx_node_names(prepared, exclude, model)
    target = model.scratch("model.int8.onnx")
    common = dict(per_channel=per_channel, reduce_range=reduce_range, weight_type=getattr(QuantType, weight_type),
                  nodes_to_exclude=excluded, op_types_to_quantize=list(op_types))
    if mode == "dynamic":
        _dynamic(prepared, target, common)
    elif mode == "weights":
        quantized = weights_only(prepared, target, excluded, tuple(op_types), bits)
        yield Progress(0.7, f"{quantized} weight tensors stored in {bits} bits")
    else:
        yield Progress(0.2, f"calibrating ({calibrate}) on {calib_slices} calibration slices")
        _static(prepared, target, model, data, common, calibrate, percentile, activation_type, calib_slices)
    yield Progress(0.8, "checking what ONNX Runtime runs in int8")
    _check_and_report(model, data, source, target, mode, calibrate, excluded, min_conv_share,
                      activation_type, weight_type, per_channel, tuple(op_types), bits)
    model.onnx_path, model.module = target, None  # the float torch model no longer describes this variant
    model.storage = "dense"
    yield Progress(1.0, "int8 model ready")
    return model


def float_onnx(model: WorkingModel, step: str) -> Path:
    """The variant as ONNX for a step that works on the file (``step`` names it in the error):
    the one an earlier step wrote, else the torch model exported and verified."""
    if model.module is None:
        if model.onnx_path is None:
            raise ValueError(f"{step} needs a float torch model or ONNX model")
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
                      activation_type, weight_type, per_channel, op_types, bits=8) -> None:
    from compression.export import quantized_conv_share

    share = quantized_conv_share(target)
    fidelity = _fidelity(model, data, source, target)
    static = mode == "static"
    model.metrics["int8_ort"] = {"mode": mode, "calibrate": calibrate if static else None,
                                 "activation_type": activation_type if static else ("dynamic" if mode == "dynamic" else "float"),
                                 "weight_type": weight_type if bits == 8 else "codebook4", "weight_bits": bits,
                                 "per_channel": per_channel, "excluded": excluded,
                                 **{k: v for k, v in share.items() if k != "ops"}, "fidelity_dice_calib": fidelity}
    if mode == "weights" and bits == 4:
        model.notes.append(
            f"4-bit weights only: every {'/'.join(op_types)} weight is stored as 4-bit indices into a 16-value "
            f"codebook (scaled per output channel; the weights' own values where they lie on 16 or fewer, as "
            f"after quantization-aware training, else k-means) and decoded to float in the graph by standard "
            f"operators; ONNX Runtime folds them at load and computes in float, at the float model's speed. "
            f"Mask Dice vs the float model on calibration slices {fidelity:.4f}.")
    elif mode == "weights":
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


def weights_only(source: Path, target: Path, exclude=(), op_types=("Conv", "ConvTranspose"), bits: int = 8) -> int:
    """Rewrite ``source`` so that each weight of ``op_types`` is stored in ``bits`` bits per weight and
    decoded to float inside the graph; returns how many tensors were rewritten.

    - 8: an int8 initializer (symmetric, one scale per output channel) feeding a DequantizeLinear.
    - 4: two 4-bit indices per byte into a 16-value codebook of the tensor (k-means on the weights
      scaled to [-1, 1] per output channel, as in Deep Compression's weight sharing), times the
      channel's scale. Stock opset-13 operators decode it (Cast, Div, Mod, Gather, Mul); ONNX
      Runtime folds them into float constants when it loads the file, so the model computes in
      float at the float model's speed, from a file with half the bytes of the int8 one.

    Conv weights are (out, in/groups, ...) — channel axis 0; ConvTranspose weights are
    (in, out/groups, ...) — axis 1. A weight several nodes share (the candidate filter runs one
    net on four flipped views) is decoded once, when all its users are of one such type."""
    import onnx
    from onnx import numpy_helper

    from app.core.atomic import atomic_output

    from compression.export import unused_prefix

    if bits not in (4, 8):
        raise ValueError(f"weights are stored in 8 or 4 bits, not {bits}")
    graph_model = onnx.load(str(source))
    graph = graph_model.graph
    if bits == 4 and _default_opset(graph_model) < 13:
        raise ValueError(f"4-bit weights need ONNX opset 13 or later; {source.name} uses "
                         f"{_default_opset(graph_model)}")
    graph_inputs = {i.name for i in graph.input}
    initializers = {init.name: init for init in graph.initializer if init.name not in graph_inputs}
    _fold_weight_identities(graph, initializers)
    _fold_weight_dequantization(graph, initializers)
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    prefix = unused_prefix(graph, "q")  # q, qq, …: e.g. a graph 4-bit weights were written into before
    sixteen = f"{prefix}_sixteen"  # one constant for every 4-bit tensor's decoding
    encode = _int8_weight if bits == 8 else functools.partial(_codebook4_weight, sixteen=sixteen)
    new_nodes, count, done = [], 0, set()
    for node in graph.node:
        weight = node.input[1] if len(node.input) > 1 else None
        if (node.op_type in op_types and weight in initializers and weight not in done
                and all(u.op_type == node.op_type and u.name not in exclude and list(u.input).index(weight) == 1
                        for u in users[weight])):
            done.add(weight)
            w = numpy_helper.to_array(initializers[weight]).astype(np.float32)
            graph.initializer.remove(initializers[weight])
            stored, nodes = encode(weight, w, 1 if node.op_type == "ConvTranspose" else 0, f"{prefix}{count}_")
            graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in stored.items())
            new_nodes.extend(nodes)
            count += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if bits == 4 and count:
        graph.initializer.append(numpy_helper.from_array(np.array(16, np.int32), sixteen))
    with atomic_output(target) as tmp:
        onnx.save(graph_model, str(tmp))
    return count


def _default_opset(graph_model) -> int:
    return next((o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _channel_scale(w: np.ndarray, axis: int, levels: float) -> tuple[np.ndarray, list[int]]:
    """Per-channel symmetric scale (max |w| / levels) and the shape that broadcasts it over ``w``."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    return (np.maximum(np.abs(w).max(axis=reduce), 1e-12) / levels).astype(np.float32), shape


def _int8_weight(name: str, w: np.ndarray, axis: int, tag: str):
    from onnx import helper

    scale, shape = _channel_scale(w, axis, 127.0)
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    stored = {f"{name}_int8": q, f"{name}_scale": scale, f"{name}_zero": np.zeros_like(scale, np.int8)}
    return stored, [helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [name],
                                     name=f"{name}_dequantize", axis=axis)]


def _codebook4_weight(name: str, w: np.ndarray, axis: int, tag: str, sixteen: str):
    """16-value codebook + packed 4-bit indices, decoded by stock operators (see :func:`weights_only`).

    Names are short (``tag``: q0_, q1_, …, a prefix no other tensor starts with; the last output
    keeps the weight's name) and the constant 16 (``sixteen``) is one tensor for all: on a 240 kB
    student the decoding graph must not cost what the nibbles save."""
    from onnx import TensorProto, helper

    from compression.steps.cluster_weights import pack_nibbles

    scale, shape = _channel_scale(w, axis, 1.0)
    codebook, index = _codebook16(w / scale.reshape(shape))
    broadcast = np.ones(w.ndim, np.int64)
    broadcast[axis] = len(scale)
    t = lambda suffix: f"{tag}{suffix}"  # noqa: E731 - this weight's decoding tensors
    stored = {t("n"): pack_nibbles(index).reshape(-1, 1), t("k"): codebook, t("s"): scale.reshape(broadcast),
              t("w"): np.array(w.shape, np.int64)}
    nodes = [helper.make_node("Cast", [t("n")], [t("i")], to=TensorProto.INT32),
             helper.make_node("Mod", [t("i"), sixteen], [t("l")]),
             helper.make_node("Div", [t("i"), sixteen], [t("h")]),
             helper.make_node("Concat", [t("l"), t("h")], [t("p")], axis=1),  # (bytes, 2): low nibble first
             helper.make_node("Gather", [t("k"), t("p")], [t("v")])]
    if index.size % 2:  # the last byte's high nibble is padding
        stored.update({t("f"): np.array([-1], np.int64), t("0"): np.array([0], np.int64),
                       t("c"): np.array([index.size], np.int64)})
        nodes += [helper.make_node("Reshape", [t("v"), t("f")], [t("a")]),
                  helper.make_node("Slice", [t("a"), t("0"), t("c")], [t("b")])]
    nodes += [helper.make_node("Reshape", [nodes[-1].output[0], t("w")], [t("u")]),
              helper.make_node("Mul", [t("u"), t("s")], [name], name=f"{tag}decode4")]
    return stored, nodes


def _codebook16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16 shared values and each value's index: the values themselves when there are at most 16
    (weights trained on a grid, e.g. quantization-aware distillation: stored exactly), else 1-D
    k-means."""
    from compression.steps.cluster_weights import kmeans_1d

    flat = values.ravel()
    distinct, index = np.unique(np.round(flat, 5), return_inverse=True)
    if len(distinct) <= 16:
        codebook = np.zeros(16, np.float32)
        codebook[:len(distinct)] = [flat[index == i].mean() for i in range(len(distinct))]
        return codebook, index.astype(np.uint8)
    return kmeans_1d(flat, 16)


def _fold_weight_dequantization(graph, initializers: dict) -> None:
    """Weights already stored in int8 (a DequantizeLinear of initializers) become float initializers
    again, so they can be stored anew (e.g. an int8 candidate filter re-stored in 4 bits)."""
    from onnx import numpy_helper

    graph_outputs = {o.name for o in graph.output}
    folded = []
    for node in graph.node:
        if (node.op_type == "DequantizeLinear" and all(name in initializers for name in node.input)
                and node.output[0] not in graph_outputs):
            q, scale, *zero = (numpy_helper.to_array(initializers[name]) for name in node.input)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            zero = zero[0].astype(np.float32).reshape(shape) if zero else 0.0
            weight = ((q.astype(np.float32) - zero) * scale.reshape(shape)).astype(np.float32)
            initializers[node.output[0]] = numpy_helper.from_array(weight, node.output[0])
            graph.initializer.append(initializers[node.output[0]])
            folded.append(node)
    if not folded:
        return
    for node in folded:
        graph.node.remove(node)
    still_read = {name for node in graph.node for name in node.input}
    for node in folded:
        for name in node.input:
            if name not in still_read and name in initializers:
                graph.initializer.remove(initializers.pop(name))


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
