"""The synthetic demo studies: valid DICOM, aligned ground truth, sound manifest, same bytes per seed."""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess

import numpy as np
import pytest

from app.core.demo_data import add_cli, generate_demo_data
from app.core.lesions import lesion_table, read_lesion_csv
from app.core.manifest import check_manifest, read_manifest
from app.core.progress import Progress, run_to_end
from app.core.volume import Volume

CASES = ("CASE001", "CASE002", "CASE003")


def _ct_files(case_dir):
    return sorted((case_dir / "CT").glob("*.dcm"))


def _sitk_ct(case_dir):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(case_dir / "CT")))
    return reader.Execute()


def _sitk_volume(image) -> Volume:
    import SimpleITK as sitk

    sx, sy, sz = image.GetSpacing()
    return Volume(voxels=sitk.GetArrayFromImage(image), spacing=(sz, sy, sx), origin=image.GetOrigin(),
                  direction=np.asarray(image.GetDirection()).reshape(3, 3))


def test_ct_files_are_synthetic_ct_images_with_hu_rescale(demo_tiny):
    import pydicom

    files = _ct_files(demo_tiny / "CASE001")
    assert len(files) == 32
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.Rows, ds.Columns) == (128, 128)
    assert (ds.RescaleIntercept, ds.RescaleSlope) == (-1024, 1)
    assert str(ds.PatientName) == "DEMO^CASE001" and ds.PatientPosition == "HFS"
    assert "research" in ds.ImageComments.lower()
    series = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}
    sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len(series) == 1 and len(sops) == 32


def test_nifti_masks_share_the_ct_geometry_and_mark_nodule_densities(demo_tiny):
    import SimpleITK as sitk

    nodule_hu, shell_hu = [], []
    for name in CASES[:2]:
        case = demo_tiny / name
        ct = _sitk_ct(case)
        mask = sitk.ReadImage(str(case / "nodules.nii.gz"))
        assert mask.GetSize() == ct.GetSize()
        np.testing.assert_allclose(mask.GetOrigin(), ct.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(mask.GetSpacing(), ct.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(mask.GetDirection(), ct.GetDirection(), atol=1e-6)
        hu = sitk.GetArrayFromImage(ct).astype(float)
        nodule = sitk.GetArrayFromImage(mask) == 1
        assert nodule.any()
        nodule_hu.append(hu[nodule])
        shell_hu.append(hu[_shell(nodule) & (hu < -300)])
    # Nodules (even small ground-glass ones) are denser than the aerated lung around them; a
    # mask shifted off its nodule would sit on lung at about -850 HU.
    nodule_mean, shell_mean = np.concatenate(nodule_hu).mean(), np.concatenate(shell_hu).mean()
    assert nodule_mean > -700
    assert nodule_mean > shell_mean + 150


def _shell(mask):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=2) & ~mask


def test_instance_mask_and_lesion_csv_agree_with_lesion_table(demo_tiny):
    import SimpleITK as sitk

    for name in CASES:
        case = demo_tiny / name
        volume = _sitk_volume(_sitk_ct(case))
        semantic = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "nodules.nii.gz")))
        instances = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "nodule_instances.nii.gz")))
        assert np.array_equal(instances > 0, semantic == 1)
        rows = read_lesion_csv(case / "lesions.csv")
        lesions = lesion_table(semantic, volume)  # connected components of the semantic mask
        assert [r["lesion_id"] for r in rows] == [les.lesion_id for les in lesions]
        for row, lesion in zip(rows, lesions):
            assert row["voxel_count"] == lesion.voxel_count == int((instances == lesion.lesion_id).sum())
            assert row["mean_diameter_mm"] == pytest.approx(lesion.mean_diameter_mm, abs=0.01)
            assert (row["centre_x_mm"], row["centre_y_mm"], row["centre_z_mm"]) == pytest.approx(lesion.centre_lps, abs=0.01)
            assert row["type"] in {"solid", "part-solid", "ground-glass"}
        assert (len(rows) == 0) == (name == "CASE003")  # the third case is a normal scan


def test_seg_references_the_series_and_matches_the_mask(demo_tiny):
    import highdicom as hd
    import pydicom
    import SimpleITK as sitk

    case = demo_tiny / "CASE002"
    seg = hd.seg.segread(case / "seg.dcm")
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in _ct_files(case)]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
    assert seg.get_segment_description(1).segment_label == "Nodule"
    semantic = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "nodules.nii.gz")))
    by_z = sorted(headers, key=lambda h: float(h.ImagePositionPatient[2]))  # k ascends with z
    uids = [h.SOPInstanceUID for h in by_z]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert np.array_equal(frames[..., 0] > 0, semantic == 1)


def test_empty_case_still_has_a_valid_seg(demo_tiny):
    import highdicom as hd

    seg = hd.seg.segread(demo_tiny / "CASE003" / "seg.dcm")
    assert seg.NumberOfFrames >= 1
    assert not np.asarray(seg.pixel_array).any()


def test_manifest_splits_by_patient_and_points_at_real_files(demo_tiny):
    manifest = read_manifest(demo_tiny / "manifest.csv")
    assert [c.case for c in manifest.cases] == list(CASES)
    assert check_manifest(manifest) == []
    assert {c.split for c in manifest.cases} == {"train", "calib", "eval"}
    assert len({c.patient for c in manifest.cases}) == 3
    assert "synthetic phantom" in (demo_tiny / "README.txt").read_text().lower()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors(demo_tiny):
    for path in (_ct_files(demo_tiny / "CASE001")[0], demo_tiny / "CASE001" / "seg.dcm", demo_tiny / "CASE003" / "seg.dcm"):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = result.stdout + result.stderr
        assert "Error" not in report, report


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_writes_the_same_bytes(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_to_end(generate_demo_data(first, cases=2, seed=7, size="tiny"))
    run_to_end(generate_demo_data(second, cases=2, seed=7, size="tiny"))
    run_to_end(generate_demo_data(other, cases=1, seed=8, size="tiny"))
    assert _digest(first) == _digest(second)
    assert (first / "CASE001" / "seg.dcm").read_bytes() != (other / "CASE001" / "seg.dcm").read_bytes()
    assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_progress_is_reported_and_bad_arguments_refused(tmp_path):
    steps = generate_demo_data(tmp_path, cases=1, seed=1, size="tiny")
    seen: list[Progress] = []
    summary = run_to_end(_recording(steps, seen))
    fractions = [p.fraction for p in seen]
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert any("CASE001" in p.message for p in seen)
    assert summary.cases[0].series_dir.is_dir()
    with pytest.raises(ValueError, match="size"):
        run_to_end(generate_demo_data(tmp_path, cases=1, size="huge"))


def _recording(steps, seen: list):
    """Pass a job's progress through, keeping a copy of each report."""
    while True:
        try:
            progress = next(steps)
        except StopIteration as done:
            return done.value
        seen.append(progress)
        yield progress


def test_cli_writes_a_study(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo-data", "--out", str(tmp_path), "--cases", "1", "--seed", "3", "--size", "tiny"])
    assert args.handler(args) == 0
    assert "CASE001" in capsys.readouterr().out
    assert len(_ct_files(tmp_path / "CASE001")) == 32


# ---------------------------------------------------------------------------- the phantom itself


def _tiny_study(index=0):
    from app.core.phantom.study import PROFILES, build_study

    return run_to_end(build_study(np.random.default_rng([11, index]), PROFILES["tiny"], index))


def test_nodules_lie_in_the_lungs_and_vessels_branch_and_narrow():
    study = _tiny_study()
    assert study.owner.any()
    assert study.lung[study.owner > 0].all()
    assert len(study.vessels) > 100
    thick = [s.start_radius for s in study.vessels if s.generation == 0]
    thin = [s.start_radius for s in study.vessels if s.generation >= 4]
    assert min(thick) > max(thin)
    lung_hu = study.hu[study.lung & (study.owner == 0)]
    assert -900 < np.median(lung_hu) < -780  # aerated lung, with vessels in it
    assert 8.0 < np.std(study.hu[0, :8, :8]) < 25.0  # air outside the body: noise only


def test_nodules_vary_in_kind_shape_place_and_size():
    from app.core.phantom.nodules import place_nodules
    from app.core.phantom.study import PROFILES, grow_vessels, make_grid
    from app.core.phantom import anatomy

    rng = np.random.default_rng(5)
    grid = make_grid(rng, PROFILES["full"])
    chest = anatomy.sample_chest(rng, grid.cols * grid.pixel_mm, grid.slices * grid.slice_mm, grid.origin[2])
    vessels = grow_vessels(rng, chest, PROFILES["tiny"])  # coarse trees are enough to lean on
    nodules = [n for _ in range(12) for n in place_nodules(rng, chest, vessels, 4, 3.0)]
    assert {n.kind for n in nodules} == {"solid", "part-solid", "ground-glass"}
    assert {n.shape for n in nodules} == {"round", "lobulated", "spiculated"}
    assert {n.place for n in nodules} == {"free", "pleural", "vascular"}
    diameters = [2 * n.radius for n in nodules]
    assert min(diameters) >= 3.0 and max(diameters) <= 30.0 and max(diameters) > 15.0
    assert all(anatomy.points_in_lung(chest, np.array([n.centre]))[0] for n in nodules)
