"""run_steps: a copy of the parent goes through the steps; the variant folder appears whole or not at all."""
from __future__ import annotations

import json

import numpy as np
import pytest

from app.core.models import load_torch_module, open_model, sha256_file
from app.core.progress import Cancelled, drive, run_to_end

from compression.pipeline import STEP_REGISTRY, StepData, StepError, check_step, run_steps, step_parameters
from tests.compression.tiny import THREADS, calib_cases, train_cases, trained_variant_card


def step_data(**changes) -> StepData:
    return StepData(train=list(train_cases()), calib=list(calib_cases()), threads=THREADS, **changes)


def parent_files_hashes(variant) -> dict:
    return {role: sha256_file(path) for role, path in variant.files.items()}


def test_finetune_writes_a_complete_variant_with_lineage_and_never_touches_the_parent(tmp_path):
    parent = open_model(trained_variant_card())
    before = parent_files_hashes(parent)
    variant = run_to_end(run_steps(parent, [{"step": "finetune", "steps": 3}], step_data(), tmp_path, name="tuned"))
    assert parent_files_hashes(parent) == before
    assert variant.card_path == tmp_path / "tuned" / "card.json"
    assert set(variant.card.files) == {"onnx", "weights", "torchscript"}
    lineage = variant.card.lineage
    assert lineage.parent_sha256 == parent.weights_sha256
    assert lineage.weights_sha256 == sha256_file(tmp_path / "tuned" / "model.onnx") == variant.weights_sha256
    compression = lineage.metrics["compression"]
    assert compression["verification"]["onnx"]["verified"] is True
    assert compression["history"][0]["step"] == "finetune"
    assert compression["history"][0]["params_before"] == compression["history"][0]["params_after"] > 0
    assert lineage.seed == 0 and lineage.package_versions["torch"]
    assert [p.name for p in tmp_path.iterdir()] == ["tuned"]  # no temporary folder left behind
    load_torch_module(variant.as_format("state_dict"))  # the weights fit the card's architecture


def test_progress_only_moves_forward(tmp_path):
    job = run_steps(open_model(trained_variant_card()), [{"step": "finetune", "steps": 2}, {"step": "finetune", "steps": 1}],
                    step_data(), tmp_path, name="ticks")
    fractions = []
    while True:
        try:
            fractions.append(next(job).fraction)
        except StopIteration:
            break
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_cancel_leaves_no_output_files(tmp_path):
    parent = open_model(trained_variant_card())
    ticks = []

    def cancel_after_a_few():
        ticks.append(1)
        return len(ticks) > 3

    job = run_steps(parent, [{"step": "finetune", "steps": 20}], step_data(), tmp_path, name="cancelled")
    with pytest.raises(Cancelled):
        drive(job, cancel_after_a_few, lambda p: None)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_step_leaves_no_output_files(tmp_path):
    parent = open_model(trained_variant_card())
    job = run_steps(parent, [{"step": "finetune", "steps": 2, "use": "labels"}],
                    StepData(train=[], calib=[], threads=THREADS), tmp_path, name="failed")
    with pytest.raises(ValueError):
        run_to_end(job)
    assert list(tmp_path.iterdir()) == []


def test_unknown_steps_and_parameters_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(StepError, match="unknown compression step"):
        check_step({"step": "make_it_small"})
    with pytest.raises(StepError, match="unknown parameter 'sparsty'"):
        check_step({"step": "prune_unstructured", "sparsty": 0.5})
    assert step_parameters("prune_unstructured")["sparsity"] == 0.8
    assert {"prune_unstructured", "prune_channels", "quantize_int8_ort", "distill"} <= set(STEP_REGISTRY)


def test_an_existing_variant_is_never_overwritten(tmp_path):
    (tmp_path / "taken").mkdir()
    parent = open_model(trained_variant_card())
    with pytest.raises(FileExistsError):
        run_to_end(run_steps(parent, [{"step": "finetune", "steps": 1}], step_data(), tmp_path, name="taken"))


def test_seeded_runs_reproduce_their_outputs(tmp_path):
    """Same seed, data and threads: the fine-tuned weights agree to float rounding (stated tolerance 1e-5)."""
    parent = open_model(trained_variant_card())
    outs = []
    for name in ("a", "b"):
        variant = run_to_end(run_steps(parent, [{"step": "finetune", "steps": 4}], step_data(seed=3), tmp_path, name=name))
        state = load_torch_module(variant.as_format("state_dict")).state_dict()
        outs.append(np.concatenate([v.float().numpy().ravel() for v in state.values()]))
    assert np.allclose(outs[0], outs[1], atol=1e-5)
