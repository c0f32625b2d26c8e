"""Unstructured magnitude pruning (layer-wise or global) to a target sparsity, with fine-tuning.

Zeros alone change nothing on a CPU: dense kernels multiply them all the same. What this step
really buys is storage: the ONNX file keeps weights as sparse initializers where that pays (more
than 2/3 zeros, because each kept value carries an int64 index), and the archive compresses well.
The notes say so, with the non-zeros and the stored sizes.
"""
from __future__ import annotations

import numpy as np

from app.core.progress import Progress

from compression.pipeline import StepData, WorkingModel
from compression.steps._common import recover, weight_layers


def prune_unstructured(model: WorkingModel, data: StepData, *, sparsity: float = 0.8, scope: str = "global",
                       iterations: int = 1, finetune_steps: int = 0, lr: float = 5e-4, batch_size: int = 8,
                       crop: int | None = None, amp: str = "auto", use: str = "auto", min_params: int = 64,
                       max_slices: int | None = 64):
    """Zero the smallest-magnitude weights of every conv/linear layer until ``sparsity`` is reached.

    ``scope``: "global" ranks all layers' weights together (layers differ in how much they can
    lose), "layer" prunes each layer to the same sparsity. ``iterations`` > 1 raises the sparsity
    gradually (cubic schedule, Zhu & Gupta) with ``finetune_steps`` of fine-tuning after each.
    """
    import torch.nn.utils.prune as prune

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), not {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', not {scope!r}")
    module = model.require_module("prune_unstructured")
    layers, too_small = weight_layers(module, min_params)
    model.skipped += too_small
    for number in range(1, iterations + 1):
        target = sparsity * (1 - (1 - number / iterations) ** 3)
        _prune_to(layers, target, scope)
        yield Progress(number / iterations * 0.2, f"pruned to {target:.0%} of weights")
        if finetune_steps:
            yield from _scaled_recover(model, data, number, iterations, finetune_steps, lr, batch_size, crop, amp, use, max_slices)
    for _, layer in layers:
        if prune.is_pruned(layer):
            prune.remove(layer, "weight")
    _report(model, layers, sparsity, scope)
    model.storage = "sparse"
    yield Progress(1.0, "pruning done")
    return model


def _prune_to(layers, target: float, scope: str) -> None:
    """Prune (cumulatively) so that ``target`` of all the layers' weights are zero."""
    import torch.nn.utils.prune as prune

    if scope == "global":
        # The amount is of the whole pool, counted on weight·mask, so earlier zeros count towards it.
        prune.global_unstructured([(layer, "weight") for _, layer in layers], pruning_method=prune.L1Unstructured,
                                  amount=_pool_amount(layers, target))
    else:
        for _, layer in layers:
            prune.l1_unstructured(layer, "weight", amount=_layer_amount(layer, target))


def _zeros(layer) -> int:
    return int((layer.weight == 0).sum())


def _pool_amount(layers, target: float) -> int:
    """torch's PruningContainer prunes ``amount`` of the still-unpruned weights: convert the target."""
    total = sum(layer.weight.numel() for _, layer in layers)
    already = sum(_zeros(layer) for _, layer in layers)
    return max(0, int(round(target * total)) - already) if already else int(round(target * total))


def _layer_amount(layer, target: float) -> int:
    already = _zeros(layer)
    return max(0, int(round(target * layer.weight.numel())) - already)


def _scaled_recover(model, data, number, iterations, steps, lr, batch_size, crop, amp, use, max_slices):
    gen = recover(model, data, steps=steps, lr=lr, batch_size=batch_size, crop=crop, amp=amp, use=use,
                  max_slices=max_slices, label=f"fine-tune {number}/{iterations}")
    from app.core.progress import scaled

    start = 0.2 + 0.8 * (number - 1) / iterations
    stats = yield from scaled(gen, start, 0.2 + 0.8 * number / iterations)
    model.metrics.setdefault("finetune", []).append(stats)


def _report(model: WorkingModel, layers, sparsity: float, scope: str) -> None:
    pruned_total = sum(layer.weight.numel() for _, layer in layers)
    nonzeros = sum(int((layer.weight != 0).sum()) for _, layer in layers)
    all_params = sum(p.numel() for p in model.module.parameters())
    all_nonzeros = sum(int((p != 0).sum()) for p in model.module.parameters())
    per_layer = {name: round(1 - float((layer.weight != 0).sum()) / layer.weight.numel(), 4) for name, layer in layers}
    achieved = 1 - nonzeros / max(1, pruned_total)
    model.metrics["unstructured"] = {"target_sparsity": sparsity, "scope": scope, "sparsity": round(achieved, 4),
                                     "nonzeros": all_nonzeros, "parameters": all_params,
                                     "per_layer_sparsity": per_layer}
    model.notes.append(
        f"Unstructured {scope} magnitude pruning: {achieved:.1%} of {pruned_total} conv weights are zero "
        f"({all_nonzeros} of {all_params} parameters non-zero). Dense CPU kernels still multiply the zeros, "
        "so expect no speed-up; the gain is storage.")
    if np.isfinite(achieved) and achieved <= 2 / 3:
        model.notes.append("At or below 2/3 sparsity, ONNX sparse storage (value + int64 index per non-zero) "
                           "would be larger than dense; layers stay dense unless they alone pass 2/3.")
