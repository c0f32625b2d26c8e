"""Quantization-aware fine-tuning: train with int8 rounding simulated, so PTQ afterwards loses less.

During the fine-tune every Conv sees what ONNX Runtime's static QDQ will give it: weights
rounded per output channel to symmetric int8, inputs rounded to asymmetric uint8 over a running
(EMA) range; gradients pass straight through the rounding. The weights end on the int8 grid, and
the step must be followed by ``quantize_int8_ort`` (static), which then quantizes them exactly.
ConvTranspose is left alone: ORT has no int8 CPU kernel for it, so it stays float there anyway.
Gains are usually modest; the notes state the fidelity before and after.
"""
from __future__ import annotations

from app.core.progress import Progress, scaled

from compression.pipeline import StepData, WorkingModel
from compression.steps._common import recover


class WeightFakeQuant:
    """Per-output-channel symmetric round trip to ``bits`` bits (±(2^(bits-1) − 1) steps of max |w|),
    with a straight-through gradient. ``axis``: the output-channel axis (1 for ConvTranspose).

    Rounding per channel commutes with scaling a channel, so a batch norm folded into the
    convolution at export leaves the weights on the grid: ``weights_only`` stores them exactly."""

    def __init__(self, bits: int = 8, axis: int = 0):
        self.levels, self.axis = float(2 ** (bits - 1) - 1), axis

    def __call__(self, weight):
        import torch

        dims = [d for d in range(weight.dim()) if d != self.axis]
        scale = (weight.detach().abs().amax(dim=dims, keepdim=True) / self.levels).clamp_min(1e-12)
        rounded = torch.clamp(torch.round(weight / scale), -self.levels, self.levels) * scale
        return weight + (rounded - weight).detach()


def fake_quantize_weights(layers, bits: int = 8) -> list:
    """Put the weight of each convolution in ``layers`` (transposed ones included) behind
    :class:`WeightFakeQuant`; returns the layers, for :func:`bake_weights`."""
    import torch.nn.utils.parametrize as parametrize

    layers = list(layers)
    for layer in layers:
        axis = 1 if layer.transposed else 0
        parametrize.register_parametrization(layer, "weight", _Module(WeightFakeQuant(bits, axis)))
    return layers


def bake_weights(layers) -> None:
    """Remove the fake quantization, keeping the weights on the grid the training adapted to."""
    import torch.nn.utils.parametrize as parametrize

    for layer in layers:
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


class _InputFakeQuant:
    """uint8 round trip of a layer's input over an EMA min/max range (straight-through)."""

    def __init__(self, momentum: float = 0.9):
        self.momentum, self.low, self.high = momentum, None, None

    def __call__(self, _layer, inputs):
        import torch

        x = inputs[0]
        lo, hi = min(float(x.detach().min()), 0.0), max(float(x.detach().max()), 0.0)
        if self.low is None:
            self.low, self.high = lo, hi
        elif _layer.training:
            self.low = self.momentum * self.low + (1 - self.momentum) * lo
            self.high = self.momentum * self.high + (1 - self.momentum) * hi
        scale = (self.high - self.low) / 255.0 or 1.0
        zero = round(-self.low / scale)
        q = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
        return (x + (q - x).detach(),) + tuple(inputs[1:])


def qat_finetune(model: WorkingModel, data: StepData, *, steps: int = 50, lr: float = 1e-4, batch_size: int = 8,
                 crop: int | None = None, amp: str = "off", use: str = "auto", max_slices: int | None = 64):
    """Fine-tune with simulated int8 (fp32 math: bf16/fp16 autocast would blur the simulated rounding)."""
    module = model.require_module("qat_finetune")
    convs = [(n, m) for n, m in module.named_modules() if type(m).__name__ in ("Conv1d", "Conv2d", "Conv3d")]
    model.skipped += [(n, "ConvTranspose: no int8 kernel in ONNX Runtime's CPU provider; trained in float")
                      for n, m in module.named_modules() if type(m).__name__.startswith("ConvTranspose")]
    layers = fake_quantize_weights(layer for _, layer in convs)
    hooks = [layer.register_forward_pre_hook(_InputFakeQuant()) for layer in layers]
    try:
        stats = yield from scaled(recover(model, data, steps=steps, lr=lr, batch_size=batch_size, crop=crop, amp=amp,
                                          use=use, max_slices=max_slices, label="QAT"), 0.0, 0.95)
    finally:
        for hook in hooks:
            hook.remove()
        bake_weights(layers)  # keep the weights on the int8 grid the training adapted to
    model.metrics.setdefault("finetune", []).append(stats)
    model.metrics["qat"] = {"steps": steps, "convs": len(convs), "learnt_from": stats.get("learnt_from")}
    model.notes.append(f"Quantization-aware fine-tuning: {len(convs)} Convs trained {steps} steps with int8 weights and "
                       "uint8 inputs simulated; follow with quantize_int8_ort (static).")
    yield Progress(1.0, "QAT done")
    return model


def _Module(function):
    """parametrize needs an nn.Module."""
    import torch

    class FakeQuant(torch.nn.Module):
        def forward(self, weight):
            return function(weight)

    return FakeQuant()
