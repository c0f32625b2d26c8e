"""Half precision: fp16 ONNX for GPUs (inputs and outputs stay float32), bf16 torch for CPUs that have it.

Measured and said plainly: ONNX Runtime's CPU provider has no fp16 convolution kernels on x86,
so an fp16 model runs there as fp32 between casts (no faster, sometimes slower); fp16 halves the
file and pays on a GPU. bf16 autocast pays on CPUs with native bf16 (AVX-512 BF16 / AMX); the
step measures the speed ratio on this machine and records it.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from app.core.progress import Progress

from compression.pipeline import StepData, StepError, WorkingModel, cpu_flags


MIN_FP16_FIDELITY = 0.9   # mask Dice vs fp32 below which the fp16 model is refused


def half_precision(model: WorkingModel, data: StepData, *, precision: str = "fp16", keep_io_types: bool = True,
                   measure: bool = True, measure_size: int = 256, repeats: int = 5):
    """``precision``: "fp16" (ONNX, the variant's deployable file) or "bf16" (torch weights + autocast)."""
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"precision must be 'fp16' or 'bf16', not {precision!r}")
    if precision == "fp16":
        yield from _fp16(model, data, keep_io_types, measure, measure_size, repeats)
    else:
        yield from _bf16(model, data, measure, measure_size, repeats)
    yield Progress(1.0, f"{precision} ready")
    return model


def _calibration_slices(model: WorkingModel, data: StepData, count: int = 8) -> np.ndarray:
    split = "calib" if data.calib else ("train" if data.train else None)
    if split is None:
        from compression.export import example_input

        return example_input(model.example_shape)
    return data.slices(split, model.card, with_labels=False, max_slices=count)[0]


def _fp16(model, data, keep_io_types, measure, size, repeats):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from compression.steps.quantize_ort import float_onnx
    from compression.training import mask_dice, masks_from_logits, onnx_logits

    source = float_onnx(model, "half_precision")
    yield Progress(0.2, "float ONNX ready")
    half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=keep_io_types)
    sort_graph_topologically(half.graph)   # the converter appends its output Casts last
    onnx.checker.check_model(half)
    target = model.scratch("model.fp16.onnx")
    onnx.save(half, str(target))
    x = _calibration_slices(model, data)
    reference, got = onnx_logits(source, x), onnx_logits(target, x)
    record = {"precision": "fp16", "keep_io_types": keep_io_types, "max_abs_logit_diff": float(np.abs(reference - got).max()),
              "fidelity_dice_calib": mask_dice(masks_from_logits(reference), masks_from_logits(got)),
              "file_bytes_fp32": source.stat().st_size, "file_bytes_fp16": target.stat().st_size}
    if record["fidelity_dice_calib"] < MIN_FP16_FIDELITY:
        # A half-precision model that no longer finds what the fp32 one found (overflow past
        # 65504, or an op the converter mishandles) must not be written as a variant.
        raise StepError(
            f"fp16 changed the model's masks (Dice {record['fidelity_dice_calib']:.3f} vs fp32 on "
            f"calibration slices, max logit change {record['max_abs_logit_diff']:.3g}); no fp16 "
            f"variant was written. Keep this model in fp32 or bf16.")
    if measure:
        yield Progress(0.6, "timing fp32 vs fp16 in ONNX Runtime (CPU)")
        record["cpu_speed_ratio_fp16_vs_fp32"] = _onnx_speed_ratio(source, target, model, size, repeats)
    model.metrics["half_precision"] = record
    model.onnx_path, model.module = target, None
    model.notes.append(
        f"fp16 ONNX (inputs/outputs kept float32): file {record['file_bytes_fp32']} → {record['file_bytes_fp16']} bytes, "
        f"max logit change {record['max_abs_logit_diff']:.2g}, mask Dice vs fp32 {record['fidelity_dice_calib']:.4f}. "
        "It is meant for GPUs: ONNX Runtime's CPU provider runs fp16 convolutions as fp32 between casts"
        + (f" (measured ×{record['cpu_speed_ratio_fp16_vs_fp32']:.2f} speed here)." if measure else "."))


def sort_graph_topologically(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs, as the
    ONNX checker (and so our runners) require; ONNX Runtime itself would run either order."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError("the fp16 graph has a cycle or an input nothing produces")
        for node in ready:
            available.update(node.output)
            ordered.append(node)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _onnx_speed_ratio(source, target, model, size, repeats) -> float:
    """fp32 time / fp16 time on one slice, sessions side by side in this process (> 1: fp16 faster)."""
    from compression.export import example_input
    from compression.training import ort_session

    shape = (1, model.card.input.channels, size, size)
    x = example_input(shape)
    sessions = [ort_session(p) for p in (source, target)]
    seconds = [_median_seconds(lambda s=s: s.run(None, {s.get_inputs()[0].name: x}), repeats) for s in sessions]
    return seconds[0] / seconds[1]


def _bf16(model, data, measure, size, repeats):
    import torch

    from compression.pipeline import _module_fits_architecture
    from compression.training import mask_dice, masks_from_logits, predict_logits

    module = model.require_module("half_precision bf16")
    if not _module_fits_architecture(model):
        model.skipped.append(("<network>", "bf16 is deployed as a state_dict of the card's architecture; "
                                           "this model no longer fits it (e.g. after channel pruning)"))
        model.notes.append("bf16 skipped: the model no longer fits its card's architecture; it stays fp32.")
        return
    x = _calibration_slices(model, data)
    reference = predict_logits(module, x)
    # The weights themselves are rounded to bf16, so fidelity is measured on what will be deployed.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    got = predict_logits(module, x, amp="bf16")
    native = bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))
    record = {"precision": "bf16", "native_bf16_cpu": native,
              "fidelity_dice_calib": mask_dice(masks_from_logits(reference), masks_from_logits(got)),
              "max_abs_logit_diff": float(np.abs(reference - got).max())}
    if measure:
        yield Progress(0.5, "timing fp32 vs bf16 autocast (torch, CPU)")
        record["cpu_speed_ratio_bf16_vs_fp32"] = _torch_speed_ratio(module, model, size, repeats)
    model.metrics["half_precision"] = record
    model.weights_dtype, model.deploy = "bfloat16", "torch"
    model.runtime_hint = {"torch_autocast": "bf16"}
    model.notes.append(
        f"bf16: weights stored as bfloat16 (half the file), run with torch autocast bf16; mask Dice vs fp32 "
        f"{record['fidelity_dice_calib']:.4f}"
        + (f"; measured ×{record['cpu_speed_ratio_bf16_vs_fp32']:.2f} speed on this CPU" if measure else "")
        + ("." if native else "; this CPU has no native bf16, so expect no speed-up."))
    yield Progress(0.9, "bf16 weights ready")


def _torch_speed_ratio(module, model, size, repeats) -> float:
    import torch

    from compression.export import example_input

    x = torch.from_numpy(example_input((1, model.card.input.channels, size, size)))

    def run(amp: bool):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            module(x)

    fp32 = _median_seconds(lambda: run(False), repeats)
    bf16 = _median_seconds(lambda: run(True), repeats)
    return fp32 / bf16
