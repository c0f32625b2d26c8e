"""Masks onto a loaded volume: NIfTI/NRRD resampled by SimpleITK, DICOM SEG (highdicom) by
frame position, on series written with pydicom and on the demo study."""
from __future__ import annotations

import numpy as np
import pytest

from app.core.dicom_fixtures import SeriesSpec, write_ct_series
from app.core.dicom_index import index_path
from app.core.dicom_load import load_series
from app.core.masks import MaskError, load_label_file, load_seg, volume_grid_image
from app.core.progress import run_to_end


def _load(folder):
    (series,) = run_to_end(index_path(folder)).image_series()
    return run_to_end(load_series(series))


@pytest.fixture
def ct(tmp_path):
    written = write_ct_series(tmp_path / "ct", SeriesSpec(shape=(10, 24, 20), shuffle_names=True))
    return written, _load(tmp_path / "ct")


# ------------------------------------------------------------------------- label files

@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_label_file_in_another_orientation_lands_back_on_the_grid(ct, tmp_path, suffix):
    import SimpleITK as sitk

    _, volume = ct
    labels = np.zeros(volume.shape, np.uint8)
    labels[2:5, 3:9, 4:7] = 1
    labels[7, 10:12, 10:15] = 3
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(volume_grid_image(volume))
    flipped = sitk.Flip(image, [True, True, False])  # same physical voxels, RAS-like axes
    path = tmp_path / f"labels{suffix}"
    sitk.WriteImage(flipped, str(path))
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), labels)
    assert np.array_equal(load_label_file(path, volume), labels)


def test_coarser_label_file_is_resampled_nearest_neighbour(ct, tmp_path):
    import SimpleITK as sitk

    _, volume = ct
    coarse = np.zeros((4, 8, 7), np.uint16)
    coarse[1:3, 2:5, 1:4] = 300  # above 255: must come back as uint16, not wrapped
    image = sitk.GetImageFromArray(coarse)
    image.SetSpacing([3 * s for s in volume.spacing[::-1]])
    image.SetOrigin(volume.origin)
    image.SetDirection(np.asarray(volume.direction).ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "coarse.nii.gz"))
    got = load_label_file(tmp_path / "coarse.nii.gz", volume)
    k, j, i = np.indices(volume.shape)
    # a fine index n sits at coarse index n/3: never a tie, so rounding is unambiguous
    kc, jc, ic = np.rint(k / 3).astype(int), np.rint(j / 3).astype(int), np.rint(i / 3).astype(int)
    inside = (kc < 4) & (jc < 8) & (ic < 7)
    expected = np.zeros(volume.shape, np.uint16)
    expected[inside] = coarse[kc[inside], jc[inside], ic[inside]]
    assert got.dtype == np.uint16 and np.array_equal(got, expected)


def test_unreadable_label_file_is_a_clear_error(ct, tmp_path):
    _, volume = ct
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(MaskError, match="bad.nii.gz"):
        load_label_file(tmp_path / "bad.nii.gz", volume)


# ---------------------------------------------------------------------------------- SEG

def _write_seg(written, masks_by_file: dict[str, np.ndarray], path, n_segments: int):
    """A highdicom SEG over the series' files in file-name order (not slice order)."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(written.paths)
    sources = [pydicom.dcmread(p) for p in files]
    pixels = np.stack([masks_by_file[p] for p in files]).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=f"Nodule {n}",
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT",
                                                           "Morphologically Abnormal Structure"),
            segmented_property_type=hd.sr.CodedConcept("27925004", "SCT", "Nodule"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n in range(1, n_segments + 1)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=50,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="MedCompress tests",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    seg.save_as(path)


def test_seg_frames_land_on_the_right_voxels(ct, tmp_path):
    written, volume = ct
    expected = np.zeros(volume.shape, np.uint8)
    expected[3, 5:9, 6:10] = 1
    expected[4, 5:9, 6:11] = 1
    expected[7, 14:18, 2:5] = 2
    slice_of_file = {p: volume.sop_uids.index(uid) for p, uid in zip(written.paths, written.sop_uids)}
    masks = {p: expected[k] for p, k in slice_of_file.items()}
    _write_seg(written, masks, tmp_path / "seg.dcm", n_segments=2)
    labels, segments = load_seg(tmp_path / "seg.dcm", volume)
    assert np.array_equal(labels, expected)
    assert [s["number"] for s in segments] == [1, 2]
    assert segments[1]["label"] == "Nodule 2"


def test_seg_of_another_grid_is_refused(ct, tmp_path):
    written, volume = ct
    masks = {p: np.ones(volume.shape[1:], np.uint8) for p in written.paths}
    _write_seg(written, masks, tmp_path / "seg.dcm", n_segments=1)
    shifted = write_ct_series(tmp_path / "shifted", SeriesSpec(
        shape=(10, 24, 20), first_position=(-22.4, -25.6, -98.75)))  # half a slice off
    with pytest.raises(MaskError, match="does not fall on a slice"):
        load_seg(tmp_path / "seg.dcm", _load(tmp_path / "shifted"))
    assert shifted.paths


def test_seg_index_overlay_and_nifti_agree_on_the_demo_study(demo_tiny):
    index = run_to_end(index_path(demo_tiny))
    cases = sorted(p for p in demo_tiny.iterdir() if p.is_dir())
    assert len(index.image_series()) == len(cases) == 3
    for case in cases:
        series = next(s for s in index.image_series() if s.files[0].startswith(str(case)))
        (overlay,) = index.overlays_for(series.series_uid)
        volume = run_to_end(load_series(series))
        seg_labels, _ = load_seg(overlay.files[0], volume)
        nifti = load_label_file(case / "nodules.nii.gz", volume)
        assert np.array_equal(seg_labels > 0, nifti > 0), case.name
        instances = load_label_file(case / "nodule_instances.nii.gz", volume)
        assert np.array_equal(instances > 0, nifti > 0), case.name
