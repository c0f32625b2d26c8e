"""int8 in torch: PT2E with torchao's X86InductorQuantizer, packaged ahead of time by AOTInductor.

Measured here: the PT2E int8 graph compiled by inductor (with freezing) ran a UNet 2.0× faster;
uncompiled it runs reference kernels and is *slower* than fp32, so it only counts once packaged
as a deployable artifact (an AOTInductor ``.pt2``, loaded by plain torch with
``torch._inductor.aoti_load_package``), with its compile and load times reported. The package is
compiled for one input shape. When torchao is not installed the step is skipped with the reason.

The variant carries the package beside its float files (role ``aoti_package``). The package is
compiled native code, so it runs only where this machine compiled it (the compile is recorded,
with the file's SHA-256, in the local audit log) or when the variant is opened with trust
(``main.py evaluate --trust``, ``main.py infer --trust``). Then, on the CPU, the int8 network is
what is judged and timed (``app.core.inference.AotiRunner``; slices larger than its input run
window by window). Otherwise, or on another device, the float files run.
"""
from __future__ import annotations

import time

from app.core.audit import append_audit
from app.core.models import sha256_file
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
    one slice of one size: the card's patch, else ``input_size`` pixels square, else the size of the
    calibration slices (the user's own scans). The int8 graph is exported for that size, so the
    calibration slices are edge-padded or cut to it first."""
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
    x = _to_size(x, _export_size(model.card, input_size, x.shape[2:]))
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
        record.update(_package(model, converted, example))
    model.metrics["int8_torch"] = record
    model.notes.append(f"torch int8 (PT2E, X86InductorQuantizer): mask Dice vs float on calibration slices "
                       f"{record['fidelity_dice_calib']:.4f}."
                       + (f" AOTInductor package for {record['package_input']} input: {record['package_bytes']} "
                          f"bytes, compiled in {record['compile_s']:.0f} s, loads in {record['load_s']:.2f} s. It is "
                          "what the variant runs on the CPU, on this machine or opened with trust (compiled native "
                          "code); elsewhere, or on another device, its float ONNX/weights run."
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


def _export_size(card, input_size: int | None, calib_size) -> tuple[int, ...]:
    if card.input.patch_size:
        return tuple(card.input.patch_size)
    return (input_size,) * card.input.dims if input_size else tuple(calib_size)


def _to_size(x, size):
    """(N, C, *spatial) cut, then edge-padded, at the far edges to ``size``."""
    from app.core.inference import crop_far, pad_far

    return pad_far(crop_far(x, size), size)


def _package(model: WorkingModel, converted, example) -> dict:
    import torch
    import torch._inductor.config as inductor_config

    path = model.scratch("model.int8.pt2")
    start = time.perf_counter()
    with torch.no_grad():
        inductor_config.freezing = True
        try:
            torch._inductor.aoti_compile_and_package(torch.export.export(converted, (example,)), package_path=str(path))
        finally:
            inductor_config.freezing = False
    compile_s = time.perf_counter() - start
    # The package is native code: the runners load it without trust only if this machine's audit
    # log says this machine compiled this very file (app.core.inference.package_trusted).
    append_audit("compile", kind="AOTInductor package", sha256=sha256_file(path), model=model.card.name,
                 path=str(path))
    start = time.perf_counter()
    torch._inductor.aoti_load_package(str(path))
    model.extra_files["aoti_package"] = path
    return {"package_bytes": path.stat().st_size, "package_input": list(example.shape), "compile_s": compile_s,
            "load_s": time.perf_counter() - start}
