"""Training the demo models: deterministic, nodule-balanced, and a lesion clean-up chosen on
calibration data that removes vessel-shaped candidates and keeps nodules."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.demo_models import (
    DemoCase,
    candidates_from_foreground,
    choose_postprocessing,
    lesion_patches,
    read_demo_cases,
    sample_crops,
    shows_solid_core,
    slice_pool,
    train_unet,
)
from app.core.lesions import label_instances
from app.core.progress import run_to_end
from app.core.volume import Volume


def _train_cases(demo_tiny):
    cases = read_demo_cases(demo_tiny, ("train", "calib", "eval"))
    with_nodules = [c for c in cases if c.labels.any()]
    assert with_nodules, "the tiny demo data has nodules"
    return with_nodules


def test_slice_pool_lists_every_nodule_with_pixels_inside_its_mask(demo_tiny):
    cases = _train_cases(demo_tiny)
    pool = slice_pool(cases, np.random.default_rng(0), background_per_case=2)
    assert len(pool.nodules) == sum(label_instances((c.labels > 0).astype(np.uint8))[1] for c in cases)
    for pixels in pool.nodules:
        assert pool.masks[tuple(pixels.T)].all()
    assert pool.images.dtype == np.float16  # half the memory; the windowed values lose < 0.4 HU
    x, y = sample_crops(pool, np.random.default_rng(1), batch=6, crop=96)
    assert x.shape == (6, 1, 96, 96) and x.dtype == np.float32 and y.shape == (6, 96, 96)
    assert y.sum() > 0  # 70 % of crops are drawn on a nodule


def test_unet_training_is_deterministic(demo_tiny):
    cases = _train_cases(demo_tiny)[:1]
    first = run_to_end(train_unet(cases, seed=3, steps=1, crop=64, batch=2, threads=1, polish_steps=1))
    second = run_to_end(train_unet(cases, seed=3, steps=1, crop=64, batch=2, threads=1, polish_steps=1))
    other = run_to_end(train_unet(cases, seed=4, steps=1, crop=64, batch=2, threads=1, polish_steps=1))
    a, b, c = (net.state_dict() for net in (first, second, other))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not all(np.array_equal(a[k].numpy(), c[k].numpy()) for k in a)


def _ball(shape, spacing, centre, radii):
    axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return (z / radii[0]) ** 2 + (y / radii[1]) ** 2 + (x / radii[2]) ** 2 <= 1.0


def test_clean_up_chosen_on_calib_drops_the_vessel_and_keeps_the_nodule():
    spacing = (1.25, 0.8, 0.8)
    shape = (48, 96, 96)
    nodule = _ball(shape, spacing, (25, 25, 25), (5.0, 5.0, 5.0))
    vessel = _ball(shape, spacing, (30, 55, 50), (25.0, 2.5, 2.5))  # runs through the slices
    case = DemoCase("T", "calib", Volume(voxels=np.zeros(shape, np.int16), spacing=spacing),
                    nodule.astype(np.uint8), [])
    foreground = (nodule | vessel).astype(np.float32)
    candidates = candidates_from_foreground(foreground, case)
    assert candidates.outcome(np.ones(2, bool))[1:] == (1, 1, 1)  # found the nodule, one false positive
    rule, table = choose_postprocessing([candidates])
    assert rule.max_elongation is not None
    keep = candidates.elongation <= rule.max_elongation
    dice, found, big, false_positives = candidates.outcome(keep)
    assert (found, big, false_positives) == (1, 1, 0) and dice == pytest.approx(1.0)
    assert table["0mm3/0.5/any (no clean-up)"][1] == 1.0  # the untouched candidates: one FP per case


def test_unet_training_can_polish_given_weights(demo_tiny, tmp_path):
    import torch

    cases = _train_cases(demo_tiny)[:1]
    parent = run_to_end(train_unet(cases, seed=3, steps=1, crop=64, batch=2, threads=1))
    torch.save(parent.state_dict(), tmp_path / "parent.pt")
    polished = run_to_end(train_unet(cases, seed=5, steps=0, crop=64, batch=2, threads=1, polish_steps=1,
                                     init=tmp_path / "parent.pt"))
    fresh = run_to_end(train_unet(cases, seed=5, steps=0, crop=64, batch=2, threads=1, polish_steps=1))
    a, b, c = (net.state_dict() for net in (parent, polished, fresh))
    conv = next(k for k in a if k.endswith("conv.weight"))
    # One small step from the parent stays near it; the same step from random weights does not.
    assert float((b[conv] - a[conv]).abs().max()) < float((c[conv] - a[conv]).abs().max())
    assert not torch.equal(b[conv], a[conv])


def test_part_solid_training_slices_show_their_core_and_ground_glass_keeps_every_slice():
    # 2.5 mm slices, 0.7 mm pixels: a 9 mm ground-glass disc over 5 slices; the part-solid one
    # has its 3 mm solid core on the middle slice only, as small cores are on thick slices.
    spacing, shape = (2.5, 0.7, 0.7), (9, 64, 64)
    voxels = np.full(shape, -900, np.int16)
    glass = _ball(shape, spacing, (10.0, 22.4, 22.4), (6.0, 4.5, 4.5))
    core = _ball(shape, spacing, (10.0, 22.4, 22.4), (1.0, 1.5, 1.5))
    assert glass.any(axis=(1, 2)).sum() == 5 and core.any(axis=(1, 2)).sum() == 1
    voxels[glass] = -550
    voxels[core] = 30
    volume = Volume(voxels=voxels, spacing=spacing)
    row = {"centre_x_mm": 22.4, "centre_y_mm": 22.4, "centre_z_mm": 10.0, "mean_diameter_mm": 9.0}
    centre = tuple(int(round(v)) for v in volume.patient_to_index((22.4, 22.4, 10.0)))
    assert [shows_solid_core(volume, (k,) + centre[1:], 9.0) for k in range(2, 7)] == [False, False, True, False, False]

    offsets = (-2, -1, 0, 1, 2)
    part_solid = DemoCase("P", "train", volume, glass.astype(np.uint8), [{**row, "type": "part-solid"}])
    patches, targets = lesion_patches(part_solid, offsets=offsets, require_core=True)
    assert targets == [1] and patches[0].max() > 0.6  # only the core slice: solid is > 0.6 windowed
    assert lesion_patches(part_solid, offsets=offsets)[1] == [1] * len(offsets)  # evaluation keeps all

    voxels[core] = -550  # the same nodule without its core: ground glass on every slice
    ground_glass = DemoCase("G", "train", volume, glass.astype(np.uint8), [{**row, "type": "ground-glass"}])
    patches, targets = lesion_patches(ground_glass, offsets=offsets, require_core=True)
    assert targets == [2] * len(offsets) and max(p.max() for p in patches) < 0.4


def test_solid_nodules_are_told_apart_and_drawn_as_often_as_asked():
    from app.core.demo_models import SlicePool, _window01

    images = np.full((2, 64, 64), -900, np.int16)
    solid, glass = _ball((1, 64, 64), (1.0, 1.0, 1.0), (0, 20, 20), (1, 5, 5))[0], \
        _ball((1, 64, 64), (1.0, 1.0, 1.0), (0, 40, 40), (1, 6, 6))[0]
    images[0][solid] = 30  # soft tissue
    images[1][glass] = -550  # ground glass
    masks = np.stack([solid, glass]).astype(np.uint8)
    nodules = [np.argwhere(solid).astype(np.int32), np.argwhere(glass).astype(np.int32)]
    nodules = [np.column_stack([np.full(len(n), k, np.int32), n]) for k, n in enumerate(nodules)]
    pool = SlicePool(_window01(images), masks, nodules)
    assert pool.solid().tolist() == [True, False]
    assert pool.nodule_odds(1.0) is None
    odds = pool.nodule_odds(3.0)
    assert odds.tolist() == pytest.approx([0.75, 0.25])
    rng = np.random.default_rng(0)
    crops = [sample_crops(pool, rng, batch=1, crop=32, nodule_fraction=1.0, nodule_odds=odds)[0] for _ in range(400)]
    drawn_solid = np.mean([x.max() > 0.7 for x in crops])  # the solid nodule is on slice 0, the glass on 1
    assert 0.68 < drawn_solid < 0.82


def test_extra_training_data_must_not_hold_a_held_out_patient(demo_tiny, tmp_path):
    import csv

    from app.core.demo_models import extra_training_cases

    with pytest.raises(ValueError, match="also in"):
        extra_training_cases(demo_tiny, (demo_tiny,))
    # The same scans listed under other patients' names: accepted, every split read.
    rows = list(csv.DictReader(open(demo_tiny / "manifest.csv", encoding="utf-8")))
    other = tmp_path / "other"
    other.mkdir()
    with open(other / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "patient": "OTHER-" + row["patient"],
                             "series": str((demo_tiny / row["series"]).resolve()),
                             "labels": str((demo_tiny / row["labels"]).resolve())})
    names, cases = extra_training_cases(demo_tiny, (other,))
    assert len(names) == len(rows) and names[0].startswith("other/")
    assert [c.name for c in cases] == [row["case"] for row in rows]
