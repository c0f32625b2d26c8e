"""The one training loop every fine-tune, distillation, sparsity and QAT step shares.

Mixed precision everywhere: ``amp="fp16"`` runs autocast float16 with a GradScaler (what GPUs
want), ``amp="bf16"`` autocast bfloat16 (no scaler needed: bf16 keeps fp32's range), ``"off"``
plain fp32; ``"auto"`` picks fp16 on CUDA and fp32 on CPU, where bf16 autocast is only worth it
on CPUs with native bf16 (pass ``"bf16"`` there). Seeded: the same seed, data and threads give
the same weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np

from app.core.progress import Progress


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    amp: str = "auto"  # auto | off | bf16 | fp16
    crop: int | None = None  # random square crops (None: whole slices); CPU fine-tunes use 128-256
    lesion_crops: float = 0.7  # share of crops centred (±crop/3) on a lesion pixel of the labels or the teacher
    augment: bool = True  # flips: nodules have no preferred left/right or up/down
    threads: int | None = None
    time_limit_s: float | None = None  # train fewer steps when the planned ones would not end in time


def seed_all(seed: int, threads: int | None = None) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(int(threads))


def amp_dtype(amp: str, device: str):
    """The autocast dtype for ``amp`` on ``device`` (None: fp32)."""
    import torch

    if amp == "auto":
        amp = "fp16" if device.startswith("cuda") else "off"
    table = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in table:
        raise ValueError(f"amp must be auto, off, bf16 or fp16, not {amp!r}")
    return table[amp]


# ---------------------------------------------------------------- losses


def soft_dice_loss(probabilities, target_probabilities, eps: float = 1e-5):
    """1 − mean soft Dice over foreground channels (channel 0 is background)."""
    dims = (0, 2, 3)
    p, t = probabilities[:, 1:], target_probabilities[:, 1:]
    inter = (p * t).sum(dims)
    dice = (2 * inter + eps) / (p.sum(dims) + t.sum(dims) + eps)
    return 1 - dice.mean()


IGNORE = 255  # label value of pixels without ground truth (unlabelled scans mixed into a labelled batch)


def segmentation_loss(logits, labels, foreground_weight: float = 1.0):
    """Cross-entropy + soft Dice against integer labels (N, H, W); pixels labelled IGNORE do not count.

    ``foreground_weight`` > 1 up-weights lesion pixels in the cross-entropy: nodules are a few
    per cent of a slice, and a network trained from scratch otherwise settles on "all background".
    """
    import torch
    import torch.nn.functional as F

    labels = labels.long()
    valid = labels != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0
    weight = None
    if foreground_weight != 1.0:
        weight = torch.full((logits.shape[1],), float(foreground_weight), device=logits.device)
        weight[0] = 1.0
    ce = F.cross_entropy(logits, labels, weight=weight, ignore_index=IGNORE)
    one_hot = F.one_hot(labels.clamp_max(logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2).float()
    mask = valid[:, None].float()
    return ce + soft_dice_loss(logits.softmax(1) * mask, one_hot * mask)


def distillation_loss(student_logits, teacher_logits, labels=None, temperature: float = 1.0,
                      label_weight: float = 0.5, foreground_weight: float = 1.0):
    """Per-pixel KL(teacher‖student) at ``temperature`` (× T², Hinton) + soft Dice to the teacher's
    mask, mixed with the labels' loss when labels are given.

    The Dice term uses the teacher's argmax mask, not its probabilities: an unsure teacher
    (p ≈ 0.55 at a lesion) imitated closely would otherwise tip to background under argmax.

    ``foreground_weight`` up-weights the KL where the teacher sees lesion, for the same reason as
    in :func:`segmentation_loss` (a student from scratch otherwise settles on background).
    """
    import torch.nn.functional as F

    t = float(temperature)
    teacher_logits = teacher_logits.float()
    teacher_soft = F.softmax(teacher_logits / t, 1)
    kl_map = (teacher_soft * (F.log_softmax(teacher_logits / t, 1) - F.log_softmax(student_logits / t, 1))).sum(1)
    if foreground_weight != 1.0:
        kl_map = kl_map * (1 + (foreground_weight - 1) * (1 - F.softmax(teacher_logits, 1)[:, 0]))
    teacher_mask = F.one_hot(teacher_logits.argmax(1), teacher_logits.shape[1]).permute(0, 3, 1, 2).float()
    soft = kl_map.mean() * t * t + soft_dice_loss(student_logits.softmax(1), teacher_mask)
    if labels is None:
        return soft
    return (1 - label_weight) * soft + label_weight * segmentation_loss(student_logits, labels, foreground_weight)


# ---------------------------------------------------------------- the loop


def _batch(arrays: dict[str, np.ndarray], idx: np.ndarray, rng: np.random.Generator, config: TrainConfig,
           lesions: "LesionPixels | None" = None):
    """One crop window per slice, the same for each of its arrays (image, labels, teacher
    outputs), and the same flips for the whole batch.

    Lesions fill a few per cent of a slice: a crop drawn anywhere mostly shows background, so
    ``config.lesion_crops`` of the crops are centred near a lesion pixel (labels where the slice
    has them, else the teacher's mask), the rest anywhere. Only the crops are read from the
    arrays (a memory-mapped teacher's whole slices were copied first, then cut), and each
    slice's lesion pixels are found once (``lesions``) rather than at every draw.
    """
    height, width = arrays["x"].shape[-2:]
    if config.crop and min(config.crop, height, width) < max(height, width):
        c = min(config.crop, height, width)
        lesions = lesions if lesions is not None else LesionPixels(arrays)
        windows = [_crop_window(lesions, int(i), c, (height, width), rng, config.lesion_crops) for i in idx]
        out = {k: np.stack([v[i, ..., y0:y0 + c, x0:x0 + c] for i, (y0, x0) in zip(idx, windows)])
               for k, v in arrays.items()}
    else:
        out = {k: v[idx] for k, v in arrays.items()}
    if config.augment:
        flips = rng.random(2) < 0.5
        for axis_from_end, flip in zip((1, 2), flips):
            if flip:
                out = {k: np.flip(v, -axis_from_end) for k, v in out.items()}
    # Labels are kept as uint8 (an eighth of int64 for every train slice), 2.5-D slices as float16
    # (cut_slices): the network wants float32 images, the loss int64 labels.
    wanted = {"x": np.float32, "y": np.int64}
    return {k: np.ascontiguousarray(v, wanted.get(k)) for k, v in out.items()}


class LesionPixels:
    """Per train slice, its lesion pixels (row, col): the labels' where the slice has any, else
    the teacher's mask; found on a slice's first draw and kept (a few hundred pixels a slice).

    Finding them at every draw meant an argmax over the teacher's float16 logits of the whole
    slice, eight times a step: on a GPU, where the step itself is milliseconds, that bound the
    training speed."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.y, self.teacher = arrays.get("y"), arrays.get("teacher")
        self._found: dict[int, np.ndarray] = {}

    def __call__(self, i: int) -> np.ndarray:
        pixels = self._found.get(i)
        if pixels is None:
            pixels = self._found[i] = self._find(i).astype(np.int32)
        return pixels

    def _find(self, i: int) -> np.ndarray:
        if self.y is not None:
            labels = np.asarray(self.y[i])
            pixels = np.argwhere((labels > 0) & (labels != IGNORE))
            if len(pixels) or self.teacher is None:
                return pixels
        if self.teacher is not None:
            logits = np.asarray(self.teacher[i])
            lesion = logits[1] > logits[0] if len(logits) == 2 else logits.argmax(0) > 0  # argmax, ties to 0
            return np.argwhere(lesion)
        return np.zeros((0, 2), int)


def _crop_window(lesions: LesionPixels, i: int, c: int, size: tuple[int, int], rng: np.random.Generator,
                 lesion_crops: float) -> tuple[int, int]:
    height, width = size
    pixels = lesions(i) if lesion_crops > 0 and rng.random() < lesion_crops else ()
    if len(pixels):
        cy, cx = pixels[rng.integers(len(pixels))] + rng.integers(-(c // 3), c // 3 + 1, size=2)
        return int(np.clip(cy - c // 2, 0, height - c)), int(np.clip(cx - c // 2, 0, width - c))
    return int(rng.integers(0, height - c + 1)), int(rng.integers(0, width - c + 1))


def train_loop(module, arrays: dict[str, np.ndarray], loss_fn: Callable, config: TrainConfig, *,
               penalty: Callable | None = None, after_backward: Callable | None = None,
               after_step: Callable | None = None, param_groups: list[dict] | None = None,
               sampler: Callable | None = None, label: str = "fine-tune", on_cut: Callable[[int], None] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> Generator[Progress, None, dict]:
    """Train ``module`` in place on ``arrays`` (``x`` plus targets) for ``config.steps`` steps.

    ``loss_fn(logits, batch_tensors)`` gives the task loss; ``penalty(module)`` adds a
    regulariser (sparsity); ``after_backward(module)`` runs between backward and the optimiser
    step (torch-pruning's group regularisation); ``after_step(module, lr)`` after it (proximal
    shrinkage, projections). ``sampler(module, step, rng, n, batch_size)`` picks each batch's
    slices (default: uniformly; see :class:`DisagreementSampler`). Yields a progress tick with
    the loss per step.

    ``config.time_limit_s``: the first few steps are timed, and when the planned steps would not
    end within the limit the run is cut to as many as fit: the learning rate's cosine then ends
    at the cut, and ``on_cut(steps)`` tells the caller (quantization-aware training moves its
    last share with it). The pace is timed again every 2.5 % of the steps to run, and the count
    moved to what fits at the mean pace since the first check, never past the planned steps:
    timed once, a limited 20000-step distillation on the demo data overran its limit by a third
    on a machine that got busy, and another, timed on its slower first steps, ended with a third
    of its time unused. Paced on the last 2.5 % alone, the count swung by a quarter from one
    check to the next. The stats say how many steps were planned and how many ran.
    """
    import torch

    seed_all(config.seed, config.threads)
    rng = np.random.default_rng(config.seed)
    dtype = amp_dtype(config.amp, config.device)
    device_type = "cuda" if config.device.startswith("cuda") else "cpu"
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    module.to(config.device).train()
    # param_groups: e.g. channel scales learning faster than the weights (sparsity training).
    optimiser = torch.optim.AdamW(param_groups or module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(1, config.steps))
    losses, start = [], clock()
    n = len(arrays["x"])
    lesions = LesionPixels(arrays)
    total, check = config.steps, _timed_steps(config)
    window, mark = check, (0, start)  # steps between pace checks; (step, time) at the first one
    step = -1
    while step + 1 < total:
        step += 1
        idx = (rng.choice(n, min(config.batch_size, n), replace=False) if sampler is None
               else sampler(module, step, rng, n, min(config.batch_size, n)))
        batch = {k: torch.from_numpy(v).to(config.device) for k, v in _batch(arrays, idx, rng, config, lesions).items()}
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = module(batch["x"])
            loss = loss_fn(logits.float(), batch)
            if penalty is not None:
                loss = loss + penalty(module)
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if after_backward is not None:
            scaler.unscale_(optimiser)
            after_backward(module)
        scaler.step(optimiser)
        scaler.update()
        if after_step is not None:
            after_step(module, optimiser.param_groups[0]["lr"])
        schedule.step()
        losses.append(float(loss.detach()))
        if step + 1 == check:
            now = clock()
            fits = _steps_that_fit(config, step + 1, now - start, (now - mark[1]) / (step + 1 - mark[0]))
            if fits != total:
                total = schedule.T_max = fits
                for group, base in zip(optimiser.param_groups, schedule.base_lrs):  # onto the cosine of the new count
                    group["lr"] = base * (1 + math.cos(math.pi * schedule.last_epoch / total)) / 2
                if on_cut is not None:
                    on_cut(total)
            mark = mark if mark[0] else (step + 1, now)  # later paces leave out the slower first steps
            check = step + 1 + max(window, total // 40)
        yield Progress((step + 1) / total, f"{label} step {step + 1}/{total} loss {losses[-1]:.4f}",
                       {"loss": losses[-1], "step": step + 1})
    module.eval()
    stats = {"steps": total, "loss_first": losses[0] if losses else None,
             "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None,
             "seconds": round(clock() - start, 2), "amp": str(dtype).replace("torch.", "") if dtype else "fp32"}
    if total < config.steps:
        stats.update(steps_planned=config.steps, time_limit_s=config.time_limit_s)
    return stats


def _timed_steps(config: TrainConfig) -> int:
    """After how many steps a time-limited run decides how many fit (0: no limit)."""
    return 0 if config.time_limit_s is None else max(1, min(20, config.steps // 20))


def _steps_that_fit(config: TrainConfig, done: int, elapsed: float, per_step: float) -> int:
    """The steps a run that has taken ``done`` in ``elapsed`` seconds can take in its time limit,
    at ``per_step`` seconds a step from now on."""
    left = max(0.0, config.time_limit_s - elapsed)
    return max(done, min(config.steps, done + int(left / max(per_step, 1e-9))))


def lesion_on_slice(logits: np.ndarray) -> np.ndarray:
    """Per slice of a segmenter's (N, 2, H, W) logits: does it call any pixel lesion."""
    return (logits[:, 1] > logits[:, 0]).any(axis=(1, 2))


class DisagreementSampler:
    """Online hard-example mining for distillation: ``share`` of every batch comes from the train
    slices where the student, as it is now, misses most of the teacher's lesion pixels.

    Lesions are a few per cent of the slices and the misses a few per cent of those: drawn
    uniformly, a slice with the one small nodule the student does not see yet comes up about
    once in a thousand batches. Every ``every`` steps the student (in eval mode, as it will
    run) is scored on each slice where the teacher sees lesion: the share of the teacher's
    lesion pixels it calls background (plus a floor so every such slice keeps a chance), and
    those slices are drawn in proportion. Scoring costs one forward pass over those slices.
    """

    def __init__(self, x: np.ndarray, teacher: np.ndarray, share: float = 0.5, every: int = 2000,
                 device: str = "cpu", chunk: int = 64):
        self.x, self.teacher, self.share, self.every, self.device = x, teacher, float(share), int(every), device
        lesion = [np.flatnonzero(lesion_on_slice(teacher[i:i + chunk])) + i for i in range(0, len(teacher), chunk)]
        self.lesion_slices = np.concatenate(lesion) if lesion else np.zeros(0, int)
        self.weights: np.ndarray | None = None
        self.history: list[dict] = []  # per re-scoring: step, slices scored, mean missed share

    def __call__(self, module, step: int, rng: np.random.Generator, n: int, batch_size: int) -> np.ndarray:
        if step and step % self.every == 0 and len(self.lesion_slices):
            self.rescore(module, step)
        focused = int(round(self.share * batch_size)) if self.weights is not None else 0
        picked = (rng.choice(self.lesion_slices, min(focused, len(self.lesion_slices)), replace=False,
                             p=self.weights) if focused else np.zeros(0, int))
        rest = rng.choice(n, batch_size, replace=False)
        rest = rest[~np.isin(rest, picked)][:batch_size - len(picked)]
        return np.concatenate([picked, rest]).astype(int)

    def missed_share(self, module, batch_size: int = 8) -> np.ndarray:
        """Per lesion slice: the share of the teacher's lesion pixels the student calls background."""
        import torch

        was_training = module.training
        module.eval()
        out = np.empty(len(self.lesion_slices), np.float32)
        with torch.inference_mode():
            for first in range(0, len(self.lesion_slices), batch_size):
                idx = self.lesion_slices[first:first + batch_size]
                batch = torch.from_numpy(np.ascontiguousarray(self.x[idx], np.float32)).to(self.device)
                student = module(batch).float()
                student_fg = (student[:, 1] > student[:, 0]).cpu().numpy()
                teacher = np.asarray(self.teacher[idx], np.float32)
                teacher_fg = teacher[:, 1] > teacher[:, 0]
                out[first:first + len(idx)] = ((teacher_fg & ~student_fg).sum(axis=(1, 2))
                                               / np.maximum(teacher_fg.sum(axis=(1, 2)), 1))
        module.train(was_training)
        return out

    def rescore(self, module, step: int) -> None:
        missed = self.missed_share(module)
        weights = missed + 0.02
        self.weights = weights / weights.sum()
        self.history.append({"step": step, "slices": int(len(missed)), "missed_mean": round(float(missed.mean()), 4),
                             "missed_half": int((missed > 0.5).sum())})


def labels_loss(logits, batch):
    return segmentation_loss(logits, batch["y"])


def make_labels_loss(foreground_weight: float = 1.0):
    def loss(logits, batch):
        return segmentation_loss(logits, batch["y"], foreground_weight)
    return loss


def make_distillation_loss(temperature: float = 1.0, label_weight: float = 0.5, foreground_weight: float = 1.0):
    def loss(logits, batch):
        labels = batch.get("y") if label_weight > 0 else None
        return distillation_loss(logits, batch["teacher"], labels, temperature, label_weight, foreground_weight)
    return loss


# ---------------------------------------------------------------- predictions


def predict_logits(module, x: np.ndarray, batch_size: int = 8, device: str = "cpu", amp: str = "off",
                   dtype=np.float32, allocate: Callable | None = None) -> np.ndarray:
    """Logits (N, C, H, W) of a torch module on pre-processed slices, stored as ``dtype``
    (in the array ``allocate(shape, dtype)`` returns, e.g. a file-backed one; see :func:`batched_logits`).

    The module runs on ``device`` and goes back to where its weights were afterwards: a teacher
    held on the CPU between steps scores a GPU run's train slices on the GPU."""
    import torch

    autocast = amp_dtype(amp, device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    home = next((p.device for p in module.parameters()), None)
    module.to(device).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        logits = module(torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(device))
        return logits.float().cpu().numpy()

    try:
        with torch.inference_mode(), torch.autocast(device_type, dtype=autocast or torch.float32,
                                                    enabled=autocast is not None):
            return batched_logits(run, x, batch_size, dtype, allocate)
    finally:
        if home is not None:
            module.to(home)


def onnx_logits(path, x: np.ndarray, batch_size: int = 8, threads: int | None = None, dtype=np.float32,
                allocate: Callable | None = None) -> np.ndarray:
    """Logits of an ONNX model on pre-processed slices (a teacher that exists only as ONNX)."""
    session = ort_session(path, threads)
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(batch, np.float32)})[0]
    return batched_logits(run, x, batch_size, dtype, allocate)


def batched_logits(run, x: np.ndarray, batch_size: int, dtype, allocate: Callable | None = None) -> np.ndarray:
    """``run`` batch by batch, written straight into one array of ``dtype``.

    Collecting float32 batches and concatenating them held two float32 copies of every train
    slice's logits at once (≈ 18 GB for a teacher's outputs on the 4,277 slices of 24 full
    scans: killed for memory); a teacher's float16 outputs now take a quarter of that, and
    ``allocate(shape, dtype)`` may hand out a file-backed array so that they take page cache
    instead of memory (:func:`scratch_array`).
    """
    out = None
    for first in range(0, len(x), batch_size):
        logits = run(x[first:first + batch_size])
        if out is None:
            shape = (len(x),) + logits.shape[1:]
            out = np.empty(shape, dtype) if allocate is None else allocate(shape, dtype)
        out[first:first + len(logits)] = logits
    return out if out is not None else np.zeros((0,), dtype)


def scratch_array(path) -> Callable:
    """An ``allocate`` for :func:`batched_logits`: a memory-mapped .npy file at ``path`` (in a
    step's scratch folder, removed with the variant's temporary folder). Training reads its
    batches from it at random; the operating system keeps what fits in memory."""
    from pathlib import Path

    def allocate(shape, dtype):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    return allocate


def ort_session(path, threads: int | None = None, optimized_path=None, level: str = "all",
                providers=("CPUExecutionProvider",)):
    """An ONNX Runtime session with spinning off (two cores are shared with the UI)."""
    import onnxruntime as ort

    from app.core.inference import apply_weights_only_int8, session_options

    options = session_options(ort, threads)
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    options.graph_optimization_level = levels[level]
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    apply_weights_only_int8(options, path)
    return ort.InferenceSession(str(path), options, providers=list(providers))


def masks_from_logits(logits: np.ndarray) -> np.ndarray:
    """Foreground masks (N, H, W) bool: argmax over channels, as the runners label softmax outputs."""
    return logits.argmax(1) > 0


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks over all slices (1.0 when both are empty)."""
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom
