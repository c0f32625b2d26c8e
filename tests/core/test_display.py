"""Display maths: window/level, radiological orientation for any patient position, MIP, measurements."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.display import (PRESETS, DisplayedScan, apply_window, array_to_canonical, canonical_to_array,
                              default_window, display_axes, ellipse_mask, label_lut, label_slice_uint8,
                              loaded_along_view, orientation_letters, outline, probability_to_uint8,
                              roi_stats, ruler_distance_mm, series_caption, slab_voxels, view_pixel_size, view_slice,
                              window_lut_int16, window_to_uint8)
from app.core.volume import Volume


def iop_direction(row, col) -> np.ndarray:
    """Direction matrix from DICOM ImageOrientationPatient (row = i direction, column = j direction)."""
    row, col = np.asarray(row, float), np.asarray(col, float)
    return np.stack([row, col, np.cross(row, col)], axis=1)


# Patient positions as scanners write ImageOrientationPatient.
POSITIONS = {
    "HFS": iop_direction((1, 0, 0), (0, 1, 0)),
    "FFS": iop_direction((-1, 0, 0), (0, 1, 0)),
    "HFP": iop_direction((-1, 0, 0), (0, -1, 0)),
    "FFP": iop_direction((1, 0, 0), (0, -1, 0)),
    "sagittal acquisition": iop_direction((0, 1, 0), (0, 0, -1)),
    "coronal acquisition": iop_direction((1, 0, 0), (0, 0, -1)),
}


def test_window_maps_level_to_mid_grey_and_clips_outside():
    grey = window_to_uint8(np.array([-1350, -600, 150, 3000]), *PRESETS["lung"])
    assert grey.tolist() == [0, 128, 255, 255]


def test_int16_table_gives_the_same_bytes_as_the_formula_and_inverts():
    hu = np.array([[-32768, -1000, -600, 0], [40, 400, 3000, 32767]], dtype=np.int16)
    lut = window_lut_int16(400, 40)
    assert np.array_equal(apply_window(hu, lut, 400, 40), window_to_uint8(hu, 400, 40))
    inverted = window_lut_int16(400, 40, inverted=True)
    assert np.array_equal(apply_window(hu, inverted, 400, 40), 255 - window_to_uint8(hu, 400, 40))


def test_default_window_prefers_the_dicom_window():
    assert default_window((-500.0, 1200.0)) == (1200.0, -500.0)
    assert default_window(None) == PRESETS["mediastinum"]
    mr_slice = np.linspace(0, 1000, 10_001)
    width, level = default_window(None, "MR", mr_slice)
    assert width == pytest.approx(980.0) and level == pytest.approx(500.0)


@pytest.mark.parametrize("position", list(POSITIONS))
def test_canonical_view_runs_superior_to_inferior_anterior_to_posterior_right_to_left(position):
    direction = POSITIONS[position]
    volume = Volume(np.zeros((6, 7, 8), np.int16), spacing=(2.0, 1.0, 0.5), direction=direction)
    scan = DisplayedScan(volume)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = [tuple(rng.integers(0, n) for n in volume.shape) for _ in range(2)]
        lps_a, lps_b = volume.index_to_patient(*a), volume.index_to_patient(*b)
        ca, cb = scan.to_canonical(a), scan.to_canonical(b)
        # canonical index grows toward inferior (−z), posterior (+y) and the patient's left (+x)
        assert np.sign(cb[0] - ca[0]) == np.sign(-(lps_b[2] - lps_a[2]))
        assert np.sign(cb[1] - ca[1]) == np.sign(lps_b[1] - lps_a[1])
        assert np.sign(cb[2] - ca[2]) == np.sign(lps_b[0] - lps_a[0])


@pytest.mark.parametrize("position", list(POSITIONS))
def test_canonical_view_is_a_view_and_indexes_the_same_voxels(position):
    voxels = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
    axes = display_axes(POSITIONS[position])
    scan = DisplayedScan(Volume(voxels, spacing=(1, 1, 1), direction=POSITIONS[position]))
    assert np.shares_memory(scan.canonical, voxels)
    kji = (4, 2, 5)
    canonical = scan.to_canonical(kji)
    assert scan.canonical[canonical] == voxels[kji]
    assert canonical_to_array(array_to_canonical(kji, axes, voxels.shape), axes, voxels.shape) == kji


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_orientation_letters_are_radiological_for_every_patient_position(position):
    axes = display_axes(POSITIONS[position])
    assert orientation_letters("axial", axes) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert orientation_letters("coronal", axes) == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert orientation_letters("sagittal", axes) == {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def test_oblique_scan_snaps_to_the_nearest_axis_and_names_the_tilt():
    angle = np.deg2rad(25)
    direction = iop_direction((np.cos(angle), np.sin(angle), 0), (-np.sin(angle), np.cos(angle), 0))
    letters = orientation_letters("axial", display_axes(direction))
    assert letters["right"] == "LP" and letters["left"] == "RA"
    assert letters["top"] == "AL" and letters["bottom"] == "PR"


def test_mip_over_a_slab_is_the_maximum_of_its_slices():
    canonical = np.random.default_rng(1).integers(-1000, 1000, (20, 5, 6)).astype(np.int16)
    n = slab_voxels(10.0, 2.0)
    assert n == 5
    assert np.array_equal(view_slice(canonical, "axial", 10, n), canonical[8:13].max(axis=0))
    assert np.array_equal(view_slice(canonical, "coronal", 2, 1), canonical[:, 2, :])
    assert np.array_equal(view_slice(canonical, "sagittal", 3, 1), canonical[:, :, 3])
    assert slab_voxels(0, 1.0) == 1


def test_reformatted_pixels_keep_the_voxel_aspect():
    spacing = (3.0, 0.7, 0.6)  # canonical (S-I, A-P, R-L)
    assert view_pixel_size("axial", spacing) == (0.7, 0.6)
    assert view_pixel_size("coronal", spacing) == (3.0, 0.6)
    assert view_pixel_size("sagittal", spacing) == (3.0, 0.7)


def test_roi_stats_exclude_padding_and_measure_area_in_mm2():
    image = np.full((10, 10), 100.0)
    image[0, :] = -3024  # padding row
    padding = np.zeros((10, 10), bool)
    padding[0, :] = True
    image[5, 5] = 110
    inside = np.zeros((10, 10), bool)
    inside[0:6, 4:7] = True
    stats = roi_stats(image, inside, (0.5, 2.0), padding)
    assert stats.area_mm2 == pytest.approx(18 * 1.0)
    assert stats.pixels == 15
    values = np.r_[np.full(14, 100.0), 110.0]
    assert stats.mean_hu == pytest.approx(values.mean())
    assert stats.sd_hu == pytest.approx(values.std(ddof=1))
    assert roi_stats(image, padding, (1, 1), padding).mean_hu is None


def test_ellipse_mask_and_ruler():
    mask = ellipse_mask((11, 11), (5, 5), (3, 3))
    assert mask.sum() == 29  # lattice points in a circle of radius 3
    assert ruler_distance_mm((0.0, 0.0), (30.0, 40.0)) == pytest.approx(50.0)


def test_progressive_loading_masks_what_has_not_arrived():
    loaded = np.array([True, True, False, False])
    axes = display_axes(np.eye(3))  # k runs superior, so canonical S→I is k flipped
    assert loaded_along_view(loaded, "axial", axes, 0) == (False, None, None)  # canonical 0 = k 3
    assert loaded_along_view(loaded, "axial", axes, 3)[0] is True
    _, rows, cols = loaded_along_view(loaded, "coronal", axes, 0)
    assert rows.tolist() == [False, False, True, True] and cols is None
    assert loaded_along_view(np.ones(4, bool), "coronal", axes, 0) == (True, None, None)


def test_label_display_helpers():
    lut = label_lut({1: (255, 0, 0), 3: "#2ecc71", 4: (0.0, 0.5, 1.0)}, hidden={2})
    assert tuple(lut[3, :3]) == (0x2E, 0xCC, 0x71) and tuple(lut[4, :3]) == (0, 128, 255)
    assert lut[0, 3] == 0 and tuple(lut[1]) == (255, 0, 0, 255) and lut[2, 3] == 0
    assert label_slice_uint8(np.array([0, 1, 255, 256, 300], np.int32)).tolist() == [0, 1, 255, 1, 45]
    square = np.zeros((5, 5), np.uint8)
    square[1:4, 1:4] = 1
    ring = outline(square)
    assert ring[2, 2] == 0 and ring[1, 1] == 1 and ring.sum() == 8
    heat = probability_to_uint8(np.array([0.2, 0.5, 1.0]), 0.5)
    assert heat.tolist() == [0, 128, 255]


def test_overlay_on_another_grid_is_refused():
    scan = DisplayedScan(Volume(np.zeros((2, 3, 4), np.int16), spacing=(1, 1, 1)))
    with pytest.raises(ValueError, match="does not match"):
        scan.orient(np.zeros((2, 3, 5), np.uint8))


def test_series_caption_reads_the_loaders_description_and_formats_the_date():
    volume = Volume(np.zeros((1, 1, 1), np.int16), spacing=(1, 1, 1),
                    description={"series": "Chest 1", "date": "20230701", "modality": "CT"})
    assert series_caption(volume) == "Chest 1 · CT · 2023-07-01"
