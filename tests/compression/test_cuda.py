"""The torch CUDA paths: training with fp16/bf16 autocast, distillation (4-bit aware), the teacher
scored on the GPU, and the torch runner. Skipped where torch sees no CUDA device (CI has none);
they run on a GPU machine (see bench/README.md, "On a GPU").

The ONNX Runtime CUDA/TensorRT providers are not covered here: the provider list falls back to
the CPU, which tests/core/test_inference.py checks on any machine.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")

from app.core.progress import run_to_end  # noqa: E402

from compression.training import TrainConfig, make_labels_loss, predict_logits, train_loop  # noqa: E402
from tests.compression.steps_support import fresh_model, parent, step_data  # noqa: E402
from tests.compression.test_training import arrays, fresh_net  # noqa: E402
from tests.compression.tiny import eval_cases, tiny_card  # noqa: E402

DEVICE = "cuda:0"


def _device_of(module) -> str:
    return next(module.parameters()).device.type


@pytest.mark.parametrize("amp, used", [("auto", "float16"), ("fp16", "float16"), ("bf16", "bfloat16"), ("off", "fp32")])
def test_the_training_loop_learns_on_the_gpu_in_every_precision(amp, used):
    net = fresh_net()
    stats = run_to_end(train_loop(net, arrays(), make_labels_loss(10.0),
                                  TrainConfig(steps=30, lr=1e-2, amp=amp, device=DEVICE)))
    assert stats["amp"] == used  # "auto" on CUDA is fp16 with a grad scaler
    assert np.isfinite(stats["loss_last"]) and stats["loss_last"] < stats["loss_first"]
    assert _device_of(net) == "cuda"
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_fp16_on_the_gpu_scales_its_gradients(monkeypatch):
    made = []
    real = torch.amp.GradScaler

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", recording)
    run_to_end(train_loop(fresh_net(), arrays(), make_labels_loss(), TrainConfig(steps=3, amp="fp16", device=DEVICE)))
    assert made and made[0].is_enabled() and made[0].get_scale() > 1  # a real scale, on the GPU


def test_a_teacher_scores_slices_on_the_gpu_as_on_the_cpu_and_goes_back_to_the_cpu():
    from compression.data import slice_tensors

    net = fresh_net().eval()
    x, _ = slice_tensors(list(eval_cases()), tiny_card(), with_labels=False)
    on_cpu = predict_logits(net, x)
    on_gpu = predict_logits(net, x, device=DEVICE)
    assert _device_of(net) == "cpu"
    # cuDNN may use TF32 for float32 convolutions: about 1e-3 relative, far under what flips a mask.
    assert np.abs(on_gpu - on_cpu).max() <= 5e-3 * np.abs(on_cpu).max()
    assert ((on_gpu.argmax(1) == on_cpu.argmax(1)).mean()) > 0.999
    half = predict_logits(net, x, device=DEVICE, amp="fp16", dtype=np.float16)
    assert half.dtype == np.float16 and np.isfinite(half).all()
    assert ((half.argmax(1) == on_cpu.argmax(1)).mean()) > 0.99


def test_distillation_on_the_gpu_hands_back_a_cpu_student_on_the_4bit_grid_that_stores_exactly():
    from compression.steps.distill import distill
    from compression.steps.quantize_ort import quantize_int8_ort
    from compression.training import onnx_logits

    data = step_data(device=DEVICE)
    model = run_to_end(distill(fresh_model(), data, steps=40, width=0.5, weight_bits=4, qat_share=0.5,
                               focus=0.5, focus_every=10))
    stats = model.metrics["distillation"]
    assert stats["amp"] == "float16" and stats["focus"]["rescored"]  # fp16 autocast; mining ran on the GPU
    student = model.module
    assert _device_of(student) == "cpu" and _device_of(model.original) == "cpu"
    for layer in (m for m in student.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)):
        w = layer.weight.detach().numpy()
        w = np.moveaxis(w, 1 if layer.transposed else 0, 0).reshape(w.shape[1 if layer.transposed else 0], -1)
        steps = w / (np.abs(w).max(axis=1, keepdims=True) / 7)
        assert np.abs(steps - np.round(steps)).max() < 1e-4
    x = data.slices("calib", model.card, with_labels=False, max_slices=3)[0]
    float_logits = predict_logits(student, x)
    model = run_to_end(quantize_int8_ort(model, data, mode="weights", bits=4))
    assert np.abs(onnx_logits(model.onnx_path, x) - float_logits).max() < 1e-3 * np.abs(float_logits).max()


def test_a_fine_tune_on_the_gpu_hands_back_a_cpu_module_that_exports():
    from compression.steps.prune_unstructured import prune_unstructured

    model = run_to_end(prune_unstructured(fresh_model(), step_data(device=DEVICE), sparsity=0.5, finetune_steps=20))
    assert _device_of(model.module) == "cpu"
    zeros = sum(int((p == 0).sum()) for n, p in model.module.named_parameters() if n.endswith("weight"))
    assert zeros > 0


@pytest.mark.parametrize("autocast", [None, "fp16", "bf16"])
def test_the_torch_runner_on_the_gpu_finds_what_it_finds_on_the_cpu(autocast):
    from app.core.inference import make_runner

    from compression.evaluate import dice

    variant = parent().as_format("state_dict")
    case = eval_cases()[0]
    reference = run_to_end(make_runner(variant, device="cpu", threads=1).run(case.volume))
    runner = make_runner(variant, device=DEVICE, autocast=autocast)
    assert runner.provider == "torch-cuda:0" + (f"-{autocast}" if autocast else "")
    found = run_to_end(runner.run(case.volume))
    assert found.labels.shape == reference.labels.shape
    assert dice(found.labels > 0, reference.labels > 0) > 0.98


def test_a_gpu_latency_is_timed_to_the_output_on_the_host():
    from compression.cost import torch_predictor

    predict, name = torch_predictor(fresh_net(), device=DEVICE, autocast="fp16")
    out = predict(np.zeros((2, 1, 64, 64), np.float32) + 0.5)
    assert name == "torch-cuda:0-fp16" and out.device.type == "cpu" and out.shape == (2, 2, 64, 64)


def test_output_calibration_fits_the_same_scale_and_shift_with_the_teacher_on_the_gpu():
    from compression.steps.calibrate_output import calibrate_output
    from compression.steps.quantize_ort import quantize_int8_ort

    fits = []
    for device in ("cpu", DEVICE):
        data = step_data(device=device)
        model = run_to_end(quantize_int8_ort(fresh_model(), data, mode="weights", bits=4))
        fits.append(run_to_end(calibrate_output(model, data)).metrics["output_calibration"])
        assert _device_of(model.original) == "cpu"
    # The teacher's logits differ by TF32 rounding at most; the fitted numbers hardly move.
    assert fits[1]["scale"] == pytest.approx(fits[0]["scale"], rel=1e-2)
    assert fits[1]["shift"] == pytest.approx(fits[0]["shift"], abs=2e-2)
