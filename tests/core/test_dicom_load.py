"""Loading real series: geometry against SimpleITK, HU against pydicom, the fast path against
pydicom byte for byte, compressed syntaxes, multi-frame, progressive fill and bad slices."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.core.dicom_fixtures import SeriesSpec, bundled_test_file, bundled_test_files, write_ct_series
from app.core.dicom_header import read_header
from app.core.dicom_index import index_path
from app.core.dicom_load import (_CHUNK, _WORKERS, SeriesLoadError, centre_out_order,
                                 fast_path_accepts, load_series, open_series, read_stored_fast,
                                 series_thumbnail)
from app.core.progress import run_to_end


def _only_series(folder):
    index = run_to_end(index_path(folder))
    (series,) = index.image_series()
    return series


def _load(folder):
    return run_to_end(load_series(_only_series(folder)))


def _sitk_volume(folder):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


# ------------------------------------------------------------- the fast path is exact

def test_fast_path_pixels_equal_pydicom_on_every_corpus_file_it_accepts():
    import pydicom

    accepted = 0
    for path in bundled_test_files("**/*"):  # *.dcm and the DICOMDIR sets' files
        try:
            h = read_header(path)
        except ValueError:
            continue
        if not fast_path_accepts(h) or h.has_pixels is not True:
            continue
        try:
            reference = pydicom.dcmread(path).pixel_array
        except Exception:  # noqa: BLE001 - pydicom cannot decode it either: nothing to compare
            continue
        ours = read_stored_fast(h)
        assert ours.dtype == reference.dtype, path
        assert ours.tobytes() == reference.tobytes(), path
        accepted += 1
    assert accepted >= 30


def test_fast_path_declines_what_it_cannot_read_exactly():
    for name in ("MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                 "SC_rgb_small_odd.dcm", "MR_small_expb.dcm"):
        assert not fast_path_accepts(read_header(bundled_test_file(name))), name


# ------------------------------------------------------------------------ geometry

GEOMETRIES = {
    "slope 0.5": SeriesSpec(slope=0.5, intercept=-1000.0),
    "feet first": SeriesSpec(patient_position="FFS"),
    "prone": SeriesSpec(patient_position="HFP"),
    "oblique": SeriesSpec(oblique_deg=30.0, first_position=(10.0, -20.0, 35.0)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry_and_voxels_match_simpleitk(tmp_path, name):
    import SimpleITK as sitk

    write_ct_series(tmp_path, dataclasses.replace(GEOMETRIES[name], shuffle_names=True))
    volume = _load(tmp_path)
    reference = _sitk_volume(tmp_path)
    assert np.allclose(volume.origin, reference.GetOrigin(), atol=1e-4)
    assert np.allclose(volume.spacing[::-1], reference.GetSpacing(), atol=1e-4)
    assert np.allclose(np.asarray(volume.direction).ravel(), reference.GetDirection(), atol=1e-6)
    assert np.array_equal(volume.voxels, sitk.GetArrayFromImage(reference).astype(volume.voxels.dtype))
    assert volume.warnings == ()


def test_prone_and_feet_first_keep_patient_directions(tmp_path):
    write_ct_series(tmp_path / "ffs", SeriesSpec(patient_position="FFS"))
    write_ct_series(tmp_path / "hfp", SeriesSpec(patient_position="HFP"))
    ffs, hfp = _load(tmp_path / "ffs"), _load(tmp_path / "hfp")
    assert np.allclose(ffs.direction[:, 0], [-1, 0, 0])  # columns run to the patient's right
    assert np.allclose(hfp.direction[:, 1], [0, -1, 0])  # rows run anterior
    for v in (ffs, hfp):
        k_axis = v.direction[:, 2]
        assert v.slice_position_mm(1) - v.slice_position_mm(0) == pytest.approx(2.5)
        assert abs(k_axis[2]) == pytest.approx(1.0)


def test_shuffled_file_names_load_equal_to_ordered(tmp_path):
    write_ct_series(tmp_path / "ordered", SeriesSpec(seed=3))
    write_ct_series(tmp_path / "shuffled", SeriesSpec(seed=3, shuffle_names=True))
    a, b = _load(tmp_path / "ordered"), _load(tmp_path / "shuffled")
    assert np.array_equal(a.voxels, b.voxels)
    assert a.origin == b.origin and a.spacing == b.spacing


def test_instance_numbers_do_not_decide_the_order(tmp_path):
    import pydicom

    written = write_ct_series(tmp_path, SeriesSpec())
    for n, path in enumerate(written.paths):  # scramble InstanceNumber, keep positions
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = (n * 7) % len(written.paths) + 1
        ds.save_as(path)
    volume = _load(tmp_path)
    assert np.array_equal(volume.voxels, written.hu.astype(np.int16))


# ----------------------------------------------------------------------------- HU

def test_hu_equal_pydicom_rescale_int16_when_integral(tmp_path):
    import pydicom
    from pydicom.pixels import apply_rescale

    written = write_ct_series(tmp_path, SeriesSpec(intercept=-1024.0))
    volume = _load(tmp_path)
    assert volume.voxels.dtype == np.int16
    for k, path in enumerate(written.paths):
        ds = pydicom.dcmread(path)
        assert np.array_equal(volume.voxels[k], apply_rescale(ds.pixel_array, ds))


def test_hu_equal_pydicom_rescale_float32_when_slope_is_fractional(tmp_path):
    import pydicom
    from pydicom.pixels import apply_rescale

    written = write_ct_series(tmp_path, SeriesSpec(slope=0.37, intercept=-1000.5))
    volume = _load(tmp_path)
    assert volume.voxels.dtype == np.float32
    for k, path in enumerate(written.paths):
        ds = pydicom.dcmread(path)
        assert np.array_equal(volume.voxels[k], apply_rescale(ds.pixel_array, ds).astype(np.float32))


def test_values_beyond_int16_switch_to_float32(tmp_path):
    written = write_ct_series(tmp_path, SeriesSpec(intercept=31000.0))  # 2000 + 31000 > 32767
    volume = _load(tmp_path)
    assert volume.voxels.dtype == np.float32
    assert np.array_equal(volume.voxels, written.hu.astype(np.float32))
    assert any("float32" in w for w in volume.warnings)


def test_monochrome1_flagged_not_inverted_and_padding_masked(tmp_path):
    written = write_ct_series(tmp_path, SeriesSpec(monochrome1=True, padding_value=0))
    volume = _load(tmp_path)
    assert volume.photometric == "MONOCHROME1"
    assert np.array_equal(volume.voxels, written.hu.astype(np.int16))
    assert np.array_equal(volume.padding_mask, written.stored == 0)
    assert volume.padding_mask.any() and not volume.padding_mask.all()


# ------------------------------------------------------------------------ warnings

def test_missing_slice_and_gantry_tilt_are_warned(tmp_path):
    write_ct_series(tmp_path / "gap", SeriesSpec(missing_slices=(4,)))
    write_ct_series(tmp_path / "tilt", SeriesSpec(gantry_tilt_deg=15.0))
    gap, tilt = _load(tmp_path / "gap"), _load(tmp_path / "tilt")
    assert gap.shape[0] == 9 and gap.spacing[0] == pytest.approx(2.5)
    assert any("missing slices" in w and "5.00 mm" in w for w in gap.warnings)
    assert any("gantry tilt of 15.0" in w for w in tilt.warnings)


def test_uneven_spacing_is_warned(tmp_path):
    import pydicom

    written = write_ct_series(tmp_path, SeriesSpec())
    ds = pydicom.dcmread(written.paths[5])
    ds.ImagePositionPatient[2] += 0.4
    ds.save_as(written.paths[5])
    volume = _load(tmp_path)
    assert any("uneven slice spacing" in w for w in volume.warnings)


def test_mixed_sizes_keep_the_largest_group_and_warn(tmp_path):
    main = write_ct_series(tmp_path / "a", SeriesSpec(shape=(6, 32, 32)))
    write_ct_series(tmp_path / "b", SeriesSpec(shape=(2, 16, 16), series_uid=main.series_uid))
    index = run_to_end(index_path(tmp_path))
    first, second = sorted(index.image_series(), key=lambda s: s.key)
    merged = dataclasses.replace(first, files=first.files + second.files,
                                 instances=first.instances + second.instances)
    volume = run_to_end(load_series(merged))
    assert volume.shape == (6, 32, 32)
    assert any("mixed sizes" in w for w in volume.warnings)


# ---------------------------------------------------------------- compressed, no decoder

@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm",
                                  "JPGExtended.dcm", "MR_small_bigendian.dcm",
                                  "CT_small.dcm"])
def test_compressed_and_other_syntaxes_decode_through_pydicom(tmp_path, name):
    import pydicom
    from pydicom.pixels import apply_rescale

    shutil.copy(bundled_test_file(name), tmp_path)
    volume = _load(tmp_path)
    ds = pydicom.dcmread(bundled_test_file(name))
    expected = apply_rescale(ds.pixel_array, ds)
    assert np.array_equal(volume.voxels[0], expected.astype(volume.voxels.dtype))


def test_a_file_no_plugin_can_decode_is_blank_with_the_reason(tmp_path):
    # Its 12-bit JPEG Extended stream is beyond both pylibjpeg and Pillow.
    shutil.copy(bundled_test_file("JPEG-lossy.dcm"), tmp_path)
    volume = _load(tmp_path)
    assert volume.is_complete
    (warning,) = [w for w in volume.warnings if "could not be decoded" in w]
    assert "JPEG-lossy.dcm" in warning and "pylibjpeg" in warning


def test_a_syntax_without_decoder_is_a_clear_error(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(bundled_test_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: nobody decodes it
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(SeriesLoadError, match=r"1\.2\.840\.10008\.1\.2\.4\.100.*no decoder"):
        open_series(_only_series(tmp_path))


def test_colour_series_is_refused_by_name(tmp_path):
    shutil.copy(bundled_test_file("SC_rgb_small_odd.dcm"), tmp_path)
    series = _only_series(tmp_path)
    with pytest.raises(SeriesLoadError, match=f"{series.key}.*colour"):
        open_series(series)


# ------------------------------------------------------------------------ multi-frame

def test_enhanced_multiframe_loads_like_its_single_frames(tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    written = write_ct_series(tmp_path / "single", SeriesSpec(shape=(5, 32, 32), oblique_deg=20))
    legacy = [pydicom.dcmread(p) for p in written.paths]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    single, multi = _load(tmp_path / "single"), _load(tmp_path / "multi")
    assert np.array_equal(single.voxels, multi.voxels)
    assert np.allclose(single.origin, multi.origin) and np.allclose(single.spacing, multi.spacing)
    assert np.allclose(single.direction, multi.direction)


def test_rtdose_grid_positions_come_from_frame_offsets(tmp_path):
    shutil.copy(bundled_test_file("rtdose.dcm"), tmp_path)
    volume = _load(tmp_path)
    assert volume.shape[0] == 15 and volume.spacing[0] > 0
    assert volume.voxels.dtype == np.float32  # DoseGridScaling is fractional


# ---------------------------------------------------------------- progressive loading

def test_first_slice_is_ready_at_open_and_fill_grows_around_it(tmp_path):
    write_ct_series(tmp_path, SeriesSpec(shape=(40, 16, 16)))
    loader = open_series(_only_series(tmp_path))
    assert loader.first_slice == 20
    assert loader.volume.loaded.sum() == 1 and loader.volume.loaded[20]
    ranges = [p.data for p in loader.fill()]
    for lo, hi in ranges:
        assert lo <= 20 < hi
    widths = [hi - lo for lo, hi in ranges]
    assert widths == sorted(widths) and ranges[-1] == (0, 40)
    assert loader.volume.is_complete


def test_closing_fill_stops_it_part_way(tmp_path):
    write_ct_series(tmp_path, SeriesSpec(shape=(80, 16, 16)))
    loader = open_series(_only_series(tmp_path))
    # Slices outside the first chunk wait until the loader is told to stop, so the outcome
    # does not depend on how fast this machine decodes 16x16 slices (it once loaded all 80
    # before the close arrived).
    order = centre_out_order(80, loader.first_slice)
    first_chunk = set([k for k in order if not loader.volume.loaded[k]][:_CHUNK])
    read = loader._read_stored

    def gated_read(s):
        if loader._slices.index(s) not in first_chunk:
            assert loader._stop.wait(timeout=30)
        return read(s)

    loader._read_stored = gated_read
    job = loader.fill()
    next(job)
    job.close()  # cancel: the pool is shut down and joined (conftest fails leaked threads)
    loaded = int(loader.volume.loaded.sum())
    # the first chunk, plus at most the one slice each other worker was waiting on
    assert 1 + _CHUNK <= loaded <= 1 + _CHUNK + _WORKERS


def test_a_slice_broken_after_indexing_is_blank_with_a_warning(tmp_path):
    written = write_ct_series(tmp_path, SeriesSpec())
    series = _only_series(tmp_path)
    victim = written.paths[2]
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[: len(data) // 2])
    volume = run_to_end(load_series(series))
    assert volume.is_complete
    assert any(os.path.basename(victim) in w and "could not be decoded" in w
               for w in volume.warnings)
    assert np.array_equal(volume.voxels[3], written.hu[3].astype(np.int16))


def test_zip_series_loads_equal_to_folder(tmp_path):
    import zipfile

    written = write_ct_series(tmp_path / "ct", SeriesSpec(shape=(5, 32, 32)))
    with zipfile.ZipFile(tmp_path / "ct.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for p in written.paths:
            zf.write(p, os.path.basename(p))
    assert np.array_equal(_load(tmp_path / "ct.zip").voxels, _load(tmp_path / "ct").voxels)


def test_loading_never_writes_to_input(tmp_path):
    import hashlib

    written = write_ct_series(tmp_path, SeriesSpec())
    before = {p: (hashlib.sha256(Path(p).read_bytes()).hexdigest(), os.stat(p).st_mtime_ns)
              for p in written.paths}
    _load(tmp_path)
    series_thumbnail(_only_series(tmp_path))
    after = {p: (hashlib.sha256(Path(p).read_bytes()).hexdigest(), os.stat(p).st_mtime_ns)
             for p in written.paths}
    assert before == after


def test_thumbnail_is_the_windowed_centre_slice(tmp_path):
    write_ct_series(tmp_path, SeriesSpec(shape=(10, 64, 32)))
    thumb = series_thumbnail(_only_series(tmp_path), size=48)
    assert thumb.shape == (48, 48) and thumb.dtype == np.uint8
    assert thumb[:, :12].max() == 0  # letterboxed: the image is half as wide as tall
    assert thumb[24, 24] > 0


def test_non_image_series_is_refused(tmp_path):
    shutil.copy(bundled_test_file("test-SR.dcm"), tmp_path)
    (series,) = run_to_end(index_path(tmp_path)).all_series()
    with pytest.raises(SeriesLoadError, match="SR object"):
        open_series(series)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5",      # RLE Lossless
                                    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
                                    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
                                    "1.2.840.10008.1.2"])       # Implicit VR Little Endian
def test_a_compressed_series_loads_equal_to_the_uncompressed_one(tmp_path, syntax):
    plain = write_ct_series(tmp_path / "plain", SeriesSpec(seed=5, shape=(6, 32, 32)))
    write_ct_series(tmp_path / "packed", SeriesSpec(seed=5, shape=(6, 32, 32),
                                                    transfer_syntax=syntax))
    volume = _load(tmp_path / "packed")
    assert np.array_equal(volume.voxels, plain.hu.astype(np.int16))
    assert volume.warnings == ()
