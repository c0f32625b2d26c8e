"""Pruning steps on a small real UNet: the sparsity is reached, the file or the network really shrinks."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.inference import make_runner
from app.core.models import sha256_file
from app.core.progress import run_to_end

from compression.export import conv_weight_shapes, macs_and_params
from compression.pipeline import run_steps
from compression.steps.prune_channels import prune_channels
from compression.steps.prune_unstructured import prune_unstructured
from compression.steps.sparsity_train import sparsity_train
from tests.compression.steps_support import fresh_model, parent, step_data
from tests.compression.tiny import eval_dice, phantom_case


def conv_sparsity(module) -> float:
    import torch

    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_reaches_the_target_sparsity(scope):
    model = run_to_end(prune_unstructured(fresh_model(), step_data(), sparsity=0.7, scope=scope, min_params=0))
    assert conv_sparsity(model.module) == pytest.approx(0.7, abs=0.02)
    stats = model.metrics["unstructured"]
    assert stats["nonzeros"] < 0.4 * stats["parameters"]
    if scope == "layer":  # every layer alike; global lets layers differ
        assert all(v == pytest.approx(0.7, abs=0.05) for v in stats["per_layer_sparsity"].values())


def test_iterative_pruning_with_finetuning_keeps_the_zeros_and_the_accuracy():
    model = run_to_end(prune_unstructured(fresh_model(), step_data(), sparsity=0.6, iterations=2, finetune_steps=10))
    assert conv_sparsity(model.module) >= 0.55
    assert len(model.metrics["finetune"]) == 2
    assert eval_dice(model.module) > 0.6


def test_sparse_storage_shrinks_the_onnx_file_and_onnx_runtime_still_agrees(tmp_path):
    dense = parent()
    variant = run_to_end(run_steps(dense, [{"step": "prune_unstructured", "sparsity": 0.9}], step_data(), tmp_path))
    stored = variant.card.lineage.metrics["compression"]["sparse_storage"]
    assert stored["sparse_tensors"] > 0
    assert variant.files["onnx"].stat().st_size < 0.5 * dense.files["onnx"].stat().st_size
    assert stored["stored_file_bytes"] == variant.files["onnx"].stat().st_size
    assert variant.card.lineage.metrics["compression"]["verification"]["onnx_sparse"]["verified"]


def test_below_two_thirds_sparsity_the_file_stays_dense_and_says_why(tmp_path):
    variant = run_to_end(run_steps(parent(), [{"step": "prune_unstructured", "sparsity": 0.5, "scope": "layer"}],
                                   step_data(), tmp_path))
    compression = variant.card.lineage.metrics["compression"]
    assert compression["sparse_storage"]["sparse_tensors"] == 0
    assert any("2/3" in note for note in compression["notes"])


def test_channel_pruning_shrinks_conv_shapes_and_macs_and_the_variant_still_runs(tmp_path):
    dense = parent()
    variant = run_to_end(run_steps(dense, [{"step": "prune_channels", "ratio": 0.5, "iterations": 2,
                                            "finetune_steps": 5}], step_data(), tmp_path))
    before, after = conv_weight_shapes(dense.files["onnx"]), conv_weight_shapes(variant.files["onnx"])
    assert len(before) == len(after)
    assert sum(np.prod(s) for s in after.values()) < 0.45 * sum(np.prod(s) for s in before.values())
    history = variant.card.lineage.metrics["compression"]["history"][0]
    assert history["macs_after"] < 0.5 * history["macs_before"]
    assert "weights" not in variant.files  # a pruned net no longer fits the card's architecture
    findings = run_to_end(make_runner(variant, threads=1).run(phantom_case(30).volume))
    assert findings.labels.shape == phantom_case(30).volume.shape


def test_channel_pruning_never_removes_output_classes():
    model = run_to_end(prune_channels(fresh_model(), step_data(), ratio=0.6))
    assert any("output classes" in reason for _, reason in model.skipped)
    import torch

    with torch.inference_mode():
        assert model.module(torch.zeros(1, 1, 32, 32)).shape[1] == 2


def test_a_network_the_dependency_graph_cannot_trace_is_skipped_with_a_reason():
    import torch

    class Untraceable(torch.nn.Module):  # the graph-building forward breaks, as PReLU did in MONAI's UNet
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            if x.requires_grad is False and not torch.is_grad_enabled():
                return self.conv(x)
            raise RuntimeError("cannot trace me")

    model = fresh_model()
    model.module = Untraceable()
    out = run_to_end(prune_channels(model, step_data(), ratio=0.5))
    assert out.module.conv.out_channels == 2
    assert any(layer == "<network>" for layer, _ in out.skipped)


def test_sparsity_training_drives_channels_to_zero_and_prunes_them():
    model = fresh_model()
    macs_before, _ = macs_and_params(model.module, (1, 1, 64, 64))
    model = run_to_end(sparsity_train(model, step_data(), strength=0.02, steps=80, lr=3e-3, finetune_steps=20))
    removed = model.metrics["sparsity_training"]["channels_removed"]
    assert removed > 0
    assert macs_and_params(model.module, (1, 1, 64, 64))[0] < macs_before
    assert eval_dice(model.module) > 0.5


def test_the_parent_files_are_never_modified(tmp_path):
    dense = parent()
    hashes = {role: sha256_file(p) for role, p in dense.files.items()}
    run_to_end(run_steps(dense, [{"step": "prune_channels", "ratio": 0.3}], step_data(), tmp_path))
    assert hashes == {role: sha256_file(p) for role, p in dense.files.items()}
