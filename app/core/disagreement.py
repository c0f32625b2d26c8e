"""Where two model variants disagree on one scan, lesion by lesion: the clinician's safety check.

The reference is usually the original model, the other its compressed variant. Lesions are
found, measured and paired with the one shared rule (:mod:`app.core.lesions`), so "lesion 3,
8.4 mm" here is the same lesion the lesion list and the evaluation talk about.

Kinds of disagreement, most serious first (a lesion the compressed model no longer reports is
the failure that hurts a patient; an added one costs a second look; a changed volume or type
can move a nodule across a management threshold):

1. ``missed`` — a reference lesion with no partner in the other's findings (when most of it lies
   inside another of the other's lesions — two merged into one — it is listed after the true
   misses, with the share covered);
2. ``added`` — a lesion only the other reports (likewise for one split off a paired lesion);
3. ``volume_change`` — a matched pair whose volume differs by more than a threshold (%);
4. ``class_flip`` — a classifier's most likely type differs on the same reference lesion.

Within a kind, larger lesions (and larger changes) come first; a volume change that moves a
nodule into another Lung-RADS size band comes before one that does not. When the scan has
ground truth, each missed or added lesion says whether it lies on a true lesion: a missed
nodule comes before the reference's own false positive the other no longer reports, and an
added false positive before an added true nodule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from app.core.lesions import Lesion, label_instances, lesion_table, match_lesions
from app.core.volume import Volume

MISSED, ADDED, VOLUME_CHANGE, CLASS_FLIP = "missed", "added", "volume_change", "class_flip"
KINDS = (MISSED, ADDED, VOLUME_CHANGE, CLASS_FLIP)
KIND_TITLES = {MISSED: "Missed", ADDED: "Added", VOLUME_CHANGE: "Volume changed", CLASS_FLIP: "Type changed"}
DEFAULT_VOLUME_CHANGE_PCT = 25.0
# A missed or added lesion mostly covered by the other side's labels was merged or split, not lost.
MERGED_FRACTION = 0.5
# Voxel disagreement map values (uint8): where the two label maps' foregrounds differ.
AGREE, ONLY_REFERENCE, ONLY_OTHER = 0, 1, 2
# Lung-RADS v2022 size bands for solid nodules (mean diameter, mm): 2 / 3 / 4A / 4B.
_SIZE_BANDS = ((6.0, "<6 mm"), (8.0, "6–8 mm"), (15.0, "8–15 mm"), (float("inf"), "≥15 mm"))


def lung_rads_size_band(mean_diameter_mm: float) -> str:
    """The Lung-RADS solid-nodule size band a mean diameter falls in."""
    return next(text for limit, text in _SIZE_BANDS if mean_diameter_mm < limit)


@dataclass(frozen=True)
class Disagreement:
    kind: str  # one of KINDS
    centre_index: tuple[float, float, float]  # (k, j, i): where the views jump to
    mean_diameter_mm: float  # Lung-RADS size of the lesion concerned (the reference's when paired)
    reference_id: int | None = None  # lesion id in the reference's lesion table
    other_id: int | None = None  # lesion id in the other's lesion table
    reference_volume_ml: float | None = None
    other_volume_ml: float | None = None
    reference_type: str | None = None  # classifier's most likely type, for class flips
    other_type: str | None = None
    # Missed / added: share of the lesion's voxels the other side marks all the same, as part of
    # a lesion paired elsewhere (merged or split). 0 = nothing there at all: a true miss.
    covered_fraction: float = 0.0
    other_diameter_mm: float | None = None  # volume changes: the other's size of the paired lesion
    # Missed / added, with ground truth: does the lesion overlap a true lesion? None: no labels.
    on_truth: bool | None = None

    @property
    def size_band(self) -> str:
        return lung_rads_size_band(self.mean_diameter_mm)

    @property
    def volume_change_pct(self) -> float | None:
        if not self.reference_volume_ml or self.other_volume_ml is None:
            return None
        return 100.0 * (self.other_volume_ml - self.reference_volume_ml) / self.reference_volume_ml

    @property
    def slice_number(self) -> int:
        """1-based slice, as the viewer's corner text shows it."""
        return int(round(self.centre_index[0])) + 1

    @property
    def crosses_size_band(self) -> bool:
        """A volume change that moves the lesion into another Lung-RADS size band."""
        return (self.other_diameter_mm is not None
                and lung_rads_size_band(self.other_diameter_mm) != self.size_band)

    @property
    def merged(self) -> bool:
        """Most of the lesion lies inside another lesion of the other side (merged or split)."""
        return self.covered_fraction >= MERGED_FRACTION

    @property
    def truth_text(self) -> str:
        """"", or what the ground truth says of a missed / added lesion."""
        if self.on_truth is None:
            return ""
        if self.kind == MISSED:
            return "; a ground-truth lesion" if self.on_truth else "; the reference's false positive"
        return "; a ground-truth lesion the reference missed" if self.on_truth else "; not in the ground truth"

    @property
    def reassuring(self) -> bool:
        """A difference the ground truth sides with the other on: listed after the worrying ones."""
        return (self.kind == MISSED and self.on_truth is False) or (self.kind == ADDED and self.on_truth is True)

    def detail(self) -> str:
        """The specifics in a few words, for a table whose other columns say kind, size and variant."""
        inside = f"{self.covered_fraction:.0%} inside another lesion"
        if self.kind == MISSED:
            return f"reference lesion {self.reference_id} " + (f"not found on its own ({inside})" if self.covered_fraction
                                                                else "not found") + self.truth_text
        if self.kind == ADDED:
            return (f"not on its own in the reference ({inside})" if self.covered_fraction
                    else "not in the reference") + self.truth_text
        if self.kind == VOLUME_CHANGE:
            band = f", now {lung_rads_size_band(self.other_diameter_mm)}" if self.crosses_size_band else ""
            return (f"lesion {self.reference_id}: {self.reference_volume_ml:.3f} → {self.other_volume_ml:.3f} mL "
                    f"({self.volume_change_pct:+.0f} %{band})")
        return f"lesion {self.reference_id}: {self.reference_type} → {self.other_type}"

    def describe(self, other: str = "the other") -> str:
        """One plain sentence for the list and the report."""
        size = f"{self.mean_diameter_mm:.1f} mm ({self.size_band})"
        if self.kind == MISSED:
            return f"Lesion {self.reference_id}, {size}, not found by {other}{self.truth_text}"
        if self.kind == ADDED:
            return f"{other} adds a lesion of {size} the reference does not report{self.truth_text}"
        if self.kind == VOLUME_CHANGE:
            return (f"Lesion {self.reference_id}, {size}: volume {self.reference_volume_ml:.3f} → "
                    f"{self.other_volume_ml:.3f} mL ({self.volume_change_pct:+.0f} %)")
        return f"Lesion {self.reference_id}, {size}: type {self.reference_type} → {self.other_type}"


# ------------------------------------------------------------------------- voxels


def voxel_disagreement(reference_labels: np.ndarray, other_labels: np.ndarray) -> np.ndarray:
    """uint8 map: 0 both agree, 1 only the reference marks the voxel, 2 only the other does."""
    reference = np.asarray(reference_labels) > 0
    other = np.asarray(other_labels) > 0
    if reference.shape != other.shape:
        raise ValueError(f"label maps differ in shape: {reference.shape} vs {other.shape}")
    result = np.zeros(reference.shape, np.uint8)
    result[reference & ~other] = ONLY_REFERENCE
    result[other & ~reference] = ONLY_OTHER
    return result


# ------------------------------------------------------------------------- lesions


def find_disagreements(reference_labels: np.ndarray, other_labels: np.ndarray, volume: Volume, *,
                       volume_change_pct: float = DEFAULT_VOLUME_CHANGE_PCT,
                       reference_types: Mapping[int, Mapping[str, float]] | None = None,
                       other_types: Mapping[int, Mapping[str, float]] | None = None,
                       min_voxels: int = 1, truth_labels: np.ndarray | None = None) -> list[Disagreement]:
    """Every lesion-level disagreement between two label maps on ``volume``, most serious first.

    With ``truth_labels`` (the scan's ground truth), each missed or added lesion records
    whether it overlaps a true lesion.

    ``reference_types`` / ``other_types`` are classifier scores ({type: probability}) per
    *reference* lesion id — both classifiers look at the reference's lesion centres, so a type
    flip is never confused with a segmentation difference.
    """
    ref_instances, _ = label_instances(np.asarray(reference_labels))
    other_instances, _ = label_instances(np.asarray(other_labels))
    ref_lesions = _by_id(lesion_table(reference_labels, volume, instances=ref_instances, min_voxels=min_voxels))
    other_lesions = _by_id(lesion_table(other_labels, volume, instances=other_instances, min_voxels=min_voxels))
    match = match_lesions(ref_instances, other_instances)
    other_mask, ref_mask = np.asarray(other_labels) > 0, np.asarray(reference_labels) > 0
    truth = None if truth_labels is None else np.asarray(truth_labels) > 0

    def on_truth(instances, lesion_id):
        return None if truth is None else _covered(instances, lesion_id, truth) > 0

    found = [_missed(ref_lesions[i], _covered(ref_instances, i, other_mask), on_truth(ref_instances, i))
             for i in match.missed if i in ref_lesions]
    found += [_added(other_lesions[i], _covered(other_instances, i, ref_mask), on_truth(other_instances, i))
              for i in match.added if i in other_lesions]
    found += _volume_changes(match.matched, ref_lesions, other_lesions, volume_change_pct)
    found += class_flips(list(ref_lesions.values()), reference_types or {}, other_types or {})
    return sort_by_seriousness(found)


def findings_disagreements(reference, other, volume: Volume, *, reference_types=None, other_types=None,
                           volume_change_pct: float = DEFAULT_VOLUME_CHANGE_PCT,
                           truth_labels: np.ndarray | None = None) -> list[Disagreement]:
    """:func:`find_disagreements` on two :class:`~app.core.findings.Findings`; the optional
    ``*_types`` are classifier Findings run on the reference's lesions (their lesion_scores)."""
    if reference.labels is None or other.labels is None:
        raise ValueError("both findings need a label map (segmentation models)")
    return find_disagreements(
        reference.labels, other.labels, volume, volume_change_pct=volume_change_pct,
        reference_types=_type_scores(reference_types), other_types=_type_scores(other_types),
        truth_labels=truth_labels)


def _type_scores(findings) -> dict[int, dict[str, float]]:
    if findings is None:
        return {}
    return {int(k): v for k, v in findings.lesion_scores.items() if isinstance(v, dict)}


def _by_id(lesions: Sequence[Lesion]) -> dict[int, Lesion]:
    return {lesion.lesion_id: lesion for lesion in lesions}


def _covered(instances: np.ndarray, lesion_id: int, other_mask: np.ndarray) -> float:
    """Share of one lesion's voxels that the other label map marks too."""
    inside = instances == lesion_id
    return float(other_mask[inside].mean()) if inside.any() else 0.0


def _missed(lesion: Lesion, covered: float = 0.0, on_truth: bool | None = None) -> Disagreement:
    return Disagreement(MISSED, lesion.centre_index, lesion.mean_diameter_mm, reference_id=lesion.lesion_id,
                        reference_volume_ml=lesion.volume_ml, covered_fraction=covered, on_truth=on_truth)


def _added(lesion: Lesion, covered: float = 0.0, on_truth: bool | None = None) -> Disagreement:
    return Disagreement(ADDED, lesion.centre_index, lesion.mean_diameter_mm, other_id=lesion.lesion_id,
                        other_volume_ml=lesion.volume_ml, covered_fraction=covered, on_truth=on_truth)


def _volume_changes(pairs, ref_lesions: dict, other_lesions: dict, threshold_pct: float) -> list[Disagreement]:
    changes = []
    for ref_id, other_id, _dice in pairs:
        ref, other = ref_lesions.get(ref_id), other_lesions.get(other_id)
        if ref is None or other is None:
            continue
        item = Disagreement(VOLUME_CHANGE, ref.centre_index, ref.mean_diameter_mm, reference_id=ref_id,
                            other_id=other_id, reference_volume_ml=ref.volume_ml, other_volume_ml=other.volume_ml,
                            other_diameter_mm=other.mean_diameter_mm)
        if abs(item.volume_change_pct or 0.0) > threshold_pct:
            changes.append(item)
    return changes


def most_likely_type(scores: Mapping[str, float]) -> str:
    return max(scores, key=scores.get)


def class_flips(reference_lesions: Sequence[Lesion], reference_types: Mapping[int, Mapping[str, float]],
                other_types: Mapping[int, Mapping[str, float]]) -> list[Disagreement]:
    """Reference lesions whose most likely type differs between the two classifiers."""
    flips = []
    for lesion in reference_lesions:
        ref_scores, other_scores = reference_types.get(lesion.lesion_id), other_types.get(lesion.lesion_id)
        if not ref_scores or not other_scores:
            continue
        ref_type, other_type = most_likely_type(ref_scores), most_likely_type(other_scores)
        if ref_type != other_type:
            flips.append(Disagreement(CLASS_FLIP, lesion.centre_index, lesion.mean_diameter_mm,
                                      reference_id=lesion.lesion_id, reference_type=ref_type,
                                      other_type=other_type))
    return flips


def seriousness_key(item: Disagreement) -> tuple:
    """Kind first (missed > added > volume > type); within missed and added, lesions the other
    side has nothing of before those it merged or split, then those the ground truth sides with
    the reference on (see :attr:`Disagreement.reassuring`); volume changes that move a lesion
    into another Lung-RADS size band before those that do not; then the bigger change or lesion."""
    change = abs(item.volume_change_pct or 0.0) if item.kind == VOLUME_CHANGE else 0.0
    return (KINDS.index(item.kind), item.merged, item.reassuring, not item.crosses_size_band, -change,
            -item.mean_diameter_mm, item.reference_id or 0, item.other_id or 0)


def sort_by_seriousness(items: Sequence[Disagreement]) -> list[Disagreement]:
    return sorted(items, key=seriousness_key)


def count_by_kind(items: Sequence[Disagreement]) -> dict[str, int]:
    return {kind: sum(1 for item in items if item.kind == kind) for kind in KINDS}
