"""Cost: deployed size, archive size, parameters, MACs, side-by-side latency, peak memory."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from app.core.models import open_model
from compression import cost
from tests.core.model_fixtures import small_unet


def _two_layer_net(tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ConvTranspose2d(4, 2, 2, stride=2))
    path = tmp_path / "net.onnx"
    torch.onnx.export(net.eval(), torch.zeros(1, 1, 16, 16), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    return net, path


def test_macs_are_the_conv_work_counted_by_hand_in_torch_and_onnx(tmp_path):
    net, path = _two_layer_net(tmp_path)
    # Conv: 4×16×16 outputs × 1·3·3; ConvTranspose: 4×16×16 inputs × 2·2·2 (not outputs × Cin·k²).
    expected = 4 * 16 * 16 * 9 + 4 * 16 * 16 * 8
    assert cost.torch_macs(net, (1, 1, 16, 16)) == expected
    assert cost.onnx_macs(path, (1, 1, 16, 16)) == expected
    assert cost.onnx_macs(path, (1, 1, 32, 32)) == 4 * expected  # the shape given, not the exported one


def test_a_unet_costs_the_same_in_torch_and_onnx(tmp_path):
    card = small_unet(tmp_path / "unet")
    as_torch = cost.static_cost(open_model(card, prefer="state_dict"), "torch", (1, 1, 32, 32))
    as_onnx = cost.static_cost(open_model(card, prefer="onnx"), "onnx", (1, 1, 32, 32))
    assert as_torch.macs == as_onnx.macs > 0
    assert as_torch.parameters == as_onnx.parameters > 0
    assert as_onnx.deployed_files == [str(tmp_path / "unet" / "model.onnx")]
    assert as_onnx.deployed_bytes == (tmp_path / "unet" / "model.onnx").stat().st_size
    assert 0 < as_onnx.archive_bytes < as_onnx.deployed_bytes and as_onnx.archive_kind == "deflated deployed files"


def test_int8_qdq_graph_keeps_the_macs_and_shrinks_the_file(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    card = small_unet(tmp_path / "unet")
    fp32 = tmp_path / "unet" / "model.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"image": rng.random((1, 1, 16, 16), dtype=np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    int8 = tmp_path / "int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    assert cost.onnx_macs(int8, (1, 1, 32, 32)) == cost.onnx_macs(fp32, (1, 1, 32, 32))
    params, _ = cost.onnx_parameters(int8)
    assert params == cost.onnx_parameters(fp32)[0]  # the same weights, stored as int8
    del card


def test_external_data_counts_in_the_deployed_size(tmp_path):
    import onnx

    card = small_unet(tmp_path / "unet")
    model = onnx.load(str(tmp_path / "unet" / "model.onnx"))
    onnx.save_model(model, str(tmp_path / "unet" / "model.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    variant = open_model(card, prefer="onnx")
    files = cost.deployed_files(variant)
    assert [p.name for p in files] == ["model.onnx", "weights.bin"]
    assert cost.deployed_size(variant) == sum(p.stat().st_size for p in files)
    assert (tmp_path / "unet" / "weights.bin").stat().st_size > 4 * 3000  # the fp32 weights live there


def test_a_codebook_archive_is_reported_beside_not_as_the_deployed_size(tmp_path):
    card = small_unet(tmp_path / "unet")
    archive = tmp_path / "unet" / "clustered.npz"
    archive.write_bytes(b"\0" * 1234)
    variant = open_model(card, prefer="onnx")
    variant = replace(variant, files={**variant.files, "archive": archive})
    size = cost.static_cost(variant, "clustered", (1, 1, 16, 16))
    assert (size.archive_bytes, size.archive_kind) == (1234, "codebook archive")
    assert size.deployed_bytes == (tmp_path / "unet" / "model.onnx").stat().st_size


def test_zero_weights_are_counted_as_such(tmp_path):
    import torch

    net = torch.nn.Conv2d(1, 4, 3)
    with torch.no_grad():
        net.weight[:2] = 0
    total, nonzero = cost.torch_parameters(net)
    assert total == 4 * 9 + 4 and nonzero == total - 18


def test_latency_rounds_are_interleaved_and_relative_to_the_first(tmp_path):
    calls = []
    predictors = {"original": lambda b: calls.append("original"), "variant": lambda b: calls.append("variant")}
    gen = cost.measure_latency(predictors, np.zeros((1, 1, 8, 8)), warmup=1, rounds=4)
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as done:
            stats = done.value
            break
    assert calls == ["original", "variant"] * 5  # warm-up then rounds, each round running both
    assert stats["original"].speedup == 1.0 and stats["variant"].rounds == 4
    assert stats["variant"].speedup == pytest.approx(stats["original"].median_ms / stats["variant"].median_ms)
    assert progress[-1].fraction == 1.0


def test_compare_costs_runs_torch_and_onnx_side_by_side_with_peak_memory(tmp_path):
    from app.core.progress import run_to_end

    card = small_unet(tmp_path / "unet")
    variants = [open_model(card, prefer="state_dict"), open_model(card, prefer="onnx")]
    costs = run_to_end(cost.compare_costs(variants, ["torch", "onnx"], input_shape=(1, 1, 16, 16), threads=1,
                                          rounds=3, warmup=1, memory=False))
    assert [c.provider for c in costs] == ["torch-cpu", "CPUExecutionProvider"]
    assert costs[0].latency.speedup == 1.0 and costs[1].latency.median_ms > 0
    small = cost.peak_memory_mb(variants[1], (1, 1, 16, 16), threads=1)
    large = cost.peak_memory_mb(variants[1], (1, 1, 512, 512), threads=1)
    assert large > small + 5  # activations of a 512² slice through 4–16 channels take tens of MB


def test_a_2p5d_variant_is_costed_on_the_neighbouring_slices_it_reads(tmp_path):
    from app.core.progress import run_to_end
    from tests.core.model_fixtures import SMALL_UNET_2D, build, segmentation_card, write_model

    arch = {**SMALL_UNET_2D, "in_channels": 3}
    card = segmentation_card(channels=3, arch=arch)
    card = replace(card, input=replace(card.input, slice_context=1))
    three = open_model(write_model(tmp_path / "three", card, build("UNet", arch), (1, 3, 16, 16)))
    one = open_model(small_unet(tmp_path / "one"))
    costs = run_to_end(cost.compare_costs([one, three], ["one slice", "three slices"], input_shape=(1, 1, 16, 16),
                                          threads=1, rounds=2, warmup=1, memory=False))
    assert costs[1].latency.median_ms > 0
    # Only the first convolutions read the input: 4 filters of 3×3 over 2 more channels, at 8×8
    # outputs, in the first unit's conv and in its residual conv.
    assert costs[1].macs - costs[0].macs == 2 * (4 * 8 * 8 * 9 * 2)


def test_a_bf16_variant_runs_as_its_card_says_torch_under_autocast(tmp_path):
    import json

    card_path = small_unet(tmp_path / "unet")
    card = json.loads(card_path.read_text())
    card.setdefault("lineage", {})["metrics"] = {"compression": {"runtime_hint": {"torch_autocast": "bf16"}}}
    card_path.write_text(json.dumps(card))
    variant = open_model(card_path)  # ONNX is listed too, and would be the default runtime
    assert variant.format == "onnx" and cost.torch_autocast_hint(variant) == "bf16"
    predict, provider = cost.variant_predictor(variant, threads=1)
    assert provider == "torch-cpu-bf16"
    assert predict(np.zeros((1, 1, 16, 16), np.float32)).dtype.is_floating_point
