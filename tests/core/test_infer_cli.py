"""``main.py infer``: every series under a path gets labels, lesion CSV and timing."""
from __future__ import annotations

import json
import shutil

import pytest

import main
from app.core.lesions import read_lesion_csv
from tests.core.model_fixtures import small_classifier, small_unet


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    from app.core.demo_data import generate_demo_data
    from app.core.progress import run_to_end

    return run_to_end(generate_demo_data(tmp_path_factory.mktemp("demo"), cases=1, seed=3, size="tiny"))


def _infer(*args) -> int:
    return main.main(["infer", *map(str, args)])


def test_infer_writes_labels_lesions_and_timing_per_series(tmp_path, tiny_study, capsys):
    import SimpleITK as sitk

    card = small_unet(tmp_path / "model")
    case = tiny_study.cases[0]
    assert _infer("--model", card, "--data", case.series_dir, "--out", tmp_path / "out", "--threads", 1) == 0
    (series,) = list((tmp_path / "out").iterdir())
    labels = sitk.ReadImage(str(series / "labels.nii.gz"))
    assert labels.GetSize() == (128, 128, case.slices)
    assert "score" in (series / "lesions.csv").read_text().splitlines()[0]
    timing = json.loads((series / "timing.json").read_text())
    assert timing["load_s"] > 0 and timing["network_s"] > 0
    assert "CPUExecutionProvider" in capsys.readouterr().out


def test_infer_reads_a_manifest_and_chains_a_lesion_classifier(tmp_path, tiny_study):
    segmenter, classifier = small_unet(tmp_path / "seg"), small_classifier(tmp_path / "type")
    code = _infer("--model", segmenter, "--model", classifier, "--data", tiny_study.manifest_path,
                  "--out", tmp_path / "out", "--backend", "torch")
    assert code == 0
    (series,) = list((tmp_path / "out").iterdir())
    seg_rows = read_lesion_csv(series / "test-unet2d" / "lesions.csv")
    type_rows = read_lesion_csv(series / "test-type" / "lesions.csv")
    assert [r["lesion_id"] for r in type_rows] == [r["lesion_id"] for r in seg_rows]
    assert all(r["type"] in ("solid", "part-solid", "ground-glass") for r in type_rows)


def test_a_corrupt_model_is_a_message_and_exit_code_2(tmp_path, tiny_study, capsys):
    card = small_unet(tmp_path / "model")
    (tmp_path / "model" / "model.onnx").write_bytes(b"\x08\x07garbage")
    assert _infer("--model", card, "--data", tiny_study.cases[0].series_dir, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model.onnx: corrupt or invalid ONNX file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_zip_of_the_study_and_a_series_uid_filter(tmp_path, tiny_study):
    card = small_unet(tmp_path / "model")
    archive = shutil.make_archive(str(tmp_path / "study"), "zip", tiny_study.cases[0].series_dir)
    assert _infer("--model", card, "--data", archive, "--series-uid", "1.2.3.4", "--out", tmp_path / "none") == 1
    assert _infer("--model", card, "--data", archive, "--out", tmp_path / "out") == 0
    assert len(list((tmp_path / "out").iterdir())) == 1
