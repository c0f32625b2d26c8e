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
    # The int8 graph alone; the tests below compile its AOTInductor package too (about 15 s here).
    model = run_to_end(quantize_torch.quantize_int8_torch(fresh_model(), step_data(), package=False))
    assert model.metrics["int8_torch"]["fidelity_dice_calib"] > 0.95


@pytest.fixture(scope="module")
def pt2e_variant(tmp_path_factory):
    """The tiny model through quantize_int8_torch with its AOTInductor package (about 15 s here),
    compiled for the calibration slices' 64×64."""
    if quantize_torch._torchao()[0] is None:
        pytest.skip("torchao is not installed")
    from compression.pipeline import run_steps
    from tests.compression.steps_support import parent

    out = tmp_path_factory.mktemp("pt2e")
    return run_to_end(run_steps(parent(), [{"step": "quantize_int8_torch"}], step_data(), out, name="pt2e"))


def test_the_pt2e_package_is_what_the_variant_runs_and_it_finds_what_float_finds(pt2e_variant):
    from app.core.inference import make_runner, prepare
    from compression.cost import deployed_files, variant_predictor
    from compression.training import mask_dice
    from tests.compression.tiny import eval_cases

    runner = make_runner(pt2e_variant, threads=1)  # not opened with trust: this machine compiled it
    assert runner.provider == "torch-aoti-cpu" and runner.input_shape == (1, 1, 64, 64)
    assert variant_predictor(pt2e_variant, "cpu", 1)[1] == "torch-aoti-cpu"  # what latency is measured on
    assert deployed_files(pt2e_variant) == [pt2e_variant.files["aoti_package"]]  # and what size counts
    float_runner = make_runner(pt2e_variant, threads=1, backend="onnxruntime")
    for case in eval_cases():
        int8 = run_to_end(runner.run(case.volume)).labels
        assert int8.shape == case.volume.shape and (int8 > 0).any()
        assert mask_dice(int8 > 0, run_to_end(float_runner.run(case.volume)).labels > 0) > 0.9
    slices = prepare(eval_cases()[0].volume, runner.card).array[:, None]
    whole = runner._predict_slices(slices, None)
    # Smaller slices are edge-padded into the package's 64×64: as float finds on the same padding.
    cut = slices[:, :, :48, :40]
    padded = np.pad(cut, [(0, 0), (0, 0), (0, 16), (0, 24)], mode="edge")
    int8 = runner._predict_slices(cut, None)
    assert int8.shape[2:] == (48, 40)
    assert mask_dice(int8 > 0.5, float_runner._predict_slices(padded, None)[:, :, :48, :40] > 0.5) > 0.97
    # Larger ones run window by window: where they hold the same pixels, as the whole slice.
    taller = np.pad(slices, [(0, 0), (0, 0), (0, 16), (0, 0)], mode="reflect")
    windows = runner._predict_slices(taller, None)
    assert windows.shape[2:] == (80, 64)
    assert mask_dice(windows[:, :, :64] > 0.5, whole > 0.5) > 0.97


def test_the_pt2e_package_refuses_what_it_cannot_run_and_says_why(pt2e_variant, tmp_path, monkeypatch):
    import shutil

    from app.core.inference import make_runner
    from app.core.model_card import ModelError
    from app.core.models import open_model

    runner = make_runner(pt2e_variant, threads=1)
    with pytest.raises(ModelError, match=r"compiled for 1 channel\(s\) of 64×64, which cannot hold 3 of 64×64"):
        runner._predict(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ModelError, match="compiled for the CPU"):
        make_runner(pt2e_variant, device="cuda", backend="torch-aoti")
    # On a machine whose audit log never saw it compiled, the package loads only with trust.
    monkeypatch.setenv("MEDCOMPRESS_HOME", str(tmp_path / "another-machine"))
    foreign = open_model(pt2e_variant.card_path)
    assert make_runner(foreign, threads=1).backend == "onnxruntime"  # the float files run
    with pytest.raises(ModelError, match="this machine did not compile; refusing to load it"):
        make_runner(foreign, threads=1, backend="torch-aoti")
    assert make_runner(open_model(pt2e_variant.card_path, trust=True), threads=1).backend == "torch-aoti"
    damaged = tmp_path / "damaged"
    shutil.copytree(pt2e_variant.card_path.parent, damaged)
    package = damaged / pt2e_variant.files["aoti_package"].name
    package.write_bytes(package.read_bytes()[:4096])  # a download cut short
    with pytest.raises(ModelError, match=f"{package.name}: torch .* could not load"):
        make_runner(open_model(damaged / "card.json", trust=True), threads=1)
