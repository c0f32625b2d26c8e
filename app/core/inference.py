"""Inference runners: a scan in, findings out, as a generator that reports every batch.

The card drives everything: orientation, resampling, HU window and normalisation, 2D slice
batching or 3D sliding windows, output activation. Two back ends run the network:

- :class:`OnnxRunner` — ONNX Runtime with an explicit provider order (TensorRT → CUDA → CPU),
  reporting the provider that really ran; cancel ends the running batch through
  ``RunOptions.terminate``.
- :class:`TorchRunner` — eager PyTorch on CPU or CUDA, optional bf16/fp16 autocast.

Each runner's ``run(volume)`` yields :class:`Progress` per batch and returns :class:`Findings`.
``cancel()`` may be called from any thread; at most the batch already running completes.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generator, Sequence

import numpy as np

from app.core.findings import Findings, Timing
from app.core.model_card import ModelCard, ModelError
from app.core.models import ModelVariant, check_input_shape, check_onnx_model, check_output_shape
from app.core.progress import Cancelled, Progress, run_to_end
from app.core.volume import Volume

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_PROVIDER_ORDER = ("tensorrt", "cuda", "cpu")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# ORT vs torch on the same fp32 input: different kernels sum in different orders.
ORT_TORCH_TOLERANCE = 1e-4


# ---------------------------------------------------------------- pre-processing


@dataclass(frozen=True)
class Prepared:
    """The network-ready array (z, y, x) plus what it takes to map results back."""

    array: np.ndarray  # float32, canonical orientation, target spacing
    flips: tuple[bool, bool, bool]
    permutation: tuple[int, int, int]
    native_shape: tuple[int, int, int]  # canonical orientation, before resampling
    spacing: tuple[float, float, float]  # of ``array``


def canonical_axes(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Axis permutation and flips that bring (k, j, i) to (S→I axial stack, A→P rows, R→L cols).

    The runners feed axial slices in the radiological LPS layout the demo models learnt,
    whatever the patient position (feet-first, prone) the scanner recorded.
    """
    d = np.asarray(direction, float)
    # Which array axis (0=k, 1=j, 2=i) runs most along patient z, y, x.
    array_axis_of = {}
    columns = {2: d[:, 0], 1: d[:, 1], 0: d[:, 2]}  # array axis -> LPS direction vector
    for patient_axis in (2, 1, 0):  # z first, so the slice axis is settled before rows/cols
        free = [a for a in columns if a not in array_axis_of.values()]
        array_axis_of[patient_axis] = max(free, key=lambda a: abs(columns[a][patient_axis]))
    permutation = (array_axis_of[2], array_axis_of[1], array_axis_of[0])
    flips = (
        columns[permutation[0]][2] < 0,  # slices: head-first order keeps +z (towards S) increasing
        columns[permutation[1]][1] < 0,  # rows run anterior → posterior (+y)
        columns[permutation[2]][0] < 0,  # columns run right → left (+x), i.e. radiological
    )
    return permutation, flips


def _reorient(array: np.ndarray, permutation, flips, axis_offset: int = 0) -> np.ndarray:
    axes = list(range(axis_offset)) + [axis_offset + p for p in permutation]
    array = np.transpose(array, axes)
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis_offset + axis)
    return array


def _undo_reorient(array: np.ndarray, permutation, flips, axis_offset: int = 0) -> np.ndarray:
    for axis, flip in enumerate(flips):
        if flip:
            array = np.flip(array, axis_offset + axis)
    inverse = np.argsort(permutation)
    return np.transpose(array, list(range(axis_offset)) + [axis_offset + int(p) for p in inverse])


def intensity_preprocess(voxels: np.ndarray, card: ModelCard, padding: np.ndarray | None = None) -> np.ndarray:
    """HU window/clip and normalisation from the card, as float32."""
    pre = card.preprocessing
    array = voxels.astype(np.float32, copy=True)
    if padding is not None:  # padding is outside the body: treat it as air, not as data
        array[padding] = pre.hu_window[0] if pre.hu_window else -1024.0
    if pre.hu_window is not None and pre.clip:
        np.clip(array, pre.hu_window[0], pre.hu_window[1], out=array)
    if pre.normalisation == "window_0_1" and pre.hu_window is not None:
        lo, hi = pre.hu_window
        array -= lo
        array /= float(hi - lo)
    elif pre.normalisation == "zscore":
        body = array if padding is None else array[~padding]
        array -= float(body.mean())
        array /= float(body.std()) or 1.0
    return array


def prepare(volume: Volume, card: ModelCard) -> Prepared:
    permutation, flips = canonical_axes(volume.direction)
    voxels = _reorient(np.asarray(volume.voxels), permutation, flips)
    padding = None if volume.padding_mask is None else _reorient(np.asarray(volume.padding_mask), permutation, flips)
    spacing = tuple(float(volume.spacing[p]) for p in permutation)
    array = intensity_preprocess(voxels, card, padding)
    native_shape = array.shape
    target = _target_spacing(card, spacing)
    if target != spacing:
        array = _resample(array, spacing, target, order=1)
    return Prepared(np.ascontiguousarray(array), flips, permutation, native_shape, target)


def _target_spacing(card: ModelCard, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
    target = card.input.target_spacing
    if target is None:
        return spacing
    if len(target) == 2:  # in-plane only: keep the slice spacing
        return (spacing[0], float(target[0]), float(target[1]))
    return tuple(float(t) for t in target)  # type: ignore[return-value]


def _resample(array: np.ndarray, spacing, target, order: int, shape=None) -> np.ndarray:
    from scipy import ndimage

    if shape is None:
        shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(array.shape[-3:], spacing, target))
    zoom = [1.0] * (array.ndim - 3) + [new / old for new, old in zip(shape, array.shape[-3:])]
    return ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)


def restore(prepared: Prepared, array: np.ndarray, order: int, axis_offset: int = 0) -> np.ndarray:
    """Map a per-voxel result on the network grid back onto the original volume grid."""
    if array.shape[axis_offset:] != tuple(prepared.native_shape):
        array = _resample(array, None, None, order, shape=prepared.native_shape)
    return np.ascontiguousarray(_undo_reorient(array, prepared.permutation, prepared.flips, axis_offset))


# ---------------------------------------------------------------- sliding windows


def window_starts(image_size: Sequence[int], patch: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Patch start corners, laid exactly as MONAI's sliding_window_inference lays them."""
    from monai.data.utils import dense_patch_slices

    interval = [p if p == n else max(1, int(p * (1 - overlap))) for n, p in zip(image_size, patch)]
    slices = dense_patch_slices(tuple(image_size), tuple(patch), tuple(interval))
    return [tuple(s.start for s in window) for window in slices]


def importance_map(patch: Sequence[int], mode: str = "gaussian") -> np.ndarray:
    from monai.inferers.utils import compute_importance_map

    weights = compute_importance_map(tuple(patch), mode=mode, sigma_scale=0.125, device="cpu")
    return weights.numpy().astype(np.float32)


def sliding_window(
    image: np.ndarray, patch: Sequence[int], overlap: float, predict: Callable[[np.ndarray], np.ndarray],
    batch_size: int, mode: str = "gaussian",
) -> Generator[int, None, np.ndarray]:
    """Blend patch predictions over ``image`` (C, *spatial); yields after each batch of patches.

    Equivalent to ``monai.inferers.sliding_window_inference`` (same windows, same Gaussian
    importance map), but a generator, so every batch is a progress tick and a cancel point.
    """
    spatial = image.shape[1:]
    starts = window_starts(spatial, patch, overlap)
    weights = importance_map(patch, mode)
    total = weight_sum = None
    for first in range(0, len(starts), batch_size):
        chunk = starts[first:first + batch_size]
        boxes = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in chunk]
        logits = predict(np.stack([image[(slice(None),) + box] for box in boxes]))
        if total is None:
            total = np.zeros((logits.shape[1],) + tuple(spatial), np.float32)
            weight_sum = np.zeros(tuple(spatial), np.float32)
        for box, patch_logits in zip(boxes, logits):
            total[(slice(None),) + box] += patch_logits * weights
            weight_sum[box] += weights
        yield len(chunk)
    return total / weight_sum


# ---------------------------------------------------------------- the pipeline


def two_class_foreground(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """Softmax's second channel for two classes: the sigmoid of the logits' difference (one exp
    instead of two, plus the max and the sum)."""
    first, second = np.take(logits, 0, axis=axis), np.take(logits, 1, axis=axis)
    with np.errstate(over="ignore"):  # exp → inf where background wins by > 88: foreground 0, exactly
        return (1.0 / (1.0 + np.exp(first - second))).astype(logits.dtype, copy=False)


def activate(logits: np.ndarray, activation: str, axis: int = 1) -> np.ndarray:
    if activation == "softmax" and logits.shape[axis] == 2:
        foreground = two_class_foreground(logits, axis)
        return np.stack([1.0 - foreground, foreground], axis=axis)
    if activation == "softmax":
        shifted = logits - logits.max(axis=axis, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=axis, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


def labels_from_probabilities(probabilities: np.ndarray, card: ModelCard) -> np.ndarray:
    """(C, z, y, x) → uint8 label values from the card (argmax, or 0.5 per sigmoid channel)."""
    if card.output_activation == "sigmoid":
        foreground = [label.value for label in card.labels if label.value != 0]
        out = np.zeros(probabilities.shape[1:], np.uint8)
        for channel, value in enumerate(foreground):
            out[probabilities[channel] >= 0.5] = value
        return out
    values = np.array([label.value for label in card.labels], np.uint8)
    # argmax over channels, one contiguous pass per channel: np.argmax(axis=0) walks the volume
    # with a channel stride and took 1.7 s of a 2.2 s post-processing on a 119-slice scan.
    best, out = probabilities[0], np.full(probabilities.shape[1:], values[0], np.uint8)
    for channel in range(1, len(probabilities)):
        higher = probabilities[channel] > best  # ties keep the lower channel, as np.argmax does
        out[higher] = values[channel]
        best = np.where(higher, probabilities[channel], best) if channel + 1 < len(probabilities) else best
    return out


class _Runner:
    """What both back ends share: pre-processing, batching, post-processing, cancel."""

    backend = ""

    def __init__(self, variant: ModelVariant, threads: int | None = None, batch_size: int = 4,
                 keep_probabilities: bool = False):
        self.variant = variant
        self.card = variant.card
        self.threads = threads
        self.batch_size = max(1, int(batch_size))
        self.keep_probabilities = keep_probabilities
        # A two-class softmax segmenter: slices keep only the foreground probability, half the
        # memory and the copying of both channels (most of the post-processing of a whole scan).
        self._foreground_only = (self.card.task == "segmentation" and self.card.output_activation == "softmax"
                                 and len(self.card.labels) == 2)
        self.batches_run = 0
        self.provider = ""
        self._cancel = threading.Event()
        self._load_s = 0.0
        self._filter = None  # app.core.candidate_filter.FilterSession, opened on first use

    # Back ends implement these two.
    def _predict(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """The network alone on one prepared batch (N, C, *spatial): what latency is measured on."""
        return self._predict(np.ascontiguousarray(batch, np.float32))

    def _check_io(self) -> None:
        """Dry run on a minimal input: the model's real output against the card."""
        shape = self._dry_run_shape()
        out = self._predict(np.zeros(shape, np.float32))
        check_output_shape(list(out.shape), self.card, str(self.variant.main_file))

    def _dry_run_shape(self) -> tuple[int, ...]:
        spec = self.card.input
        if spec.patch_size is not None:
            spatial = tuple(spec.patch_size)
        elif self.card.roi is not None and self.card.roi.patch_size_voxels is not None:
            spatial = tuple(self.card.roi.patch_size_voxels)
        else:
            spatial = (max(32, spec.size_divisor),) * spec.dims
        return (1, spec.channels) + spatial

    def cancel(self) -> None:
        """Thread-safe: the next batch boundary raises Cancelled; ORT also ends its run."""
        self._cancel.set()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    def _network(self, batch: np.ndarray) -> np.ndarray:
        self._check_cancel()
        out = self._predict(np.ascontiguousarray(batch, np.float32))
        self.batches_run += 1
        self._check_cancel()
        return out

    def run(self, volume: Volume, lesions=None) -> Generator[Progress, None, Findings]:
        """Findings for one volume; classifiers with an ROI of lesion centres need ``lesions``."""
        self._cancel.clear()
        self.batches_run = 0
        self._batch_pre_s = 0.0  # slicing batches out of the volume counts as pre-processing
        self._batch_post_s = 0.0
        timing = Timing(load_s=self._load_s)
        self._load_s = 0.0  # the model load counts once, against the first scan it ran on
        start = time.perf_counter()
        self._check_channels(volume)
        prepared = prepare(volume, self.card)
        timing.preprocess_s = time.perf_counter() - start
        if self.card.task == "classification":
            findings = yield from self._classify(volume, prepared, lesions, timing)
        else:
            findings = yield from self._segment(volume, prepared, timing)
        return findings

    def _check_channels(self, volume: Volume) -> None:
        # A CT volume is one channel; a model wanting more cannot run on it, except a 2D model
        # that reads neighbouring slices as its channels (2.5-D segmenters, lesion classifiers).
        spec = self.card.input
        if spec.channels != 1 and not spec.slice_context and spec.channels != self._slice_channels():
            raise ModelError(
                f"{self.variant.main_file}: the model wants {self.card.input.channels} input channels "
                f"but series {volume.series_uid or '(unnamed)'} has 1"
            )

    # -- segmentation

    def _segment(self, volume: Volume, prepared: Prepared, timing: Timing):
        network_start = time.perf_counter()
        if self.card.input.dims == 2:
            probabilities = yield from self._segment_slices(prepared.array)
        else:
            probabilities = yield from self._segment_3d(prepared.array)
        timing.network_s = time.perf_counter() - network_start - self._batch_pre_s - self._batch_post_s
        timing.preprocess_s += self._batch_pre_s
        post_start = time.perf_counter()
        findings = self._segmentation_findings(volume, prepared, probabilities, timing)
        timing.postprocess_s = time.perf_counter() - post_start + self._batch_post_s
        yield Progress(1.0, "findings ready")
        return findings

    def _segment_slices(self, array: np.ndarray):
        """2D models: batches of axial slices, whole or through an in-plane sliding window."""
        slices_total = array.shape[0]
        in_plane = self._in_plane_size(array.shape[1:])
        out = None
        context = self.card.input.slice_context
        for first in range(0, slices_total, self.batch_size):
            t0 = time.perf_counter()
            batch = (neighbour_slices(array, range(first, min(first + self.batch_size, slices_total)), context)
                     if context else array[first:first + self.batch_size, None])  # (N, 1 or 2·context + 1, y, x)
            self._batch_pre_s += time.perf_counter() - t0
            probs = self._predict_slices(batch, in_plane)
            if out is None:
                out = np.empty((probs.shape[1], slices_total) + array.shape[1:], np.float32)
            out[:, first:first + len(batch)] = probs.transpose(1, 0, 2, 3)
            done = min(first + self.batch_size, slices_total)
            yield Progress(done / slices_total, f"slices {done}/{slices_total}", {"batch": self.batches_run})
        return out

    def _in_plane_size(self, shape: tuple[int, int]) -> tuple[int, int] | None:
        patch = self.card.input.patch_size
        if patch is None:
            return None
        if shape[0] < patch[-2] or shape[1] < patch[-1]:
            raise ModelError(
                f"{self.variant.main_file}: the series' slices ({shape[0]}×{shape[1]}) are smaller than "
                f"the model's patch ({patch[-2]}×{patch[-1]})"
            )
        return tuple(patch[-2:])  # type: ignore[return-value]

    def _predict_slices(self, batch: np.ndarray, patch: tuple[int, int] | None) -> np.ndarray:
        if patch is None:
            logits = crop_far(self._network(pad_to_multiple(batch, self.card.input.size_divisor)), batch.shape[2:])
        elif tuple(batch.shape[2:]) == tuple(patch):
            logits = self._network(batch)
        else:
            # The slices of the batch (and their neighbours) ride as channels through one 2D window pass.
            channels = batch.shape[1]

            def network(windows: np.ndarray) -> np.ndarray:  # (1, N·C, y, x) → the N slices as a batch
                out = self._network(windows[0].reshape((-1, channels) + windows.shape[2:]))  # (N, K, y, x)
                return out.reshape((1, -1) + out.shape[2:])

            flat = run_to_end(sliding_window(batch.reshape((-1,) + batch.shape[2:]), patch, self.card.input.overlap,
                                             network, 1))
            logits = flat.reshape((batch.shape[0], -1) + flat.shape[1:])
        start = time.perf_counter()
        probabilities = (two_class_foreground(logits)[:, None] if self._foreground_only
                         else activate(logits, self.card.output_activation))
        self._batch_post_s += time.perf_counter() - start  # activation is post-processing
        return probabilities

    def _segment_3d(self, array: np.ndarray):
        patch = self.card.input.patch_size
        if patch is None:
            raise ModelError(f"{self.variant.card_path}: a 3D model's card must give input.patch_size")
        if any(n < p for n, p in zip(array.shape, patch)):
            raise ModelError(
                f"{self.variant.main_file}: the series ({'×'.join(map(str, array.shape))} voxels after "
                f"resampling) is smaller than the model's patch ({'×'.join(map(str, patch))})"
            )
        windows = window_starts(array.shape, patch, self.card.input.overlap)
        gen = sliding_window(array[None], patch, self.card.input.overlap, self._network, self.batch_size)
        done = 0
        while True:
            try:
                done += next(gen)
            except StopIteration as stop:
                logits = stop.value
                break
            yield Progress(done / len(windows), f"patches {done}/{len(windows)}", {"batch": self.batches_run})
        return activate(logits[None], self.card.output_activation)[0]

    def _segmentation_findings(self, volume: Volume, prepared: Prepared, probabilities: np.ndarray,
                               timing: Timing) -> Findings:
        from app.core.lesions import lesion_table

        if self._foreground_only and len(probabilities) == 1:  # 2D slices: the foreground channel only
            foreground = restore(prepared, probabilities[0], order=1)
            # argmax of (1 − f, f), ties to channel 0: f > 1 − f is f > 0.5, exactly, in float32.
            mask = foreground > 0.5
            first, second = (label.value for label in self.card.labels)
            labels = (mask.view(np.uint8) if (first, second) == (0, 1)
                      else np.where(mask, second, first).astype(np.uint8))
            probabilities = np.stack([1.0 - foreground, foreground]) if self.keep_probabilities else None
        else:
            probabilities = restore(prepared, probabilities, order=1, axis_offset=1)
            labels = labels_from_probabilities(probabilities, self.card)
            foreground = foreground_probability(probabilities, self.card)
        labels, instances = clean_lesions(labels, foreground, volume, self.card.postprocessing, in_place=True,
                                          scorer=self.candidate_scorer(volume, foreground))
        lesions = lesion_table(labels, volume, instances=instances)
        scores = {lesion.lesion_id: _lesion_score(foreground, lesion) for lesion in lesions}
        keep = probabilities.astype(np.float16) if self.keep_probabilities else None
        return Findings.for_volume(volume, self._identity(), labels=labels, probabilities=keep,
                                   lesions=lesions, lesion_scores=scores, timing=timing)

    def candidate_scorer(self, volume: Volume, foreground: np.ndarray):
        """The card's candidate filter as ``clean_lesions`` calls it, or None without one."""
        spec = self.card.postprocessing.candidate_filter
        if spec is None:
            return None
        if self._filter is None:  # opened once per runner, like the network
            from app.core.candidate_filter import FilterSession, filter_file

            self._filter = FilterSession(filter_file(self.variant.files, self.variant.card_path or self.card.name),
                                         spec, self.threads)

        def scorer(instances: np.ndarray, count: int, offset) -> np.ndarray:
            return self._filter.score_lesions(volume.voxels, foreground, instances, count, volume.spacing, offset)

        return scorer

    def _identity(self) -> dict:
        return {"model_name": self.card.name, "model_version": self.card.version,
                "model_sha256": self.variant.weights_sha256, "provider": self.provider,
                "threads": self.threads, "backend": self.backend}

    # -- classification

    def _classify(self, volume: Volume, prepared: Prepared, lesions, timing: Timing):
        roi = self.card.roi.source if self.card.roi else "slice"
        if roi == "lesion_centres" and lesions is None:
            raise ModelError(
                f"{self.variant.card_path}: this classifier looks at lesions; run a segmentation "
                "model first or give a lesion table"
            )
        start = time.perf_counter()
        if roi == "lesion_centres":
            inputs = self._lesion_patches(prepared, lesions)
        else:
            inputs = prepared.array[:, None]
        timing.preprocess_s += time.perf_counter() - start
        start = time.perf_counter()
        scores = yield from self._classify_items(inputs)
        timing.network_s = time.perf_counter() - start
        start = time.perf_counter()
        if roi == "lesion_centres":
            findings = Findings.for_volume(volume, self._identity(), lesions=list(lesions),
                                           lesion_scores={l.lesion_id: s for l, s in zip(lesions, scores)},
                                           study_scores=_study_scores(scores, self.card), timing=timing)
        else:
            findings = Findings.for_volume(volume, self._identity(), slice_scores=_score_matrix(scores, self.card),
                                           study_scores=_study_scores(scores, self.card), timing=timing)
        timing.postprocess_s = time.perf_counter() - start
        yield Progress(1.0, "findings ready")
        return findings

    def _classify_items(self, inputs: np.ndarray):
        """Class probabilities per item (lesion patch or slice), in batches."""
        scores = []
        for first in range(0, len(inputs), self.batch_size):
            logits = self._network(inputs[first:first + self.batch_size])
            for row in activate(logits, self.card.output_activation):
                scores.append({name: float(p) for name, p in zip(self.card.label_names, row)})
            done = min(first + self.batch_size, len(inputs))
            yield Progress(done / max(1, len(inputs)), f"items {done}/{len(inputs)}", {"batch": self.batches_run})
        return scores

    def _slice_channels(self) -> int | None:
        """For a 2D classifier whose ROI is 3-D (slices, rows, columns): the neighbouring axial
        slices it stacks as input channels. None for every other model."""
        roi = self.card.roi
        if self.card.task != "classification" or self.card.input.dims != 2 or roi is None:
            return None
        if roi.source != "lesion_centres" or roi.patch_size_voxels is None or len(roi.patch_size_voxels) != 3:
            return None
        return int(roi.patch_size_voxels[0])

    def _lesion_patches(self, prepared: Prepared, lesions) -> np.ndarray:
        size = self._roi_voxels(prepared)
        patches = [extract_patch(prepared.array, self._centre_on_grid(lesion, prepared), size) for lesion in lesions]
        stacked = self._slice_channels() is not None  # (slices, rows, cols): slices are the channels
        fit = tuple(self.card.input.patch_size or (size[-2:] if stacked else size))
        if not patches:
            return np.zeros((0, size[0] if stacked else 1) + fit, np.float32)
        if stacked:
            return np.stack([fit_patch(p, (p.shape[0],) + fit) for p in patches]).astype(np.float32)
        return np.stack([fit_patch(p, self.card.input.patch_size) for p in patches])[:, None].astype(np.float32)

    def _roi_voxels(self, prepared: Prepared) -> tuple[int, ...]:
        roi = self.card.roi
        if roi.patch_size_voxels is not None:
            return tuple(int(v) for v in roi.patch_size_voxels)
        if roi.patch_size_mm is not None:
            spacing = prepared.spacing[-len(roi.patch_size_mm):]
            return tuple(max(1, int(round(mm / s))) for mm, s in zip(roi.patch_size_mm, spacing))
        return tuple(self.card.input.patch_size)

    def _centre_on_grid(self, lesion, prepared: Prepared) -> tuple[int, int, int]:
        """A lesion's (k, j, i) centre on the reoriented, resampled network grid."""
        centre = np.asarray(lesion.centre_index, float)[list(prepared.permutation)]
        shape = np.asarray(prepared.native_shape, float)
        for axis, flip in enumerate(prepared.flips):
            if flip:
                centre[axis] = shape[axis] - 1 - centre[axis]
        centre = centre * np.asarray(prepared.array.shape) / shape
        return tuple(int(round(c)) for c in centre)  # type: ignore[return-value]


def neighbour_slices(array: np.ndarray, indices, context: int) -> np.ndarray:
    """(len(indices), 2·context + 1, y, x): each axial slice of (z, y, x) ``array`` with its
    ``context`` neighbours on each side, in slice order, as a 2.5-D network reads them; at the
    ends of the scan the edge slice stands in for the ones beyond it."""
    rows = np.clip(np.asarray(indices, int)[:, None] + np.arange(-context, context + 1), 0, len(array) - 1)
    return array[rows]


def pad_far(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``array``'s last ``len(size)`` axes edge-padded at their far ends up to ``size`` (sides
    already as long or longer stay as they are): the padding every runner and step uses, undone
    by :func:`crop_far`."""
    spatial = array.shape[array.ndim - len(size):]
    pads = [(0, 0)] * (array.ndim - len(size)) + [(0, max(0, w - n)) for n, w in zip(spatial, size)]
    return np.pad(array, pads, mode="edge") if any(p for _, p in pads) else array


def pad_to_multiple(array: np.ndarray, divisor: int) -> np.ndarray:
    """(…, y, x) edge-padded at the far edges to a multiple of ``divisor``: whole slices as a
    network with that many halvings reads them (the runners and the training slices alike)."""
    return pad_far(array, [n + (-n) % max(1, divisor) for n in array.shape[-2:]])


def crop_far(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``array``'s last ``len(size)`` axes cut to ``size`` from their near ends (undoes :func:`pad_far`)."""
    return array[(Ellipsis,) + tuple(slice(0, n) for n in size)]


def extract_patch(array: np.ndarray, centre: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """A patch of ``size`` around ``centre`` (k, j, i); 2D sizes take the axial slice through it.

    Parts outside the volume are filled with the array's minimum (air, after windowing).
    """
    if len(size) == 2 and array.ndim == 3:
        k = int(np.clip(centre[0], 0, array.shape[0] - 1))
        return extract_patch(array[k], centre[1:], size)
    out = np.full(tuple(size), float(array.min()), np.float32)
    src, dst = [], []
    for c, n, s in zip(centre, array.shape, size):
        lo = int(c) - s // 2
        a, b = max(lo, 0), min(lo + s, n)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - lo, a - lo + max(0, b - a)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def foreground_probability(probabilities: np.ndarray, card: ModelCard) -> np.ndarray:
    """(C, z, y, x) → the probability of any lesion: 1 − background for a softmax, else the
    highest sigmoid channel."""
    return 1.0 - probabilities[0] if card.output_activation == "softmax" else probabilities.max(0)


def remove_unsure_lesions(labels: np.ndarray, foreground: np.ndarray, volume: Volume, rule) -> np.ndarray:
    """Drop lesions smaller than ``rule.min_lesion_mm3``, whose peak probability is below
    ``rule.min_lesion_score`` or whose shape is more elongated than ``rule.max_elongation``
    (the card's post-processing; chosen on the calibration split)."""
    if rule.is_empty:
        return labels  # nothing to drop: no need to label the scan
    return clean_lesions(labels, foreground, volume, rule)[0]


def clean_lesions(labels: np.ndarray, foreground: np.ndarray, volume: Volume, rule,
                  in_place: bool = False, scorer=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`remove_unsure_lesions`, also returning the kept lesions' instance map: exactly
    what :func:`~app.core.lesions.label_instances` makes of the kept labels (ids by descending
    size), so that the lesion table need not label the scan a second time. ``in_place``: the
    dropped lesions are cleared in ``labels`` itself (a scan-sized copy saved). ``scorer``
    (instances, count, box corner) → per-lesion scores: the rule's candidate filter."""
    from app.core.lesions import label_instances, occupied_box

    instances = np.zeros(labels.shape, np.int32)
    box = occupied_box(labels)
    if box is None:
        return labels, instances
    # Everything below reads only the box around the candidates (moments do not depend on where
    # the box sits): whole-volume passes were most of a 32-slice scan's post-processing.
    inner, count = label_instances(labels[box])
    inside = np.flatnonzero(inner.reshape(-1))  # only lesion voxels are read and written
    in_ids = inner.reshape(-1)[inside]
    if rule.is_empty:
        instances[box] = inner
        return labels, instances
    unsure = rule.drops(*candidate_measures(inner, in_ids, count, box, foreground, volume, rule, scorer))
    # Ids are in descending size, ties in raster order of first voxel: dropping some and closing
    # the gaps gives the kept lesions the ids a fresh labelling of the kept mask would.
    new_id = np.zeros(count + 1, np.int32)
    new_id[1:][~unsure] = np.arange(1, int((~unsure).sum()) + 1, dtype=np.int32)
    inner.reshape(-1)[inside] = new_id[in_ids]
    instances[box] = inner
    if not unsure.any():
        return labels, instances
    out = labels if in_place else labels.copy()
    kept = out[box].copy()
    kept.reshape(-1)[inside[np.concatenate([[False], unsure])[in_ids]]] = 0
    out[box] = kept
    return out, instances


def candidate_measures(inner: np.ndarray, in_ids: np.ndarray, count: int, box: tuple[slice, ...],
                       foreground: np.ndarray, volume: Volume, rule, scorer=None) -> tuple:
    """What the clean-up's limits read of candidates 1..count — ``inner``, the label map's
    components inside ``box``; ``in_ids``, their ids at their voxels: volumes (mm³), peak
    probabilities, elongations and candidate-filter scores (None where ``rule`` does not use
    them), in the order :meth:`~app.core.model_card.Postprocessing.drops` and ``reasons`` take."""
    from app.core.lesions import lesion_elongation

    volume_mm3 = np.bincount(in_ids, minlength=count + 1)[1:] * volume.voxel_volume_ml * 1000.0
    elongation = lesion_elongation(inner, count, volume.spacing) if rule.max_elongation is not None else None
    scores = None
    if rule.candidate_filter is not None:
        if scorer is None:
            raise ModelError("this lesion clean-up has a candidate filter but no scorer was given")
        scores = scorer(inner, count, tuple(s.start for s in box))
    return volume_mm3, lesion_peaks(foreground[box], inner, count), elongation, scores


def lesion_peaks(foreground: np.ndarray, instances: np.ndarray, count: int) -> np.ndarray:
    """Highest foreground probability inside each lesion 1..count (only lesion voxels are read:
    scipy's ndimage.maximum sorts the whole volume, minutes on a 300-slice scan)."""
    inside = instances > 0
    peaks = np.zeros(count + 1, np.float32)
    np.maximum.at(peaks, instances[inside], foreground[inside].astype(np.float32))
    return peaks[1:]


def fit_patch(patch: np.ndarray, size: Sequence[int] | None) -> np.ndarray:
    """An ROI patch resized (linear) to the network's fixed input, e.g. a zoom onto a nodule."""
    if size is None or tuple(patch.shape) == tuple(size):
        return patch
    from scipy import ndimage

    zoom = [w / n for w, n in zip(size, patch.shape)]
    return ndimage.zoom(patch, zoom, order=1, grid_mode=True, mode="nearest").astype(np.float32)


def _lesion_score(foreground: np.ndarray, lesion) -> float:
    """Mean foreground probability inside the lesion's bounding box voxels that are lesion."""
    k0, k1, j0, j1, i0, i1 = lesion.bbox
    box = foreground[k0:k1, j0:j1, i0:i1]
    return float(box.max()) if box.size else 0.0


def _score_matrix(scores: list[dict], card: ModelCard) -> np.ndarray:
    return np.array([[s[name] for name in card.label_names] for s in scores], np.float32)


def _study_scores(scores: list[dict], card: ModelCard) -> dict[str, float]:
    """Per study: the highest probability any item reached for each class."""
    if not scores:
        return {}
    return {name: float(max(s[name] for s in scores)) for name in card.label_names}


# ---------------------------------------------------------------- ONNX Runtime


@contextlib.contextmanager
def _stderr_to_log(logger: logging.Logger):
    """ORT's C++ writes provider-fallback noise straight to fd 2: capture it into our log."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    python_side = io.StringIO()  # its Python layer print()s "EP Error ... falling back"
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            with contextlib.redirect_stdout(python_side), contextlib.redirect_stderr(python_side):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = python_side.getvalue() + capture.read().decode("utf-8", "replace")
            for line in text.splitlines():
                line = _ANSI.sub("", line).strip(" *")
                if line:
                    logger.info("onnxruntime: %s", line)


def _torch_cuda_libraries_present() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.version.cuda) and torch.cuda.is_available()


_INTEGER_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                "MatMulInteger"}


def weights_only_int8(path) -> bool:
    """True for an ONNX model whose int8 lives only in its stored weights (DequantizeLinear on
    initializers, no activation quantization): it is meant to compute in float."""
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # not readable as ONNX: ONNX Runtime will say why
        return False
    ops = {node.op_type for node in graph.node}
    return "DequantizeLinear" in ops and not ops & _INTEGER_OPS


def apply_weights_only_int8(options, path) -> None:
    """For a weights-only int8 model, let ONNX Runtime fold the weight DequantizeLinear nodes into
    float constants once at load time (its QDQ handling would otherwise keep them and dequantize
    every run: measured 14.5 vs 16.7 ms per 512² slice on a ½-width UNet)."""
    if weights_only_int8(path):
        options.add_session_config_entry("session.disable_quant_qdq", "1")


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Requested short names (tensorrt/cuda/cpu) in order, kept if installed; CPU always last."""
    names = [PROVIDER_NAMES.get(r.lower(), r) for r in requested]
    chosen = [n for n in names if n in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def device_providers(device: str) -> tuple[str, ...]:
    return DEFAULT_PROVIDER_ORDER if device.startswith("cuda") else ("cpu",)


def session_options(ort, threads: int | None = None):
    """Quiet ONNX Runtime options with thread spinning off: spinning threads would steal the
    UI's core while idle between batches."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = int(threads)
    return options


class OnnxRunner(_Runner):
    backend = "onnxruntime"

    def __init__(self, variant: ModelVariant, providers: Sequence[str] = ("cpu",), threads: int | None = None,
                 batch_size: int = 4, keep_probabilities: bool = False):
        super().__init__(variant.as_format("onnx") if variant.format != "onnx" else variant,
                         threads, batch_size, keep_probabilities)
        self.requested_providers = tuple(providers)
        self._run_options = None
        self._lock = threading.Lock()
        start = time.perf_counter()
        check_onnx_model(self.variant.main_file, self.card)
        self.session = self._open_session()
        self._input_name = self.session.get_inputs()[0].name
        self._check_io()
        self._load_s = time.perf_counter() - start

    def _open_session(self):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        chosen = resolve_providers(self.requested_providers, ort.get_available_providers())
        if any(p != "CPUExecutionProvider" for p in chosen) and _torch_cuda_libraries_present():
            with contextlib.suppress(Exception):  # only a hint to find CUDA/cuDNN; ORT copes without
                ort.preload_dlls()
        options = self._session_options(ort)
        path = str(self.variant.main_file)
        apply_weights_only_int8(options, path)
        with _stderr_to_log(log):
            try:
                session = ort.InferenceSession(path, options, providers=chosen)
            except Exception as exc:  # a provider that cannot start: fall back to CPU, say so
                if chosen == ["CPUExecutionProvider"]:
                    raise ModelError(f"{path}: ONNX Runtime cannot load the model ({_first_line(exc)})") from exc
                log.warning("%s: providers %s failed (%s); running on CPU", path, chosen, _first_line(exc))
                session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.provider = session.get_providers()[0]
        if self.provider != chosen[0]:
            log.info("%s: asked for %s, ONNX Runtime runs %s", path, chosen[0], self.provider)
        return session

    def _session_options(self, ort):
        return session_options(ort, self.threads)

    def cancel(self) -> None:
        super().cancel()
        with self._lock:
            if self._run_options is not None:
                self._run_options.terminate = True

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 3
        with self._lock:
            self._run_options = options
            if self._cancel.is_set():
                options.terminate = True
        try:
            return self.session.run(None, {self._input_name: batch}, options)[0]
        except Exception as exc:
            if self._cancel.is_set():
                raise Cancelled() from exc
            raise ModelError(f"{self.variant.main_file}: ONNX Runtime failed on input {batch.shape} "
                             f"({_first_line(exc)})") from exc
        finally:
            with self._lock:
                self._run_options = None


# ---------------------------------------------------------------- torch


class TorchRunner(_Runner):
    backend = "torch"

    def __init__(self, variant: ModelVariant, device: str = "cpu", threads: int | None = None,
                 batch_size: int = 4, autocast: str | None = None, keep_probabilities: bool = False):
        super().__init__(variant, threads, batch_size, keep_probabilities)
        from app.core.models import load_torch_module
        import torch

        if autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', not {autocast!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"{variant.main_file}: device {device} asked for, but torch sees no CUDA device")
        start = time.perf_counter()
        if threads:
            torch.set_num_threads(int(threads))
        self.device = device
        self.autocast = autocast
        self.provider = f"torch-{device}" + (f"-{autocast}" if autocast else "")
        self.module = load_torch_module(self.variant, device)
        self._check_input_rank()
        self._check_io()
        self._load_s = time.perf_counter() - start

    def _check_input_rank(self) -> None:
        # Eager modules have no declared input shape; the first conv's weights tell the channels.
        import torch

        first = next((m for m in self.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))), None)
        if first is not None:
            dims = [None, first.in_channels] + [None] * (3 if isinstance(first, torch.nn.Conv3d) else 2)
            check_input_shape(dims, self.card, str(self.variant.main_file))

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if self.threads:
            torch.set_num_threads(int(self.threads))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast or "")
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            try:
                out = self.module(torch.from_numpy(batch).to(self.device))
            except RuntimeError as exc:
                raise ModelError(f"{self.variant.main_file}: the network failed on input {batch.shape} "
                                 f"({_first_line(exc)})") from exc
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().cpu().numpy()


class AotiRunner(_Runner):
    """A torch int8 variant run as what it deploys: its AOTInductor package (files role
    ``aoti_package``), which stock torch loads and which was compiled for one input shape, recorded
    on the card by ``quantize_int8_torch``. Slices run one at a time; smaller ones are edge-padded
    to that shape and cropped back, as the ONNX path pads to its size divisor, and larger ones run
    window by window (that shape, the card's overlap, Gaussian blending), as a patch model does."""

    backend = "torch-aoti"

    def __init__(self, variant: ModelVariant, threads: int | None = None, batch_size: int = 4,
                 keep_probabilities: bool = False):
        super().__init__(variant, threads, batch_size, keep_probabilities)
        import torch

        self.package = variant.files.get("aoti_package")
        if self.package is None:
            raise ModelError(f"{variant.card_path or self.card.name}: the card lists no AOTInductor package "
                             "(role 'aoti_package')")
        self.input_shape = package_input_shape(self.card)
        if self.input_shape is None:
            raise ModelError(f"{self.package}: the card does not record the input shape the package was compiled "
                             "for (lineage metrics compression.int8_torch.package_input)")
        start = time.perf_counter()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            self.module = torch._inductor.aoti_load_package(str(self.package))
        except Exception as exc:  # another torch, another CPU, a damaged file: all say the same to the user
            raise ModelError(f"{self.package}: torch {torch.__version__} could not load this AOTInductor package "
                             f"({_first_line(exc)}); it runs only with the torch and CPU it was compiled for") from exc
        self.provider = "torch-aoti-cpu"
        self._check_io()
        self._load_s = time.perf_counter() - start

    def _predict_slices(self, batch: np.ndarray, patch: tuple[int, int] | None) -> np.ndarray:
        want, spatial = self.input_shape[2:], batch.shape[2:]
        if patch is not None or all(n <= w for n, w in zip(spatial, want)):
            return super()._predict_slices(batch, patch)
        probabilities = super()._predict_slices(pad_far(batch, want), tuple(want))  # a side under the window grows
        return crop_far(probabilities, spatial)

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        channels, want = self.input_shape[1], self.input_shape[2:]
        spatial = batch.shape[2:]
        if batch.shape[1] != channels or len(spatial) != len(want) or any(n > w for n, w in zip(spatial, want)):
            raise ModelError(f"{self.package}: compiled for {channels} channel(s) of {'×'.join(map(str, want))}, "
                             f"which cannot hold {batch.shape[1]} of {'×'.join(map(str, spatial))}")
        padded = pad_far(batch, want)
        if self.threads:
            torch.set_num_threads(int(self.threads))
        outs = []
        with torch.inference_mode():
            for item in padded:
                out = self.module(torch.from_numpy(np.ascontiguousarray(item[None])))
                outs.append((out[0] if isinstance(out, (tuple, list)) else out).float().numpy())
        return crop_far(np.concatenate(outs), spatial)


def package_trusted(variant: ModelVariant) -> bool:
    """Whether a variant's AOTInductor package may load. It is compiled native code, so only when
    the variant is opened with trust, or when this machine compiled that very file: its SHA-256
    is in the local audit log's ``compile`` events (``quantize_int8_torch`` writes them). A
    package from anywhere else needs trust, as a pickled model does."""
    package = variant.files.get("aoti_package")
    if package is None:
        return False
    if variant.trusted:
        return True
    from app.core.audit import read_audit
    from app.core.models import sha256_file

    digest = sha256_file(package)
    return any(e.get("event") == "compile" and e.get("sha256") == digest for e in read_audit())


def package_input_shape(card: ModelCard) -> tuple[int, ...] | None:
    """The input shape an AOTInductor package was compiled for, as ``quantize_int8_torch`` recorded it."""
    shape = card.lineage.metrics.get("compression", {}).get("int8_torch", {}).get("package_input")
    return tuple(int(n) for n in shape) if shape else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def make_runner(variant: ModelVariant, device: str = "cpu", threads: int | None = None, batch_size: int = 4,
                backend: str | None = None, **options) -> _Runner:
    """ONNX Runtime when the variant is ONNX, else torch; on the CPU, the variant's AOTInductor
    package when it carries one that may load (the torch int8 artifact it stands for; see
    :func:`package_trusted`). ``backend`` ('onnxruntime', 'torch', 'torch-aoti') chooses."""
    loadable = device == "cpu" and package_trusted(variant)  # hashes the package: once per runner
    backend = backend or ("torch-aoti" if loadable else "onnxruntime" if variant.format == "onnx" else "torch")
    if backend == "torch-aoti":
        where = variant.card_path or variant.card.name
        if device != "cpu":
            raise ModelError(f"{where}: its AOTInductor package is compiled for the CPU, not {device}")
        if not loadable:
            raise ModelError(f"{where}: its AOTInductor package is compiled native code that this machine did not "
                             "compile; refusing to load it (open it with trust only if you trust where it came from)")
        return AotiRunner(variant, threads=threads, batch_size=batch_size, **options)
    if backend == "onnxruntime":
        return OnnxRunner(variant, providers=device_providers(device), threads=threads,
                          batch_size=batch_size, **options)
    if variant.format == "onnx":  # the same card's torch weights
        variant = variant.as_format("state_dict" if "weights" in variant.files else "torchscript")
    return TorchRunner(variant, device=device, threads=threads, batch_size=batch_size, **options)
