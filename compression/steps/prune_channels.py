"""Structured pruning: physically remove whole channels, so every later layer gets cheaper.

Torch-Pruning's dependency graph finds what must shrink together when a channel goes (the
residual add, the skip connection's concatenation, the next layer's input channels), so the
pruned network is a smaller dense network that any runtime speeds up, not a masked one.
Pruned gradually over ``iterations`` with fine-tuning between the steps.
"""
from __future__ import annotations

from app.core.progress import Progress, scaled

from compression.pipeline import StepData, WorkingModel
from compression.steps._common import recover

IMPORTANCES = ("magnitude", "taylor", "lamp", "random")


def prune_channels(model: WorkingModel, data: StepData, *, ratio: float = 0.5, iterations: int = 1,
                   finetune_steps: int = 0, importance: str = "magnitude", global_pruning: bool = False,
                   round_to: int | None = None, lr: float = 5e-4, batch_size: int = 8, crop: int | None = None,
                   amp: str = "auto", use: str = "auto", max_slices: int | None = 64, layer_ratios: dict | None = None):
    """Remove ``ratio`` of the channels of every prunable layer (or globally ranked with ``global_pruning``).

    ``layer_ratios`` ({layer name: ratio}) overrides the ratio for some layers, e.g. chosen by
    sensitivity. Output-class layers are never pruned. A network the dependency graph cannot
    trace is left unchanged, with the reason in the notes and in ``skipped``.
    """
    import torch

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), not {ratio}")
    module = model.require_module("prune_channels")
    example = torch.zeros(model.example_shape)
    before = _channel_counts(module)
    pruner = _make_pruner(model, example, ratio, iterations, importance, global_pruning, round_to, layer_ratios)
    if pruner is None:
        return model
    for number in range(1, iterations + 1):
        _step(pruner, model, example, importance, data)
        yield Progress(number / iterations * 0.3, f"pruning step {number}/{iterations}")
        if finetune_steps:
            stats = yield from scaled(recover(model, data, steps=finetune_steps, lr=lr, batch_size=batch_size, crop=crop,
                                              amp=amp, use=use, max_slices=max_slices,
                                              label=f"fine-tune {number}/{iterations}"),
                                      0.3 + 0.7 * (number - 1) / iterations, 0.3 + 0.7 * number / iterations)
            model.metrics.setdefault("finetune", []).append(stats)
    _report(model, before, _channel_counts(module), ratio)
    yield Progress(1.0, "channel pruning done")
    return model


def _output_layers(module, example):
    """Layers whose channels are the network's output classes: pruning them would drop a class."""
    import torch

    with torch.inference_mode():
        classes = module(example).shape[1]
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
             torch.nn.ConvTranspose3d, torch.nn.Linear)
    return [m for m in module.modules() if isinstance(m, convs)
            and getattr(m, "out_channels", getattr(m, "out_features", None)) == classes]


def _importance(name: str):
    import torch_pruning as tp

    table = {"magnitude": lambda: tp.importance.MagnitudeImportance(p=2),
             "taylor": lambda: tp.importance.TaylorImportance(),
             "lamp": lambda: tp.importance.LAMPImportance(p=2),
             "random": lambda: tp.importance.RandomImportance()}
    if name not in table:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, not {name!r}")
    return table[name]()


def _make_pruner(model, example, ratio, iterations, importance, global_pruning, round_to, layer_ratios):
    import torch_pruning as tp

    module = model.module
    ignored = _output_layers(module, example)
    names = {m: n for n, m in module.named_modules()}
    model.skipped += [(names[m], "produces the network's output classes; never pruned") for m in ignored]
    per_layer = {dict(module.named_modules())[n]: r for n, r in (layer_ratios or {}).items()
                 if n in dict(module.named_modules())}
    try:
        return tp.pruner.MetaPruner(module, example, importance=_importance(importance), pruning_ratio=ratio,
                                    pruning_ratio_dict=per_layer or None, iterative_steps=iterations,
                                    ignored_layers=ignored, global_pruning=global_pruning, round_to=round_to)
    except Exception as exc:  # torch-pruning cannot trace some graphs (e.g. PReLU in MONAI's UNet)
        model.skipped.append(("<network>", f"the dependency graph cannot be built: {type(exc).__name__}: {exc}"))
        model.notes.append("Channel pruning skipped: Torch-Pruning could not trace this network "
                           f"({type(exc).__name__}); the model is unchanged.")
        return None


def _step(pruner, model, example, importance, data):
    """One pruning step; Taylor importance needs gradients of a loss first."""
    if importance == "taylor":
        import torch

        from compression.steps._common import teacher_logits
        from compression.training import distillation_loss

        x, _ = data.slices("calib" if data.calib else "train", model.card, with_labels=False, max_slices=8)
        model.module.zero_grad()
        xt = torch.from_numpy(x)
        distillation_loss(model.module(xt), torch.from_numpy(teacher_logits(model, data, x))).backward()
    pruner.step()
    model.module.zero_grad(set_to_none=True)
    _sync_norm_sizes(model.module)


def _sync_norm_sizes(module) -> None:
    """Parameter-free InstanceNorms keep a stale ``num_features``; keep the module self-consistent."""
    import torch

    previous = None
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                              torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            previous = layer.out_channels
        elif isinstance(layer, torch.nn.modules.instancenorm._InstanceNorm) and not layer.affine and previous:
            layer.num_features = previous


def _channel_counts(module) -> dict[str, int]:
    import torch

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
             torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    return {n: m.out_channels for n, m in module.named_modules() if isinstance(m, convs)}


def _report(model: WorkingModel, before: dict, after: dict, ratio: float) -> None:
    kept = sum(after.values()) / max(1, sum(before.values()))
    model.metrics["channels"] = {"ratio": ratio, "channels_before": sum(before.values()),
                                 "channels_after": sum(after.values()),
                                 "per_layer": {n: [before[n], after.get(n)] for n in before}}
    if sum(after.values()) == sum(before.values()):
        return
    model.notes.append(f"Channel pruning removed {1 - kept:.0%} of all output channels "
                       f"({sum(before.values())} → {sum(after.values())}); the network is physically smaller, "
                       "so its weights no longer fit the card's architecture: it is saved as ONNX and TorchScript.")
