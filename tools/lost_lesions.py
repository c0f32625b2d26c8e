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
    from app.core.lesions import lesion_table
    from app.core.manifest import read_manifest
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from compression.data import load_case
    from compression.evaluate import _match, lesion_map

    manifest = read_manifest(args.data)
    wanted = set(args.cases.split(",")) if args.cases else None
    runners = [make_runner(open_model(card), threads=args.threads, keep_probabilities=True)
               for card in (args.original, args.variant)]
    lost_total = missed_total = 0
    for case in manifest.cases:
        if case.split != "eval" or (wanted is not None and case.case not in wanted):
            continue
        data = load_case(manifest, case)
        original, variant = (run_to_end(r.run(data.volume)) for r in runners)
        original_lesions = lesion_map(original.labels > 0, data.volume)
        variant_lesions = lesion_map(variant.labels > 0, data.volume)
        lost = sorted(set(_match(original_lesions, variant_lesions).missed) & original_lesions.large)
        missed = (missed_nodules(lesion_map(data.labels > 0, data.volume), original_lesions, variant_lesions)
                  if data.labels is not None else [])
        if not lost and not missed:
            continue
        candidates = Candidates(runners[1], variant, data.volume)
        for nodule, inside in missed:
            slices = np.flatnonzero(inside.any(axis=(1, 2)))
            print(f"{case.case} nodule {nodule} (ground truth, slices {slices.min()}-{slices.max()}, "
                  f"{int(inside.sum())} voxels): the original detects it, the variant does not", flush=True)
            candidates.print_under(inside)
        table = {l.lesion_id: l for l in lesion_table(original.labels > 0, data.volume,
                                                       instances=original_lesions.instances)}
        for lesion_id in lost:
            inside = original_lesions.instances == lesion_id
            slices = np.flatnonzero(inside.any(axis=(1, 2)))
            p_original = original.probabilities[1][inside].astype(np.float64)
            p_variant = variant.probabilities[1][inside].astype(np.float64)
            on_truth = "no labels" if data.labels is None else (
                "on a ground-truth lesion" if (data.labels[inside] > 0).any() else "the original's false positive")
            print(f"{case.case} lesion {lesion_id}: {table[lesion_id].mean_diameter_mm:.1f} mm, slices "
                  f"{slices.min()}-{slices.max()}, {int(inside.sum())} voxels; mean p original "
                  f"{p_original.mean():.2f}, variant {p_variant.mean():.2f} (max {p_variant.max():.2f}); the "
                  f"variant's network marks {int((p_variant >= 0.5).sum())} of its voxels; {on_truth}", flush=True)
            candidates.print_under(inside)
        lost_total += len(lost)
        missed_total += len(missed)
    name = Path(args.variant).parent.name
    print(f"{lost_total} lesion(s) >= 6 mm of the original lost by {name}; {missed_total} ground-truth nodule(s) "
          f">= 6 mm the original detects and {name} does not")
    return 0


def missed_nodules(truth, original_lesions, variant_lesions) -> list[tuple[int, np.ndarray]]:
    """The ground-truth nodules ≥ 6 mm (id, voxel mask) the original detects and the variant does
    not, by the evaluation's sensitivity rule: the ones ``nodules_missed_large`` counts (and the
    nodule budget with it). The original may reach one with a piece under 6 mm, which the
    lost-lesion count leaves out."""
    from compression.evaluate import _match

    found_by = [{ref for ref, _, _ in _match(truth, lesions).matched} & truth.large
                for lesions in (original_lesions, variant_lesions)]
    return [(nodule, truth.instances == nodule) for nodule in sorted(found_by[0] - found_by[1])]


class Candidates:
    """The variant's candidates on one scan — the components of its network's label map, before
    its clean-up — and, for each, the limits of the clean-up that removed it, measured by the
    application's own clean-up code (``candidate_measures``) and the runner's candidate filter."""

    def __init__(self, runner, findings, volume):
        from app.core.inference import candidate_measures, foreground_probability, labels_from_probabilities
        from app.core.lesions import label_instances, occupied_box

        card, probabilities = runner.card, findings.probabilities
        labels = labels_from_probabilities(probabilities, card) > 0
        self.ids = np.zeros(labels.shape, np.int32)
        self.voxels, self.volume_mm3, self.reasons = np.zeros(0, int), np.zeros(0), []
        box = occupied_box(labels)
        if box is None:
            return
        inner, count = label_instances(labels[box])
        self.ids[box] = inner
        in_ids = inner.reshape(-1)[np.flatnonzero(inner.reshape(-1))]
        foreground = foreground_probability(probabilities, card)
        measures = candidate_measures(inner, in_ids, count, box, foreground, volume, card.postprocessing,
                                      runner.candidate_scorer(volume, foreground))
        self.voxels, self.volume_mm3 = np.bincount(in_ids, minlength=count + 1)[1:], measures[0]
        self.reasons = card.postprocessing.reasons(*measures)

    def print_under(self, inside: np.ndarray) -> None:
        """Those under the voxels ``inside`` (a lost lesion, a missed nodule), and why each went."""
        ids = np.unique(self.ids[inside])
        ids = ids[ids > 0]
        if not len(ids):
            print("    its network marks no candidate there", flush=True)
        for i in ids - 1:
            shared = int((self.ids[inside] == i + 1).sum())
            verdict = "dropped: " + "; ".join(self.reasons[i]) if self.reasons[i] else "kept"
            print(f"    its candidate of {self.voxels[i]} voxels ({self.volume_mm3[i]:.0f} mm³, {shared} inside the "
                  f"lesion): {verdict}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
