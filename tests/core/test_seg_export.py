"""Findings as DICOM SEG: referencing the source CT, valid by dciodvfy, back on the same voxels."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from app.core.audit import read_audit
from app.core.demo_models import read_labels, read_series_volume
from app.core.seg_export import SegExportError, export_seg, read_seg_labels, series_files
from tests.core.model_fixtures import segmentation_card


@pytest.fixture(scope="module")
def case(demo_tiny):
    folder = demo_tiny / "CASE002" / "CT"
    volume = read_series_volume(folder)
    labels = read_labels(demo_tiny / "CASE002" / "nodules.nii.gz", volume.shape)
    assert labels.any()
    return folder, volume, labels


@pytest.fixture(scope="module")
def card():
    return segmentation_card().with_lineage()


@pytest.fixture(scope="module")
def exported(case, card, tmp_path_factory):
    folder, volume, labels = case
    out = tmp_path_factory.mktemp("seg") / "findings.seg.dcm"
    return export_seg(labels, volume, series_files(folder), card, out, weights_sha256="ab" * 32)


def test_the_seg_round_trips_through_highdicom_onto_the_same_voxels(case, exported):
    folder, volume, labels = case
    back = read_seg_labels(exported.path, volume, series_files(folder))
    assert np.array_equal(back, labels)
    assert exported.frames == int(labels.any(axis=(1, 2)).sum())   # one frame per slice holding a finding


def test_the_seg_names_the_algorithm_and_references_the_source_slices(case, exported, card):
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    folder, volume, labels = case
    seg = hd.seg.segread(str(exported.path))
    segment = seg.SegmentSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == card.name and algorithm.AlgorithmVersion == card.version
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert family.CodeValue == codes.cid7162.ArtificialIntelligence.value
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Nodule"
    assert "research use" in seg.SeriesDescription
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(p, stop_before_pixels=True)
               for p in series_files(folder)}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == next(iter(sources.values())).SeriesInstanceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:   # every frame sits exactly on its CT slice
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in sources[uid].ImagePositionPatient], abs=1e-4)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed (make installs it)")
def test_dciodvfy_finds_no_error(exported):
    result = subprocess.run(["dciodvfy", str(exported.path)], capture_output=True, text=True, timeout=120)
    report = result.stdout + result.stderr
    assert "Segmentation" in report   # the IOD was recognised
    assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_each_export_is_in_the_audit_log_and_nothing_half_written_is_left(exported):
    events = [e for e in read_audit() if e["event"] == "export" and e.get("path") == str(exported.path.resolve())]
    assert len(events) == 1 and events[0]["kind"] == "DICOM SEG" and events[0]["weights_sha256"] == "ab" * 32
    assert [p.name for p in exported.path.parent.iterdir()] == [exported.path.name]


def test_labels_off_the_grid_are_refused_and_write_nothing(case, card, tmp_path):
    folder, volume, labels = case
    with pytest.raises(SegExportError, match="grid"):
        export_seg(labels[:-1], volume, series_files(folder), card, tmp_path / "x.dcm")
    assert not list(tmp_path.iterdir())


def test_an_empty_result_still_writes_a_valid_seg(case, card, tmp_path):
    folder, volume, _ = case
    result = export_seg(np.zeros(volume.shape, np.uint8), volume, series_files(folder), card, tmp_path / "e.dcm")
    assert result.frames == volume.shape[0]
    assert not read_seg_labels(result.path, volume, series_files(folder)).any()


def test_the_seg_reloads_in_our_viewer_on_the_same_voxels_in_the_cards_colour(case, exported, card):
    """app.core.masks.load_seg is what the viewer calls for a SEG beside a series (by frame position)."""
    from app.core.display import rgb_of
    from app.core.masks import load_seg

    _folder, volume, labels = case
    reloaded, segments = load_seg(str(exported.path), volume)
    assert np.array_equal(np.asarray(reloaded) > 0, labels > 0)
    assert len(segments) == 1
    nodule = next(label for label in card.labels if label.value == 1)
    assert np.allclose(segments[0]["colour"], rgb_of(nodule.colour), atol=3)


def test_the_lesion_measurements_go_out_as_a_tid_1500_sr_on_the_seg(case, exported, card, tmp_path):
    import highdicom as hd

    from app.core.lesions import lesion_table
    from app.core.seg_export import export_lesion_sr

    _folder, volume, labels = case
    lesions = lesion_table(labels, volume)
    path = export_lesion_sr(lesions, exported.path, card, tmp_path / "lesions.sr.dcm")
    sr = hd.sr.srread(str(path))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [str(g.tracking_identifier) for g in groups] == [f"Lesion {l.lesion_id}" for l in lesions]
    for group, lesion in zip(groups, lesions):
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Diameter"] == pytest.approx(lesion.mean_diameter_mm, abs=1e-3)
        assert values["Long axis"] == pytest.approx(lesion.long_axis_mm, abs=1e-3)
        assert values["Volume"] == pytest.approx(lesion.volume_ml, abs=1e-3)
    assert "research use" in sr.SeriesDescription
    if shutil.which("dciodvfy"):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
        assert not [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
