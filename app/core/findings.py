"""Findings: what one model variant found on one volume, and how long each stage took.

Saved to a folder as files other tools read too:

- ``labels.nii.gz`` — the label map (uint8) with the volume's geometry (SimpleITK, LPS);
- ``lesions.csv`` — the shared lesion table (:mod:`app.core.lesions`) plus ``score``
  (and, for classifiers, ``type`` and one ``p_<class>`` column per class);
- ``timing.json`` — load / pre-process / network / post-process seconds;
- ``findings.json`` — model identity, provider, scores and the exact lesion records;
- ``probabilities.npy`` — float16 class probabilities, only when kept.

Every file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.atomic import atomic_output, write_text_atomic
from app.core.volume import Volume

LABELS_FILE = "labels.nii.gz"
LESIONS_FILE = "lesions.csv"
TIMING_FILE = "timing.json"
FINDINGS_FILE = "findings.json"
PROBABILITIES_FILE = "probabilities.npy"


@dataclass
class Timing:
    """Seconds per stage; published work finds pre/post-processing, not the network, dominating."""

    load_s: float = 0.0
    preprocess_s: float = 0.0
    network_s: float = 0.0
    postprocess_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.load_s + self.preprocess_s + self.network_s + self.postprocess_s

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_s": self.total_s}


@dataclass
class Findings:
    # Geometry of the volume the findings lie on (for NIfTI export and overlays).
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    series_uid: str = ""
    labels: np.ndarray | None = None  # uint8 (z, y, x), label values from the card
    probabilities: np.ndarray | None = None  # float16 (classes, z, y, x), when kept
    lesions: list = field(default_factory=list)  # app.core.lesions.Lesion
    # Per lesion id: {"score": p} for segmentation; class -> probability for classifiers.
    lesion_scores: dict[int, dict[str, float] | float] = field(default_factory=dict)
    slice_scores: np.ndarray | None = None  # (z, classes) for slice classifiers
    study_scores: dict[str, float] = field(default_factory=dict)
    timing: Timing = field(default_factory=Timing)
    model: dict[str, Any] = field(default_factory=dict)  # name, version, sha256, provider, threads, backend

    @classmethod
    def for_volume(cls, volume: Volume, model: dict, **fields) -> "Findings":
        return cls(spacing=tuple(volume.spacing), origin=tuple(volume.origin),
                   direction=np.asarray(volume.direction, float), series_uid=volume.series_uid,
                   model=dict(model), **fields)

    @property
    def provider(self) -> str:
        return str(self.model.get("provider", ""))

    def lesion_csv_extra(self) -> dict[int, dict[str, Any]]:
        """Extra lesion-CSV columns: ``score`` always; ``type`` + ``p_<class>`` for classifiers."""
        extra = {}
        for lesion_id, score in self.lesion_scores.items():
            if isinstance(score, dict):
                best = max(score, key=score.get)
                row = {"type": best, "score": f"{score[best]:.4f}"}
                row.update({f"p_{name}": f"{p:.4f}" for name, p in score.items()})
            else:
                row = {"score": f"{float(score):.4f}"}
            extra[int(lesion_id)] = row
        return extra

    # ------------------------------------------------------------ saving

    def save(self, folder: str | os.PathLike) -> Path:
        from app.core.lesions import write_lesion_csv

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.labels is not None:
            write_label_nifti(self.labels, self, folder / LABELS_FILE)
        if self.probabilities is not None:
            with atomic_output(folder / PROBABILITIES_FILE) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, self.probabilities.astype(np.float16))
        write_lesion_csv(self.lesions, folder / LESIONS_FILE, extra=self.lesion_csv_extra())
        write_text_atomic(folder / TIMING_FILE, json.dumps(self.timing.as_dict(), indent=2) + "\n")
        write_text_atomic(folder / FINDINGS_FILE, json.dumps(self._record(), indent=2) + "\n")
        return folder

    def _record(self) -> dict:
        return {
            "series_uid": self.series_uid,
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": np.asarray(self.direction, float).tolist(),
            "model": self.model,
            "lesions": [asdict(lesion) for lesion in self.lesions],
            "lesion_scores": {str(k): v for k, v in self.lesion_scores.items()},
            "slice_scores": None if self.slice_scores is None else np.asarray(self.slice_scores).tolist(),
            "study_scores": self.study_scores,
        }

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Findings":
        from app.core.lesions import Lesion

        folder = Path(folder)
        record = json.loads((folder / FINDINGS_FILE).read_text(encoding="utf-8"))
        timing = json.loads((folder / TIMING_FILE).read_text(encoding="utf-8"))
        timing.pop("total_s", None)
        labels = read_label_nifti(folder / LABELS_FILE) if (folder / LABELS_FILE).exists() else None
        probs = np.load(folder / PROBABILITIES_FILE) if (folder / PROBABILITIES_FILE).exists() else None
        return cls(
            spacing=tuple(record["spacing"]), origin=tuple(record["origin"]),
            direction=np.asarray(record["direction"], float), series_uid=record.get("series_uid", ""),
            labels=labels, probabilities=probs,
            lesions=[Lesion(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})
                     for row in record.get("lesions", [])],
            lesion_scores={int(k): v for k, v in record.get("lesion_scores", {}).items()},
            slice_scores=None if record.get("slice_scores") is None else np.asarray(record["slice_scores"], np.float32),
            study_scores=record.get("study_scores", {}), timing=Timing(**timing), model=record.get("model", {}),
        )


def write_label_nifti(labels: np.ndarray, geometry, path: Path) -> None:
    """uint8 labels (z, y, x) as NIfTI with ``geometry``'s spacing/origin/direction (LPS)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(labels, np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(geometry.spacing)))  # SimpleITK is (x, y, z)
    image.SetOrigin(tuple(float(o) for o in geometry.origin))
    image.SetDirection(tuple(float(v) for v in np.asarray(geometry.direction, float).ravel()))
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def read_label_nifti(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.uint8)
