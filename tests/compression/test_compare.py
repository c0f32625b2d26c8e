"""Comparing variants on the demo data: real ONNX runs, the findings cache, the report, the CLI."""
from __future__ import annotations

import html.parser
import re
from pathlib import Path

import numpy as np
import pytest

from app.core.disagreement import ADDED, MISSED
from app.core.findings_cache import FindingsCache, series_key
from app.core.lesions import label_instances
from app.core.models import open_model
from app.core.progress import run_to_end
from app.core.report import RESEARCH_NOTICE, pdf_page_count, write_html, write_pdf
from compression.compare import CompareError, cache_id, check_variants, compare, load_compare_cases
from compression.compare_report import report_data
from tests.compression.compare_fixtures import original_and_degraded


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    return [open_model(p) for p in original_and_degraded(tmp_path_factory.mktemp("variants"))]


@pytest.fixture(scope="module")
def eval_cases(demo_tiny):
    return run_to_end(load_compare_cases(demo_tiny, "eval"))


@pytest.fixture(scope="module")
def comparison(variants, eval_cases, tmp_path_factory):
    cache = FindingsCache(tmp_path_factory.mktemp("findings-cache"))
    return run_to_end(compare(variants, eval_cases, cache))


def test_the_degraded_variant_lists_exactly_the_lesions_it_really_misses(comparison):
    """Checked against the two lesion tables: a reference lesion is really missed when none of
    its voxels is in the degraded variant's label map (its lesions lie inside the reference's)."""
    reference, degraded = comparison.findings(0, 0), comparison.findings(0, 1)
    instances, _ = label_instances(reference.labels)
    really_missed = {lesion.lesion_id for lesion in reference.lesions
                     if not degraded.labels[instances == lesion.lesion_id].any()}
    items = comparison.cases[0].disagreements[comparison.names[1]]
    assert really_missed, "the degraded variant should lose some lesions on this case"
    assert {d.reference_id for d in items if d.kind == MISSED} == really_missed
    kinds = [d.kind for d in items]
    assert kinds == sorted(kinds, key=[MISSED, ADDED, "volume_change", "class_flip"].index)


def test_findings_are_cached_on_disk_per_weights_and_series_and_reused(variants, eval_cases, comparison):
    case = eval_cases[0]
    folder = comparison.cache.folder(cache_id(variants[1]), series_key(case.volume))
    assert (folder / "labels.nii.gz").is_file() and (folder / "lesions.csv").is_file()
    assert not list(folder.parent.glob(".*part"))   # nothing half-written left beside it
    fresh = FindingsCache(comparison.cache.root)   # a new session: only the disk copy exists

    def must_not_run(variant, volume):
        raise AssertionError("a cached variant was run again")
        yield  # pragma: no cover

    again = run_to_end(compare(variants, eval_cases, fresh, run=must_not_run))
    assert again.findings(0, 1).labels.dtype == np.uint8
    assert np.array_equal(again.findings(0, 1).labels, comparison.findings(0, 1).labels)
    assert again.all_disagreements() == comparison.all_disagreements()
    assert folder.parent.name.startswith(variants[1].weights_sha256)


def test_the_same_weights_with_another_card_are_not_served_from_the_cache(variants):
    from dataclasses import replace

    from app.core.model_card import Preprocessing

    other_window = replace(variants[0], card=replace(variants[0].card, preprocessing=Preprocessing(
        hu_window=(-1200.0, 600.0), clip=True, normalisation="window_0_1")))
    assert other_window.weights_sha256 == variants[0].weights_sha256
    assert cache_id(other_window) != cache_id(variants[0])


def test_the_report_files_open(comparison, tmp_path):
    data = report_data(comparison)
    html_path, pdf_path = write_html(data, tmp_path / "r.html"), write_pdf(data, tmp_path / "r.pdf")
    text = html_path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    parser.close()
    assert parser.tags["html"] == 1 and parser.tags["table"] >= 4
    assert parser.images == len(data.charts) + len(data.disagreement_images) > len(data.charts)
    assert RESEARCH_NOTICE in text and "Intended use" in text and "raise threshold" in text   # card + recipe
    pdf = pdf_path.read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page[^s]", pdf)) == pdf_page_count(data) >= 6


def test_check_variants_refuses_one_or_five(variants):
    with pytest.raises(CompareError, match="2 to 4"):
        check_variants(variants[:1])
    with pytest.raises(CompareError, match="2 to 4"):
        check_variants(variants * 3)


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.images = 0

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "img" and dict(attrs).get("src", "").startswith("data:image/png;base64,"):
            self.images += 1


# ---------------------------------------------------------------- de-identification and the CLI


def _copy_as(source: Path, target: Path, name: str, patient_id: str, date: str) -> Path:
    """The same CT series re-exported under another patient's name, ID and dates."""
    import pydicom

    target.mkdir(parents=True)
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, patient_id, date
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            setattr(ds, keyword, date)
        ds.save_as(target / path.name)
    return target


def test_the_same_study_under_two_patient_names_gives_identical_reports(demo_tiny, variants, tmp_path):
    import main

    first = _copy_as(demo_tiny / "CASE002" / "CT", tmp_path / "a" / "CT", "SMITH^JANE", "ID-1111", "19610203")
    second = _copy_as(demo_tiny / "CASE002" / "CT", tmp_path / "b" / "CT", "DOE^JOHN", "ID-2222", "20011224")
    models = [str(v.card_path) for v in variants]
    outputs = []
    for n, series in enumerate((first, second)):
        out = tmp_path / f"out{n}"
        code = main.main(["compare", "--models", *models, "--data", str(series), "--report", str(out / "r.html"),
                          "--pdf", str(out / "r.pdf"), "--seg-out", str(out / "seg")])
        assert code == 0
        outputs.append(out)
    html_a, html_b = ((o / "r.html").read_bytes() for o in outputs)
    assert html_a == html_b
    assert (outputs[0] / "r.pdf").read_bytes() == (outputs[1] / "r.pdf").read_bytes()
    text = re.sub(rb"data:image/png;base64,[A-Za-z0-9+/=]+", b"", html_a)   # the images: byte-equal above
    for secret in (b"SMITH", b"DOE", b"ID-1111", b"1961", b"20011224", b"2001-12-24"):
        assert secret not in text
    segs = sorted((outputs[0] / "seg").glob("*.seg.dcm"))
    assert len(segs) == 2   # one SEG per variant, and its lesion measurements as SR beside it
    assert len(list((outputs[0] / "seg").glob("*.sr.dcm"))) == 2


def test_the_cli_says_what_is_wrong_with_a_missing_data_path(variants, tmp_path, capsys):
    import main

    code = main.main(["compare", "--models", *(str(v.card_path) for v in variants), "--data",
                      str(tmp_path / "nowhere"), "--report", str(tmp_path / "r.html")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_lesion_type_classifiers_are_compared_on_the_reference_lesions(variants, eval_cases, tmp_path):
    """Two classifier variants (different weights) score the reference segmentation's lesions; every
    lesion whose most likely type differs is listed as a type flip, and only those."""
    from dataclasses import replace as replace_card

    from app.core.disagreement import CLASS_FLIP, most_likely_type
    from compression.compare import classifier_key
    from tests.core.model_fixtures import SMALL_DENSENET, build, small_classifier, write_model

    first = open_model(small_classifier(tmp_path / "type-a"))
    card = replace_card(first.card, version="0.1-int8")
    second = open_model(write_model(tmp_path / "type-b", card, build("DenseNet", SMALL_DENSENET, seed=3),
                                    (1, 1, 16, 16), dynamic=False))
    cache = FindingsCache(tmp_path / "cache")
    run = run_to_end(compare(variants, eval_cases, cache, classifiers=[first, second]))
    key = classifier_key(eval_cases[0].volume, variants[0])
    scores_a, scores_b = (cache.get(cache_id(c), key).lesion_scores for c in (first, second))
    reference_lesions = {lesion.lesion_id for lesion in run.findings(0, 0).lesions}
    assert set(scores_a) == reference_lesions   # scored on the reference segmentation's lesions
    expected = {i for i in scores_a if most_likely_type(scores_a[i]) != most_likely_type(scores_b[i])}
    flips = run.cases[0].disagreements[run.classifier_names[1]]
    assert {d.reference_id for d in flips} == expected and all(d.kind == CLASS_FLIP for d in flips)
    assert expected, "the two classifiers should disagree on some lesion"
    data = report_data(run)
    assert any(t.title.startswith("Lesion-type classifiers") for t in data.tables)
    assert [v.role for v in data.variants] == ["reference", "compared", "reference classifier", "compared classifier"]


def test_report_exports_are_in_the_audit_log(comparison, tmp_path):
    from app.core.audit import read_audit
    from compression.compare_report import write_reports

    written = write_reports(comparison, tmp_path / "r.html", tmp_path / "r.pdf")
    events = [e for e in read_audit() if e["event"] == "export" and e.get("kind") == "comparison report"]
    logged = {e["path"] for e in events}
    assert {str(p.resolve()) for p in written} <= logged
    assert all(e["identified"] is False for e in events if e["path"] in {str(p.resolve()) for p in written})


def test_the_demo_model_against_its_pruned_copy_lists_every_lesion_it_really_loses(demo_tiny, tmp_path):
    """The demo segmentation model and a deliberately degraded copy (70 % of its weights pruned,
    no fine-tuning) on every demo case: the lesions listed as missed with nothing of them left
    in the pruned model's map are exactly the reference lesions the pruned map does not touch."""
    from compression.pipeline import StepData, run_steps
    from tests.core.model_fixtures import DEMO_MODELS

    card = DEMO_MODELS / "lung-nodule-unet2d" / "card.json"
    if not card.is_file():
        pytest.skip("the demo model is not trained in this checkout (python main.py train-demo)")
    original = open_model(card)
    pruned = run_to_end(run_steps(original, [{"step": "prune_unstructured", "sparsity": 0.7}],
                                  StepData(train=[], calib=[], threads=1), tmp_path, name="pruned70"))
    cases = [c for split in ("train", "calib", "eval") for c in run_to_end(load_compare_cases(demo_tiny, split))]
    run = run_to_end(compare([original, pruned], cases, FindingsCache(tmp_path / "cache")))
    lost_anywhere = 0
    for ci in range(len(cases)):
        reference, other = run.findings(ci, 0), run.findings(ci, 1)
        instances, _ = label_instances(reference.labels)
        really_missed = {l.lesion_id for l in reference.lesions if not other.labels[instances == l.lesion_id].any()}
        missed = [d for d in run.cases[ci].disagreements[run.names[1]] if d.kind == MISSED]
        assert {d.reference_id for d in missed if d.covered_fraction == 0.0} == really_missed
        lost_anywhere += len(really_missed)
    assert lost_anywhere > 0, "70 % pruning without fine-tuning should lose some lesion"


def test_the_report_is_written_without_a_display_and_without_qt(demo_tiny, variants, tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = ("import sys, main\n"
              f"code = main.main(['compare', '--models', {str(variants[0].card_path)!r}, {str(variants[1].card_path)!r},"
              f" '--data', {str(demo_tiny)!r}, '--report', {str(tmp_path / 'r.html')!r},"
              f" '--pdf', {str(tmp_path / 'r.pdf')!r}])\n"
              "print('EXIT', code, 'QT', any(m.startswith('PySide6') for m in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "EXIT 0 QT False" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF")
