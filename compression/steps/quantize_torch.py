"""int8 in torch: PT2E with torchao's X86InductorQuantizer, packaged ahead of time by AOTInductor.

Measured here: the PT2E int8 graph compiled by inductor (with freezing) ran a UNet 2.0× faster;
uncompiled it runs reference kernels and is *slower* than fp32, so it only counts once packaged
as a deployable artifact (an AOTInductor ``.pt2``, loaded by plain torch with
``torch._inductor.aoti_load_package``), with its compile and load times reported. The package is
compiled for one input shape. When torchao is not installed the step is skipped with the reason.

MedCompress's runners cannot run a ``.pt2`` yet, so the variant keeps its float files to run
and carries the package beside them (role ``aoti_package``); the notes say so.
"""
from __future__ import annotations

import time

from app.core.progress import Progress

from compression.pipeline import StepData, WorkingModel


def _torchao():
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except Exception as exc:  # not installed, or built for another torch
        return None, f"{type(exc).__name__}: {exc}"
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config())
    return (prepare_pt2e, convert_pt2e, quantizer), None


def quantize_int8_torch(model: WorkingModel, data: StepData, *, calib_slices: int = 16, package: bool = True,
                        input_size: int | None = None):
    """PT2E static int8 calibrated on the calib scans; with ``package``, an AOTInductor package for
    one slice of ``input_size`` (default: the card's patch, else 512) pixels square."""
    import torch

    module = model.require_module("quantize_int8_torch")
    tools, problem = _torchao()
    if tools is None:
        model.skipped.append(("<network>", f"torchao is not available ({problem})"))
        model.notes.append("torch int8 (PT2E) skipped: torchao is not installed; use quantize_int8_ort.")
        return model
    prepare_pt2e, convert_pt2e, quantizer = tools
    split = "calib" if data.calib else "train"
    x, _ = data.slices(split, model.card, with_labels=False, max_slices=calib_slices)
    example = torch.from_numpy(x[:1])
    exported = torch.export.export(module.eval(), (example,)).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(len(x)):
            prepared(torch.from_numpy(x[i:i + 1]))
    converted = convert_pt2e(prepared)
    yield Progress(0.4, "int8 graph calibrated")
    record = {"fidelity_dice_calib": _fidelity(module, converted, x)}
    if package:
        yield Progress(0.45, "compiling the AOTInductor package (minutes on a small CPU)")
        record.update(_package(model, converted, input_size))
    model.metrics["int8_torch"] = record
    model.notes.append(f"torch int8 (PT2E, X86InductorQuantizer): mask Dice vs float on calibration slices "
                       f"{record['fidelity_dice_calib']:.4f}."
                       + (f" AOTInductor package for {record['package_input']} input: {record['package_bytes']} bytes, "
                          f"compiled in {record['compile_s']:.0f} s, loads in {record['load_s']:.2f} s. The variant's "
                          "ONNX/weights stay float (our runners cannot run a .pt2 yet); the package is the int8 artifact."
                          if package else " No package was built, so nothing deployable runs in int8."))
    yield Progress(1.0, "torch int8 done")
    return model


def _fidelity(module, converted, x) -> float:
    import torch

    from compression.training import mask_dice, masks_from_logits

    with torch.no_grad():
        ref = [module(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))]
        got = [converted(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))]
    import numpy as np

    return mask_dice(masks_from_logits(np.concatenate(ref)), masks_from_logits(np.concatenate(got)))


def _package(model: WorkingModel, converted, input_size: int | None) -> dict:
    import torch
    import torch._inductor.config as inductor_config

    spec = model.card.input
    spatial = tuple(spec.patch_size) if spec.patch_size else (input_size or 512,) * spec.dims
    example = torch.zeros((1, spec.channels) + spatial)
    path = model.scratch("model.int8.pt2")
    start = time.perf_counter()
    with torch.no_grad():
        inductor_config.freezing = True
        try:
            torch._inductor.aoti_compile_and_package(torch.export.export(converted, (example,)), package_path=str(path))
        finally:
            inductor_config.freezing = False
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    torch._inductor.aoti_load_package(str(path))
    model.extra_files["aoti_package"] = path
    return {"package_bytes": path.stat().st_size, "package_input": list(example.shape), "compile_s": compile_s,
            "load_s": time.perf_counter() - start}
