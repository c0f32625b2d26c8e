"""Output calibration to the original (label-free), on the tiny UNet."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.progress import run_to_end

from compression.pipeline import StepError, run_steps
from compression.steps.calibrate_output import append_logit_calibration, calibrate_output, fit_logit_calibration
from compression.steps.quantize_ort import quantize_int8_ort
from compression.training import onnx_logits
from tests.compression.steps_support import fresh_model, parent, step_data


def test_the_fit_undoes_a_known_scale_and_shift_of_the_logits():
    rng = np.random.default_rng(0)
    reference = rng.normal(-4, 3, 200_000).astype(np.float32)  # mostly background, some lesion
    variant = (reference - 1.5) / 2.0  # a less sure network: half the margin, biased to background
    fit = fit_logit_calibration(variant, reference, foreground_weight=1.0)
    assert fit["scale"] == pytest.approx(2.0, rel=0.02) and fit["shift"] == pytest.approx(1.5, abs=0.05)
    assert fit["loss_after"] < fit["loss_before"]
    assert fit["mask_dice_after"] > fit["mask_dice_before"]
    assert fit["lesion_probability_after"] == pytest.approx(fit["lesion_probability_original"], abs=0.01)


def test_the_written_model_is_the_variant_with_its_logits_scaled_and_shifted(tmp_path):
    source = parent().files["onnx"]
    x = step_data().slices("calib", parent().card, with_labels=False, max_slices=3)[0]
    target = tmp_path / "calibrated.onnx"
    append_logit_calibration(source, target, 1.7, 0.8)
    before, after = onnx_logits(source, x), onnx_logits(target, x)
    assert np.allclose(after[:, 0], 1.7 * before[:, 0] - 0.4, atol=1e-4)
    assert np.allclose(after[:, 1], 1.7 * before[:, 1] + 0.4, atol=1e-4)


def test_a_less_sure_variant_is_brought_back_to_the_originals_lesion_probability(tmp_path):
    """A stand-in for a student that sees the lesions but is less sure of them: the original's own
    ONNX with its logits halved and pushed to background. The step, fitting on the calib slices
    against the original, must find the inverse and give back the original's masks."""
    data = step_data()
    model = fresh_model()
    x = data.slices("calib", model.card, with_labels=False, max_slices=8)[0]
    original = onnx_logits(model.parent.files["onnx"], x)
    unsure = tmp_path / "unsure.onnx"
    append_logit_calibration(model.parent.files["onnx"], unsure, 0.5, -1.0)
    model.onnx_path, model.module = unsure, None
    assert (onnx_logits(unsure, x).argmax(1) > 0).sum() < 0.9 * (original.argmax(1) > 0).sum()
    model = run_to_end(calibrate_output(model, data, foreground_weight=1.0))
    fit = model.metrics["output_calibration"]
    assert fit["scale"] == pytest.approx(2.0, rel=0.05) and fit["shift"] == pytest.approx(2.0, abs=0.1)
    calibrated = onnx_logits(model.onnx_path, x)
    agree = ((calibrated.argmax(1) > 0) == (original.argmax(1) > 0)).mean()
    assert agree > 0.999 and fit["mask_dice_after"] > 0.99 > fit["mask_dice_before"]
    assert any("Output calibrated to the original" in note for note in model.notes)


def test_calibration_after_4bit_weights_keeps_the_4bit_file_and_the_input_untouched(tmp_path):
    from app.core.models import open_model

    from tests.compression.tiny import trained_variant_card

    card = trained_variant_card()
    hashes = {p.name: p.read_bytes() for p in card.parent.iterdir()}
    variant = run_to_end(run_steps(open_model(card), [{"step": "quantize_int8_ort", "mode": "weights", "bits": 4},
                                                      {"step": "calibrate_output"}], step_data(), tmp_path,
                                   name="calibrated"))
    assert variant.card.lineage.metrics["compression"]["output_calibration"]["scale"] > 0
    onnx_size = variant.files["onnx"].stat().st_size
    assert onnx_size < 0.5 * open_model(card).files["onnx"].stat().st_size  # still the 4-bit file, plus two ops
    assert {p.name: p.read_bytes() for p in card.parent.iterdir()} == hashes


def test_a_model_that_is_not_a_two_class_segmenter_or_has_no_calib_scans_is_refused_clearly():
    with pytest.raises(StepError, match="needs calib scans"):
        run_to_end(calibrate_output(fresh_model(), step_data(calib=[])))
    model = run_to_end(quantize_int8_ort(fresh_model(), step_data(), mode="weights"))
    import dataclasses

    model.card = dataclasses.replace(model.card, output_activation="sigmoid")
    with pytest.raises(StepError, match="two-class softmax"):
        run_to_end(calibrate_output(model, step_data()))


def test_calib_scans_where_the_original_sees_no_lesion_leave_the_output_as_it_was():
    import dataclasses

    from tests.compression.tiny import calib_cases

    empty = [dataclasses.replace(c, volume=dataclasses.replace(c.volume, voxels=np.full_like(c.volume.voxels, -1000)))
             for c in calib_cases()]
    model = run_to_end(quantize_int8_ort(fresh_model(), step_data(), mode="weights"))
    before = model.onnx_path
    model = run_to_end(calibrate_output(model, step_data(calib=empty)))
    assert model.onnx_path == before and "output_calibration" not in model.metrics
    assert model.skipped[-1][0] == "output calibration" and "no lesion pixel" in model.skipped[-1][1]
