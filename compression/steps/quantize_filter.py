"""int8 weights for the candidate filter, the second network a lesion clean-up runs.

The demo UNet's filter (three CNNs averaged over four flipped views, 183 k weights, 770 kB) goes
unchanged into every variant, so it bounds every size ratio: the 240 kB distilled student
deploys at 987 kB, 7.2× instead of 27×. This step stores the filter's convolution weights in
int8 behind a DequantizeLinear (per output channel, symmetric; the same rewrite as
``quantize_int8_ort(mode="weights")``): a stock ONNX Runtime loads it, computes in float, and the
file is about 4× smaller. Its patches are a few hundred 32 × 32 stacks per scan, so speed is not
what matters here; the scores are.

It checks what the rounding does to the filter's decisions before it is adopted: both files
score patches cut from the calib scans — at each labelled nodule (with its label as the
probability channel) and at seeded random points inside the body — and the step reports the
largest score change and how many keep/drop decisions at the card's threshold flip. Over
``max_flip_share`` of them flipping fails the step; the evaluation then judges the whole variant.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from app.core.progress import Progress

from compression.pipeline import StepData, StepError, WorkingModel

FILTER_ROLE = "candidate_filter"


def quantize_filter(model: WorkingModel, data: StepData, *, points_per_case: int = 48, max_cases: int = 8,
                    max_flip_share: float = 0.02):
    """Store the candidate filter's Conv weights in int8; a model without a filter is left as it is."""
    from app.core.candidate_filter import FilterSession

    from compression.steps.quantize_ort import int8_weights_only

    source = model.extra_files.get(FILTER_ROLE)
    spec = model.card.postprocessing.candidate_filter
    if source is None or spec is None:
        model.skipped.append((FILTER_ROLE, "the model has no candidate filter; nothing to quantize"))
        model.notes.append("quantize_filter: no candidate filter in this model; skipped.")
        yield Progress(1.0, "no candidate filter")
        return model
    target = model.scratch("candidate_filter.onnx")
    count = int8_weights_only(Path(source), target, op_types=("Conv",))
    yield Progress(0.3, f"{count} filter weight tensors stored in int8")
    patches = _check_patches(data, spec, points_per_case, max_cases)
    yield Progress(0.6, f"scoring {len(patches)} calib patches with both filters")
    before = FilterSession(Path(source), spec, data.threads).scores(patches)
    after = FilterSession(target, spec, data.threads).scores(patches)
    flips = int(np.count_nonzero((before >= spec.threshold) != (after >= spec.threshold)))
    check = {"weight_tensors_int8": count, "patches": int(len(patches)),
             "max_score_change": float(np.abs(after - before).max()) if len(patches) else 0.0,
             "decisions_flipped": flips, "threshold": spec.threshold,
             "file_bytes": {"float": Path(source).stat().st_size, "int8": target.stat().st_size}}
    model.metrics["candidate_filter_int8"] = check
    if len(patches) and flips > max_flip_share * len(patches):
        raise StepError(f"int8 weights flip {flips} of {len(patches)} candidate-filter decisions at threshold "
                        f"{spec.threshold:g} (allowed {max_flip_share:.0%}); the filter is kept in float")
    model.extra_files[FILTER_ROLE] = target
    model.notes.append(
        f"Candidate filter: {count} Conv weight tensors in int8 ({check['file_bytes']['float'] / 1e3:.0f} kB → "
        f"{check['file_bytes']['int8'] / 1e3:.0f} kB); on {len(patches)} calib patches the score moved by at most "
        f"{check['max_score_change']:.4f} and {flips} keep/drop decision(s) flipped.")
    yield Progress(1.0, "candidate filter in int8")
    return model


def _check_patches(data: StepData, spec, points_per_case: int, max_cases: int) -> np.ndarray:
    """Filter inputs at the calib (else train) scans' labelled nodules and at random body points."""
    from scipy import ndimage

    from app.core.candidate_filter import candidate_patches

    cases = data.calib if len(data.calib) else data.train
    if not len(cases):
        raise StepError("quantize_filter needs calib or train scans to check the filter's decisions on")
    rng = np.random.default_rng(data.seed)
    stacks = []
    for index in range(min(len(cases), max_cases)):
        case = cases[index]
        voxels = case.volume.voxels
        centres = []
        probability = np.zeros(voxels.shape, np.float32)
        if case.labels is not None and case.labels.any():
            components, count = ndimage.label(case.labels)
            centres += ndimage.center_of_mass(case.labels, components, range(1, count + 1))
            probability = case.labels.astype(np.float32)
        body = np.argwhere(voxels[:, ::8, ::8] > -500) * (1, 8, 8)  # a coarse grid is enough to draw from
        if len(body):
            centres += [tuple(p) for p in body[rng.choice(len(body), min(points_per_case, len(body)), replace=False)]]
        if centres:
            stacks.append(candidate_patches(voxels, probability, np.asarray(centres, float), case.volume.spacing, spec))
    return np.concatenate(stacks) if stacks else np.zeros((0, spec.channels, spec.patch_px, spec.patch_px), np.float32)
