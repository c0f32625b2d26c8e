"""Calibrate a compressed segmenter's output to the original's (label-free), in the ONNX file.

A distilled or quantized network can rank pixels much as the original does and still be less
sure of them: on the demo UNet, a 0.35-width student gave a mean foreground probability of 0.41
inside a 12 mm nodule the original marks at 0.97. Its mask then covers half the nodule, the
lesion clean-up drops the piece as too small, and the candidate filter — which reads the
segmentation's probability map as one of its inputs — scores the weaker map lower. The nodule
is lost although the network saw it.

This step fits two numbers on the calib slices, with no labels: a scale ``a`` and a shift ``b``
of the foreground-minus-background logit, so that sigmoid(a·d + b) matches the original's
foreground probability (binary cross-entropy against the original's soft output, pixels the
original calls lesion weighted ``foreground_weight`` times; Platt scaling with the original as
the reference). The weight sets the trade: on the demo UNet's 0.35-width student (40 whole
eval scans, bench/README.md) ×3 kept Dice (0.851 against 0.856 uncalibrated, the original's
0.854) and the original's false-positive rate while losing none of the original's nodules ≥
6 mm (3 before); ×10 and ×30 found more but grew every mask (Dice 0.810 and 0.778). It writes them into the variant's ONNX
file as one Mul and one Add after the logits (``logits·a + [−b/2, +b/2]``, exact for a
two-class softmax), so any runtime reproduces them; a few thousand operations on a 512×512
slice's two output maps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Generator

import numpy as np

from app.core.progress import Progress

from compression.pipeline import StepData, StepError, WorkingModel


def calibrate_output(model: WorkingModel, data: StepData, *, foreground_weight: float = 3.0,
                     calib_slices: int = 400) -> Generator[Progress, None, WorkingModel]:
    """Fit and write the logit scale and shift that bring this variant's foreground probability
    to the original's on the calib slices (see the module's docstring)."""
    from compression.steps._common import teacher_logits
    from compression.steps.quantize_ort import float_onnx
    from compression.training import lesion_on_slice, onnx_logits

    if model.card.task != "segmentation" or model.card.output_activation != "softmax" or len(model.card.labels) != 2:
        raise StepError("calibrate_output needs a two-class softmax segmentation model "
                        f"({model.card.name} is {model.card.task}, {model.card.output_activation}, "
                        f"{len(model.card.labels)} labels)")
    if not data.calib:
        raise StepError("calibrate_output needs calib scans: it fits the variant to the original on them")
    if foreground_weight < 1:
        raise ValueError(f"foreground_weight must be at least 1, not {foreground_weight}")
    source = float_onnx(model, "calibrate_output")
    yield Progress(0.05, "reading calib slices")
    x, _ = data.slices("calib", model.card, with_labels=False, max_slices=calib_slices)
    yield Progress(0.3, f"the original on {len(x)} calib slices")
    reference = teacher_logits(model, data, x, dtype=np.float16)
    if not lesion_on_slice(reference).any():  # nothing to be sure of: a fit would only push to background
        reason = f"the original marks no lesion pixel on the {len(x)} calib slices: nothing to calibrate to"
        model.skipped.append(("output calibration", reason))
        model.notes.append(f"Output left uncalibrated: {reason}.")
        yield Progress(1.0, "output left as it was")
        return model
    yield Progress(0.6, f"the variant on {len(x)} calib slices")
    variant = onnx_logits(source, x, threads=data.threads, dtype=np.float16)
    yield Progress(0.8, "fitting scale and shift")
    fit = fit_logit_calibration(variant[:, 1] - variant[:, 0], reference[:, 1] - reference[:, 0], foreground_weight)
    target = model.scratch("model.calibrated.onnx")
    append_logit_calibration(source, target, fit["scale"], fit["shift"])
    model.onnx_path, model.module = target, None  # the torch weights no longer give these outputs
    model.metrics["output_calibration"] = {**fit, "calib_slices": int(len(x)), "foreground_weight": foreground_weight}
    model.notes.append(
        f"Output calibrated to the original on {len(x)} calib slices (no labels): foreground logit × "
        f"{fit['scale']:.3f} {fit['shift']:+.3f}. Mean foreground probability where the original sees lesion "
        f"{fit['lesion_probability_before']:.3f} → {fit['lesion_probability_after']:.3f} (the original's "
        f"{fit['lesion_probability_original']:.3f}); mask Dice against the original's "
        f"{fit['mask_dice_before']:.4f} → {fit['mask_dice_after']:.4f}.")
    yield Progress(1.0, "output calibrated")
    return model


def fit_logit_calibration(variant: np.ndarray, reference: np.ndarray, foreground_weight: float = 3.0,
                          max_pixels: int = 4_000_000, seed: int = 0) -> dict:
    """Scale and shift of ``variant``'s logit differences (any shape) that fit sigmoid(a·d + b) to
    sigmoid(``reference``) by weighted binary cross-entropy; with before/after figures.

    Lesion pixels are few: every pixel either network calls lesion is kept, and background
    pixels are sampled down to ``max_pixels`` in all (weighted back up so that the fit is that
    of the whole set)."""
    import torch

    from compression.training import mask_dice

    # Kept in the callers' float16 (400 calib slices: 100 M pixels, 200 MB a map); only the pixels
    # the fit uses, and the lesion pixels, are widened to float32.
    d, r = np.asarray(variant).reshape(-1), np.asarray(reference).reshape(-1)
    lesion = (d > 0) | (r > 0)
    rest = np.flatnonzero(~lesion)
    keep_rest = max(0, max_pixels - int(lesion.sum()))
    weight_rest = 1.0
    if len(rest) > keep_rest:
        weight_rest = len(rest) / max(1, keep_rest)
        rest = np.random.default_rng(seed).choice(rest, keep_rest, replace=False)
    idx = np.concatenate([np.flatnonzero(lesion), rest])
    ds, rs = torch.from_numpy(d[idx].astype(np.float32)), torch.from_numpy(r[idx].astype(np.float32))
    target = torch.sigmoid(rs)
    weight = (1 + (foreground_weight - 1) * target) * torch.where(torch.from_numpy(lesion[idx]),
                                                                  torch.tensor(1.0), torch.tensor(weight_rest))
    scale, shift = torch.ones((), requires_grad=True), torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([scale, shift], max_iter=100, line_search_fn="strong_wolfe")

    def loss():
        optimiser.zero_grad()
        value = (torch.nn.functional.binary_cross_entropy_with_logits(scale * ds + shift, target, reduction="none")
                 * weight).sum() / weight.sum()
        value.backward()
        return value

    before = loss().item()
    for _ in range(3):
        optimiser.step(loss)
    after = loss().item()
    a, b = float(scale.detach()), float(shift.detach())
    if not (np.isfinite(a) and np.isfinite(b) and a > 0):
        raise StepError(f"the output calibration did not converge (scale {a}, shift {b})")
    original_lesion = r > 0
    calibrated_lesion = d > -b / a  # a·d + b > 0, without a float32 copy of every pixel
    on_lesion = d[original_lesion].astype(np.float64)

    def mean_sigmoid(v):
        return float((1.0 / (1.0 + np.exp(-np.clip(v, -60, 60)))).mean()) if len(v) else None

    return {"scale": a, "shift": b, "loss_before": before, "loss_after": after,
            "lesion_probability_before": mean_sigmoid(on_lesion),
            "lesion_probability_after": mean_sigmoid(a * on_lesion + b),
            "lesion_probability_original": mean_sigmoid(r[original_lesion].astype(np.float64)),
            "mask_dice_before": mask_dice(d > 0, original_lesion),
            "mask_dice_after": mask_dice(calibrated_lesion, original_lesion),
            "lesion_pixels": {"original": int(original_lesion.sum()), "before": int((d > 0).sum()),
                              "after": int(calibrated_lesion.sum())}}


def append_logit_calibration(source: Path, target: Path, scale: float, shift: float) -> None:
    """Write ``source`` to ``target`` with its (N, 2, …) output multiplied by ``scale`` and shifted by
    −shift/2 on the background and +shift/2 on the foreground channel: the softmax's foreground
    becomes sigmoid(scale·d + shift) of the logit difference d."""
    import onnx
    from onnx import helper, numpy_helper

    from app.core.atomic import atomic_output

    from compression.export import unused_prefix

    graph_model = onnx.load(str(source))
    graph = graph_model.graph
    if len(graph.output) != 1:
        raise StepError(f"{source.name}: calibrate_output expects one output, not {len(graph.output)}")
    output = graph.output[0].name
    prefix = unused_prefix(graph, "calibration", "_")
    raw = f"{prefix}_logits"
    for node in graph.node:
        node.output[:] = [raw if o == output else o for o in node.output]
    rank = len(graph.output[0].type.tensor_type.shape.dim) or 4
    shape = (1, 2) + (1,) * (rank - 2)
    graph.initializer.extend([
        numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}_scale"),
        numpy_helper.from_array(np.array([-shift / 2, shift / 2], np.float32).reshape(shape), f"{prefix}_shift")])
    graph.node.extend([helper.make_node("Mul", [raw, f"{prefix}_scale"], [f"{prefix}_scaled"], name=f"{prefix}_mul"),
                       helper.make_node("Add", [f"{prefix}_scaled", f"{prefix}_shift"], [output], name=f"{prefix}_add")])
    onnx.checker.check_model(graph_model)
    with atomic_output(target) as tmp:
        onnx.save(graph_model, str(tmp))
