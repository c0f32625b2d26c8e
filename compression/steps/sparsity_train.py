"""Sparsity-regularised training (network slimming), then pruning of the channels it drove to zero.

Every normalisation layer gets a per-channel scale (BatchNorm's γ; MONAI's parameter-free
InstanceNorm is made affine with γ = 1, β = 0, which changes nothing at the start), and training
adds a sparsity penalty on those scales (network slimming, Liu et al. 2017). A channel whose scale
is (near) zero contributes nothing; Torch-Pruning's dependency graph then removes it everywhere it
is coupled (residual adds, skip concatenations, the consumers' input channels).

The penalty is the scale-invariant Hoyer-Square (Σ|γ|)²/Σγ² per layer (DeepHoyer, Yang et al.
2020), not plain L1: a layer followed by InstanceNorm has no overall scale of its own, so L1
would shrink every γ of a layer alike, without changing the output, until the layer dies (seen
here: all channels gone, Dice 0). Hoyer-Square cannot lower itself by uniform shrinking; it only
pays by making some channels small *relative to the others*, which is what pruning needs.
"""
from __future__ import annotations

from app.core.progress import Progress, scaled

from compression.pipeline import StepData, WorkingModel
from compression.steps._common import recover
from compression.steps.prune_channels import _channel_counts, _output_layers, _report, _sync_norm_sizes


def sparsity_train(model: WorkingModel, data: StepData, *, strength: float = 0.02, steps: int = 100,
                   threshold: float = 0.1, max_ratio: float = 0.75, lr: float = 1e-3, batch_size: int = 8,
                   crop: int | None = None, amp: str = "auto", use: str = "auto", max_slices: int | None = 64,
                   finetune_steps: int = 0, scale_lr_factor: float = 10.0):
    """Train with the Hoyer-Square penalty on channel scales (× ``strength``; the scales learn
    ``scale_lr_factor`` × faster than the weights, so a short run can move them), then remove every channel whose |γ| is below ``threshold`` × its layer's largest
    (at most ``max_ratio`` of a layer's channels)."""
    import torch

    module = model.require_module("sparsity_train")
    example = torch.zeros(model.example_shape)
    norms = _make_norms_affine(module)
    slimming = _HoyerSquare(norms, strength)
    stats = yield from scaled(recover(model, data, steps=steps, lr=lr, batch_size=batch_size, crop=crop, amp=amp,
                                      use=use, max_slices=max_slices, label="sparsity training",
                                      penalty=slimming, param_groups=_groups(module, norms, lr * scale_lr_factor)),
                              0.0, 0.7)
    model.metrics.setdefault("finetune", []).append(stats)
    before = _channel_counts(module)
    removed = _prune_weak_channels(module, example, threshold, max_ratio)
    _sync_norm_sizes(module)
    yield Progress(0.75, f"removed {removed} channels driven to zero")
    _report(model, before, _channel_counts(module), ratio=None)
    model.metrics["sparsity_training"] = {"strength": strength, "steps": steps, "threshold": threshold,
                                          "channels_removed": removed, "scales": sum(n.weight.numel() for n in norms)}
    model.notes.append(f"Sparsity training of channel scales ({steps} steps, strength {strength:g}) drove {removed} channels "
                       f"below {threshold:g}× their layer's largest scale; they were removed.")
    if removed == 0:
        model.notes.append("No channel scale fell below the threshold: raise the strength or the steps; "
                           "nothing was pruned.")
    if finetune_steps:
        stats = yield from scaled(recover(model, data, steps=finetune_steps, lr=lr, batch_size=batch_size, crop=crop,
                                          amp=amp, use=use, max_slices=max_slices), 0.75, 1.0)
        model.metrics["finetune"].append(stats)
    yield Progress(1.0, "sparsity training done")
    return model


def _make_norms_affine(module) -> list:
    """Give every Batch/InstanceNorm a per-channel scale γ (1) and shift β (0): the function is unchanged."""
    import torch

    norms = []
    for layer in module.modules():
        if isinstance(layer, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)):
            if layer.weight is None:
                layer.affine = True
                layer.weight = torch.nn.Parameter(torch.ones(layer.num_features))
                layer.bias = torch.nn.Parameter(torch.zeros(layer.num_features))
            norms.append(layer)
    return norms


def _groups(module, norms, scale_lr: float) -> list[dict]:
    scales = {id(n.weight) for n in norms}
    return [{"params": [n.weight for n in norms], "lr": scale_lr},
            {"params": [p for p in module.parameters() if id(p) not in scales]}]


class _HoyerSquare:
    """strength · Σ_layers (Σ|γ|)² / Σγ²: differentiable, scale-invariant sparsity of the channel scales."""

    def __init__(self, norms, strength: float):
        self.norms, self.strength = norms, strength

    def __call__(self, module):
        total = 0.0
        for norm in self.norms:
            gamma = norm.weight
            total = total + gamma.abs().sum() ** 2 / (gamma.pow(2).sum() + 1e-12)
        return self.strength * total


def _prune_weak_channels(module, example, threshold: float, max_ratio: float) -> int:
    """Remove, group by group (traced afresh, so indices are current), channels whose norms' |γ| are all small."""
    import torch
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
    ignored = _output_layers(module, example)
    removed = 0
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[torch.nn.modules.conv._ConvNd]):
        scales = _group_scales(group)
        if scales is None or len(scales) < 2:
            continue
        weak = (scales < threshold * scales.max().clamp_min(1e-12)).nonzero().flatten().tolist()
        weak = sorted(weak, key=lambda i: float(scales[i]))[: int(max_ratio * len(scales))]
        if weak:
            root = group[0].dep
            graph.get_pruning_group(root.target.module, root.handler, idxs=weak).prune()
            removed += len(weak)
    return removed


def _group_scales(group):
    """Per channel of the group: the largest |γ| of the norm layers it passes through (None if none)."""
    import torch

    best = None
    for dep, idxs in group:
        layer = dep.target.module
        if not isinstance(layer, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)):
            continue
        if layer.weight is None or len(idxs) == 0:
            continue
        gamma = layer.weight.detach().abs()[torch.as_tensor(idxs)]
        best = gamma if best is None else (torch.maximum(best, gamma) if len(gamma) == len(best) else best)
    return best
