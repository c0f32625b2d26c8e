"""Per-layer sensitivity on the tiny trained UNet: one row per layer, the model restored afterwards."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.models import load_torch_module
from app.core.progress import run_to_end

from compression.sensitivity import layer_sensitivity
from compression.steps.quantize_ort import quantize_int8_ort
from tests.compression.steps_support import fresh_model, parent, step_data
from tests.compression.tiny import tiny_card


def test_quantize_sensitivity_gives_a_row_per_layer_and_plot_data():
    table = run_to_end(layer_sensitivity(parent(), step_data(), method="quantize"))
    module = load_torch_module(parent().as_format("state_dict"))
    convs = [n for n, m in module.named_modules() if type(m).__name__.startswith(("Conv", "ConvTranspose")) and hasattr(m, "weight")]
    assert [r.layer for r in table] == convs
    assert all(0.0 <= r.drop <= 1.0 and r.params > 0 for r in table)
    assert table.plot_data()["layers"] == convs
    assert table.most_sensitive(2) == [r.layer for r in sorted(table.rows, key=lambda r: -r.drop)[:2]]


def test_pruning_half_of_a_layer_hurts_more_than_quantizing_it():
    quantized = run_to_end(layer_sensitivity(parent(), step_data(), method="quantize"))
    pruned = run_to_end(layer_sensitivity(parent(), step_data(), method="prune_channels", amount=0.5))
    assert np.mean([r.drop for r in pruned]) > np.mean([r.drop for r in quantized])
    assert max(r.drop for r in pruned) > 0.01


def test_the_module_is_restored_exactly_after_measuring():
    model = fresh_model()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    run_to_end(layer_sensitivity(model.module, step_data(), method="prune_weights", card=tiny_card()))
    after = model.module.state_dict()
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)


def test_its_layer_names_are_what_quantization_excludes():
    table = run_to_end(layer_sensitivity(parent(), step_data(), method="quantize"))
    worst = table.most_sensitive(1)
    model = run_to_end(quantize_int8_ort(fresh_model(), step_data(), exclude=worst))
    assert model.metrics["int8_ort"]["excluded"] and not model.skipped


def test_an_onnx_only_variant_gets_an_empty_table_with_the_reason():
    import dataclasses

    onnx_only = dataclasses.replace(parent(), files={"onnx": parent().files["onnx"]}, format="onnx")
    table = run_to_end(layer_sensitivity(onnx_only, step_data()))
    assert len(table) == 0 and "torch weights" in table.notes[0]


def test_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="method"):
        run_to_end(layer_sensitivity(parent(), step_data(), method="guess"))
