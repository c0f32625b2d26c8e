"""The shared lesion rule: measurement against analytic shapes, and one-to-one matching."""
from __future__ import annotations

import math

import numpy as np
import pytest

from app.core.lesions import (
    label_instances,
    lesion_elongation,
    lesion_table,
    match_lesions,
    read_lesion_csv,
    write_lesion_csv,
)
from app.core.volume import Volume


def _grid(shape, spacing, centre_mm):
    """Physical coordinates (mm) of every voxel centre, relative to ``centre_mm`` (z, y, x)."""
    axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre_mm)]
    return np.meshgrid(*axes, indexing="ij")


def _ellipsoid(shape, spacing, centre_mm, radii_mm):
    z, y, x = _grid(shape, spacing, centre_mm)
    return ((z / radii_mm[0]) ** 2 + (y / radii_mm[1]) ** 2 + (x / radii_mm[2]) ** 2) <= 1.0


@pytest.mark.parametrize("spacing", [(1.0, 0.5, 0.5), (1.5, 0.6, 0.9)])
def test_sphere_measures_its_diameter_and_volume(spacing):
    r = 8.0
    shape = (24, 48, 36)
    centre = (12 * spacing[0], 24 * spacing[1], 18 * spacing[2])
    mask = _ellipsoid(shape, spacing, centre, (r, r, r)).astype(np.uint8)
    volume = Volume(voxels=np.zeros(shape, np.int16), spacing=spacing)
    (lesion,) = lesion_table(mask, volume)
    assert abs(lesion.mean_diameter_mm - 2 * r) <= max(spacing[1:])
    assert abs(lesion.long_axis_mm - lesion.short_axis_mm) <= max(spacing[1:])
    assert lesion.volume_ml == pytest.approx(4 / 3 * math.pi * r**3 / 1000, rel=0.04)
    assert lesion.centre_index == pytest.approx((12, 24, 18), abs=0.05)


def test_ellipse_gives_its_axes_with_anisotropic_pixels():
    # An ellipse 20 mm x 10 mm in plane, rotated 30°, on 0.4 x 0.8 mm pixels.
    spacing = (2.0, 0.4, 0.8)
    shape = (5, 100, 50)
    _, y, x = _grid(shape, spacing, (4.0, 20.0, 20.0))
    angle = math.radians(30)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    mask = ((u / 10.0) ** 2 + (v / 5.0) ** 2) <= 1.0
    mask[[0, 4]] = False  # three slices deep
    volume = Volume(voxels=np.zeros(shape, np.int16), spacing=spacing)
    (lesion,) = lesion_table(mask.astype(np.uint8), volume)
    assert lesion.long_axis_mm == pytest.approx(20.0, abs=0.8)
    assert lesion.short_axis_mm == pytest.approx(10.0, abs=0.8)
    assert lesion.mean_diameter_mm == pytest.approx(15.0, abs=0.8)
    assert lesion.slice_range == (1, 3)


def test_long_axis_is_taken_on_the_slice_of_greatest_extent():
    spacing = (1.0, 0.5, 0.5)
    _, y, x = (a[0] for a in _grid((1, 80, 80), spacing, (0.0, 20.0, 20.0)))
    mask = np.zeros((4, 80, 80), np.uint8)
    mask[1] = (x**2 + y**2) <= 4.0**2  # an 8 mm disc
    mask[2] = (x / 15.0) ** 2 + (y / 5.0) ** 2 <= 1.0  # a 30 x 10 mm ellipse: this slice wins
    volume = Volume(voxels=np.zeros(mask.shape, np.int16), spacing=spacing)
    (lesion,) = lesion_table(mask, volume)
    assert lesion.long_axis_mm == pytest.approx(30.0, abs=0.5)
    assert lesion.short_axis_mm == pytest.approx(10.0, abs=0.5)


def test_padding_is_left_out_of_mean_hu_and_centre_uses_patient_space():
    voxels = np.full((3, 10, 10), 50, np.int16)
    voxels[1, 4, 4] = -2000  # a padding voxel inside the lesion
    padding = voxels == -2000
    mask = np.zeros(voxels.shape, np.uint8)
    mask[1, 3:6, 3:6] = 2
    volume = Volume(voxels=voxels, spacing=(2.0, 0.5, 0.5), origin=(10.0, 20.0, 30.0), padding_mask=padding)
    (lesion,) = lesion_table(mask, volume)
    assert lesion.mean_hu == pytest.approx(50.0)
    assert lesion.label == 2
    assert lesion.centre_lps == pytest.approx((12.0, 22.0, 32.0))
    assert lesion.bbox == (1, 2, 3, 6, 3, 6)


def test_all_padding_gives_no_mean_hu():
    voxels = np.zeros((1, 4, 4), np.int16)
    mask = np.zeros(voxels.shape, np.uint8)
    mask[0, 1, 1] = 1
    volume = Volume(voxels=voxels, spacing=(1.0, 1.0, 1.0), padding_mask=mask.astype(bool))
    assert lesion_table(mask, volume)[0].mean_hu is None


def test_instances_are_per_class_components_ordered_by_size():
    labels = np.zeros((1, 10, 20), np.uint8)
    labels[0, 1:3, 1:3] = 1  # 4 voxels
    labels[0, 5:9, 5:9] = 1  # 16 voxels
    labels[0, 5:9, 9:11] = 2  # 8 voxels of another class, touching the 16: still its own lesion
    instances, n = label_instances(labels)
    assert n == 3
    assert instances.dtype == np.int32
    assert instances[0, 6, 6] == 1 and instances[0, 6, 10] == 2 and instances[0, 1, 1] == 3


def test_min_voxels_drops_specks_but_keeps_ids():
    labels = np.zeros((1, 10, 10), np.uint8)
    labels[0, 0:3, 0:3] = 1
    labels[0, 8, 8] = 1
    volume = Volume(voxels=np.zeros(labels.shape, np.int16), spacing=(1.0, 1.0, 1.0))
    assert [les.lesion_id for les in lesion_table(labels, volume)] == [1, 2]
    assert [les.lesion_id for les in lesion_table(labels, volume, min_voxels=2)] == [1]


def test_shape_mismatch_is_a_clear_error():
    volume = Volume(voxels=np.zeros((2, 4, 4), np.int16), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="does not match"):
        lesion_table(np.zeros((2, 4, 5), np.uint8), volume)


def test_match_lists_a_miss_and_a_false_positive_of_equal_size():
    reference = np.zeros((1, 10, 30), np.int32)
    test = np.zeros_like(reference)
    reference[0, 2:5, 2:5] = 1  # A: the test map misses it
    test[0, 2:5, 20:23] = 1  # C: same voxel count, elsewhere
    reference[0, 6:9, 10:14] = 2  # B, found with a slight shift
    test[0, 6:9, 11:15] = 2
    result = match_lesions(reference, test)
    assert result.missed == [1]
    assert result.added == [1]
    assert [(r, t) for r, t, _ in result.matched] == [(2, 2)]
    assert result.matched[0][2] == pytest.approx(2 * 9 / 24)


def test_match_is_one_to_one_by_greatest_overlap():
    reference = np.zeros((1, 4, 20), np.int32)
    reference[0, :, 0:10] = 1  # one big reference lesion
    test = np.zeros_like(reference)
    test[0, :, 0:6] = 1  # overlaps it by 24 voxels: the partner
    test[0, :, 8:12] = 2  # overlaps it by 8: left over, so "added"
    result = match_lesions(reference, test)
    assert [(r, t) for r, t, _ in result.matched] == [(1, 1)]
    assert result.added == [2] and result.missed == []


def test_csv_round_trip_with_extra_columns(tmp_path):
    labels = np.zeros((3, 12, 12), np.uint8)
    labels[1, 2:6, 2:6] = 1
    labels[1, 8:10, 8:10] = 1
    volume = Volume(voxels=np.full(labels.shape, 30, np.int16), spacing=(1.0, 0.7, 0.7))
    lesions = lesion_table(labels, volume)
    path = tmp_path / "lesions.csv"
    write_lesion_csv(lesions, path, extra={1: {"type": "solid", "score": 0.25}, 2: {"type": "ground-glass"}})
    rows = read_lesion_csv(path)
    assert [r["lesion_id"] for r in rows] == [1, 2]
    assert rows[0]["type"] == "solid" and rows[0]["score"] == 0.25 and rows[1]["score"] is None
    assert rows[0]["volume_ml"] == pytest.approx(lesions[0].volume_ml, abs=1e-4)
    assert rows[0]["mean_hu"] == pytest.approx(30.0)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("spacing", [(1.0, 0.7, 0.7), (2.5, 0.6, 0.8)])
def test_elongation_tells_balls_from_tubes_and_plates(spacing):
    shape = (40, 96, 96)
    centre = (20 * spacing[0], 48 * spacing[1], 48 * spacing[2])
    ball = _ellipsoid(shape, spacing, centre, (7.0, 7.0, 7.0))
    cigar = _ellipsoid(shape, spacing, centre, (3.0, 3.0, 15.0))  # a vessel piece along x, 5:1
    plate = np.zeros(shape, bool)  # one slice of a dome: wide in plane, one slice thick
    plate[20] = _ellipsoid(shape, spacing, centre, (100.0, 6.0, 6.0))[20]
    out = []
    for mask in (ball, cigar, plate):
        instances, count = label_instances(mask.astype(np.uint8))
        out.append(float(lesion_elongation(instances, count, spacing)[0]))
    ball_e, cigar_e, plate_e = out
    assert ball_e == pytest.approx(1.0, abs=0.12)
    assert cigar_e == pytest.approx(5.0, rel=0.15)  # ratio of the half axes, 15 / 3
    # A plate one slice thick: in-plane sd 3 mm (radius 6) over thickness/sqrt(12).
    assert plate_e == pytest.approx(3.0 / (spacing[0] / math.sqrt(12)), rel=0.15)


def test_elongation_of_several_lesions_at_once_matches_one_by_one():
    spacing = (1.25, 0.8, 0.8)
    shape = (40, 80, 80)
    a = _ellipsoid(shape, spacing, (15, 20, 20), (5.0, 5.0, 5.0))
    b = _ellipsoid(shape, spacing, (30, 45, 40), (2.0, 9.0, 2.5))
    instances, count = label_instances((a | b).astype(np.uint8))
    together = lesion_elongation(instances, count, spacing)
    alone = [lesion_elongation(*label_instances((instances == i).astype(np.uint8)), spacing)[0]
             for i in (1, 2)]
    assert count == 2
    assert together == pytest.approx(alone, rel=1e-9)
    assert lesion_elongation(np.zeros(shape, np.int32), 0, spacing).shape == (0,)


def test_shape_rule_drops_the_tube_and_keeps_the_nodule():
    from app.core.inference import remove_unsure_lesions
    from app.core.model_card import Postprocessing

    spacing = (1.25, 0.8, 0.8)
    shape = (48, 80, 80)
    nodule = _ellipsoid(shape, spacing, (20, 20, 20), (5.0, 5.0, 5.0))
    vessel = _ellipsoid(shape, spacing, (30, 45, 40), (20.0, 2.0, 2.0))
    labels = (nodule | vessel).astype(np.uint8)
    volume = Volume(voxels=np.zeros(shape, np.int16), spacing=spacing)
    foreground = labels.astype(np.float32)
    kept = remove_unsure_lesions(labels, foreground, volume, Postprocessing(max_elongation=2.0))
    assert np.array_equal(kept > 0, nodule)
    assert np.array_equal(remove_unsure_lesions(labels, foreground, volume, Postprocessing()), labels)


@pytest.mark.parametrize("rule", [{}, {"min_lesion_mm3": 30.0}, {"min_lesion_mm3": 30.0, "max_elongation": 2.0},
                                  {"min_lesion_score": 0.97}])
def test_cleaned_lesions_carry_the_ids_a_fresh_labelling_of_the_kept_mask_gives(rule):
    """The inference post-processing hands its instance map to the lesion table instead of
    labelling the scan again: it must be exactly label_instances of what it kept (ids by size,
    ties in raster order), whichever lesions were dropped, with two classes and a tie."""
    from app.core.inference import clean_lesions
    from app.core.model_card import Postprocessing

    rng = np.random.default_rng(3)
    shape = (30, 64, 64)
    labels = np.zeros(shape, np.uint8)
    for k in range(14):  # boxes of random sizes, two classes; two equal cubes make a tie
        z, y, x = rng.integers(2, 24), rng.integers(2, 56), rng.integers(2, 56)
        d = (3, 3, 3) if k < 2 else tuple(rng.integers(1, 7, size=3))
        labels[z:z + d[0], y:y + d[1], x:x + d[2]] = 1 + k % 2
    labels[25:27, 0:30, 60:62] = 1  # a thin plate
    foreground = rng.random(shape).astype(np.float32) * (labels > 0)
    volume = Volume(voxels=np.zeros(shape, np.int16), spacing=(1.5, 0.9, 0.9))
    kept, instances = clean_lesions(labels, foreground, volume, Postprocessing(**rule))
    fresh, count = label_instances(kept)
    assert np.array_equal(instances, fresh) and instances.max() == count
    if rule:
        assert 0 < count < label_instances(labels)[1]  # the rule dropped some, not all
    assert [l.lesion_id for l in lesion_table(kept, volume, instances=instances)] == \
           [l.lesion_id for l in lesion_table(kept, volume)]


def test_candidate_scoring_agrees_with_the_matching_rule():
    """The calibration grid scores rules from precomputed overlaps; it must give exactly what
    match_lesions gives on the cleaned-up map."""
    from app.core.demo_models import DemoCase, _outcome, _truth, candidates_from_foreground

    rng = np.random.default_rng(3)
    spacing = (1.25, 0.8, 0.8)
    shape = (40, 72, 72)
    truth = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.float32)
    for _ in range(6):
        centre = rng.uniform((8, 10, 10), (40, 47, 47))
        truth |= _ellipsoid(shape, spacing, centre, (4.0, 4.0, 4.0)).astype(np.uint8)
        shift = rng.uniform(-3, 3, 3)
        pred = np.maximum(pred, _ellipsoid(shape, spacing, centre + shift, rng.uniform(2, 6, 3)) * rng.uniform(0.6, 1))
    volume = Volume(voxels=np.zeros(shape, np.int16), spacing=spacing)
    case = DemoCase("T", "calib", volume, truth, [])

    candidates = candidates_from_foreground(pred, case)
    instances, _ = label_instances((pred >= 0.5).astype(np.uint8))
    for keep in (np.ones(len(candidates.voxels), bool), candidates.elongation <= 1.3, candidates.peaks >= 0.8,
                 np.zeros(len(candidates.voxels), bool)):
        cleaned = np.where(np.isin(instances, np.flatnonzero(keep) + 1), instances, 0)
        assert candidates.outcome(keep) == pytest.approx(_outcome(cleaned, _truth(case, 6.0)))
