"""What the steps share: training data, the reference outputs to recover towards, layer lists."""
from __future__ import annotations

from typing import Generator

import numpy as np

from app.core.progress import Progress

from compression.pipeline import StepData, WorkingModel
from compression.training import TrainConfig, make_distillation_loss, labels_loss, onnx_logits, predict_logits, train_loop

PRUNABLE = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")


def weight_layers(module, min_params: int = 0) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """(name, layer) of convolutions/linears with weights, and (name, reason) for those too small to matter."""
    kept, skipped = [], []
    for name, layer in module.named_modules():
        if type(layer).__name__ not in PRUNABLE or getattr(layer, "weight", None) is None:
            continue
        if layer.weight.numel() < min_params:
            skipped.append((name, f"only {layer.weight.numel()} weights (< {min_params}): not worth it"))
        else:
            kept.append((name, layer))
    return kept, skipped


def teacher_logits(model: WorkingModel, data: StepData, x: np.ndarray, dtype=np.float32,
                   allocate=None) -> np.ndarray:
    """What the student recovers towards: the given teacher variant, else the parent's own model.
    A reference reading fewer neighbouring slices than a 2.5-D student gets the middle ones."""
    from compression.data import reference_input

    if data.teacher is not None:
        x = reference_input(x, data.teacher.card.input.channels)
        return variant_logits(data.teacher, x, data.threads, dtype, allocate, data.device)
    if model.original is None:
        raise ValueError("no teacher and no original torch model to recover towards")
    if model.parent is not None:
        x = reference_input(x, model.parent.card.input.channels)
    return predict_logits(model.original, x, device=data.device, dtype=dtype, allocate=allocate)


def variant_logits(variant, x: np.ndarray, threads: int | None = None, dtype=np.float32,
                   allocate=None, device: str = "cpu") -> np.ndarray:
    """Logits of any variant (torch weights when present, on ``device``; else ONNX on the CPU)."""
    from app.core.models import load_torch_module

    if "weights" in variant.files and variant.card.architecture is not None:
        return predict_logits(load_torch_module(variant.as_format("state_dict")), x, device=device, dtype=dtype,
                              allocate=allocate)
    if "torchscript" in variant.files:
        return predict_logits(load_torch_module(variant.as_format("torchscript")), x, device=device, dtype=dtype,
                              allocate=allocate)
    return onnx_logits(variant.files["onnx"], x, threads=threads, dtype=dtype, allocate=allocate)


def recovery_arrays(model: WorkingModel, data: StepData, use: str, max_slices: int | None):
    """Training arrays and loss for fine-tuning: labels, teacher outputs (label-free), or both.

    ``use="auto"`` mixes labels in when every train case has them, else learns from the teacher.
    """
    labelled = data.has_labels("train")
    if use == "auto":
        use = "both" if labelled else "teacher"
    if use in ("labels", "both") and not labelled:
        raise ValueError(f"fine-tuning with {use!r} needs labels on every train case")
    x, y = data.slices("train", model.card, with_labels=use in ("labels", "both"), max_slices=max_slices)
    arrays = {"x": x}
    if y is not None:
        arrays["y"] = y  # uint8; batches turn it into int64
    if use == "labels":
        return arrays, labels_loss, use
    arrays["teacher"] = teacher_logits(model, data, x, dtype=np.float16)
    return arrays, make_distillation_loss(label_weight=0.5 if use == "both" else 0.0), use


def recover(model: WorkingModel, data: StepData, *, steps: int, lr: float, batch_size: int, crop: int | None,
            amp: str, use: str = "auto", max_slices: int | None = 64, label: str = "fine-tune",
            penalty=None, after_backward=None, after_step=None, param_groups=None) -> Generator[Progress, None, dict]:
    """Fine-tune ``model.module`` in place; returns the loop's statistics (plus what it learnt from)."""
    if steps <= 0:
        return {}
    arrays, loss, used = recovery_arrays(model, data, use, max_slices)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=data.seed, device=data.device,
                         amp=amp, crop=crop, threads=data.threads)
    stats = yield from train_loop(model.module, arrays, loss, config, penalty=penalty,
                                  after_backward=after_backward, after_step=after_step,
                                  param_groups=param_groups, label=label)
    model.module.to("cpu").eval()
    return {**stats, "learnt_from": used}
