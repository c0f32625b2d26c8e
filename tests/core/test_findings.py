"""Findings on disk: NIfTI labels with the volume's geometry, the lesion CSV, timing."""
from __future__ import annotations

import json

import numpy as np

from app.core.findings import Findings, Timing
from app.core.lesions import lesion_table, read_lesion_csv
from tests.core.model_fixtures import chest_phantom


def _findings(**extra):
    direction = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])
    volume = chest_phantom()
    volume = type(volume)(voxels=volume.voxels, spacing=volume.spacing, origin=volume.origin,
                          direction=direction, series_uid=volume.series_uid)
    labels = (volume.voxels > 0).astype(np.uint8) * 0
    labels[2:5, 16:24, 14:22] = 1
    lesions = lesion_table(labels, volume)
    scores = {lesions[0].lesion_id: 0.93}
    timing = Timing(load_s=0.5, preprocess_s=0.25, network_s=1.0, postprocess_s=0.125)
    return volume, Findings.for_volume(volume, {"model_name": "m", "provider": "CPUExecutionProvider"},
                                       labels=labels, lesions=lesions, lesion_scores=scores, timing=timing, **extra)


def test_labels_keep_the_volume_geometry_in_nifti(tmp_path):
    import SimpleITK as sitk

    volume, findings = _findings()
    findings.save(tmp_path / "out")
    image = sitk.ReadImage(str(tmp_path / "out" / "labels.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(image), findings.labels)
    assert np.allclose(image.GetSpacing(), volume.spacing[::-1])
    assert np.allclose(image.GetOrigin(), volume.origin)
    assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), volume.direction)
    assert image.GetPixelID() == sitk.sitkUInt8


def test_lesion_csv_has_the_shared_columns_plus_score(tmp_path):
    _, findings = _findings()
    findings.save(tmp_path)
    rows = read_lesion_csv(tmp_path / "lesions.csv")
    assert len(rows) == 1
    assert rows[0]["score"] == 0.93
    assert rows[0]["voxel_count"] == 3 * 8 * 8


def test_classifier_scores_become_type_and_class_columns(tmp_path):
    _, findings = _findings()
    findings.lesion_scores = {1: {"solid": 0.1, "part-solid": 0.7, "ground-glass": 0.2}}
    findings.save(tmp_path)
    row = read_lesion_csv(tmp_path / "lesions.csv")[0]
    assert (row["type"], row["score"], row["p_solid"]) == ("part-solid", 0.7, 0.1)


def test_timing_json_splits_the_stages(tmp_path):
    _, findings = _findings()
    findings.save(tmp_path)
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing == {"load_s": 0.5, "preprocess_s": 0.25, "network_s": 1.0, "postprocess_s": 0.125,
                      "total_s": 1.875}


def test_findings_round_trip_through_a_folder(tmp_path):
    _, findings = _findings(probabilities=np.full((2, 6, 48, 40), 0.5, np.float16),
                            study_scores={"nodule": 0.93})
    findings.save(tmp_path)
    again = Findings.load(tmp_path)
    assert np.array_equal(again.labels, findings.labels)
    assert again.lesions == findings.lesions
    assert again.lesion_scores == {1: 0.93}
    assert again.probabilities.dtype == np.float16
    assert again.timing == findings.timing
    assert again.study_scores == {"nodule": 0.93}
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name]
