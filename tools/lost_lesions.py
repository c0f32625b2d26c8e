"""Why a variant loses the original's lesions: per lost lesion ≥ 6 mm, how sure each model is of it.

    .venv/bin/python tools/lost_lesions.py --variant CARD --data MANIFEST [--original CARD]
        [--cases ACASE023,BCASE013] [--threads 2]

Runs the original and the variant through the application's own runners (pre-processing,
network, lesion clean-up, candidate filter) on each eval case (or the ``--cases`` named), one
scan at a time, matches lesions with the evaluation's rule, and prints for every lesion ≥ 6 mm
of the original that the variant does not reproduce: its size and slices, the mean foreground
probability of each model inside it, how many of its voxels the variant's network marks
(before its clean-up), and whether it lies on a ground-truth lesion; with labels, also every
ground-truth nodule ≥ 6 mm the original detects and the variant does not. Under each, the variant's
own candidates there and which limit of its lesion clean-up removed each (too small, too
unsure, too elongated, or the candidate filter's score), or that its network marks none: a
lesion the variant marks in part was seen and then dropped; one it gives a probability near 0
it did not see.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "resources" / "models" / "lung-nodule-unet2d" / "card.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default=str(DEFAULT_MODEL))
    parser.add_argument("--variant", required=True)
    parser.add_argument("--data", required=True, help="a manifest; its eval cases are read")
    parser.add_argument("--cases", help="comma-separated case names (default: every eval case)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from app.core.inference import make_runner
    from app.core.lesions import label_instances, lesion_table
    from app.core.manifest import read_manifest
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from compression.data import load_case
    from compression.evaluate import _match, lesion_map

    manifest = read_manifest(args.data)
    wanted = set(args.cases.split(",")) if args.cases else None
    variants = [open_model(card) for card in (args.original, args.variant)]
    runners = [make_runner(v, threads=args.threads, keep_probabilities=True) for v in variants]
    lost_total = missed_total = 0
    for case in manifest.cases:
        if case.split != "eval" or (wanted is not None and case.case not in wanted):
            continue
        data = load_case(manifest, case)
        original, variant = (run_to_end(r.run(data.volume)) for r in runners)
        original_lesions = lesion_map(original.labels > 0, data.volume)
        variant_lesions = lesion_map(variant.labels > 0, data.volume)
        match = _match(original_lesions, variant_lesions)
        lost = sorted(set(match.missed) & original_lesions.large)
        if data.labels is not None:
            missed_total += missed_nodules(case.case, variants[1], data, original_lesions, variant_lesions,
                                           variant, args.threads)
        if not lost:
            continue
        table = {l.lesion_id: l for l in lesion_table(original.labels > 0, data.volume,
                                                       instances=original_lesions.instances)}
        truth = label_instances(data.labels > 0)[0] if data.labels is not None else None
        for lesion_id in lost:
            inside = original_lesions.instances == lesion_id
            slices = np.flatnonzero(inside.any(axis=(1, 2)))
            p_original = original.probabilities[1][inside].astype(np.float64)
            p_variant = variant.probabilities[1][inside].astype(np.float64)
            on_truth = "no labels" if truth is None else (
                "on a ground-truth lesion" if (truth[inside] > 0).any() else "the original's false positive")
            print(f"{case.case} lesion {lesion_id}: {table[lesion_id].mean_diameter_mm:.1f} mm, slices "
                  f"{slices.min()}-{slices.max()}, {int(inside.sum())} voxels; mean p original "
                  f"{p_original.mean():.2f}, variant {p_variant.mean():.2f} (max {p_variant.max():.2f}); the "
                  f"variant's network marks {int((p_variant >= 0.5).sum())} of its voxels; {on_truth}", flush=True)
            for line in why_dropped(variants[1], variant, data.volume, inside, args.threads):
                print("    " + line, flush=True)
            lost_total += 1
    name = Path(args.variant).parent.name
    print(f"{lost_total} lesion(s) >= 6 mm of the original lost by {name}; {missed_total} ground-truth nodule(s) "
          f">= 6 mm the original detects and {name} does not")
    return 0


def missed_nodules(case: str, model, data, original_lesions, variant_lesions, findings, threads) -> int:
    """Print the ground-truth nodules ≥ 6 mm the original detects and the variant does not (the
    evaluation's sensitivity rule; the original may reach one with a piece under 6 mm, which
    the lost-lesion count above leaves out), each with why the variant dropped it."""
    from compression.evaluate import _match, lesion_map

    truth = lesion_map(data.labels > 0, data.volume)
    found_by = [{ref for ref, _, _ in _match(truth, lesions).matched} & truth.large
                for lesions in (original_lesions, variant_lesions)]
    missed = sorted(found_by[0] - found_by[1])
    for nodule in missed:
        inside = truth.instances == nodule
        slices = np.flatnonzero(inside.any(axis=(1, 2)))
        print(f"{case} nodule {nodule} (ground truth, slices {slices.min()}-{slices.max()}, {int(inside.sum())} "
              f"voxels): the original detects it, the variant does not", flush=True)
        for line in why_dropped(model, findings, data.volume, inside, threads):
            print("    " + line, flush=True)
    return len(missed)


def why_dropped(model, findings, volume, inside: np.ndarray, threads: int | None = None) -> list[str]:
    """The variant's own candidates under a lost lesion (components of its network's label map,
    before the clean-up) and which limit of its lesion clean-up removed each, in words."""
    from app.core.inference import labels_from_probabilities, lesion_peaks
    from app.core.lesions import label_instances, lesion_elongation

    card = model.card
    probabilities = findings.probabilities
    candidates, count = label_instances(labels_from_probabilities(probabilities, card) > 0)
    ids = np.unique(candidates[inside])
    ids = ids[ids > 0]
    if not len(ids):
        return ["its network marks no candidate there"]
    foreground = (1.0 - probabilities[0].astype(np.float32) if card.output_activation == "softmax"
                  else probabilities.max(0).astype(np.float32))
    rule = card.postprocessing
    voxels = np.bincount(candidates.reshape(-1), minlength=count + 1)[1:]
    volume_mm3 = voxels * volume.voxel_volume_ml * 1000.0
    peaks = lesion_peaks(foreground, candidates, count)
    elongation = lesion_elongation(candidates, count, volume.spacing) if rule.max_elongation is not None else None
    scores = None
    if rule.candidate_filter is not None:
        from app.core.candidate_filter import FilterSession, filter_file

        session = FilterSession(filter_file(model.files, model.card_path or card.name), rule.candidate_filter, threads)
        scores = session.score_lesions(volume.voxels, foreground, candidates, count, volume.spacing)
    reasons = rule.reasons(volume_mm3, peaks, elongation, scores)
    lines = []
    for i in ids - 1:
        shared = int((candidates[inside] == i + 1).sum())
        verdict = "dropped: " + "; ".join(reasons[i]) if reasons[i] else "kept"
        lines.append(f"its candidate of {voxels[i]} voxels ({volume_mm3[i]:.0f} mm³, {shared} inside the lesion): {verdict}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
