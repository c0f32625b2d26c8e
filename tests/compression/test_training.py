"""The shared training loop: mixed precision (autocast + GradScaler) on every fine-tune and distillation."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.progress import run_to_end

from compression.training import (
    IGNORE,
    TrainConfig,
    distillation_loss,
    make_labels_loss,
    segmentation_loss,
    train_loop,
)
from tests.compression.tiny import THREADS, TINY_UNET, tiny_card, train_cases


def arrays():
    from compression.data import slice_tensors

    x, y = slice_tensors(list(train_cases())[:2], tiny_card(), with_labels=True)
    return {"x": x, "y": y}  # uint8, as the steps keep it


def fresh_net():
    import torch

    from app.core.model_card import Architecture
    from app.core.models import build_network

    torch.manual_seed(0)
    return build_network(Architecture("UNet", TINY_UNET))


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_every_precision_trains_and_reports_what_it_used(amp):
    stats = run_to_end(train_loop(fresh_net(), arrays(), make_labels_loss(10.0),
                                  TrainConfig(steps=12, lr=1e-2, amp=amp, threads=THREADS)))
    assert stats["amp"] == {"off": "fp32", "bf16": "bfloat16", "fp16": "float16"}[amp]
    assert np.isfinite(stats["loss_last"]) and stats["loss_last"] < stats["loss_first"]


def test_fp16_uses_a_grad_scaler(monkeypatch):
    import torch

    made = []
    real = torch.amp.GradScaler

    def recording(*args, **kwargs):
        scaler = real(*args, **kwargs)
        made.append(scaler)
        return scaler

    monkeypatch.setattr(torch.amp, "GradScaler", recording)
    run_to_end(train_loop(fresh_net(), arrays(), make_labels_loss(), TrainConfig(steps=2, amp="fp16", threads=THREADS)))
    assert made and made[0].is_enabled()


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="amp"):
        run_to_end(train_loop(fresh_net(), arrays(), make_labels_loss(), TrainConfig(steps=1, amp="int4")))


def test_ignored_pixels_do_not_count_in_the_labels_loss():
    import torch

    logits = torch.randn(2, 2, 8, 8)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[1] = IGNORE
    assert torch.isclose(segmentation_loss(logits, labels), segmentation_loss(logits[:1], labels[:1]), atol=1e-6)
    assert float(segmentation_loss(logits, torch.full_like(labels, IGNORE))) == 0.0


def test_distillation_loss_is_smallest_when_the_student_copies_the_teacher():
    import torch

    teacher = torch.randn(2, 2, 8, 8) * 3
    assert distillation_loss(teacher, teacher) < distillation_loss(torch.zeros_like(teacher), teacher)
    assert distillation_loss(teacher, teacher) < distillation_loss(-teacher, teacher)


@pytest.mark.parametrize("source", ["y", "teacher"])
def test_crops_are_drawn_on_lesions_from_the_labels_or_the_teacher(source):
    from compression.training import TrainConfig, _batch

    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 128, 128), dtype=np.float32)
    lesion = np.zeros((6, 128, 128), np.int64)
    lesion[:, 100:106, 4:10] = 1  # a small lesion near a corner of every slice
    arrays = {"x": x}
    if source == "y":
        arrays["y"] = lesion
    else:
        arrays["teacher"] = np.stack([1.0 - lesion, lesion], axis=1).astype(np.float16)

    def lesion_share(lesion_crops):
        config = TrainConfig(crop=32, lesion_crops=lesion_crops, augment=False)
        hits = []
        for _ in range(40):
            batch = _batch(arrays, np.arange(5), rng, config)
            assert batch["x"].shape == (5, 1, 32, 32)
            shown = batch[source] if source == "y" else batch[source].argmax(1)
            hits += [bool((shown[i] == 1).any()) for i in range(5)]
        return np.mean(hits)

    assert lesion_share(1.0) == 1.0
    assert lesion_share(0.0) < 0.3  # a 32-pixel window anywhere on 128² rarely meets it


def test_each_crop_is_one_window_cut_alike_from_every_array_and_lesions_are_found_once_per_slice():
    from compression.training import LesionPixels, TrainConfig, _batch

    rows, cols = np.mgrid[:96, :96]
    where = (np.arange(4)[:, None, None] * 100_000 + rows * 100 + cols).astype(np.float32)  # slice, row, column
    teacher = np.stack([np.zeros_like(where), np.where(rows < 10, 1.0, -1.0)[None].repeat(4, 0)], axis=1)
    arrays = {"x": where[:, None], "teacher": teacher.astype(np.float16), "y": (where % 7 == 0).astype(np.uint8)}
    lesions = LesionPixels({"teacher": arrays["teacher"]})
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = rng.choice(4, 3, replace=False)
        batch = _batch({k: v for k, v in arrays.items() if k != "y"}, idx, rng, TrainConfig(crop=24), lesions)
        x = batch["x"][:, 0]
        assert x.shape == (3, 24, 24)
        steps = np.abs(np.diff(x, axis=1))
        assert np.all(steps == 100) and np.all(np.abs(np.diff(x, axis=2)) == 1)  # one window, flips at most
        assert np.array_equal(np.floor(x / 100_000), np.broadcast_to(idx[:, None, None], x.shape))  # its own slice
        assert np.array_equal(batch["teacher"][:, 1] > 0, (x % 100_000) // 100 < 10)  # cut where x was cut
    assert set(lesions._found) <= {0, 1, 2, 3} and all(len(p) == 10 * 96 for p in lesions._found.values())


def test_teacher_logits_go_straight_into_one_float16_array():
    import tracemalloc

    from compression.training import predict_logits

    net = fresh_net()
    x = np.random.default_rng(0).random((64, 1, 64, 64), dtype=np.float32)
    reference = predict_logits(net, x)  # float32
    tracemalloc.start()
    try:
        half = predict_logits(net, x, dtype=np.float16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert half.dtype == np.float16 and half.shape == reference.shape
    assert np.allclose(half, reference, rtol=1e-2, atol=1e-2)
    # The float16 result plus batch-sized scratch; gathering float32 batches and concatenating
    # them needed at least two float32 copies (4× the float16 result).
    assert peak < 2 * half.nbytes, f"peak {peak} bytes for a {half.nbytes}-byte result"


def test_teacher_logits_can_live_in_a_file_backed_array(tmp_path):
    from compression.training import predict_logits, scratch_array

    net = fresh_net()
    x = np.random.default_rng(0).random((20, 1, 64, 64), dtype=np.float32)
    in_memory = predict_logits(net, x, dtype=np.float16)
    on_disk = predict_logits(net, x, dtype=np.float16, allocate=scratch_array(tmp_path / "step" / "teacher.npy"))
    assert isinstance(on_disk, np.memmap) and str(on_disk.filename) == str(tmp_path / "step" / "teacher.npy")
    assert np.array_equal(on_disk, in_memory)
    assert np.array_equal(np.load(tmp_path / "step" / "teacher.npy"), in_memory)  # a plain .npy file


def test_hard_example_mining_draws_the_slices_where_the_student_misses_the_teachers_lesions():
    import torch

    from compression.training import DisagreementSampler

    class Threshold(torch.nn.Module):  # a "student" that sees lesion where the image is bright
        def forward(self, x):
            return torch.cat([torch.zeros_like(x), (x - 0.5) * 10], 1)

    x = np.zeros((30, 1, 16, 16), np.float32)
    teacher = np.zeros((30, 2, 16, 16), np.float16)
    teacher[:, 0] = 1.0
    teacher[:10, 1, 4:8, 4:8] = 3.0  # the teacher sees a lesion on slices 0-9
    x[:5, 0, 4:8, 4:8] = 1.0  # the student sees it only on 0-4
    sampler = DisagreementSampler(x, teacher, share=0.5, every=3)
    assert sampler.lesion_slices.tolist() == list(range(10))
    rng = np.random.default_rng(0)
    before = sampler(Threshold(), 0, rng, 30, 8)  # not scored yet: uniform
    assert len(set(before.tolist())) == 8
    batches = np.stack([sampler(Threshold(), step, rng, 30, 8) for step in range(3, 203)])
    assert sampler.history[0] == {"step": 3, "slices": 10, "missed_mean": 0.5, "missed_half": 5}
    assert all(len(set(b.tolist())) == 8 for b in batches)
    focused, uniform = batches[:, :4], batches[:, 4:]
    assert np.isin(focused, np.arange(5, 10)).mean() > 0.9  # drawn uniformly: 5 of 30 slices
    assert np.isin(uniform, np.arange(5, 10)).mean() < 0.3


def test_distillation_with_focus_reports_what_the_mining_saw():
    from compression.steps.distill import distill
    from tests.compression.steps_support import fresh_model, step_data

    model = run_to_end(distill(fresh_model(), step_data(), steps=4, focus=0.5, focus_every=2, use="teacher"))
    focus = model.metrics["distillation"]["focus"]
    assert focus["lesion_slices"] > 0 and [r["step"] for r in focus["rescored"]] == [2]
    assert any(note.startswith("Hard-example mining") for note in model.notes)


def run_on_a_simulated_clock(config: TrainConfig, seconds_for_step, **hooks):
    """train_loop on a clock that moves ``seconds_for_step(n)`` when step n's tick arrives: the pace
    it measures is exactly known. Returns (stats, ticks, the clock at the end, the counts it set)."""
    now, seen, ticks = [0.0], [], []
    gen = train_loop(fresh_net(), arrays(), make_labels_loss(10.0), config, on_cut=seen.append,
                     clock=lambda: now[0], **hooks)
    try:
        while True:
            ticks.append(next(gen))
            now[0] += seconds_for_step(len(ticks))
    except StopIteration as done:
        return done.value, ticks, now[0], seen


def test_a_time_limit_cuts_the_steps_to_what_fits_and_ends_the_learning_rate_there():
    lrs = []
    stats, ticks, end, seen = run_on_a_simulated_clock(
        TrainConfig(steps=400, lr=1e-2, threads=THREADS, time_limit_s=60.0), lambda _n: 1.0,
        after_step=lambda _module, lr: lrs.append(lr))
    # The pace is read after 20 steps, of which 19 have been counted: 0.95 s a step, 41 s left, 63
    # steps. Read again at step 40 (39 s): 1 s a step, 21 s left, 61 steps; at step 60 it holds.
    assert seen == [20 + int(41 / 0.95), 40 + 21] == [63, 61] and stats["steps"] == 61
    assert stats["steps_planned"] == 400 and stats["time_limit_s"] == 60.0
    assert len(ticks) == 61 and ticks[-1].fraction == 1.0 and "step 61/61" in ticks[-1].message
    assert end == 61.0  # the last tick counted: the run ended at its limit
    # after_step sees the rate each step used: cosine from 1e-2, reaching its floor at the cut, not at 400.
    assert lrs[0] == pytest.approx(1e-2) and all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[31] == pytest.approx(0.5e-2, rel=0.05) and lrs[-1] < 1e-5


def test_a_run_that_slows_down_is_cut_again_and_ends_near_its_limit():
    # from step 101 on, three times slower (a machine that got busy)
    stats, _ticks, end, seen = run_on_a_simulated_clock(
        TrainConfig(steps=4000, lr=1e-2, threads=THREADS, time_limit_s=300.0), lambda n: 1.0 if n <= 100 else 3.0)
    # Timed once, the first 20 steps promised about 300; the slowdown is seen at the next checks.
    assert seen[0] > 280 and len(seen) >= 2 and stats["steps"] == seen[-1] < 200
    assert end <= 300.0 + 3.0 * 20  # over by at most one check's window of slow steps


def test_a_run_timed_on_slow_first_steps_takes_back_the_steps_it_has_time_for():
    # a slow start (loading, warm-up), then the steady pace
    stats, _ticks, end, seen = run_on_a_simulated_clock(
        TrainConfig(steps=4000, lr=1e-2, threads=THREADS, time_limit_s=300.0), lambda n: 3.0 if n <= 20 else 1.0)
    assert seen[0] < 120 and stats["steps"] == seen[-1] > 200  # timed on the slow start, then given more
    assert 280 <= end <= 300.0 + 20  # it used its time, and kept to it within a check's window


def test_a_time_limit_that_the_planned_steps_fit_in_changes_nothing():
    import torch

    results = []
    for limit in (None, 1e6):
        net = fresh_net()
        stats = run_to_end(train_loop(net, arrays(), make_labels_loss(10.0),
                                      TrainConfig(steps=30, lr=1e-2, threads=THREADS, time_limit_s=limit)))
        results.append((stats, [p.detach().clone() for p in net.parameters()]))
    (plain, plain_weights), (limited, limited_weights) = results
    assert plain["steps"] == limited["steps"] == 30 and "steps_planned" not in limited
    assert all(torch.equal(a, b) for a, b in zip(plain_weights, limited_weights))
