"""Per-layer sensitivity: damage one layer at a time and measure how much the masks change.

For each convolution (or linear) layer alone, the layer is int8-quantized the way ONNX Runtime's
static QDQ does it (per-channel symmetric int8 weights, asymmetric uint8 input activations with
the calibration range), or has a fraction of its channels (or weights) zeroed; the model runs on
the calibration slices and the fidelity drop is 1 − Dice(masks, original masks). The table
(layer, parameters, drop) chooses the layers to keep in float and per-layer pruning ratios; its
``plot_data`` feeds a bar chart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, Iterator

import numpy as np

from app.core.progress import Progress

METHODS = ("quantize", "prune_channels", "prune_weights")


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str  # torch module name (quantize_int8_ort's ``exclude`` and prune_channels' ``layer_ratios`` take it)
    kind: str  # Conv2d, ConvTranspose2d, ...
    params: int
    drop: float  # 1 − Dice between the damaged and the original model's masks on the calibration slices
    fidelity_dice: float


@dataclass
class SensitivityTable:
    method: str
    rows: list[LayerSensitivity] = field(default_factory=list)
    slices: int = 0
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[LayerSensitivity]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def most_sensitive(self, count: int) -> list[str]:
        return [r.layer for r in sorted(self.rows, key=lambda r: -r.drop)[:count]]

    def plot_data(self) -> dict:
        """Bars in network order: layer names, drops, parameter counts."""
        return {"layers": [r.layer for r in self.rows], "drop": [r.drop for r in self.rows],
                "params": [r.params for r in self.rows], "method": self.method}

    def as_dicts(self) -> list[dict]:
        return [r.__dict__.copy() for r in self.rows]


def layer_sensitivity(model, data, *, method: str = "quantize", amount: float = 0.5, max_slices: int = 16,
                      card=None, min_params: int = 0) -> Generator[Progress, None, SensitivityTable]:
    """``model``: a ModelVariant (its torch weights are loaded) or a torch module (then give ``card``).

    ``data``: a StepData (its calib scans, else its train scans). ``amount``: the fraction of
    channels/weights zeroed by the pruning methods.
    """
    from compression.steps._common import weight_layers
    from compression.training import mask_dice, masks_from_logits, predict_logits

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    module, card, table = _torch_model(model, card, method)
    if module is None:
        return table
    split = "calib" if data.calib else "train"
    x, _ = data.slices(split, card, with_labels=False, max_slices=max_slices)
    table.slices = len(x)
    reference = masks_from_logits(predict_logits(module, x))
    layers, _ = weight_layers(module, min_params)
    ranges = _input_ranges(module, layers, x) if method == "quantize" else {}
    for number, (name, layer) in enumerate(layers, 1):
        with _damaged(layer, method, amount, ranges.get(name)):
            dice = mask_dice(masks_from_logits(predict_logits(module, x)), reference)
        table.rows.append(LayerSensitivity(name, type(layer).__name__, int(layer.weight.numel()), 1.0 - dice, dice))
        yield Progress(number / len(layers), f"{name}: fidelity drop {1 - dice:.4f}")
    return table


def _torch_model(model, card, method):
    from app.core.models import ModelVariant, load_torch_module

    table = SensitivityTable(method)
    if not isinstance(model, ModelVariant):
        if card is None:
            raise ValueError("give the card when passing a torch module")
        return model.eval(), card, table
    if "weights" in model.files and model.card.architecture is not None:
        return load_torch_module(model.as_format("state_dict")), model.card, table
    if "torchscript" in model.files:
        return load_torch_module(model.as_format("torchscript")), model.card, table
    table.notes.append("This variant has no torch model (ONNX only); per-layer sensitivity needs its torch weights.")
    return None, model.card, table


def _input_ranges(module, layers, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """Min/max of each layer's input over the calibration slices (what ORT's MinMax calibrator sees)."""
    import torch

    ranges, hooks = {}, []

    def record(name):
        def hook(_layer, inputs):
            lo, hi = float(inputs[0].min()), float(inputs[0].max())
            old = ranges.get(name, (lo, hi))
            ranges[name] = (min(old[0], lo), max(old[1], hi))
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in layers]
    try:
        with torch.inference_mode():
            for first in range(0, len(x), 8):
                module(torch.from_numpy(x[first:first + 8]))
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


class _damaged:
    """Context manager: the layer quantized or pruned inside, restored exactly on exit."""

    def __init__(self, layer, method: str, amount: float, input_range):
        self.layer, self.method, self.amount, self.input_range = layer, method, amount, input_range
        self.saved, self.hook = None, None

    def __enter__(self):
        import torch

        self.saved = self.layer.weight.detach().clone()
        with torch.no_grad():
            self.layer.weight.copy_(_damage(self.saved, self.layer, self.method, self.amount))
        if self.method == "quantize" and self.input_range is not None:
            lo, hi = self.input_range
            self.hook = self.layer.register_forward_pre_hook(lambda _l, inputs: (_fake_uint8(inputs[0], lo, hi),))
        return self

    def __exit__(self, *exc):
        import torch

        with torch.no_grad():
            self.layer.weight.copy_(self.saved)
        if self.hook is not None:
            self.hook.remove()
        return False


def _damage(weight, layer, method: str, amount: float):
    """The damaged weight: per-channel int8 round trip, or zeroed channels / weights."""
    import torch

    out_dim = 1 if getattr(layer, "transposed", False) else 0
    if method == "quantize":
        scale = weight.abs().amax(dim=[d for d in range(weight.dim()) if d != out_dim], keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.clamp(torch.round(weight / scale), -127, 127) * scale
    if method == "prune_channels":
        norms = weight.transpose(0, out_dim).reshape(weight.shape[out_dim], -1).norm(dim=1)
        weakest = norms.argsort()[: int(amount * len(norms))]
        damaged = weight.clone()
        damaged.index_fill_(out_dim, weakest, 0.0)
        return damaged
    threshold = weight.abs().flatten().kthvalue(max(1, int(amount * weight.numel()))).values
    return torch.where(weight.abs() <= threshold, torch.zeros_like(weight), weight)


def _fake_uint8(x, lo: float, hi: float):
    """Asymmetric uint8 quantize-dequantize of an activation with the calibrated range (0 always exact)."""
    import torch

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
