"""Knowledge distillation on the tiny phantoms: deterministic small budgets, real Dice on held-out cases.

Stated bars: with labels on one case and three unlabelled scans, teacher + labels beats labels
alone for the same student, steps and seed; label-free distillation reaches at least 80 % of the
Dice the same student reaches from labels on every train case.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest

from app.core.models import load_torch_module
from app.core.progress import run_to_end

from compression.steps.distill import _student_card, distill, student_architecture
from tests.compression.steps_support import fresh_model, parent, step_data
from tests.compression.tiny import eval_dice, train_cases

STEPS = 60
LABEL_FREE_FRACTION = 0.8


def scarce_labels():
    cases = list(train_cases())
    return [cases[0]] + [dataclasses.replace(c, labels=None) for c in cases[1:]]


@functools.cache
def student_dice(use: str, scarce: bool) -> float:
    data = step_data(train=scarce_labels() if scarce else list(train_cases()), seed=0)
    model = run_to_end(distill(fresh_model(), data, steps=STEPS, use=use, lr=1e-2))
    return eval_dice(model.module)


def test_teacher_plus_labels_beats_labels_alone_for_the_same_student_budget_and_seed():
    assert student_dice("both", scarce=True) > student_dice("labels", scarce=True) + 0.02


def test_label_free_distillation_reaches_a_stated_fraction_of_labels_only_dice():
    assert student_dice("teacher", scarce=False) >= LABEL_FREE_FRACTION * student_dice("labels", scarce=False)


def test_the_student_is_the_teacher_narrower_and_fits_its_card():
    model = run_to_end(distill(fresh_model(), step_data(), steps=2, width=0.5))
    assert model.card.architecture.args["channels"] == [4, 8, 16]
    teacher_params = model.metrics["distillation"]["teacher_params"]
    assert model.metrics["distillation"]["student_params"] < teacher_params / 3
    assert any("strongest channels" in note for note in model.notes)


def test_a_width_the_pruner_rounds_otherwise_still_starts_from_the_teachers_channels():
    # 8 × 0.35 = 2.8: the student has 3 channels there; one global pruning ratio left 2 and the
    # student silently started from scratch.
    teacher = fresh_model().module
    model = run_to_end(distill(fresh_model(), step_data(), steps=0, width=0.35))
    assert model.card.architecture.args["channels"] == [3, 6, 11]
    assert any("strongest channels" in note for note in model.notes)
    first = "model.0.conv.unit0.conv.weight"
    kept = model.module.state_dict()[first]
    source = teacher.state_dict()[first]
    assert all(any(bool((k == s).all()) for s in source) for k in kept)  # each kept filter is a teacher filter


def test_an_onnx_only_teacher_teaches_through_onnx_runtime():
    teacher = parent().as_format("onnx")
    teacher = dataclasses.replace(teacher, files={"onnx": teacher.files["onnx"]})  # no torch weights to fall back on
    model = run_to_end(distill(fresh_model(), step_data(teacher=teacher), steps=3, use="teacher"))
    assert model.metrics["distillation"]["learnt_from"] == "teacher"


def test_a_student_of_another_architecture_can_be_named():
    arch = student_architecture(None, 0.5, {"name": "BasicUNet", "args": {"spatial_dims": 2, "in_channels": 1,
                                                                          "out_channels": 2,
                                                                          "features": [4, 4, 8, 8, 16, 4]}})
    model = run_to_end(distill(fresh_model(), step_data(), steps=2, student={"name": arch.name, "args": arch.args}))
    assert model.card.architecture.name == "BasicUNet"
    assert any("from scratch" in note for note in model.notes)


def test_labels_are_required_for_label_modes():
    unlabelled = [dataclasses.replace(c, labels=None) for c in train_cases()]
    with pytest.raises(ValueError, match="needs labels"):
        run_to_end(distill(fresh_model(), step_data(train=unlabelled), steps=1, use="labels"))


def on_4bit_grid(module) -> bool:
    """Every convolution's weights on the per-channel 4-bit grid: ±7 steps of its channel's largest / 7."""
    import numpy as np
    import torch

    for layer in [m for m in module.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]:
        w = layer.weight.detach().numpy()
        w = np.moveaxis(w, 1 if layer.transposed else 0, 0).reshape(w.shape[1 if layer.transposed else 0], -1)
        steps = w / (np.abs(w).max(axis=1, keepdims=True) / 7)
        if np.abs(steps - np.round(steps)).max() >= 1e-4:
            return False
    return True


def test_quantization_aware_distillation_ends_on_the_4bit_grid_that_4bit_weights_store_exactly():
    import numpy as np
    import torch

    from compression.steps.quantize_ort import quantize_int8_ort
    from compression.training import onnx_logits, predict_logits

    data = step_data()
    model = run_to_end(distill(fresh_model(), data, steps=6, width=0.5, weight_bits=4, qat_share=0.5))
    student = model.module
    convs = [m for m in student.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    assert model.metrics["distillation"]["weight_bits"] == {"bits": 4, "from_step": 3, "layers": len(convs)}
    assert on_4bit_grid(student)
    x = data.slices("calib", model.card, with_labels=False, max_slices=3)[0]
    float_logits = predict_logits(student, x)
    model = run_to_end(quantize_int8_ort(model, data, mode="weights", bits=4))
    stored_logits = onnx_logits(model.onnx_path, x)
    # The batch norms folded into the exported Convs rescale channels, which leaves them on the grid.
    assert np.abs(stored_logits - float_logits).max() < 1e-3 * np.abs(float_logits).max()
    with pytest.raises(ValueError, match="weight_bits"):
        run_to_end(distill(fresh_model(), data, steps=1, weight_bits=4, qat_share=0))


def test_a_2p5d_student_reads_neighbouring_slices_and_starts_as_the_one_slice_teacher():
    import numpy as np

    from compression.training import predict_logits

    data = step_data()
    model = run_to_end(distill(fresh_model(), data, steps=0, width=1.0, slice_context=1))
    assert (model.card.input.channels, model.card.input.slice_context) == (3, 1)
    assert model.card.architecture.args["in_channels"] == 3
    x = data.slices("calib", model.card, with_labels=False)[0]
    assert x.shape[1] == 3 and not np.array_equal(x[:, 0], x[:, 1])
    teacher = load_torch_module(parent().as_format("state_dict"))
    start = predict_logits(model.module, x)
    assert np.abs(start - predict_logits(teacher, x[:, 1:2])).max() < 1e-4  # the teacher, reading the centre
    noise = x.copy()
    noise[:, [0, 2]] = np.random.default_rng(0).random(noise[:, [0, 2]].shape)
    assert np.abs(predict_logits(model.module, noise) - start).max() < 1e-4  # neighbours start at zero weight


def test_a_2p5d_student_learns_to_read_its_neighbours_and_its_variant_runs_as_written(tmp_path):
    from app.core.inference import OnnxRunner
    from app.core.models import open_model

    from compression.pipeline import run_steps
    from tests.compression.tiny import eval_cases

    model = run_to_end(distill(fresh_model(), step_data(), steps=4, width=0.5, slice_context=1))
    reads = [w for w in model.module.state_dict().values() if w.dim() == 4 and w.shape[1] == 3]
    assert reads and all(float(w[:, [0, 2]].abs().sum()) > 0 for w in reads)  # no longer zero
    steps = [{"step": "distill", "steps": 2, "width": 0.5, "slice_context": 1}, {"step": "calibrate_output"}]
    variant = open_model(run_to_end(run_steps(parent(), steps, step_data(), tmp_path, name="slices-3")).card_path)
    assert (variant.card.input.slice_context, variant.card.input.channels) == (1, 3)
    case = eval_cases()[0]
    assert run_to_end(OnnxRunner(variant, threads=1).run(case.volume)).labels.shape == case.volume.shape
    with pytest.raises(ValueError, match="slice_context is for 2D segmenters"):
        _student_card(dataclasses.replace(parent().card, task="classification"), parent().card.architecture, 1)


def test_the_guide_runs_the_teacher_as_its_onnx_export_and_the_targets_in_torch():
    import numpy as np

    from compression.data import slice_tensors
    from compression.export import ONNX_ATOL, ONNX_RTOL
    from compression.steps.distill import _Teacher, _TeacherGuide
    from compression.training import lesion_on_slice, predict_logits

    model = fresh_model()
    x, _ = slice_tensors(list(train_cases()), model.card, with_labels=False)
    teacher = _Teacher(model, step_data())
    got = teacher(x)
    assert teacher.path is not None and teacher.path.exists()  # the torch teacher ran as ONNX
    expected = predict_logits(model.module, x, dtype=np.float16)
    assert got.dtype == np.float16 and got.shape == expected.shape
    expected32 = expected.astype(np.float32)  # the export's tolerance, and one float16 step for the rounding
    allowed = ONNX_ATOL + ONNX_RTOL * np.abs(expected32) + np.spacing(np.abs(expected)).astype(np.float32)
    assert np.all(np.abs(got.astype(np.float32) - expected32) <= allowed)
    assert np.array_equal(got[:, 1] > got[:, 0], expected[:, 1] > expected[:, 0])
    assert np.array_equal(teacher.targets(x), expected)  # the student's targets: torch itself, bit for bit
    guide = _TeacherGuide(teacher)
    seen = guide(x)
    assert np.array_equal(seen, lesion_on_slice(expected)) and 0 < seen.sum() < len(x)
    assert (guide.scans, guide.slices, guide.seen) == (1, len(x), int(seen.sum()))


def test_unlabelled_scans_are_sampled_where_the_teacher_sees_lesion_unless_unguided():
    model = fresh_model()
    run_to_end(distill(model, step_data(train=scarce_labels()), steps=2, max_slices=4))
    assert (model.work_dir / "teacher.onnx").exists()
    assert any("where the teacher sees lesion" in note and "3 unlabelled scans" in note for note in model.notes)
    model = fresh_model()
    run_to_end(distill(model, step_data(train=scarce_labels()), steps=2, max_slices=4, guided=False))
    assert not any("where the teacher sees lesion" in note for note in model.notes)
    assert not (model.work_dir / "teacher.onnx").exists()  # unguided, the teacher runs in torch only


def test_hints_teach_the_students_blocks_the_teachers_features_and_leave_the_teacher_as_it_was():
    import torch

    model = fresh_model()
    teacher = model.module
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = run_to_end(distill(model, step_data(), steps=40, width=0.5, lr=1e-2, hint_weight=1.0))
    hints = model.metrics["distillation"]["hints"]
    # the tiny UNet's down blocks and its bottom, not the last up block (its output is the logits)
    assert len(hints["layers"]) >= 3 and "model.2.1" not in hints["layers"]
    assert hints["last"] < 0.7 * hints["first"]
    assert any("Feature distillation" in note for note in model.notes)
    assert not teacher._forward_hooks and not any(m._forward_hooks for m in teacher.modules())
    assert not any(m._forward_hooks for m in model.module.modules())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the student is the plain network: no adapter went into its weights
    assert set(model.module.state_dict()) == set(before)


def test_hints_need_the_model_being_compressed_in_torch_as_the_teacher():
    model = fresh_model()
    model.module = None
    with pytest.raises(ValueError, match="teacher, in torch"):
        run_to_end(distill(model, step_data(), steps=1, hint_weight=1.0))


def test_hints_give_a_2p5d_students_teacher_the_centre_slice():
    model = run_to_end(distill(fresh_model(), step_data(), steps=3, width=0.5, slice_context=1, hint_weight=1.0))
    assert model.card.input.channels == 3
    hints = model.metrics["distillation"]["hints"]
    assert len(hints["layers"]) >= 3 and hints["first"] > 0


def test_a_time_limit_trains_what_fits_and_the_student_still_ends_on_its_4bit_grid():
    model = run_to_end(distill(fresh_model(), step_data(), steps=10**6, width=0.5, weight_bits=4, qat_share=0.25,
                               time_limit_s=6.0))
    stats = model.metrics["distillation"]
    ran = stats["steps"]
    assert stats["steps_planned"] == 10**6 and 20 <= ran < 10**6
    assert 0 < stats["weight_bits"]["from_step"] < ran  # about its last quarter: a cut once it began shortens it
    assert any("cut training to" in note for note in model.notes)
    assert on_4bit_grid(model.module)


def test_a_time_limit_spent_before_training_fails_the_step_with_why():
    with pytest.raises(ValueError, match="ran out before the student could train"):
        run_to_end(distill(fresh_model(), step_data(), steps=10, time_limit_s=1e-6))


def test_a_cut_moves_the_quantized_share_earlier_but_never_back_once_it_has_begun():
    from compression.steps.distill import _QuantizeFrom

    net = fresh_model().module
    quantized = _QuantizeFrom(net, 4, start=750, share=0.25)
    for _ in range(20):
        quantized(net, 1e-3)
    quantized.retarget(400)  # cut at step 20 to 400: the last quarter starts at 300
    assert (quantized.start, quantized.begun) == (300, False)
    for _ in range(300):
        quantized(net, 1e-3)
    assert quantized.begun and quantized.layers
    quantized.retarget(320)  # cut again after it began: it stays where it began
    assert quantized.start == 300
    quantized.bake()
    late = _QuantizeFrom(net, 4, start=750, share=0.25)
    for _ in range(20):
        late(net, 1e-3)
    late.retarget(22)  # a quarter of 22 would have begun at 16: it begins now, at 20
    assert late.begun and late.start == 20
    late.bake()
