"""Quantization-aware fine-tuning, and the torch PT2E int8 path (skipped with its reason without torchao)."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.progress import run_to_end

from compression.steps import quantize_torch
from compression.steps.qat import qat_finetune
from compression.steps.quantize_ort import quantize_int8_ort
from tests.compression.steps_support import fresh_model, step_data
from tests.compression.tiny import eval_dice


def test_qat_leaves_conv_weights_on_the_int8_grid_and_ort_quantizes_them_all():
    model = run_to_end(qat_finetune(fresh_model(), step_data(), steps=10))
    for name, layer in model.module.named_modules():
        if type(layer).__name__ == "Conv2d":
            weight = layer.weight.detach().numpy()
            assert all(len(np.unique(channel)) <= 255 for channel in weight), name
    assert any("ConvTranspose" in reason for _, reason in model.skipped)
    assert eval_dice(model.module) > 0.8
    model = run_to_end(quantize_int8_ort(model, step_data()))
    assert model.metrics["int8_ort"]["share"] >= 0.9


def test_without_torchao_the_torch_int8_step_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(quantize_torch, "_torchao", lambda: (None, "ModuleNotFoundError: No module named 'torchao'"))
    model = run_to_end(quantize_torch.quantize_int8_torch(fresh_model(), step_data()))
    assert model.module is not None
    assert any("torchao" in reason for _, reason in model.skipped)


def test_pt2e_int8_keeps_the_masks():
    if quantize_torch._torchao()[0] is None:
        pytest.skip("torchao is not installed")
    # The AOTInductor package takes about a minute to compile even for a tiny net: bench/ builds it.
    model = run_to_end(quantize_torch.quantize_int8_torch(fresh_model(), step_data(), package=False))
    assert model.metrics["int8_torch"]["fidelity_dice_calib"] > 0.95
