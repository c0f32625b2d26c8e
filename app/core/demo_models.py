"""The two demo models, trained here, deterministically, on the demo data's train split.

1. ``lung-nodule-unet2d`` — MONAI ``UNet(spatial_dims=2, in_channels=1, out_channels=2,
   channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)`` (pinned, so
   compression results mean something) with LeakyReLU and batch norm (our choice: torch-pruning
   cannot trace MONAI's default PReLU) on axial slices. Fully convolutional: trained on crops
   around nodules and background, run on whole 512×512 slices.
2. ``nodule-type-densenet`` — a 2D DenseNet on a 24×24-pixel axial patch around each lesion
   centre (zoomed to 64×64), classifying solid / part-solid / ground-glass.

``python main.py train-demo --data DIR --out DIR --seed S`` trains both, evaluates them on the
eval split (bootstrap 95 % intervals over cases), exports ONNX (verified against torch on the
same inputs) and writes each model folder with its card.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generator, Iterable, Iterator

import numpy as np

from app.core.environment import cpu_flags, package_versions
from app.core.model_card import (
    Architecture,
    InputSpec,
    Label,
    Lineage,
    ModelCard,
    Postprocessing,
    Preprocessing,
    RoiSpec,
    save_card,
)
from app.core.progress import Progress, run_to_end
from app.core.volume import Volume

log = logging.getLogger(__name__)

INTENDED_USE = "research and demonstration only, trained on synthetic phantoms; not for diagnosis"
LUNG_WINDOW = (-1000.0, 400.0)
NODULE_TYPES = ("solid", "part-solid", "ground-glass")
UNET_ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128, 256],
             "strides": [2, 2, 2, 2], "num_res_units": 2,
             # LeakyReLU, not ReLU: with ReLU the nodule probability saturated near 0.55 (dead units);
             # not PReLU: torch-pruning cannot prune it. Batch norm: running statistics learnt on crops
             # carry over to whole 512² slices, where per-slice instance statistics differ.
             "act": ["LEAKYRELU", {"negative_slope": 0.1}], "norm": "BATCH"}
CLASSIFIER_PATCH = 64  # network input (pixels)
CLASSIFIER_ROI = 24  # pixels around the lesion centre, zoomed to CLASSIFIER_PATCH: small nodules fill it
# Axial slices read as channels (the runner supports a 3-value ROI: slices, rows, columns). Three
# slices — so that a vessel crossing ground glass, which moves between slices, is not taken for a
# solid core — scored 0.65 on the calib split against 0.82 for one slice: one it is.
CLASSIFIER_SLICES = 1
CLASSIFIER_ROI_VOXELS = ((CLASSIFIER_ROI, CLASSIFIER_ROI) if CLASSIFIER_SLICES == 1
                         else (CLASSIFIER_SLICES, CLASSIFIER_ROI, CLASSIFIER_ROI))
# DenseNet121's block layout (6, 12, 24, 16) at half the growth rate: the same family, a quarter
# of the compute, which is what 2 shared CPU cores can train in minutes on ~100 lesions.
DENSENET_ARGS = {"spatial_dims": 2, "in_channels": CLASSIFIER_SLICES, "out_channels": 3, "init_features": 32,
                 "growth_rate": 16, "block_config": [6, 12, 24, 16], "dropout_prob": 0.0}
# A part-solid training slice must show its core: ground glass is −650…−450 HU, solid 0…60 HU.
SOLID_CORE_HU = -300.0
# A nodule whose mean density is above this (windowed 0..1) is solid or mostly solid core: the
# kind a 2-D slice confuses with vessel cross-sections, drawn more often when asked.
SOLID_MEAN_WINDOWED = (-130.0 - LUNG_WINDOW[0]) / (LUNG_WINDOW[1] - LUNG_WINDOW[0])
ONNX_TOLERANCE = 1e-4  # max |logit difference| torch vs ONNX Runtime, fp32, same input


# ---------------------------------------------------------------- reading the demo data


@dataclass
class DemoCase:
    name: str
    split: str
    volume: Volume
    labels: np.ndarray  # uint8 semantic map (0 = background)
    lesions: list[dict]  # rows of the case's lesion CSV (centre_*_mm, type, ...)


def read_series_volume(folder: Path) -> Volume:
    """A DICOM series folder as a Volume (SimpleITK keeps the LPS geometry)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    if not files:
        raise ValueError(f"{folder}: no DICOM series found")
    reader.SetFileNames(files)
    return volume_from_sitk(reader.Execute())


def volume_from_sitk(image) -> Volume:
    import SimpleITK as sitk

    voxels = sitk.GetArrayFromImage(image)
    voxels = voxels.astype(np.int16) if np.all(np.mod(voxels, 1) == 0) else voxels.astype(np.float32)
    return Volume(voxels=voxels, spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
                  origin=tuple(image.GetOrigin()), direction=np.asarray(image.GetDirection()).reshape(3, 3))


def read_labels(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import SimpleITK as sitk

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.uint8)
    if labels.shape != tuple(shape):
        raise ValueError(f"{path}: label map {labels.shape} does not match its series {shape}")
    return labels


def find_lesion_csv(case_folder: Path) -> Path | None:
    """The demo generator writes a lesion CSV (with a ``type`` column) beside each case."""
    for path in sorted(case_folder.rglob("*.csv")):
        with open(path, encoding="utf-8") as handle:
            header = handle.readline()
        if "type" in header.split(",") or "type\n" in header.split(","):
            return path
    return None


def read_demo_cases(data_dir: Path, splits: tuple[str, ...]) -> list[DemoCase]:
    return list(iter_demo_cases(data_dir, splits))


def iter_demo_cases(data_dir: Path, splits: tuple[str, ...]) -> Iterator[DemoCase]:
    """The manifest's cases in ``splits``, read one at a time."""
    from app.core.lesions import read_lesion_csv
    from app.core.manifest import read_manifest

    manifest = read_manifest(_manifest_path(data_dir))
    for case in manifest.cases:
        if case.split not in splits:
            continue
        volume = read_series_volume(manifest.series_path(case))
        labels = read_labels(manifest.labels_path(case), volume.shape)
        csv_path = find_lesion_csv(manifest.labels_path(case).parent)
        rows = read_lesion_csv(csv_path) if csv_path else []
        yield DemoCase(case.case, case.split, volume, labels, rows)


def extra_training_cases(data_dir: Path, extra: tuple[Path, ...]) -> tuple[list[str], Iterator[DemoCase]]:
    """Every case of the ``extra`` demo data folders, whatever its split there, as UNet training
    cases: (their names, a generator reading them). Refuses a patient who is also in
    ``data_dir``'s calib or eval split, so that verdicts stay on unseen patients."""
    import itertools

    from app.core.manifest import read_manifest

    held_out = {c.patient for c in read_manifest(_manifest_path(data_dir)).cases if c.split in ("calib", "eval")}
    names = []
    for folder in extra:
        manifest = read_manifest(_manifest_path(folder))
        shared = sorted(held_out & {c.patient for c in manifest.cases})
        if shared:
            raise ValueError(f"{folder}: patients {', '.join(shared[:5])} are also in {data_dir}'s calib/eval split")
        names += [f"{folder.name}/{c.case}" for c in manifest.cases]
    every = ("train", "calib", "eval")
    return names, itertools.chain.from_iterable(iter_demo_cases(folder, every) for folder in extra)


def _manifest_path(data_dir: Path) -> Path:
    if data_dir.is_file():
        return data_dir
    for name in ("manifest.csv",):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"{data_dir}: no manifest.csv (generate the demo data first)")


# ---------------------------------------------------------------- determinism and lineage


def seed_everything(seed: int, threads: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---------------------------------------------------------------- segmentation training


def _window01(voxels: np.ndarray) -> np.ndarray:
    lo, hi = LUNG_WINDOW
    return ((np.clip(voxels.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


@dataclass
class SlicePool:
    """Training slices (lung-windowed) with their nodule masks, and per nodule the pixels
    where it lies, so that crops can be drawn nodule by nodule."""

    images: np.ndarray  # (n, H, W) float16: half the memory (184 full cases ≈ 4 GB), error ≤ 0.4 HU
    masks: np.ndarray  # (n, H, W) uint8
    nodules: list[np.ndarray]  # per 3-D nodule: (m, 3) int32 rows (pool slice, y, x)

    def solid(self) -> np.ndarray:
        """Per nodule: is its mean density soft tissue (a solid nodule, or mostly solid core)?"""
        return np.array([self.images[tuple(n.T)].mean() > SOLID_MEAN_WINDOWED for n in self.nodules], bool)

    def nodule_odds(self, solid_weight: float) -> np.ndarray | None:
        """Chance of drawing each nodule: solid ones ``solid_weight`` times as often (None: all equal)."""
        if solid_weight == 1.0 or not self.nodules:
            return None
        weights = np.where(self.solid(), solid_weight, 1.0)
        return weights / weights.sum()


def slice_pool(cases: Iterable[DemoCase], rng: np.random.Generator, background_per_case: int) -> SlicePool:
    """Every slice with nodule plus some without. ``cases`` is read once, so a generator of
    cases (:func:`iter_demo_cases`) keeps only one volume in memory at a time."""
    from app.core.lesions import label_instances

    images, masks, nodules, first = [], [], [], 0
    for case in cases:
        fg = np.flatnonzero(case.labels.reshape(len(case.labels), -1).any(axis=1))
        bg = np.setdiff1d(np.arange(len(case.labels)), fg)
        chosen = np.sort(np.concatenate([fg, rng.choice(bg, min(len(bg), background_per_case), replace=False)]))
        images.append(_window01(case.volume.voxels[chosen]).astype(np.float16))
        masks.append((case.labels[chosen] > 0).astype(np.uint8))
        instances = label_instances((case.labels > 0).astype(np.uint8))[0][chosen]
        points = np.argwhere(instances)
        ids = instances[tuple(points.T)]
        order = np.argsort(ids, kind="stable")
        points, ids = points[order], ids[order]
        for piece in np.split(points, np.flatnonzero(np.diff(ids)) + 1) if len(ids) else []:
            nodules.append((piece + np.array([first, 0, 0])).astype(np.int32))
        first += len(chosen)
    return SlicePool(np.concatenate(images), np.concatenate(masks), nodules)


def sample_crops(pool: SlicePool, rng, batch: int, crop: int, nodule_fraction: float = 0.7,
                 nodule_odds: np.ndarray | None = None):
    """Crops on a nodule (each nodule equally likely, whatever its size: small solid nodules
    are the hard ones; or drawn with ``nodule_odds``) or anywhere, with flips."""
    images, masks = pool.images, pool.masks
    crop = min(crop, images.shape[1], images.shape[2])  # tiny test series are smaller than a crop
    xs, ys = [], []
    for _ in range(batch):
        if pool.nodules and rng.random() < nodule_fraction:
            count = len(pool.nodules)
            pick = int(rng.integers(count)) if nodule_odds is None else int(rng.choice(count, p=nodule_odds))
            pixels = pool.nodules[pick]
            k, cy, cx = (int(v) for v in pixels[rng.integers(len(pixels))])
            jitter = rng.integers(-crop // 3, crop // 3 + 1, size=2)
            cy, cx = cy + int(jitter[0]), cx + int(jitter[1])
        else:
            k = int(rng.integers(len(images)))
            cy, cx = int(rng.integers(0, images.shape[1])), int(rng.integers(0, images.shape[2]))
        y0 = int(np.clip(cy - crop // 2, 0, images.shape[1] - crop))
        x0 = int(np.clip(cx - crop // 2, 0, images.shape[2] - crop))
        img, msk = images[k, y0:y0 + crop, x0:x0 + crop], masks[k, y0:y0 + crop, x0:x0 + crop]
        if rng.random() < 0.5:
            img, msk = img[:, ::-1], msk[:, ::-1]
        xs.append(img)
        ys.append(msk)
    return np.stack(xs)[:, None].astype(np.float32), np.stack(ys).astype(np.int64)


def train_unet(cases: Iterable[DemoCase], seed: int, steps: int, crop: int = 224, batch: int = 8,
               threads: int = 2, lr: float = 2e-3, polish_steps: int = 0, polish_lr: float = 5e-4,
               polish_foreground_weight: float = 10.0, init: Path | None = None,
               solid_weight: float = 1.0) -> Generator[Progress, None, object]:
    """Dice + cross-entropy, Adam with a one-cycle schedule; returns the trained network (eval mode).

    ``polish_steps`` more steps follow with a second, lower one-cycle and nodule pixels weighted
    ``polish_foreground_weight`` in the cross-entropy: it trades a few more vessel-like
    candidates (which the 3-D shape clean-up removes) for fewer missed nodules; during those
    steps solid nodules are drawn ``solid_weight`` times as often as the others. ``init``: start
    from these weights (a state dict) instead of random ones, e.g. to polish a trained model.
    ``cases`` may be a generator: it is read once, into the slice pool.
    """
    import torch
    from monai.losses import DiceLoss
    from monai.networks.nets import UNet

    seed_everything(seed, threads)
    rng = np.random.default_rng(seed)
    pool = slice_pool(cases, rng, background_per_case=24)
    net = UNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in UNET_ARGS.items()})
    if init is not None:
        net.load_state_dict(torch.load(init, weights_only=True))
    # Dice on the nodule channel over the whole batch (crops without nodule are common) plus
    # cross-entropy over both channels. Not MONAI's DiceCELoss(include_background=False): it
    # drops the background channel from the CE too, and CE over one channel is always zero.
    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    total = steps + polish_steps
    phases = [(steps, lr, 1.0, None), (polish_steps, polish_lr, polish_foreground_weight, pool.nodule_odds(solid_weight))]
    done = 0
    net.train()
    for phase_steps, phase_lr, weight, odds in phases:
        if phase_steps <= 0:
            continue
        cross_entropy = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, weight]) if weight != 1.0 else None)
        optimiser = torch.optim.Adam(net.parameters(), lr=phase_lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=phase_lr, total_steps=phase_steps,
                                                       pct_start=0.1)
        for _ in range(phase_steps):
            x, y = sample_crops(pool, rng, batch, crop, nodule_odds=odds)
            target = torch.from_numpy(y)
            logits = net(torch.from_numpy(x))
            loss = dice(logits, target[:, None]) + cross_entropy(logits, target)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            done += 1
            if done % 10 == 1 or done == total:
                yield Progress(done / total, f"UNet step {done}/{total} loss {loss.item():.4f}",
                               {"loss": float(loss.item())})
    return net.eval()


# ---------------------------------------------------------------- classifier training


def lesion_centre_index(volume: Volume, row: dict) -> tuple[int, int, int]:
    k, j, i = volume.patient_to_index((row["centre_x_mm"], row["centre_y_mm"], row["centre_z_mm"]))
    return int(round(k)), int(round(j)), int(round(i))


def lesion_patches(case: DemoCase, offsets=(0,), jitters: int = 0, rng=None,
                   require_core: bool = False) -> tuple[list[np.ndarray], list[int]]:
    """ROI patches (CLASSIFIER_SLICES neighbouring axial slices × CLASSIFIER_ROI²) through each
    typed lesion's centre (and, for training, centres moved by ``offsets`` slices and jittered
    in plane), zoomed in plane to the network input exactly as the runner does.

    ``require_core`` (training only): a part-solid nodule's slice is kept only if it shows the
    solid core (:func:`shows_solid_core`). Evaluation keeps every lesion."""
    from app.core.inference import extract_patch, fit_patch

    image = _window01(case.volume.voxels)
    patches, targets = [], []
    for row in case.lesions:
        if row.get("type") not in NODULE_TYPES:
            continue
        k, j, i = lesion_centre_index(case.volume, row)
        for dk in offsets:
            if (require_core and row["type"] == "part-solid"
                    and not shows_solid_core(case.volume, (k + dk, j, i), float(row["mean_diameter_mm"]))):
                continue  # a slice past a small core shows only ground glass: not a part-solid example
            # Jittered centres teach tolerance to a segmentation's slightly different centroid.
            shifts = [(0, 0)] + [tuple(rng.integers(-2, 3, 2)) for _ in range(jitters)]
            for dj, di in shifts:
                roi = extract_patch(image, (k + dk, j + dj, i + di), CLASSIFIER_ROI_VOXELS)
                patch = fit_patch(roi, roi.shape[:-2] + (CLASSIFIER_PATCH, CLASSIFIER_PATCH))
                patches.append(patch if patch.ndim == 3 else patch[None])  # (channels, rows, columns)
                targets.append(NODULE_TYPES.index(row["type"]))
    return patches, targets


def shows_solid_core(volume: Volume, centre: tuple[int, int, int], diameter_mm: float) -> bool:
    """Whether axial slice ``k`` of ``centre`` (k, j, i) shows a solid part inside the lesion's
    central disc (radius 0.6 × ``diameter_mm`` / 2 around (j, i)): the 3×3 mean somewhere there
    reaches SOLID_CORE_HU.

    A small part-solid nodule's core can lie on one slice only; the slices beside it show pure
    ground glass. Labelled part-solid, they taught the classifier to call small ground-glass
    nodules part-solid (every eval error of DenseNet 1.0.0)."""
    from scipy import ndimage

    k, j, i = centre
    if not 0 <= k < volume.shape[0]:
        return False
    radius = 0.6 * diameter_mm / 2.0 / volume.spacing[1]
    reach = int(np.ceil(radius)) + 2
    j0, i0 = max(0, j - reach), max(0, i - reach)
    window = volume.voxels[k, j0:j + reach + 1, i0:i + reach + 1].astype(np.float32)
    smooth = ndimage.uniform_filter(window, 3, mode="nearest")
    rows, cols = np.ogrid[j0 - j:j0 - j + window.shape[0], i0 - i:i0 - i + window.shape[1]]
    disc = rows**2 + cols**2 <= radius**2
    return bool(disc.any() and smooth[disc].max() >= SOLID_CORE_HU)


def train_densenet(cases: list[DemoCase], seed: int, epochs: int, threads: int = 2,
                   lr: float = 1e-3, batch: int = 32) -> Generator[Progress, None, object]:
    import torch
    from monai.networks.nets import DenseNet

    seed_everything(seed, threads)
    rng = np.random.default_rng(seed)
    patches, targets = [], []
    for case in cases:
        p, t = lesion_patches(case, offsets=(-2, -1, 0, 1, 2), jitters=2, rng=rng, require_core=True)
        patches += p
        targets += t
    x_all, y_all = np.stack(patches).astype(np.float32), np.asarray(targets, np.int64)
    net = DenseNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in DENSENET_ARGS.items()})
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    for epoch in range(epochs):
        order = rng.permutation(len(y_all))
        for first in range(0, len(order), batch):
            idx = order[first:first + batch]
            x = _augment(x_all[idx], rng)
            loss = loss_fn(net(torch.from_numpy(x)), torch.from_numpy(y_all[idx]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        yield Progress((epoch + 1) / epochs, f"DenseNet epoch {epoch + 1}/{epochs} loss {loss.item():.4f}",
                       {"loss": float(loss.item())})
    return net.eval()


def _augment(x: np.ndarray, rng) -> np.ndarray:
    """Flips and quarter turns: nodule type does not depend on in-plane orientation."""
    out = []
    for patch in x:
        patch = np.rot90(patch, int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            patch = patch[:, :, ::-1]
        out.append(patch)
    return np.ascontiguousarray(np.stack(out))


# ---------------------------------------------------------------- evaluation


def bootstrap_ci(values, rng_seed: int = 0, resamples: int = 2000, statistic=np.mean) -> tuple[float, float]:
    """95 % percentile interval of ``statistic`` over cases resampled with replacement."""
    values = np.asarray(values, float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(rng_seed)
    stats = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(resamples)]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


@dataclass
class _Truth:
    """What evaluation needs of a case's ground truth, computed once."""

    mask: np.ndarray  # bool
    instances: np.ndarray
    big_ids: list[int]  # lesions ≥ the size the sensitivity counts


def _truth(case: DemoCase, min_diameter_mm: float) -> _Truth:
    from app.core.lesions import label_instances, lesion_table

    mask = case.labels > 0
    instances, _ = label_instances(mask.astype(np.uint8))
    big = [l.lesion_id for l in lesion_table(mask.astype(np.uint8), case.volume, instances=instances)
           if l.mean_diameter_mm >= min_diameter_mm]
    return _Truth(mask, instances, big)


def _outcome(pred_instances: np.ndarray, truth: _Truth) -> tuple[float, int, int, int]:
    """(Dice, big nodules found, big nodules, false-positive lesions)."""
    from app.core.lesions import match_lesions

    pred = pred_instances > 0
    denom = int(pred.sum()) + int(truth.mask.sum())
    dice = 1.0 if denom == 0 else 2.0 * int((pred & truth.mask).sum()) / denom
    match = match_lesions(truth.instances, pred_instances)
    found = {ref for ref, _, _ in match.matched}
    return dice, sum(1 for b in truth.big_ids if b in found), len(truth.big_ids), len(match.added)


def case_outcome(pred: np.ndarray, case: DemoCase, min_diameter_mm: float = 6.0) -> tuple[float, int, int, int]:
    """(Dice, nodules ≥ min_diameter_mm found, such nodules, false-positive lesions) for one case."""
    from app.core.lesions import label_instances

    return _outcome(label_instances((pred > 0).astype(np.uint8))[0], _truth(case, min_diameter_mm))


def evaluate_segmentation(runner, cases: Iterable[DemoCase], min_diameter_mm: float = 6.0) -> dict:
    """Per-case Dice, per-lesion sensitivity (≥ min_diameter_mm) and false positives per case."""
    outcomes = [case_outcome(run_to_end(runner.run(case.volume)).labels, case, min_diameter_mm) for case in cases]
    return _segmentation_metrics(*zip(*outcomes), min_diameter_mm=min_diameter_mm)


@dataclass
class _Candidates:
    """One case's raw lesion candidates (components of foreground ≥ 0.5) with everything a
    clean-up rule looks at, and their overlaps with the truth: enough to score any rule
    exactly as :func:`app.core.lesions.match_lesions` would, without touching the volume again."""

    voxels: np.ndarray  # per candidate
    mm3: np.ndarray
    peaks: np.ndarray
    elongation: np.ndarray
    pairs: list[tuple[int, int, int]]  # (truth id, candidate id, overlapping voxels)
    truth_sizes: dict[int, int]
    truth_voxels: int
    big_ids: list[int]
    patches: np.ndarray | None = None  # candidate-filter inputs (float16), when asked for

    def on_truth(self) -> np.ndarray:
        """Per candidate: does it overlap a truth lesion (what a candidate filter learns)."""
        hit = np.zeros(len(self.voxels), bool)
        hit[[t - 1 for _, t, _ in self.pairs]] = True
        return hit

    def outcome(self, keep: np.ndarray) -> tuple[float, int, int, int]:
        """(Dice, big nodules found, big nodules, false-positive lesions) keeping ``keep`` (bool per candidate)."""
        from app.core.lesions import pair_lesions

        kept = [(r, t, c) for r, t, c in self.pairs if keep[t - 1]]
        denom = int(self.voxels[keep].sum()) + self.truth_voxels
        dice = 1.0 if denom == 0 else 2.0 * sum(c for _, _, c in kept) / denom
        sizes = np.concatenate([[0], self.voxels])  # candidate id → voxels
        found = {r for r, _, _ in pair_lesions(kept, self.truth_sizes, sizes)}
        return dice, sum(1 for b in self.big_ids if b in found), len(self.big_ids), int(keep.sum()) - len(found)


def lesion_candidates(runner, cases: Iterable[DemoCase], min_diameter_mm: float = 6.0,
                      patches=None) -> Iterator[_Candidates]:
    """Run the network on each case and keep only its candidates' measurements (and, given a
    :class:`~app.core.model_card.CandidateFilter` as ``patches``, their filter inputs)."""
    runner.keep_probabilities = True
    try:
        for case in cases:
            foreground = run_to_end(runner.run(case.volume)).probabilities[1]
            yield candidates_from_foreground(foreground, case, min_diameter_mm, patches=patches)
    finally:
        runner.keep_probabilities = False


def candidates_from_foreground(foreground: np.ndarray, case: DemoCase, min_diameter_mm: float = 6.0,
                               threshold: float = 0.5, patches=None) -> _Candidates:
    from app.core.inference import lesion_peaks
    from app.core.lesions import _overlaps, _sizes, label_instances, lesion_elongation

    instances, count = label_instances((foreground >= threshold).astype(np.uint8))
    voxels = np.bincount(instances.ravel(), minlength=count + 1)[1:]
    truth = _truth(case, min_diameter_mm)
    inputs = None
    if patches is not None:
        from app.core.candidate_filter import lesion_patches

        inputs = lesion_patches(case.volume.voxels, foreground, instances, count, case.volume.spacing,
                                patches).astype(np.float16)
    return _Candidates(
        voxels=voxels, mm3=voxels * case.volume.voxel_volume_ml * 1000.0,
        peaks=lesion_peaks(foreground, instances, count),
        elongation=lesion_elongation(instances, count, case.volume.spacing),
        pairs=_overlaps(truth.instances, instances), truth_sizes=_sizes(truth.instances),
        truth_voxels=int(truth.mask.sum()), big_ids=truth.big_ids, patches=inputs)


RULE_GRID = tuple(Postprocessing(min_lesion_mm3=mm3, min_lesion_score=score, max_elongation=elongation)
                  for mm3 in (0.0, 10.0, 20.0, 40.0, 80.0, 160.0)
                  for score in (0.5, 0.6, 0.7, 0.9)
                  for elongation in (None, 1.6, 1.8, 2.0, 2.2, 2.5, 3.0, 4.0))


def rank_clean_up(candidates: list[_Candidates], keeps: list[np.ndarray]) -> tuple[tuple, list[float]]:
    """How calib ranks a clean-up that keeps ``keeps`` (bool per candidate, per case): the key
    (sensitivity − 0.05 × FP per case, then Dice; higher is better) and the row (sensitivity,
    FP per case, Dice) its table shows."""
    outcomes = [case.outcome(keep) for case, keep in zip(candidates, keeps)]
    dice, hits, big, fp = (np.asarray(v, float) for v in zip(*outcomes))
    sensitivity, fp_rate = hits.sum() / max(1.0, big.sum()), fp.mean()
    key = (round(float(sensitivity - 0.05 * fp_rate), 4), float(dice.mean()))
    return key, [round(float(sensitivity), 3), round(float(fp_rate), 2), round(float(dice.mean()), 3)]


def choose_postprocessing(candidates: list[_Candidates], top: int = 10) -> tuple[Postprocessing, dict]:
    """Pick the lesion clean-up on the calibration split, trading sensitivity against false
    positives (sensitivity − 0.05 × FP per case, then Dice); never looks at the eval split.
    Returns the rule and the ``top`` rules' (sensitivity, FP per case, Dice), best first."""
    scored = []
    for rule in RULE_GRID:
        key, row = rank_clean_up(candidates, [~rule.drops(case.mm3, case.peaks, case.elongation) for case in candidates])
        scored.append((key, rule, row))
    scored.sort(key=lambda item: item[0], reverse=True)  # stable: ties keep the grid order
    best = scored[0][1]
    table = {f"{rule.min_lesion_mm3:g}mm3/{rule.min_lesion_score:g}/{rule.max_elongation or 'any'}": row
             for _, rule, row in scored[:top]}
    for _, rule, row in scored:  # and the rule that keeps everything, for comparison
        if rule.min_lesion_mm3 == 0 and rule.min_lesion_score == 0.5 and rule.max_elongation is None:
            table["0mm3/0.5/any (no clean-up)"] = row
    return best, table


def _segmentation_metrics(dice, hits, big_total, false_pos, min_diameter_mm: float = 6.0) -> dict:
    hits, big_total = np.asarray(hits, float), np.asarray(big_total, float)

    def pooled(idx_values):  # sensitivity pooled over the resampled cases' lesions
        idx = idx_values.astype(int)
        return hits[idx].sum() / max(1.0, big_total[idx].sum())

    case_idx = np.arange(len(hits), dtype=float)
    return {
        "eval_cases": len(dice),
        "dice_mean": float(np.mean(dice)),
        "dice_ci95": bootstrap_ci(dice),
        f"sensitivity_ge_{min_diameter_mm:g}mm": float(hits.sum() / max(1.0, big_total.sum())),
        f"sensitivity_ge_{min_diameter_mm:g}mm_ci95": bootstrap_ci(case_idx, statistic=pooled),
        "lesions_ge_min_diameter": int(big_total.sum()),
        "false_positives_per_case": float(np.mean(false_pos)),
        "false_positives_per_case_ci95": bootstrap_ci(false_pos),
    }


def evaluate_classifier(net, cases: list[DemoCase]) -> dict:
    import torch

    correct = []
    for case in cases:
        patches, targets = lesion_patches(case)
        if not patches:
            continue
        with torch.inference_mode():
            pred = net(torch.from_numpy(np.stack(patches).astype(np.float32))).argmax(1).numpy()
        correct += list((pred == np.asarray(targets)).astype(float))
    return {"eval_lesions": len(correct), "accuracy": float(np.mean(correct)) if correct else float("nan"),
            "accuracy_ci95": bootstrap_ci(correct)}


# ---------------------------------------------------------------- export


def export_onnx(net, path: Path, example_shape: tuple[int, ...], dynamic_spatial: bool) -> float:
    """Export with torch.onnx (opset 17) and return max |torch − ORT| logits on a random input."""
    import onnxruntime as ort
    import torch

    from app.core.atomic import atomic_output

    axes = {0: "batch"}
    if dynamic_spatial:
        axes.update({i: f"dim{i}" for i in range(2, len(example_shape))})
    example = torch.from_numpy(np.random.default_rng(0).random(example_shape, dtype=np.float32))
    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer chatter
        torch.onnx.export(net, example, str(tmp), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": axes, "logits": axes if dynamic_spatial else {0: "batch"}},
                          opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = net(example).numpy()
    got = session.run(None, {"image": example.numpy()})[0]
    diff = float(np.abs(expected - got).max())
    if diff > ONNX_TOLERANCE:
        raise RuntimeError(f"{path}: ONNX Runtime differs from torch by {diff:.2e} > {ONNX_TOLERANCE:g}")
    return diff


def save_weights(net, path: Path) -> None:
    from app.core.models import save_state_dict

    save_state_dict(net.state_dict(), path)


# ---------------------------------------------------------------- cards


def unet_card(lineage: Lineage, training_data: str) -> ModelCard:
    return ModelCard(
        name="lung-nodule-unet2d", version="1.0.0", task="segmentation",
        description="Lung nodule segmentation on axial CT slices (MONAI UNet 2D, LeakyReLU, batch norm).",
        labels=(Label(0, "background", "#000000"), Label(1, "nodule", "#ff4040")),
        input=InputSpec(axes="NCHW", dims=2, channels=1, patch_size=None, size_divisor=16,
                        target_spacing=None, orientation="LPS axial, radiological"),
        preprocessing=Preprocessing(hu_window=LUNG_WINDOW, clip=True, normalisation="window_0_1"),
        output_activation="softmax", intended_use=INTENDED_USE, training_data=training_data,
        architecture=Architecture("UNet", UNET_ARGS), files={"weights": "model.pt", "onnx": "model.onnx"},
        lineage=lineage,
    )


def densenet_card(lineage: Lineage, training_data: str) -> ModelCard:
    colours = ("#ff4040", "#ffc000", "#40c0ff")
    return ModelCard(
        name="nodule-type-densenet", version="1.1.0", task="classification",
        description="Nodule type (solid / part-solid / ground-glass) from a 24×24-pixel axial patch at the "
                    "lesion centre, zoomed to 64×64.",
        labels=tuple(Label(i, name, c) for i, (name, c) in enumerate(zip(NODULE_TYPES, colours))),
        input=InputSpec(axes="NCHW", dims=2, channels=CLASSIFIER_SLICES, patch_size=(CLASSIFIER_PATCH, CLASSIFIER_PATCH),
                        orientation="LPS axial, radiological"),
        preprocessing=Preprocessing(hu_window=LUNG_WINDOW, clip=True, normalisation="window_0_1"),
        roi=RoiSpec(source="lesion_centres", patch_size_voxels=CLASSIFIER_ROI_VOXELS),
        output_activation="softmax", intended_use=INTENDED_USE, training_data=training_data,
        architecture=Architecture("DenseNet", DENSENET_ARGS), files={"weights": "model.pt", "onnx": "model.onnx"},
        lineage=lineage,
    )


def write_model_folder(net, card: ModelCard, out: Path, example_shape, dynamic_spatial: bool) -> ModelCard:
    from app.core.models import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    save_weights(net, out / "model.pt")
    diff = export_onnx(net, out / "model.onnx", example_shape, dynamic_spatial)
    metrics = {**card.lineage.metrics, "onnx_max_abs_logit_diff": diff, "onnx_tolerance": ONNX_TOLERANCE}
    card = card.with_lineage(weights_sha256=sha256_file(out / "model.pt"), metrics=metrics)
    save_card(card, out / "card.json")
    return card


# ---------------------------------------------------------------- the whole recipe


def _training_data_text(names: list[str]) -> str:
    return (f"MedCompress demo phantoms (synthetic chest CT, generated by app.core.demo_data), "
            f"train split: {len(names)} cases ({', '.join(names)})")


def _lineage(seed: int, threads: int, recipe: dict, seconds: float, metrics: dict) -> Lineage:
    return Lineage(seed=seed, recipe=recipe, metrics=metrics, package_versions=package_versions(),
                   cpu_flags=cpu_flags(), provider="torch-cpu", threads=threads,
                   training_time_s=round(seconds, 1))


def train_demo(data_dir: Path, out_dir: Path, seed: int = 0, unet_steps: int = 4000, densenet_epochs: int = 12,
               threads: int = 2, which: tuple[str, ...] = ("unet", "densenet"),
               polish_steps: int = 1500, init: Path | None = None, polish_lr: float = 5e-4,
               solid_weight: float = 1.0, extra_train: tuple[Path, ...] = ()) -> Generator[Progress, None, dict]:
    """Train, evaluate, export and write the demo models; returns {name: metrics}.

    ``extra_train``: more demo data folders whose every case also trains the UNet (read one
    case at a time; a patient also in ``data_dir``'s calib or eval split is refused)."""
    from app.core.manifest import read_manifest

    manifest = read_manifest(_manifest_path(data_dir))
    train_names = [c.case for c in manifest.cases_in("train")]
    extra_names, extra_cases = extra_training_cases(data_dir, tuple(extra_train))
    yield Progress(0.02, f"{len(train_names)} train and {len(manifest.cases_in('eval'))} eval cases"
                         + (f"; {len(extra_names)} more UNet train cases" if extra_names else ""))
    results = {}
    if "unet" in which:  # scans read one at a time: a wide eval split would not fit in memory at once
        unet = UnetRecipe(seed, unet_steps, polish_steps, polish_lr, solid_weight, init)
        results["lung-nodule-unet2d"] = yield from _train_unet_folder(train_names, extra_names, extra_cases,
                                                                      data_dir, out_dir, unet, threads)
    if "densenet" in which:
        train, evaluation = read_demo_cases(data_dir, ("train",)), read_demo_cases(data_dir, ("eval",))
        results["nodule-type-densenet"] = yield from _train_densenet_folder(train, evaluation, data_dir, out_dir,
                                                                            seed, densenet_epochs, threads)
    return results


@dataclass(frozen=True)
class UnetRecipe:
    seed: int
    steps: int
    polish_steps: int
    polish_lr: float = 5e-4
    solid_weight: float = 1.0
    init: Path | None = None

    def describe(self) -> dict:
        solid = f", solid nodules drawn ×{self.solid_weight:g}" if self.solid_weight != 1.0 else ""
        recipe = {"steps": self.steps, "crop": 224, "batch": 8, "loss": "batch Dice (nodule) + CE",
                  "optimiser": "Adam+OneCycle(2e-3)",
                  "polish": f"{self.polish_steps} steps, Adam+OneCycle({self.polish_lr:g}), CE nodule weight 10{solid}",
                  "sampling": "70% crops on a nodule (each nodule equally likely), flips",
                  "postprocessing": "size, score and 3-D elongation limits chosen on the calib split"}
        if self.init is not None:
            recipe["init"] = f"{Path(self.init).name} (SHA-256 in parent_sha256)"
        return recipe


def _train_unet_folder(train_names, extra_names, extra_cases, data_dir, out_dir, unet: UnetRecipe, threads):
    import itertools

    from app.core.models import sha256_file
    from app.core.progress import scaled

    start = time.perf_counter()
    train = iter_demo_cases(data_dir, ("train",))
    net = yield from scaled(train_unet(itertools.chain(train, extra_cases), unet.seed, unet.steps, threads=threads,
                                       polish_steps=unet.polish_steps, polish_lr=unet.polish_lr, init=unet.init,
                                       solid_weight=unet.solid_weight),
                            0.05, 0.6, "")
    seconds = time.perf_counter() - start
    text = _training_data_text(train_names)
    if extra_names:
        text += f", plus {len(extra_names)} cases of other demo data, every split ({', '.join(extra_names)})"
    card = unet_card(_lineage(unet.seed, threads, unet.describe(), seconds, {}), text)
    if unet.init is not None:
        card = card.with_lineage(parent_sha256=sha256_file(Path(unet.init)))
    write_model_folder(net, card, out_dir / card.name, (1, 1, 64, 64), dynamic_spatial=True)
    return (yield from calibrate_and_evaluate_unet(out_dir / card.name, data_dir,
                                                   iter_demo_cases(data_dir, ("eval",)), threads))


def calibrate_and_evaluate_unet(folder: Path, data_dir: Path, evaluation: Iterable[DemoCase], threads: int):
    """Choose the lesion clean-up on the calib split, then measure the eval split; both go in the card."""
    from app.core.model_card import load_card

    yield Progress(0.65, "choosing the lesion clean-up on the calib split")
    calib = iter_demo_cases(data_dir, ("calib",))
    rule, table = choose_postprocessing(list(lesion_candidates(_onnx_runner(folder, threads), calib)))
    del calib
    card = replace(load_card(folder / "card.json"), postprocessing=rule)
    save_card(card, folder / "card.json")
    yield Progress(0.72, f"evaluating the UNet on the eval split (clean-up {rule})")
    metrics = evaluate_segmentation(_onnx_runner(folder, threads), evaluation)
    metrics["calib_postprocessing_grid (sensitivity, fp/case, dice)"] = table
    card = card.with_lineage(metrics={**card.lineage.metrics, **metrics})
    save_card(card, folder / "card.json")
    log.info("UNet: %s", json.dumps(metrics))
    return metrics


def _onnx_runner(folder: Path, threads: int):
    from app.core.inference import OnnxRunner
    from app.core.models import open_model

    return OnnxRunner(open_model(folder / "card.json"), providers=("cpu",), threads=threads)


def _train_densenet_folder(train, evaluation, data_dir, out_dir, seed, epochs, threads):
    from app.core.progress import scaled

    start = time.perf_counter()
    net = yield from scaled(train_densenet(train, seed, epochs, threads=threads), 0.8, 0.95, "")
    seconds = time.perf_counter() - start
    metrics = evaluate_classifier(net, evaluation)
    calib = evaluate_classifier(net, read_demo_cases(data_dir, ("calib",)))
    metrics["calib_accuracy"] = calib["accuracy"]  # what design choices were made on
    recipe = {"epochs": epochs, "batch": 32, "optimiser": "Adam(1e-3)+cosine", "roi_pixels": CLASSIFIER_ROI,
              "slices_as_channels": CLASSIFIER_SLICES,
              "input": CLASSIFIER_PATCH, "augment": "quarter turns, flips, ±2 slices, 2 jittered centres (±2 px)",
              "part_solid_slices": f"only those showing the core (3×3 mean ≥ {SOLID_CORE_HU:g} HU in the central disc)",
              "roi_chosen_on": "calib split, one slice: 24 px 0.82, 32 px 0.76, 64 px 0.65"}
    card = densenet_card(_lineage(seed, threads, recipe, seconds, metrics),
                         _training_data_text([c.name for c in train]))
    write_model_folder(net, card, out_dir / card.name, (1, CLASSIFIER_SLICES, CLASSIFIER_PATCH, CLASSIFIER_PATCH),
                       dynamic_spatial=False)
    log.info("DenseNet: %s", json.dumps(metrics))
    return metrics


# ---------------------------------------------------------------- CLI


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("train-demo", help="train the two demo models on the demo data (CPU)")
    parser.add_argument("--data", required=True, help="demo data folder (with manifest.csv)")
    parser.add_argument("--out", required=True, help="folder for the model folders (e.g. resources/models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4000, help="UNet training steps (batch 8)")
    parser.add_argument("--polish-steps", type=int, default=1500,
                        help="UNet steps after those with nodule pixels weighted ×10 (fewer missed nodules)")
    parser.add_argument("--init", help="start the UNet from these weights (model.pt), e.g. to polish it")
    parser.add_argument("--polish-lr", type=float, default=5e-4, help="peak learning rate of the polish steps")
    parser.add_argument("--solid-weight", type=float, default=1.0,
                        help="during the polish steps, draw solid nodules this many times as often as the others")
    parser.add_argument("--extra-train", action="append", default=[], metavar="DIR",
                        help="another demo data folder whose every case also trains the UNet (repeatable); "
                             "a patient also in --data's calib or eval split is refused")
    parser.add_argument("--epochs", type=int, default=12, help="DenseNet epochs")
    parser.add_argument("--only", choices=("unet", "densenet"), help="train just one of the two")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="keep the UNet weights already in --out; redo its calibration and evaluation")
    parser.add_argument("--filter-only", action="store_true",
                        help="keep the UNet weights already in --out; train its candidate filter on the UNet's "
                             "candidates in the train split (and --extra-train), choose its threshold on calib, "
                             "then evaluate")
    parser.add_argument("--filter-epochs", type=int, default=30, help="candidate-filter epochs per seed")
    parser.add_argument("--card-version", help="version to write into the UNet's card (e.g. 1.3.0)")
    parser.set_defaults(handler=_run_cli)


def _filter_only(data_dir: Path, folder: Path, extra_train: tuple[Path, ...], threads: int, epochs: int,
                 version: str | None):
    import itertools

    from app.core.demo_filter import fit_candidate_filter
    from app.core.manifest import read_manifest
    from app.core.model_card import load_card

    train_names = [c.case for c in read_manifest(_manifest_path(data_dir)).cases_in("train")]
    extra_names, extra_cases = extra_training_cases(data_dir, extra_train)
    if not (folder / "card.json").exists():
        raise FileNotFoundError(f"{folder / 'card.json'}: no UNet to fit a candidate filter to")
    if version:
        save_card(replace(load_card(folder / "card.json"), version=version), folder / "card.json")
    yield Progress(0.01, f"candidate filter from {len(train_names) + len(extra_names)} train scans")
    cases = itertools.chain(iter_demo_cases(data_dir, ("train",)), extra_cases)
    return (yield from fit_candidate_filter(folder, data_dir, cases, train_names + extra_names, threads, epochs))


def _run_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    which = (args.only,) if args.only else ("unet", "densenet")
    if args.filter_only:
        job = _filter_only(Path(args.data), Path(args.out) / "lung-nodule-unet2d",
                           tuple(Path(p) for p in args.extra_train), args.threads, args.filter_epochs,
                           args.card_version)
    elif args.evaluate_only:
        evaluation = iter_demo_cases(Path(args.data), ("eval",))
        job = calibrate_and_evaluate_unet(Path(args.out) / "lung-nodule-unet2d", Path(args.data), evaluation,
                                          args.threads)
    else:
        job = train_demo(Path(args.data), Path(args.out), args.seed, args.steps, args.epochs, args.threads, which,
                         args.polish_steps, Path(args.init) if args.init else None, args.polish_lr,
                         args.solid_weight, tuple(Path(p) for p in args.extra_train))
    try:
        progress = next(job)  # train_demo reads its manifests, and refuses a held-out patient, before any work
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    while True:
        if progress.message:
            log.info("%s", progress.message)
        try:
            progress = next(job)
        except StopIteration as done:
            print(json.dumps(done.value, indent=2))
            return 0
