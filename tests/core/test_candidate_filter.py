"""The candidate filter: patches placed in millimetres, a card that names it, the runner that
applies it after the segmentation, train-demo fitting it, and compression carrying it along."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from app.core.candidate_filter import candidate_centres, candidate_patches
from app.core.model_card import CandidateFilter, ModelError, Postprocessing, card_from_dict, card_to_dict, load_card
from app.core.volume import Volume
from tests.core.model_fixtures import DEMO_MODELS

SPEC = CandidateFilter(threshold=0.5, patch_px=16, pixel_mm=1.0, slice_offsets_mm=(-3.0, 0.0, 3.0))


def _ball(shape, spacing, centre_mm, radius_mm):
    axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre_mm)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return z ** 2 + y ** 2 + x ** 2 <= radius_mm ** 2


def test_centres_are_the_centres_of_mass_shifted_by_the_box_corner():
    rng = np.random.default_rng(0)
    instances = (rng.random((6, 20, 20)) < 0.05) * rng.integers(1, 4, (6, 20, 20))
    count = int(instances.max())
    expected = np.asarray(ndimage.center_of_mass(np.ones_like(instances), instances, range(1, count + 1)))
    assert np.allclose(candidate_centres(instances, count, (5, 7, 9)), expected + [5, 7, 9])
    assert candidate_centres(instances, 0).shape == (0, 3)


@pytest.mark.parametrize("pixel", [0.5, 0.8])
def test_patches_show_the_same_anatomy_at_any_pixel_spacing(pixel):
    # A 4 mm-radius nodule (40 HU) in lung (−850 HU), 1 mm slices: whatever the scan's pixels,
    # the patch is sampled at 1 mm, so the nodule always spans the same ~8 patch pixels.
    spacing = (1.0, pixel, pixel)
    shape = (20, int(40 / pixel), int(40 / pixel))
    nodule = _ball(shape, spacing, (10.0, 20.0, 20.0), 4.0)
    voxels = np.where(nodule, 40, -850).astype(np.int16)
    foreground = nodule.astype(np.float16)  # kept probabilities are float16
    centres = candidate_centres(nodule.astype(np.int32), 1)
    patches = candidate_patches(voxels, foreground, centres, spacing, SPEC)
    assert patches.shape == (1, 4, 16, 16) and patches.dtype == np.float32
    centre_slice, probability = patches[0, 1], patches[0, 3]
    lung = (-850 + 1000) / 1400
    assert centre_slice[7:9, 7:9].min() == pytest.approx((40 + 1000) / 1400, abs=1e-3)  # nodule density, windowed
    assert centre_slice[0, 0] == pytest.approx(lung, abs=1e-3)
    width = (centre_slice[7:9].mean(axis=0) > (lung + 0.74) / 2).sum()
    assert 7 <= width <= 9  # ~8 mm across at 1 mm per patch pixel
    assert probability[7:9, 7:9].min() == pytest.approx(1.0) and probability[0, 0] == 0.0
    # ±3 mm slices cut the ball smaller (radius √7 mm): fewer dense pixels than the centre slice
    assert (patches[0, 0] > 0.5).sum() < (centre_slice > 0.5).sum()


def test_outside_the_scan_reads_as_air():
    voxels = np.full((4, 10, 10), 40, np.int16)
    patches = candidate_patches(voxels, np.ones((4, 10, 10), np.float32), np.array([[0.0, 0.0, 0.0]]),
                                (1.0, 1.0, 1.0), SPEC)
    assert patches[0, :3, 0, 0].max() == 0.0 and patches[0, 3, 0, 0] == 0.0  # corner beyond the scan
    assert patches[0, 1, 8, 8] > 0.7  # inside: soft tissue


def _demo_card_dict():
    return json.loads((DEMO_MODELS / "lung-nodule-unet2d" / "card.json").read_text())


def test_the_card_round_trips_the_filter_and_the_schema_checks_it():
    data = _demo_card_dict()
    data["postprocessing"] = {"min_lesion_mm3": 10.0, "candidate_filter": {"threshold": 0.4, "patch_px": 16}}
    card = card_from_dict(data)
    spec = card.postprocessing.candidate_filter
    assert spec.threshold == 0.4 and spec.patch_px == 16 and spec.slice_offsets_mm == (-6.0, -3.0, 0.0, 3.0, 6.0)
    assert spec.channels == 6
    assert card_from_dict(card_to_dict(card)) == card
    assert "candidate-filter score < 0.4" in card.postprocessing.describe()
    assert "candidate_filter" not in card_to_dict(replace(card, postprocessing=Postprocessing()))["postprocessing"]
    data["postprocessing"]["candidate_filter"]["threshold"] = 1.5
    with pytest.raises(ModelError, match="candidate_filter/threshold"):
        card_from_dict(data, "c.json")


def test_a_card_with_a_filter_but_no_filter_file_is_refused_naming_the_card(tmp_path):
    from app.core.models import open_model

    folder = tmp_path / "m"
    shutil.copytree(DEMO_MODELS / "lung-nodule-unet2d", folder)
    data = json.loads((folder / "card.json").read_text())
    data["postprocessing"]["candidate_filter"] = {"threshold": 0.5}
    data["files"].pop("candidate_filter", None)
    (folder / "card.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=r"card\.json.*candidate_filter"):
        open_model(folder / "card.json")


def test_clean_lesions_drops_exactly_the_candidates_the_scorer_rejects():
    from app.core.inference import clean_lesions

    spacing, shape = (1.0, 1.0, 1.0), (24, 48, 48)
    big = _ball(shape, spacing, (12.0, 14.0, 14.0), 5.0)
    small = _ball(shape, spacing, (12.0, 34.0, 34.0), 3.0)
    labels = (big | small).astype(np.uint8)
    volume = Volume(voxels=np.zeros(shape, np.int16), spacing=spacing)
    seen = {}

    def scorer(instances, count, offset):  # ids by descending size: 1 is the big ball
        seen["centres"] = candidate_centres(instances, count, offset)
        return np.array([0.2, 0.9])

    rule = Postprocessing(candidate_filter=CandidateFilter(threshold=0.5))
    kept, instances = clean_lesions(labels, labels.astype(np.float32), volume, rule, scorer=scorer)
    assert np.array_equal(kept > 0, small) and np.array_equal(instances > 0, small)
    assert np.allclose(seen["centres"], [[12, 14, 14], [12, 34, 34]], atol=0.01)  # whole-scan voxel coordinates
    with pytest.raises(ModelError, match="scorer"):
        clean_lesions(labels, labels.astype(np.float32), volume, rule)


@pytest.fixture(scope="module")
def filtered_unet(demo_tiny, tmp_path_factory):
    """The demo UNet with a candidate filter fitted by train-demo on the tiny demo data."""
    from app.core.demo_models import _filter_only
    from app.core.progress import run_to_end

    out = tmp_path_factory.mktemp("filtered")
    shutil.copytree(DEMO_MODELS / "lung-nodule-unet2d", out / "lung-nodule-unet2d")
    folder = out / "lung-nodule-unet2d"
    before = (folder / "model.onnx").read_bytes()
    ticks = []

    def job():
        metrics = yield from _filter_only(demo_tiny, folder, (), threads=1, epochs=1, version="9.0.0")
        return metrics

    gen = job()
    try:
        while True:
            ticks.append(next(gen))
    except StopIteration as done:
        metrics = done.value
    assert (folder / "model.onnx").read_bytes() == before  # the segmentation's weights are untouched
    fractions = [t.fraction for t in ticks]
    assert fractions and all(0 <= f <= 1 for f in fractions)
    return folder, metrics


def test_train_demo_fits_the_filter_and_writes_it_into_the_card(filtered_unet):
    from app.core.models import sha256_file

    folder, metrics = filtered_unet
    card = load_card(folder / "card.json")
    assert card.version == "9.0.0"
    assert card.files["candidate_filter"] == "candidate_filter.onnx"
    spec = card.postprocessing.candidate_filter
    assert spec is not None and 0 < spec.threshold < 1
    assert card.lineage.metrics["filter_sha256"] == sha256_file(folder / "candidate_filter.onnx")
    assert card.lineage.metrics["filter_train_candidates"] > 0 and metrics["filter_onnx_max_abs_diff"] <= 1e-4
    assert card.lineage.metrics["eval_cases"] == 1  # the eval split measured through the runner, filter included
    assert "candidate filter" in card.lineage.recipe["postprocessing"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_the_runner_keeps_exactly_the_candidates_the_filter_scores_above_its_threshold(filtered_unet, demo_tiny,
                                                                                        backend):
    from app.core.candidate_filter import FilterSession
    from app.core.demo_models import read_demo_cases
    from app.core.inference import make_runner
    from app.core.lesions import label_instances
    from app.core.models import open_model
    from app.core.progress import run_to_end

    folder, _ = filtered_unet
    variant = open_model(folder / "card.json")
    spec = variant.card.postprocessing.candidate_filter
    case = next(c for c in read_demo_cases(demo_tiny, ("train", "calib", "eval")) if c.labels.any())
    runner = make_runner(variant, backend=backend, threads=1, keep_probabilities=True)
    findings = run_to_end(runner.run(case.volume))
    foreground = findings.probabilities[1].astype(np.float32)
    raw, count = label_instances((foreground > 0.5).astype(np.uint8))
    assert count > 0
    scores = FilterSession(variant.files["candidate_filter"], spec).score_lesions(
        case.volume.voxels, foreground, raw, count, case.volume.spacing)
    mm3 = np.bincount(raw.ravel(), minlength=count + 1)[1:] * case.volume.voxel_volume_ml * 1000
    keep = (scores >= spec.threshold) & (mm3 >= variant.card.postprocessing.min_lesion_mm3)
    assert np.array_equal(findings.labels > 0, np.isin(raw, np.flatnonzero(keep) + 1))
    assert len(findings.lesions) == int(keep.sum())


def test_a_filter_that_does_not_fit_its_card_is_a_clear_error(filtered_unet, tmp_path):
    from app.core.candidate_filter import FilterSession

    folder, _ = filtered_unet
    spec = load_card(folder / "card.json").postprocessing.candidate_filter
    with pytest.raises(ModelError, match=r"candidate_filter\.onnx.*takes input"):
        FilterSession(folder / "candidate_filter.onnx", replace(spec, patch_px=24))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes((folder / "candidate_filter.onnx").read_bytes()[:500])
    with pytest.raises(ModelError, match=r"broken\.onnx.*cannot load"):
        FilterSession(broken, spec)


def test_compression_carries_the_filter_into_every_variant(filtered_unet, tmp_path):
    from app.core.models import open_model, sha256_file
    from app.core.progress import run_to_end
    from compression.cost import deployed_files
    from compression.pipeline import StepData, run_steps

    folder, _ = filtered_unet
    parent = open_model(folder / "card.json")
    variant = run_to_end(run_steps(parent, [{"step": "half_precision", "precision": "fp16", "measure": False}],
                                   StepData(train=[], calib=[], threads=1), tmp_path, name="fp16"))
    assert sha256_file(variant.files["candidate_filter"]) == sha256_file(folder / "candidate_filter.onnx")
    assert variant.card.postprocessing == parent.card.postprocessing
    assert variant.files["candidate_filter"] in deployed_files(variant)
    from compression.cost import deployed_size, network_size

    filter_bytes = (folder / "candidate_filter.onnx").stat().st_size
    assert network_size(variant) == deployed_size(variant) - filter_bytes == variant.main_file.stat().st_size

    from types import SimpleNamespace

    from compression.cli import _cost_columns

    results = SimpleNamespace(variants=[SimpleNamespace(name="original", rows=[]), SimpleNamespace(name="fp16", rows=[])])
    columns = _cost_columns([parent, variant], results)
    ratio = network_size(parent) / network_size(variant)
    assert columns["fp16"]["network smaller"] == f"{ratio:.1f}x" and ratio > 1.5  # fp16 halves the network...
    assert float(columns["fp16"]["smaller"][:-1]) < ratio  # ...while the shared filter dilutes the whole


def _reduced_filter(filtered_unet, demo_tiny, tmp_path, **params):
    from app.core.manifest import read_manifest
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from compression.data import load_cases
    from compression.pipeline import StepData, run_steps

    folder, _ = filtered_unet
    parent = open_model(folder / "card.json")
    calib = run_to_end(load_cases(read_manifest(demo_tiny / "manifest.csv"), ("train", "calib", "eval")))
    return parent, run_to_end(run_steps(parent, [{"step": "compress_filter", **params}],
                                        StepData(train=[], calib=calib, threads=1), tmp_path, name="filter"))


def _filter_scores(path, spec, demo_tiny):
    from app.core.candidate_filter import FilterSession
    from app.core.demo_models import read_demo_cases

    case = next(c for c in read_demo_cases(demo_tiny, ("train", "calib", "eval")) if c.labels.any())
    centres = np.argwhere(case.labels > 0)[::50].astype(float)
    patches = candidate_patches(case.volume.voxels, case.labels.astype(np.float32), centres, case.volume.spacing, spec)
    return FilterSession(path, spec).scores(patches)


def test_compress_filter_stores_the_filters_convs_in_int8_and_keeps_its_decisions(filtered_unet, demo_tiny, tmp_path):
    import onnx
    from onnx import numpy_helper

    from app.core.models import sha256_file

    folder, _ = filtered_unet
    source = folder / "candidate_filter.onnx"
    before_hash = sha256_file(source)
    parent, variant = _reduced_filter(filtered_unet, demo_tiny, tmp_path)
    assert sha256_file(source) == before_hash  # the parent's filter is never touched
    quantized = variant.files["candidate_filter"]
    assert quantized.stat().st_size < source.stat().st_size / 3
    graph = onnx.load(str(quantized)).graph
    int8 = {i.name for i in graph.initializer if numpy_helper.to_array(i).dtype == np.int8}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    assert convs and all(n.input[1] in dequantized for n in convs)  # every Conv reads int8 weights
    check = variant.card.lineage.metrics["compression"]["candidate_filter_compression"]
    assert check["check_candidates"] > 0 and check["decisions_flipped"] <= 0.02 * check["check_candidates"]
    spec = parent.card.postprocessing.candidate_filter
    float_scores, int8_scores = _filter_scores(source, spec, demo_tiny), _filter_scores(quantized, spec, demo_tiny)
    assert np.abs(float_scores - int8_scores).max() < 0.05
    assert not np.array_equal(float_scores, int8_scores)  # the weights really changed


def test_compress_filter_keeps_the_ensemble_member_that_best_reproduces_the_whole(filtered_unet, demo_tiny,
                                                                                   tmp_path):
    import onnx

    folder, _ = filtered_unet
    source = folder / "candidate_filter.onnx"
    parent, variant = _reduced_filter(filtered_unet, demo_tiny, tmp_path, members=1, int8=False,
                                      max_flip_share=1.0)
    reduced = variant.files["candidate_filter"]
    check = variant.card.lineage.metrics["compression"]["candidate_filter_compression"]
    assert len(check["members_kept"]) == 1
    convs = lambda path: sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)  # noqa: E731
    assert convs(reduced) * 3 == convs(source)  # one network of three, still over its four views
    assert reduced.stat().st_size < source.stat().st_size / 2.5
    spec = parent.card.postprocessing.candidate_filter
    scores = _filter_scores(reduced, spec, demo_tiny)
    assert scores.shape == _filter_scores(source, spec, demo_tiny).shape and np.all((scores >= 0) & (scores <= 1))


def test_compress_filter_skips_a_model_without_a_filter_and_says_so(tmp_path):
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from compression.pipeline import StepData, run_steps

    parent = open_model(DEMO_MODELS / "nodule-type-densenet" / "card.json")
    variant = run_to_end(run_steps(parent, [{"step": "compress_filter"}], StepData(train=[], calib=[], threads=1),
                                   tmp_path, name="no-filter"))
    assert "candidate_filter" not in variant.files
    record = variant.card.lineage.metrics["compression"]
    assert ["candidate_filter", "the model has no candidate filter; nothing to compress"] in record["skipped"]


def test_compress_filter_keeps_the_filter_when_the_calib_scans_give_no_candidate_to_check_on(filtered_unet, tmp_path):
    from app.core.models import open_model, sha256_file
    from app.core.progress import run_to_end
    from compression.data import cases_from_arrays
    from compression.pipeline import StepData, run_steps

    folder, _ = filtered_unet
    air = Volume(voxels=np.full((6, 64, 64), -1000, np.int16), spacing=(2.0, 0.8, 0.8))  # nothing to segment
    calib = cases_from_arrays([air], [None])
    variant = run_to_end(run_steps(open_model(folder / "card.json"), [{"step": "compress_filter", "members": 1}],
                                   StepData(train=[], calib=calib, threads=1), tmp_path, name="kept"))
    assert sha256_file(variant.files["candidate_filter"]) == sha256_file(folder / "candidate_filter.onnx")
    reasons = [reason for _, reason in variant.card.lineage.metrics["compression"]["skipped"]]
    assert any("no candidate" in r for r in reasons)


def test_compress_filter_in_4_bits_is_half_the_int8_filter_and_reports_its_check(filtered_unet, demo_tiny, tmp_path):
    import onnx

    folder, _ = filtered_unet
    source = folder / "candidate_filter.onnx"
    parent, int8 = _reduced_filter(filtered_unet, demo_tiny, tmp_path / "8")
    _, four = _reduced_filter(filtered_unet, demo_tiny, tmp_path / "4", weight_bits=4, max_flip_share=1.0)
    reduced = four.files["candidate_filter"]
    graph = onnx.load(str(reduced)).graph
    decoded = {n.output[0] for n in graph.node if n.name.endswith("_decode4")}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in decoded for n in convs)  # every Conv reads 4-bit weights
    assert reduced.stat().st_size < 0.65 * int8.files["candidate_filter"].stat().st_size
    check = four.card.lineage.metrics["compression"]["candidate_filter_compression"]
    assert check["weight_bits"] == 4 and check["check_candidates"] > 0
    spec = parent.card.postprocessing.candidate_filter
    float_scores, scores = _filter_scores(source, spec, demo_tiny), _filter_scores(reduced, spec, demo_tiny)
    assert np.abs(float_scores - scores).max() < 0.2 and not np.array_equal(float_scores, scores)


# ---------------------------------------------------------------- refit_filter


def test_the_filters_networks_come_back_into_torch_and_score_as_the_onnx_file(filtered_unet, demo_tiny, tmp_path):
    import torch

    from app.core.demo_filter import ensemble
    from compression.pipeline import StepError
    from compression.steps.refit_filter import filter_nets_from_onnx

    folder, _ = filtered_unet
    spec = load_card(folder / "card.json").postprocessing.candidate_filter
    nets = filter_nets_from_onnx(folder / "candidate_filter.onnx", spec)
    assert len(nets) == 3  # the three seeds of the averaged ensemble
    case_patches = _real_patches(spec, demo_tiny)
    with torch.no_grad():
        rebuilt = ensemble(nets)(torch.from_numpy(case_patches)).numpy().reshape(-1)
    from app.core.candidate_filter import FilterSession

    assert np.allclose(rebuilt, FilterSession(folder / "candidate_filter.onnx", spec).scores(case_patches), atol=1e-5)
    _, int8 = _reduced_filter(filtered_unet, demo_tiny, tmp_path)
    with pytest.raises(StepError, match="not plain float tensors"):  # a compressed filter is not refit
        filter_nets_from_onnx(int8.files["candidate_filter"], spec)


def _real_patches(spec, demo_tiny):
    from app.core.demo_models import read_demo_cases

    case = next(c for c in read_demo_cases(demo_tiny, ("train", "calib", "eval")) if c.labels.any())
    centres = np.argwhere(case.labels > 0)[::50].astype(float)
    return candidate_patches(case.volume.voxels, case.labels.astype(np.float32), centres, case.volume.spacing, spec)


def _scan(mm3, overlaps, original_sizes, large, patches=None):
    from compression.steps.refit_filter import ScanCandidates

    mm3 = np.asarray(mm3, float)
    return ScanCandidates(patches=patches, mm3=mm3, peaks=np.ones(len(mm3)), elongation=None, overlaps=overlaps,
                          original_sizes=original_sizes, candidate_sizes=np.r_[0, mm3].astype(int), large=large)


def test_the_rule_counts_lost_and_added_lesions_with_the_evaluations_pairing():
    from compression.steps.refit_filter import choose_rule, rule_counts

    # The original reports lesions 1 (large) and 2 (small). The variant's candidate 1 lies on
    # lesion 1 but scores 0.2; candidate 2 lies on lesion 2; candidates 3 (0.6) and 4 (5 mm³,
    # 0.9) on nothing.
    scan = _scan([200, 80, 300, 5], [(1, 1, 150), (2, 2, 60)], {1: 180, 2: 70}, {1})
    scores = [np.array([0.2, 0.9, 0.6, 0.9])]
    rule = Postprocessing(min_lesion_mm3=40.0, candidate_filter=CandidateFilter(threshold=0.35))
    assert rule_counts([scan], scores, rule) == {"lost_large": 1, "lost": 1, "gained": 1}
    chosen, counts = choose_rule([scan], scores, rule, gained_weight=0.2)
    assert counts == {"lost_large": 0, "lost": 0, "gained": 1}  # 0.2 is kept at a lower threshold...
    assert chosen == replace(rule, candidate_filter=replace(rule.candidate_filter, threshold=0.05))  # size kept
    # ...but when one added lesion weighs more than a lost one, it drops candidate 3 and loses lesion 1
    assert choose_rule([scan], scores, rule, gained_weight=10.0) == (replace(
        rule, candidate_filter=replace(rule.candidate_filter, threshold=0.65)), {"lost_large": 1, "lost": 1, "gained": 0})
    assert rule_counts([scan], scores, replace(rule, min_lesion_mm3=0.0,
                                               candidate_filter=CandidateFilter(threshold=0.1))) == {
        "lost_large": 0, "lost": 0, "gained": 2}


def _with_rule(filtered_unet, folder: Path, rule) -> Path:
    """A copy of the filtered UNet whose card has another lesion clean-up rule."""
    from app.core.model_card import save_card

    shutil.copytree(filtered_unet[0], folder)
    save_card(replace(load_card(folder / "card.json"), postprocessing=rule), folder / "card.json")
    return folder / "card.json"


def _refit(parent_card, demo_tiny, out, teacher=None, **params):
    from app.core.manifest import read_manifest
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from compression.data import load_cases
    from compression.pipeline import StepData, run_steps

    cases = run_to_end(load_cases(read_manifest(demo_tiny / "manifest.csv"), ("train", "calib", "eval")))
    data = StepData(train=cases, calib=cases, threads=1, teacher=open_model(teacher) if teacher else None)
    return run_to_end(run_steps(open_model(parent_card), [{"step": "refit_filter", "epochs": 1, **params}], data,
                                out, name="refit"))


# The tiny demo scans give the demo UNet a dozen candidates each and its one-epoch filter no
# opinion (scores ~0.5): the tests set rules by size instead, so that the reference reports
# the large candidates and not the small ones.
BY_SIZE = Postprocessing(min_lesion_mm3=1000.0, candidate_filter=CandidateFilter(threshold=0.0))


def test_refit_filter_keeps_the_filter_of_a_model_judged_against_itself(filtered_unet, demo_tiny, tmp_path):
    from app.core.models import sha256_file

    card = _with_rule(filtered_unet, tmp_path / "model", BY_SIZE)
    before = sha256_file(card.parent / "candidate_filter.onnx")
    variant = _refit(card, demo_tiny, tmp_path / "out")
    assert sha256_file(card.parent / "candidate_filter.onnx") == before  # the parent's filter is never touched
    record = variant.card.lineage.metrics["compression"]["candidate_filter_refit"]
    table = record["calib (lost >= 6 mm, lost, gained)"]
    assert table["as it was"]["lost"] == table["as it was"]["gained"] == 0  # nothing to win against itself
    assert record["chosen"] == "as it was" and 0 < record["train_positives"] < record["train_candidates"]
    assert sha256_file(variant.files["candidate_filter"]) == before
    assert variant.card.postprocessing == BY_SIZE


def test_refit_filter_brings_back_the_lesions_a_variants_rule_loses(filtered_unet, demo_tiny, tmp_path):
    from app.core.models import sha256_file

    # The variant drops every candidate (threshold 0.99 on ~0.5 scores); the reference keeps the large ones.
    strict = replace(BY_SIZE, min_lesion_mm3=40.0, candidate_filter=CandidateFilter(threshold=0.99))
    card = _with_rule(filtered_unet, tmp_path / "variant", strict)
    teacher = _with_rule(filtered_unet, tmp_path / "original", BY_SIZE)
    variant = _refit(card, demo_tiny, tmp_path / "out", teacher=teacher)
    record = variant.card.lineage.metrics["compression"]["candidate_filter_refit"]
    table = record["calib (lost >= 6 mm, lost, gained)"]
    assert table["as it was"]["lost"] > 0 and table["as it was"]["gained"] == 0
    chosen = table[record["chosen"]]
    assert record["chosen"] == "refit" and chosen["lost_large"] < table["as it was"]["lost_large"]
    assert variant.card.postprocessing.candidate_filter.threshold == chosen["threshold"] < 0.99
    assert variant.card.postprocessing.min_lesion_mm3 == chosen["min_lesion_mm3"] == 40.0  # the size limit stays
    assert sha256_file(variant.files["candidate_filter"]) != sha256_file(card.parent / "candidate_filter.onnx")
    assert any("Candidate filter refit" in note for note in variant.card.lineage.metrics["compression"]["notes"])


def test_refit_filter_skips_a_model_without_a_filter(tmp_path):
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from compression.pipeline import StepData, run_steps

    parent = open_model(DEMO_MODELS / "nodule-type-densenet" / "card.json")
    variant = run_to_end(run_steps(parent, [{"step": "refit_filter"}], StepData(train=[], calib=[], threads=1),
                                   tmp_path, name="no-filter"))
    assert ["candidate_filter", "the model has no candidate filter; nothing to refit"] in (
        variant.card.lineage.metrics["compression"]["skipped"])
