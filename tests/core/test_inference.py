"""Inference runners on real (small) MONAI networks and phantom scans."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from app.core.inference import (
    ORT_TORCH_TOLERANCE,
    OnnxRunner,
    TorchRunner,
    canonical_axes,
    prepare,
    sliding_window,
)
from app.core.model_card import ModelError
from app.core.models import open_model
from app.core.progress import Cancelled, run_to_end
from app.core.volume import Volume
from tests.core.model_fixtures import DEMO_MODELS, chest_phantom, small_classifier, small_unet


def _collect(gen):
    """(every Progress a job yielded, its result)."""
    reports = []
    while True:
        try:
            reports.append(next(gen))
        except StopIteration as stop:
            return reports, stop.value


def test_ort_and_torch_agree_on_the_demo_unet():
    """Same preprocessed slices through both back ends: logits within ORT_TORCH_TOLERANCE."""
    variant = open_model(DEMO_MODELS / "lung-nodule-unet2d" / "card.json")
    volume = chest_phantom(shape=(3, 64, 64), nodules=((1, 30, 30, 5),))
    onnx, torch_runner = OnnxRunner(variant, threads=1), TorchRunner(variant.as_format("state_dict"), threads=1)
    batch = prepare(volume, variant.card).array[:, None]
    diff = np.abs(onnx._predict(batch) - torch_runner._predict(batch)).max()
    assert diff <= ORT_TORCH_TOLERANCE
    a, b = run_to_end(onnx.run(volume)), run_to_end(torch_runner.run(volume))
    assert np.mean(a.labels == b.labels) > 0.999
    assert a.provider == "CPUExecutionProvider" and b.provider == "torch-cpu"


def test_runner_reports_progress_per_batch_and_times_every_stage(tmp_path):
    runner = OnnxRunner(open_model(small_unet(tmp_path)), batch_size=2)
    volume = chest_phantom(shape=(5, 32, 32))
    reports, findings = _collect(runner.run(volume))
    assert [p.fraction for p in reports] == pytest.approx([0.4, 0.8, 1.0, 1.0])
    assert runner.batches_run == 3
    assert findings.labels.shape == volume.shape and findings.labels.dtype == np.uint8
    assert findings.timing.load_s > 0 and findings.timing.network_s > 0 and findings.timing.postprocess_s > 0


def test_sliding_window_equals_one_pass_when_the_patch_covers_the_volume(tmp_path):
    runner = TorchRunner(open_model(small_unet(tmp_path / "a", dims=3, patch=(8, 16, 16)), prefer="state_dict"))
    image = prepare(chest_phantom(shape=(8, 16, 16)), runner.card).array[None]
    windowed = run_to_end(sliding_window(image, (8, 16, 16), 0.5, runner._predict, batch_size=2))
    whole = runner._predict(image[None])[0]
    assert np.allclose(windowed, whole, atol=1e-6)


def test_sliding_window_matches_monai_inferer(tmp_path):
    import torch
    from monai.inferers import sliding_window_inference

    runner = TorchRunner(open_model(small_unet(tmp_path, dims=3, patch=(8, 16, 16)), prefer="state_dict"))
    image = prepare(chest_phantom(shape=(12, 40, 36)), runner.card).array[None]
    ours = run_to_end(sliding_window(image, (8, 16, 16), 0.25, runner._predict, batch_size=3))
    with torch.inference_mode():
        theirs = sliding_window_inference(torch.from_numpy(image[None]), (8, 16, 16), 3, runner.module,
                                          overlap=0.25, mode="gaussian")[0].numpy()
    assert np.abs(ours - theirs).max() < 1e-5


def test_3d_runner_reports_each_patch_batch(tmp_path):
    runner = OnnxRunner(open_model(small_unet(tmp_path, dims=3, patch=(8, 16, 16))), batch_size=2)
    reports, findings = _collect(runner.run(chest_phantom(shape=(8, 32, 32))))
    messages = [p.message for p in reports]
    assert messages[:2] == ["patches 2/9", "patches 4/9"]
    assert findings.labels.shape == (8, 32, 32)


def test_a_series_smaller_than_the_patch_is_a_message(tmp_path):
    runner = OnnxRunner(open_model(small_unet(tmp_path, dims=3, patch=(8, 16, 16))))
    with pytest.raises(ModelError, match=r"series \(4×32×32 voxels.*smaller than the model's patch \(8×16×16\)"):
        run_to_end(runner.run(chest_phantom(shape=(4, 32, 32))))


def test_a_card_asking_for_more_channels_than_a_ct_has(tmp_path):
    from dataclasses import replace

    runner = TorchRunner(open_model(small_unet(tmp_path), prefer="state_dict"))
    runner.card = replace(runner.card, input=replace(runner.card.input, channels=2))
    with pytest.raises(ModelError, match="wants 2 input channels but series .* has 1"):
        run_to_end(runner.run(chest_phantom()))


# ---------------------------------------------------------------- cancel


def test_at_most_one_batch_runs_after_cancel(tmp_path):
    runner = TorchRunner(open_model(small_unet(tmp_path), prefer="state_dict"), batch_size=1)
    gen = runner.run(chest_phantom(shape=(8, 32, 32)))
    next(gen)
    ran_before_cancel = runner.batches_run
    runner.cancel()
    with pytest.raises(Cancelled):
        next(gen)
    assert runner.batches_run - ran_before_cancel <= 1


def test_cancel_from_another_thread_ends_the_running_onnx_batch(tmp_path):
    runner = OnnxRunner(open_model(small_unet(tmp_path)), batch_size=64, threads=1)
    volume = chest_phantom(shape=(64, 256, 256))
    started = threading.Event()
    original = runner.session.run

    def run_and_signal(*args, **kwargs):
        started.set()
        return original(*args, **kwargs)

    runner.session.run = run_and_signal  # lets the test cancel while ORT is inside run()
    canceller = threading.Thread(target=lambda: (started.wait(10), runner.cancel()))
    canceller.start()
    try:
        with pytest.raises(Cancelled):
            run_to_end(runner.run(volume))
    finally:
        canceller.join()
    assert runner.batches_run == 0  # the one big batch never completed
    findings = run_to_end(runner.run(chest_phantom()))  # the runner works again afterwards
    assert findings.labels is not None


# ---------------------------------------------------------------- providers


def test_gpu_provider_requests_fall_back_to_cpu_and_say_so(tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO, logger="app.core.inference")
    runner = OnnxRunner(open_model(small_unet(tmp_path)), providers=("tensorrt", "cuda", "cpu"))
    findings = run_to_end(runner.run(chest_phantom()))
    assert runner.provider == "CPUExecutionProvider"
    assert findings.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in caplog.text
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err and "onnxruntime" not in err  # the noise went to our log


# ---------------------------------------------------------------- geometry and classifiers


def test_orientation_is_undone_for_a_feet_first_flipped_series(tmp_path):
    runner = TorchRunner(open_model(small_unet(tmp_path), prefer="state_dict"))
    volume = chest_phantom(shape=(6, 32, 28), nodules=((2, 10, 8, 4),))
    flipped = Volume(voxels=volume.voxels[::-1, :, ::-1].copy(), spacing=volume.spacing,
                     direction=np.diag([-1.0, 1.0, -1.0]))
    assert canonical_axes(flipped.direction) == ((0, 1, 2), (True, False, True))
    a, b = run_to_end(runner.run(volume)), run_to_end(runner.run(flipped))
    assert np.array_equal(a.labels, b.labels[::-1, :, ::-1])


def test_a_lesion_classifier_scores_each_lesion(tmp_path):
    from app.core.lesions import lesion_table

    volume = chest_phantom(shape=(6, 48, 40), nodules=((2, 14, 12, 4), (3, 32, 28, 5)))
    labels = np.zeros(volume.shape, np.uint8)
    labels[1:4, 11:18, 9:16] = 1
    labels[2:5, 28:37, 24:33] = 1
    lesions = lesion_table(labels, volume)
    assert len(lesions) == 2
    runner = OnnxRunner(open_model(small_classifier(tmp_path)))
    findings = run_to_end(runner.run(volume, lesions=lesions))
    assert set(findings.lesion_scores) == {l.lesion_id for l in lesions}
    for scores in findings.lesion_scores.values():
        assert set(scores) == {"solid", "part-solid", "ground-glass"}
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ModelError, match="looks at lesions"):
        run_to_end(runner.run(volume))


def test_torch_bf16_autocast_runs_and_is_reported(tmp_path):
    variant = open_model(small_unet(tmp_path), prefer="state_dict")
    volume = chest_phantom()
    fp32 = run_to_end(TorchRunner(variant).run(volume))
    runner = TorchRunner(variant, autocast="bf16")
    bf16 = run_to_end(runner.run(volume))
    assert runner.provider == "torch-cpu-bf16" and bf16.provider == "torch-cpu-bf16"
    assert np.mean(bf16.labels == fp32.labels) > 0.95  # bf16 keeps 8 bits of mantissa
    with pytest.raises(ValueError, match="autocast"):
        TorchRunner(variant, autocast="int4")


def test_a_classifier_can_read_neighbouring_slices_as_channels(tmp_path):
    from app.core.inference import prepare
    from app.core.lesions import lesion_table

    volume = chest_phantom(shape=(8, 48, 40), nodules=((3, 14, 12, 4), (5, 32, 28, 5)))
    labels = np.zeros(volume.shape, np.uint8)
    labels[2:5, 11:18, 9:16] = 1
    labels[4:7, 28:37, 24:33] = 1
    lesions = lesion_table(labels, volume)
    one = OnnxRunner(open_model(small_classifier(tmp_path / "one")))
    three_folder = small_classifier(tmp_path / "three", slices=3)
    three = OnnxRunner(open_model(three_folder))
    prepared = prepare(volume, three.card)
    stacked = three._lesion_patches(prepared, lesions)
    assert stacked.shape == (2, 3, 16, 16)
    # The middle channel is the one-slice classifier's patch; the others are the slices beside it.
    assert np.array_equal(stacked[:, 1], one._lesion_patches(prepared, lesions)[:, 0])
    for lesion, patch in zip(lesions, stacked):
        k = int(round(lesion.centre_index[0]))
        assert not np.array_equal(patch[0], patch[1]) and not np.array_equal(patch[2], patch[1])
        shifted = [type(lesion)(**{**lesion.__dict__, "centre_index": (k + dk,) + lesion.centre_index[1:]})
                   for dk in (-1, 1)]
        below, above = one._lesion_patches(prepared, shifted)[:, 0]
        assert np.array_equal(patch[0], below) and np.array_equal(patch[2], above)
    for runner in (three, TorchRunner(open_model(three_folder, prefer="state_dict"))):
        findings = run_to_end(runner.run(volume, lesions=lesions))
        assert set(findings.lesion_scores) == {l.lesion_id for l in lesions}


@pytest.mark.parametrize("patch", [None, (16, 16)])
def test_a_2p5d_segmenter_reads_each_slice_with_its_neighbours(tmp_path, patch):
    """Whole slices and an in-plane sliding window: each slice goes in with the one before and
    after it as channels (the edge slice repeated at the ends), on both back ends."""
    import torch
    from dataclasses import replace

    from app.core.inference import neighbour_slices
    from tests.core.model_fixtures import SMALL_UNET_2D, build, segmentation_card, write_model

    arch = {**SMALL_UNET_2D, "in_channels": 3}
    card = segmentation_card(patch=patch, channels=3, arch=arch)
    card = replace(card, input=replace(card.input, slice_context=1))
    net = build("UNet", arch, seed=3)
    folder = write_model(tmp_path, card, net, (1, 3, 16, 16))
    volume = chest_phantom(shape=(5, 32, 32), nodules=((2, 16, 16, 5),))
    array = prepare(volume, card).array
    stacks = neighbour_slices(array, range(5), 1)
    assert np.array_equal(stacks[0], array[[0, 0, 1]]) and np.array_equal(stacks[4], array[[3, 4, 4]])
    with torch.inference_mode():
        if patch is None:
            expected = torch.softmax(net(torch.from_numpy(stacks)), 1).numpy()
        else:
            def network(windows):  # (1, 3, y, x): one slice's stack through the window
                return net(torch.from_numpy(windows[0][None])).numpy()
            expected = np.stack([run_to_end(sliding_window(stack, patch, card.input.overlap, network, 1))
                                 for stack in stacks])
            expected = torch.softmax(torch.from_numpy(expected), 1).numpy()
    for runner in (TorchRunner(open_model(folder, prefer="state_dict"), batch_size=2, keep_probabilities=True),
                   OnnxRunner(open_model(folder), batch_size=2, keep_probabilities=True)):
        probabilities = run_to_end(runner.run(volume)).probabilities  # float16 (classes, slices, y, x)
        assert np.abs(probabilities.astype(np.float32).transpose(1, 0, 2, 3) - expected).max() < 2e-3


def test_labels_from_probabilities_is_argmax_with_ties_to_the_lower_channel():
    from app.core.inference import labels_from_probabilities
    from app.core.model_card import Label

    rng = np.random.default_rng(4)
    probabilities = rng.integers(0, 4, (4, 6, 16, 16)).astype(np.float32)  # many ties
    values = (0, 1, 2, 5)
    labels = tuple(Label(v, f"c{v}", "#ffffff") for v in values)
    card = type("Card", (), {"output_activation": "softmax", "labels": labels})()  # all the function reads
    expected = np.array(values, np.uint8)[np.argmax(probabilities, axis=0)]
    assert np.array_equal(labels_from_probabilities(probabilities, card), expected)


def test_two_class_fast_path_gives_the_full_softmax_and_its_argmax(tmp_path):
    """Two-class segmenters keep only the foreground probability per slice: the findings must
    still be the softmax of both channels and its argmax."""
    runner = OnnxRunner(open_model(small_unet(tmp_path)), keep_probabilities=True)
    assert runner._foreground_only
    volume = chest_phantom(shape=(5, 32, 32), nodules=((2, 16, 16, 6),))
    findings = run_to_end(runner.run(volume))
    logits = runner._predict(prepare(volume, runner.card).array[:, None]).astype(np.float64)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax = (softmax / softmax.sum(1, keepdims=True)).transpose(1, 0, 2, 3)
    assert findings.probabilities.shape == softmax.shape
    assert np.abs(findings.probabilities.astype(np.float64) - softmax).max() < 1e-3  # float16 storage
    assert np.array_equal(findings.labels, np.argmax(softmax, axis=0).astype(np.uint8))
    assert len(np.unique(findings.labels)) > 1  # random weights: both classes appear, the test can fail


def test_padding_at_the_far_edges_repeats_the_edge_and_the_crop_undoes_it():
    from app.core.inference import crop_far, pad_far, pad_to_multiple

    batch = np.arange(2 * 3 * 5 * 6, dtype=np.float32).reshape(2, 3, 5, 6)
    padded = pad_far(batch, (8, 6))
    assert padded.shape == (2, 3, 8, 6)
    assert np.array_equal(padded[:, :, 5:], np.repeat(batch[:, :, 4:5], 3, axis=2))  # the last row, repeated
    assert np.array_equal(crop_far(padded, (5, 6)), batch)
    assert pad_far(batch, (4, 4)) is batch  # sides already longer stay as they are
    labels = np.ones((4, 7, 7), np.uint8)  # (N, y, x): only the last two axes are spatial
    assert pad_far(labels, (8, 8)).shape == (4, 8, 8)
    assert pad_to_multiple(labels, 4).shape == (4, 8, 8) and pad_to_multiple(batch, 1) is batch
