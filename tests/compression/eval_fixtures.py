"""Tiny scans with known lesions, for the evaluation, search and CLI tests.

Real Volumes and label maps whose lesions have sizes known in millimetres, so a test can say
exactly which lesions are ≥ 6 mm and which a prediction found, missed or added.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.core.volume import Volume

SPACING = (2.0, 0.8, 0.8)  # mm (z, y, x): anisotropic on purpose


@dataclass
class Case:
    """Duck-types compression.data.CaseData (the fields evaluation reads)."""

    case: str
    patient: str
    volume: Volume
    labels: np.ndarray | None
    series: str = ""


def ball(shape, centre, radius_mm, spacing=SPACING) -> np.ndarray:
    z, y, x = np.indices(shape)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip((z, y, x), centre, spacing))
    return d2 <= radius_mm ** 2


def volume(shape=(8, 40, 40), seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    voxels = (-850 + rng.normal(0, 10, shape)).astype(np.int16)
    return Volume(voxels=voxels, spacing=SPACING, origin=(0.0, 0.0, 0.0),
                  series_uid=f"1.2.826.0.1.3680043.8.498.{seed + 10}")


def labels_with(shape, balls) -> np.ndarray:
    """A uint8 map with a 1 inside each (centre, radius_mm) ball."""
    out = np.zeros(shape, np.uint8)
    for centre, radius in balls:
        out[ball(shape, centre, radius)] = 1
    return out


LARGE = ((4, 12, 12), 5.0)  # 10 mm across: a lesion that counts (≥ 6 mm)
SMALL = ((4, 30, 30), 1.2)  # ~2.4 mm across: below the 6 mm line
ELSEWHERE = ((4, 30, 10), 4.0)  # where the truth has nothing


class FixedFindings:
    """What a runner returns, reduced to the fields evaluation reads."""

    def __init__(self, labels, network_s: float = 0.01):
        from app.core.findings import Timing

        self.labels = labels
        self.lesion_scores = {}
        self.timing = Timing(network_s=network_s)
