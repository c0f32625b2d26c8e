"""Disagreements between two variants' findings, lesion by lesion, with the shared matching rule."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.disagreement import (
    ADDED, CLASS_FLIP, MISSED, ONLY_OTHER, ONLY_REFERENCE, VOLUME_CHANGE, count_by_kind,
    find_disagreements, lung_rads_size_band, voxel_disagreement,
)
from app.core.lesions import label_instances, lesion_table
from app.core.volume import Volume

SPACING = (1.0, 0.7, 0.7)


def _ball(shape, centre, radius_vox):
    z, y, x = np.indices(shape)
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius_vox ** 2


def _volume(shape=(20, 64, 64)) -> Volume:
    return Volume(voxels=np.full(shape, -800, np.int16), spacing=SPACING, origin=(0.0, 0.0, 0.0))


def test_b_missing_lesion_a_and_adding_c_of_equal_size_lists_both():
    volume = _volume()
    a, shared = _ball(volume.shape, (6, 16, 16), 4), _ball(volume.shape, (10, 45, 45), 3)
    c = np.roll(a, (6, 30, 0), axis=(0, 1, 2))   # the same shape moved: equal voxel count, no overlap
    assert a.sum() == c.sum() and not (a & c).any()
    reference = (a | shared).astype(np.uint8)
    other = (c | shared).astype(np.uint8)
    items = find_disagreements(reference, other, volume)
    assert [item.kind for item in items] == [MISSED, ADDED]   # the miss is more serious
    missed, added = items
    assert missed.centre_index == pytest.approx((6, 16, 16))
    assert added.centre_index == pytest.approx((12, 46, 16))
    # Equal voxel counts: the two lesions have the same size and volume, and both are reported.
    assert missed.reference_volume_ml == pytest.approx(added.other_volume_ml)
    assert missed.mean_diameter_mm == pytest.approx(added.mean_diameter_mm)
    assert missed.size_band == lung_rads_size_band(missed.mean_diameter_mm) == "6–8 mm"
    assert "not found" in missed.describe("B") and "B adds" in added.describe("B")


def test_voxel_map_marks_each_side_in_its_own_value():
    reference = np.zeros((2, 3, 3), np.uint8)
    other = np.zeros_like(reference)
    reference[0, 0, :2] = 1
    other[0, 0, 1:] = 1
    other[1, 2, 2] = 2   # another class still counts as foreground
    result = voxel_disagreement(reference, other)
    assert result[0, 0].tolist() == [ONLY_REFERENCE, 0, ONLY_OTHER]
    assert result[1, 2, 2] == ONLY_OTHER
    assert int((result > 0).sum()) == 3


def test_volume_changes_over_the_threshold_are_listed_biggest_change_first():
    volume = _volume()
    big, small = _ball(volume.shape, (6, 16, 16), 5), _ball(volume.shape, (12, 45, 45), 4)
    reference = (big | small).astype(np.uint8)
    shrunk_big = _ball(volume.shape, (6, 16, 16), 3)   # about -80 % of its volume
    grown_small = _ball(volume.shape, (12, 45, 45), 4.6)   # about +70 %
    other = (shrunk_big | grown_small).astype(np.uint8)
    items = find_disagreements(reference, other, volume, volume_change_pct=25.0)
    assert [item.kind for item in items] == [VOLUME_CHANGE, VOLUME_CHANGE]
    assert items[0].volume_change_pct < -70 and 50 < items[1].volume_change_pct < 75
    # the big one shrinks from 6–8 mm to below 6 mm: a change of Lung-RADS size band, listed first
    assert items[0].crosses_size_band and items[0].size_band == "6–8 mm" and "now <6 mm" in items[0].detail()
    assert find_disagreements(reference, other, volume, volume_change_pct=90.0) == []


def test_class_flips_compare_both_classifiers_on_the_reference_lesions():
    volume = _volume()
    labels = (_ball(volume.shape, (6, 16, 16), 4) | _ball(volume.shape, (12, 45, 45), 3)).astype(np.uint8)
    ids = [lesion.lesion_id for lesion in lesion_table(labels, volume)]
    ref_types = {ids[0]: {"solid": 0.9, "ground-glass": 0.1}, ids[1]: {"solid": 0.6, "ground-glass": 0.4}}
    other_types = {ids[0]: {"solid": 0.3, "ground-glass": 0.7}, ids[1]: {"solid": 0.55, "ground-glass": 0.45}}
    items = find_disagreements(labels, labels, volume, reference_types=ref_types, other_types=other_types)
    assert [(i.kind, i.reference_id, i.reference_type, i.other_type) for i in items] == [
        (CLASS_FLIP, ids[0], "solid", "ground-glass")]


def test_a_degraded_variant_lists_exactly_the_lesions_it_really_misses(demo_tiny):
    """Ground truth of a demo case vs a degraded map (eroded in-plane: small nodules vanish, large
    ones shrink); the missed entries must be the reference lesions with no voxel left in the other
    map, read off the lesion tables independently of the matching code."""
    volume, reference, degraded, instances, lesions = _degraded_demo_case(demo_tiny)
    really_missed = {lesion.lesion_id for lesion in lesions if not degraded[instances == lesion.lesion_id].any()}
    assert 0 < len(really_missed) < len(lesions)   # the case tests something
    items = find_disagreements(reference, degraded, volume)
    assert {item.reference_id for item in items if item.kind == MISSED} == really_missed
    assert count_by_kind(items)[ADDED] == 0
    missed_sizes = [item.mean_diameter_mm for item in items if item.kind == MISSED]
    assert missed_sizes == sorted(missed_sizes, reverse=True)
    assert items[0].kind == MISSED


def _degraded_demo_case(demo_tiny):
    """A demo case with two or more lesions, and a degraded map that has lost everything beyond a
    plane lying between them (as a model blind to part of the scan would): some lesions go, some
    stay. The phantom places lesions at random, so the case and the plane are found, not fixed."""
    from app.core.demo_models import read_labels, read_series_volume

    for case in sorted(p.name for p in demo_tiny.glob("CASE*")):
        volume = read_series_volume(demo_tiny / case / "CT")
        reference = read_labels(demo_tiny / case / "nodules.nii.gz", volume.shape)
        instances, count = label_instances(reference)
        lesions = lesion_table(reference, volume, instances=instances)
        for axis in range(3):
            ends = sorted(lesion.bbox[2 * axis + 1] for lesion in lesions)
            starts = [lesion.bbox[2 * axis] for lesion in lesions]
            cut = next((end for end in ends[:-1] if any(start >= end for start in starts)), None)
            if count >= 2 and cut is not None:
                degraded = reference.copy()
                degraded[(slice(None),) * axis + (slice(cut, None),)] = 0
                return volume, reference, degraded, instances, lesions
    raise AssertionError("no demo case with two lesions apart from each other")


def test_a_lesion_merged_into_its_neighbour_is_listed_after_a_true_miss():
    """B joins lesions A1 and A2 into one (paired with the bigger, A1) and misses A3 outright:
    A3 comes first (nothing there), A2 after it, marked as lying inside another lesion."""
    volume = _volume()
    a1, a2 = _ball(volume.shape, (8, 20, 20), 4), _ball(volume.shape, (8, 20, 30), 3)
    a3 = _ball(volume.shape, (14, 48, 48), 2)
    reference = (a1 | a2 | a3).astype(np.uint8)
    bridge = np.zeros(volume.shape, bool)
    bridge[7:10, 18:23, 20:31] = True
    merged = (a1 | a2 | bridge).astype(np.uint8)
    items = find_disagreements(reference, merged, volume)
    missed = [d for d in items if d.kind == MISSED]
    assert [d.merged for d in missed] == [False, True]
    assert missed[0].centre_index == pytest.approx((14, 48, 48)) and missed[0].covered_fraction == 0.0
    assert missed[1].covered_fraction == 1.0 and "inside another lesion" in missed[1].detail()


def test_ground_truth_tells_a_missed_nodule_from_the_references_false_positive():
    volume = _volume((20, 96, 96))
    nodule, false_positive = _ball(volume.shape, (6, 16, 16), 3), _ball(volume.shape, (6, 16, 60), 4)
    found_nodule, new_false_positive = _ball(volume.shape, (14, 70, 20), 3), _ball(volume.shape, (14, 70, 70), 4)
    reference = (nodule | false_positive).astype(np.uint8)
    other = (found_nodule | new_false_positive).astype(np.uint8)
    truth = (nodule | found_nodule).astype(np.uint8)
    items = find_disagreements(reference, other, volume, truth_labels=truth)
    # The bigger false positives would come first by size; the truth puts the worrying ones first.
    assert [(item.kind, item.on_truth) for item in items] == [(MISSED, True), (MISSED, False), (ADDED, False), (ADDED, True)]
    assert items[0].detail().endswith("not found; a ground-truth lesion")
    assert items[1].detail().endswith("; the reference's false positive") and items[1].reassuring
    assert "not in the ground truth" in items[2].describe("int8")
    assert items[3].detail().endswith("a ground-truth lesion the reference missed")
    unlabelled = find_disagreements(reference, other, volume)
    assert {item.on_truth for item in unlabelled} == {None} and [i.kind for i in unlabelled][:2] == [MISSED, MISSED]
    assert unlabelled[0].mean_diameter_mm > unlabelled[1].mean_diameter_mm  # without truth: by size
    assert "ground" not in unlabelled[0].detail()
