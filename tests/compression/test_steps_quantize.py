"""int8 through ONNX Runtime, fp16/bf16 and weight clustering on a small real UNet."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.inference import make_runner
from app.core.progress import run_to_end

from compression.export import quantized_conv_share
from compression.pipeline import run_steps
from compression.steps.cluster_weights import cluster_weights, kmeans_1d, read_archive
from compression.steps.half_precision import half_precision
from compression.steps.quantize_ort import quantize_int8_ort
from tests.compression.steps_support import fresh_model, parent, step_data
from tests.compression.tiny import phantom_case


@pytest.mark.parametrize("calibrate", ["minmax", "percentile", "entropy"])
def test_static_int8_runs_at_least_90_percent_of_convs_quantized_in_onnx_runtime(calibrate):
    model = run_to_end(quantize_int8_ort(fresh_model(), step_data(), calibrate=calibrate))
    share = quantized_conv_share(model.onnx_path)  # counted in ORT's own optimised graph
    assert share["quantized_convs"] >= 0.9 * (share["quantized_convs"] + share["float_convs"])
    assert share["quantized_convs"] > 0
    assert model.module is None  # the float model no longer describes the variant
    assert model.metrics["int8_ort"]["fidelity_dice_calib"] > 0.9


def test_excluded_layers_stay_float_and_the_check_counts_them():
    """Per-tensor QInt8 settings plus two excluded layers: what stays float is counted from ORT's graph."""
    model = run_to_end(quantize_int8_ort(fresh_model(), step_data(), per_channel=False, activation_type="QInt8",
                                         exclude=["model.0.conv.unit0.conv", "model.1.submodule.0.conv.unit0.conv"]))
    share = model.metrics["int8_ort"]
    assert share["float_convs"] >= 2  # the excluded layers really stay float, and are counted so
    assert any("kept in float on purpose" in note for note in model.notes)


def test_unknown_excluded_layers_are_reported_not_fatal():
    model = run_to_end(quantize_int8_ort(fresh_model(), step_data(), exclude=["no.such.layer"]))
    assert ("no.such.layer", "asked to exclude it from quantization, but the ONNX graph has no such layer") in model.skipped


def test_dynamic_int8_uses_integer_convolutions_and_warns_about_speed():
    model = run_to_end(quantize_int8_ort(fresh_model(), step_data(), mode="dynamic"))
    assert model.metrics["int8_ort"]["quantized_convs"] > 0
    assert any("slower" in note for note in model.notes)


def test_an_int8_variant_is_written_and_runs_on_a_scan(tmp_path):
    variant = run_to_end(run_steps(parent(), [{"step": "quantize_int8_ort"}], step_data(), tmp_path, name="int8"))
    assert set(variant.card.files) == {"onnx"}
    assert variant.files["onnx"].stat().st_size < parent().files["onnx"].stat().st_size
    findings = run_to_end(make_runner(variant, threads=1).run(phantom_case(31).volume))
    assert findings.labels.any()


def test_int8_weights_only_stores_every_conv_weight_in_int8_and_computes_in_float(tmp_path):
    import onnx
    from onnx import numpy_helper

    from compression.training import onnx_logits

    model = fresh_model()
    float_path = tmp_path / "float.onnx"
    from compression.export import export_onnx

    export_onnx(model.module, float_path, model.example_shape)
    variant = run_to_end(run_steps(parent(), [{"step": "quantize_int8_ort", "mode": "weights"}], step_data(),
                                   tmp_path, name="int8-weights"))
    path = variant.files["onnx"]
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    produced_by_dequantize = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert convs and all(n.input[1] in produced_by_dequantize for n in convs)
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    assert all(weights[f"{n.input[1]}_int8"].dtype == np.int8 for n in convs)
    float_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(float_path)).graph.initializer}
    int8_bytes = sum(weights[f"{n.input[1]}_int8"].nbytes for n in convs)
    float_bytes = sum(float_weights[n.input[1]].nbytes for n in convs if n.input[1] in float_weights)
    assert int8_bytes * 4 == float_bytes  # the same tensors, a byte per weight instead of four
    # On this tiny network the graph itself is half the file; on the demo UNet the file is ~4× smaller.
    assert path.stat().st_size < 0.6 * float_path.stat().st_size
    share = quantized_conv_share(path)  # ONNX Runtime computes in float: no integer convolution
    assert share["quantized_convs"] == 0
    x = step_data().slices("calib", variant.card, with_labels=False, max_slices=4)[0]
    reference, got = onnx_logits(float_path, x), onnx_logits(path, x)
    assert np.abs(reference - got).max() < 0.05 * np.abs(reference).max()  # 8-bit weights, per channel
    assert any("int8 weights only" in note for note in variant.card.lineage.metrics.get("compression", {}).get("notes", []))
    # Our runner lets ONNX Runtime fold the weight dequantization once (float speed); static int8 is left alone.
    from app.core.inference import weights_only_int8

    static = run_to_end(run_steps(parent(), [{"step": "quantize_int8_ort"}], step_data(), tmp_path, name="int8"))
    assert weights_only_int8(path) and not weights_only_int8(static.files["onnx"]) and not weights_only_int8(float_path)
    findings = run_to_end(make_runner(variant, threads=1).run(phantom_case(31).volume))
    reference = run_to_end(make_runner(parent(), threads=1).run(phantom_case(31).volume))
    assert np.mean(findings.labels == reference.labels) > 0.99


def test_4bit_weights_halve_the_int8_bytes_and_onnx_runtime_folds_them_into_float_constants(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from compression.steps.cluster_weights import unpack
    from compression.training import onnx_logits

    int8 = run_to_end(run_steps(parent(), [{"step": "quantize_int8_ort", "mode": "weights"}], step_data(),
                                tmp_path, name="int8-weights"))
    variant = run_to_end(run_steps(parent(), [{"step": "quantize_int8_ort", "mode": "weights", "bits": 4}],
                                   step_data(), tmp_path, name="4bit-weights"))
    path = variant.files["onnx"]
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    decoded = {n.output[0] for n in graph.node if n.op_type == "Mul" and n.name.endswith("_decode4")}
    assert convs and all(n.input[1] in decoded for n in convs)
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    int8_stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int8.files["onnx"])).graph.initializer}
    nibble_bytes = 0
    for mul in (n for n in graph.node if n.name.endswith("_decode4")):
        tag = mul.name[: -len("decode4")]
        nibbles, q = stored[f"{tag}n"], int8_stored[f"{mul.output[0]}_int8"]
        assert nibbles.dtype == np.uint8 and nibbles.size == (q.size + 1) // 2  # two weights per byte
        assert len(np.unique(unpack(nibbles.ravel(), 4, q.size))) <= 16 and stored[f"{tag}k"].size == 16
        nibble_bytes += nibbles.size
    assert nibble_bytes == sum((int8_stored[f"{n.input[1]}_int8"].size + 1) // 2 for n in convs)
    assert path.stat().st_size < int8.files["onnx"].stat().st_size
    # A stock ONNX Runtime loads it and folds the decoding into constants: only the float network is left.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    left = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert not left & {"Gather", "Mod", "Div", "Cast", "Slice"} and "Conv" in left
    x = step_data().slices("calib", variant.card, with_labels=False, max_slices=4)[0]
    reference = onnx_logits(parent().files["onnx"], x)
    error4, error8 = (np.abs(onnx_logits(p, x) - reference).max() for p in (path, int8.files["onnx"]))
    assert error8 < error4 < 0.2 * np.abs(reference).max()  # coarser than int8, still the same network
    assert variant.card.lineage.metrics["compression"]["int8_ort"]["weight_bits"] == 4
    findings = run_to_end(make_runner(variant, threads=1).run(phantom_case(31).volume))
    reference = run_to_end(make_runner(parent(), threads=1).run(phantom_case(31).volume))
    assert np.mean(findings.labels == reference.labels) > 0.99
    with pytest.raises(ValueError, match="bits must be 8, or 4 with mode 'weights'"):
        run_to_end(quantize_int8_ort(fresh_model(), step_data(), mode="static", bits=4))


def test_quantization_after_quantization_is_refused_clearly():
    model = run_to_end(quantize_int8_ort(fresh_model(), step_data()))
    with pytest.raises(ValueError, match="before quantization"):
        run_to_end(half_precision(model, step_data(), precision="bf16"))


def test_fp16_onnx_keeps_float32_inputs_and_outputs_and_the_masks():
    import onnx

    model = run_to_end(half_precision(fresh_model(), step_data(), precision="fp16", measure=False))
    graph = onnx.load(str(model.onnx_path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
    record = model.metrics["half_precision"]
    assert record["file_bytes_fp16"] < 0.8 * record["file_bytes_fp32"]
    assert record["fidelity_dice_calib"] > 0.97


def test_fp16_variant_passes_the_onnx_checker_and_runs_in_our_runner(tmp_path):
    import onnx

    variant = run_to_end(run_steps(parent(), [{"step": "half_precision", "precision": "fp16", "measure": False}],
                                   step_data(), tmp_path, name="fp16"))
    onnx.checker.check_model(onnx.load(str(variant.files["onnx"])))
    findings = run_to_end(make_runner(variant, threads=1).run(phantom_case(31).volume))
    assert findings.labels.any()


def test_fp16_that_changes_the_masks_is_refused_and_writes_nothing(tmp_path):
    import torch

    from compression.pipeline import StepError

    model = fresh_model()
    with torch.no_grad():   # activations past fp16's 65504 in the second conv: fp32 copes, fp16 saturates
        convs = [m for m in model.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
        convs[1].weight.mul_(1e6)
        if convs[1].bias is not None:
            convs[1].bias.mul_(1e6)
    with pytest.raises(StepError, match="fp16 changed the model's masks"):
        run_to_end(half_precision(model, step_data(), precision="fp16", measure=False))
    assert model.onnx_path is None or not str(model.onnx_path).endswith("fp16.onnx")


def test_bf16_variant_is_deployed_as_bf16_torch_weights(tmp_path):
    import torch

    variant = run_to_end(run_steps(parent(), [{"step": "half_precision", "precision": "bf16", "measure": False}],
                                   step_data(), tmp_path, name="bf16"))
    assert variant.format == "state_dict" and "onnx" not in variant.files
    state = torch.load(variant.files["weights"], weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state.values() if v.is_floating_point())
    assert variant.card.lineage.metrics["compression"]["runtime_hint"] == {"torch_autocast": "bf16"}
    findings = run_to_end(make_runner(variant, threads=1, autocast="bf16").run(phantom_case(31).volume))
    assert findings.labels.any()


def test_kmeans_finds_the_shared_values():
    values = np.repeat(np.array([-1.0, 0.0, 2.0], np.float32), 50) + np.random.default_rng(0).normal(0, 0.01, 150)
    codebook, index = kmeans_1d(values, 3)
    assert np.allclose(np.sort(codebook), [-1.0, 0.0, 2.0], atol=0.01)
    assert np.abs(codebook[index] - values).max() < 0.05


def test_clustered_weights_share_k_values_and_the_archive_decodes_to_them(tmp_path):
    model = run_to_end(cluster_weights(fresh_model(), step_data(), clusters=16, min_params=256, finetune_steps=3))
    state = model.module.state_dict()
    decoded = read_archive(model.extra_files["archive"])
    assert set(decoded) == set(state)
    for key, tensor in state.items():
        assert np.allclose(decoded[key], tensor.numpy())
    clustered = [n for n, _ in model.module.named_modules() if f"{n}.weight" in state and state[f"{n}.weight"].numel() >= 256]
    assert clustered and all(len(np.unique(state[f"{n}.weight"].numpy())) <= 16 for n in clustered)
    record = model.metrics["clustering"]
    assert record["archive_bytes"] < record["dense_float32_bytes"] / 2
    assert any("deployed size" in note for note in model.notes)


def test_int8_weights_can_be_stored_anew_in_4_bits(tmp_path):
    import onnx

    from compression.steps.quantize_ort import weights_only
    from compression.training import onnx_logits

    int8 = run_to_end(run_steps(parent(), [{"step": "quantize_int8_ort", "mode": "weights"}], step_data(),
                                tmp_path, name="int8-weights"))
    again = tmp_path / "again.onnx"
    convs = sum(n.op_type in ("Conv", "ConvTranspose") for n in onnx.load(str(int8.files["onnx"])).graph.node)
    assert weights_only(int8.files["onnx"], again, bits=4) == convs
    graph = onnx.load(str(again)).graph
    ops = [n.op_type for n in graph.node]
    assert "DequantizeLinear" not in ops and not any(i.name.endswith("_int8") for i in graph.initializer)
    x = step_data().slices("calib", int8.card, with_labels=False, max_slices=2)[0]
    direct = tmp_path / "direct.onnx"
    weights_only(parent().files["onnx"], direct, bits=4)
    reference = onnx_logits(parent().files["onnx"], x)
    # int8 first, then 4 bits: about as far from the float model as 4 bits straight away
    assert np.abs(onnx_logits(again, x) - reference).max() < 1.5 * np.abs(onnx_logits(direct, x) - reference).max()


def test_a_second_4bit_pass_over_a_partly_4bit_graph_names_its_tensors_apart(tmp_path):
    import onnx

    from compression.steps.quantize_ort import weights_only
    from compression.training import onnx_logits

    source = parent().files["onnx"]
    convs = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Conv"]
    first, second, direct = tmp_path / "first.onnx", tmp_path / "second.onnx", tmp_path / "direct.onnx"
    assert weights_only(source, first, exclude=convs[:2], bits=4) == len(convs[2:]) + sum(
        n.op_type == "ConvTranspose" for n in onnx.load(str(source)).graph.node)
    assert weights_only(first, second, bits=4) == 2  # the two left out, with names of their own
    onnx.checker.check_model(onnx.load(str(second)), full_check=True)
    weights_only(source, direct, bits=4)
    x = step_data().slices("calib", parent().card, with_labels=False, max_slices=2)[0]
    assert np.allclose(onnx_logits(second, x), onnx_logits(direct, x), atol=1e-5)
