"""The model card: what a model expects, what it outputs, what it is for, and where it came from.

A card is a JSON sidecar (``card.json``) next to the model files, validated against the
published schema ``resources/model-card.schema.json``. Everything the runners need to feed
a scan to a model (axes, 2D/3D, patch, spacing, HU window, normalisation, activation) comes
from the card, never from guesses about the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.core.atomic import write_text_atomic

SCHEMA_VERSION = "1.0"
SUPPORTED_SCHEMA_VERSIONS = ("1.0",)
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "resources" / "model-card.schema.json"

TASKS = ("segmentation", "classification")
ACTIVATIONS = ("softmax", "sigmoid", "none")
NORMALISATIONS = ("window_0_1", "zscore", "none")
ROI_SOURCES = ("lesion_centres", "slice")


class ModelError(Exception):
    """A model or its card cannot be used; the message names the file and the mismatch."""


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    colour: str  # "#rrggbb"


@dataclass(frozen=True)
class InputSpec:
    axes: str  # "NCHW" (2D slices) or "NCDHW" (3D patches)
    dims: int  # 2 or 3
    channels: int
    # Size the network sees, in (y, x) or (z, y, x) voxels; None = the whole slice.
    patch_size: tuple[int, ...] | None = None
    # Whole-slice inputs are padded up to a multiple of this (strided encoders need it).
    size_divisor: int = 1
    target_spacing: tuple[float, ...] | None = None  # mm, same axis order as patch_size
    orientation: str = "LPS axial, radiological"
    overlap: float = 0.25  # sliding-window overlap when the input is larger than the patch
    # 2.5-D: the network reads this many neighbouring axial slices on each side of the one it
    # segments as extra channels (channels = 2 × slice_context + 1; edge slices repeat). 0: one slice.
    slice_context: int = 0

    def __post_init__(self):
        if self.slice_context and (self.dims != 2 or self.channels != 2 * self.slice_context + 1):
            raise ValueError(f"slice_context {self.slice_context} needs a 2D input of "
                             f"{2 * self.slice_context + 1} channels, not {self.dims}D with {self.channels}")


@dataclass(frozen=True)
class Preprocessing:
    hu_window: tuple[float, float] | None = None  # (lo, hi) HU
    clip: bool = True
    normalisation: str = "window_0_1"


@dataclass(frozen=True)
class CandidateFilter:
    """A second network that scores each lesion candidate of the segmentation (nodule or not),
    as the false-positive reduction stage of LUNA16-style nodule detectors does. It reads
    ``patch_px``² patches sampled at ``pixel_mm`` around the candidate's centre, one per slice
    offset (mm, through-plane) of the windowed scan, plus the segmentation's foreground
    probability on the centre slice; its ONNX file is the card's ``candidate_filter`` file."""

    threshold: float  # candidates scoring below it are dropped
    patch_px: int = 32
    pixel_mm: float = 0.7
    slice_offsets_mm: tuple[float, ...] = (-6.0, -3.0, 0.0, 3.0, 6.0)
    hu_window: tuple[float, float] = (-1000.0, 400.0)  # scan channels are clipped to it and scaled to 0..1

    @property
    def channels(self) -> int:
        return len(self.slice_offsets_mm) + 1


@dataclass(frozen=True)
class Postprocessing:
    """Lesion clean-up after the label map: drop components too small, too unsure, shaped
    like a vessel or a plate rather than a nodule, or judged no nodule by a candidate filter."""

    min_lesion_mm3: float = 0.0
    min_lesion_score: float = 0.0  # the lesion's peak foreground probability
    max_elongation: float | None = None  # app.core.lesions.lesion_elongation; None keeps every shape
    candidate_filter: CandidateFilter | None = None

    @property
    def is_empty(self) -> bool:
        return (self.min_lesion_mm3 <= 0 and self.min_lesion_score <= 0 and self.max_elongation is None
                and self.candidate_filter is None)

    def drops(self, volume_mm3: np.ndarray, peak: np.ndarray, elongation: np.ndarray | None,
              filter_scores: np.ndarray | None = None) -> np.ndarray:
        """Which lesions the rule removes, from their volumes, peak probabilities, elongations
        and candidate-filter scores (``elongation`` / ``filter_scores`` may be None when the
        rule does not use them)."""
        drop = np.zeros(np.atleast_1d(volume_mm3).shape, bool)
        for broken, _ in self._limits(volume_mm3, peak, elongation, filter_scores):
            drop |= broken
        return drop.reshape(np.shape(volume_mm3))

    def reasons(self, volume_mm3, peak, elongation=None, filter_scores=None) -> list[list[str]]:
        """Per lesion, why the rule removes it, in words ([] for a lesion it keeps): the same
        limits as :meth:`drops`, e.g. ["31 mm³ < 40 mm³", "candidate-filter score 0.12 < 0.5"]."""
        out = [[] for _ in range(len(np.atleast_1d(volume_mm3)))]
        for broken, words in self._limits(volume_mm3, peak, elongation, filter_scores):
            for i in np.flatnonzero(broken):
                out[i].append(words(i))
        return out

    def _limits(self, volume_mm3, peak, elongation, filter_scores):
        """(which lesions break it, lesion index → the limit in words) for each limit in use."""
        volume_mm3, peak = np.atleast_1d(np.asarray(volume_mm3)), np.atleast_1d(np.asarray(peak))
        yield volume_mm3 < self.min_lesion_mm3, lambda i: f"{volume_mm3[i]:.0f} mm³ < {self.min_lesion_mm3:g} mm³"
        yield peak < self.min_lesion_score, lambda i: f"peak probability {peak[i]:.2f} < {self.min_lesion_score:g}"
        if self.max_elongation is not None:
            elongation = np.atleast_1d(np.asarray(elongation))
            yield elongation > self.max_elongation, lambda i: f"elongation {elongation[i]:.2f} > {self.max_elongation:g}"
        if self.candidate_filter is not None:
            scores, threshold = np.atleast_1d(np.asarray(filter_scores)), self.candidate_filter.threshold
            yield scores < threshold, lambda i: f"candidate-filter score {scores[i]:.2f} < {threshold:g}"

    def describe(self) -> str:
        """The rule in words, e.g. for the model panel: "drops lesions < 80 mm³ or elongation > 1.8"."""
        parts = []
        if self.min_lesion_mm3 > 0:
            parts.append(f"< {self.min_lesion_mm3:g} mm³")
        if self.min_lesion_score > 0:
            parts.append(f"peak probability < {self.min_lesion_score:g}")
        if self.max_elongation is not None:
            parts.append(f"elongation > {self.max_elongation:g} (vessel- or plate-shaped)")
        if self.candidate_filter is not None:
            parts.append(f"candidate-filter score < {self.candidate_filter.threshold:g}")
        return "drops lesions " + " or ".join(parts) if parts else "none"


@dataclass(frozen=True)
class RoiSpec:
    """Where a classifier looks: e.g. a patch around each lesion centre."""

    source: str = "lesion_centres"
    patch_size_voxels: tuple[int, ...] | None = None
    patch_size_mm: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Architecture:
    name: str  # a MONAI network class name, e.g. "UNet"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lineage:
    weights_sha256: str = ""
    parent_sha256: str | None = None
    recipe: Any = None
    seed: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    package_versions: dict[str, str] = field(default_factory=dict)
    cpu_flags: list[str] = field(default_factory=list)
    provider: str | None = None
    threads: int | None = None
    training_time_s: float | None = None


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    task: str
    labels: tuple[Label, ...]
    input: InputSpec
    preprocessing: Preprocessing
    output_activation: str
    intended_use: str
    training_data: str
    files: dict[str, str] = field(default_factory=dict)  # role -> path relative to the card
    architecture: Architecture | None = None
    roi: RoiSpec | None = None
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    lineage: Lineage = field(default_factory=Lineage)
    description: str = ""
    schema_version: str = SCHEMA_VERSION

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def output_channels(self) -> int:
        """Channels the network must output for this card's labels and activation."""
        if self.output_activation == "sigmoid":
            return sum(1 for label in self.labels if label.value != 0)
        return len(self.labels)

    def with_lineage(self, **changes) -> "ModelCard":
        return replace(self, lineage=replace(self.lineage, **changes))


def _tuple(value):
    return None if value is None else tuple(value)


def card_from_dict(data: dict, source: str = "<card>") -> ModelCard:
    """Build a card from parsed JSON; raises ModelError naming ``source`` and the problem."""
    if not isinstance(data, dict):
        raise ModelError(f"{source}: a model card must be a JSON object")
    version = str(data.get("schema_version", ""))
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ModelError(
            f"{source}: unknown model card schema_version {version!r}; "
            f"this version of MedCompress reads {', '.join(SUPPORTED_SCHEMA_VERSIONS)}"
        )
    validate_card_dict(data, source)
    try:
        return _build_card(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{source}: malformed model card ({exc})") from exc


def _build_card(data: dict) -> ModelCard:
    inp = dict(data["input"])
    inp["patch_size"] = _tuple(inp.get("patch_size"))
    inp["target_spacing"] = _tuple(inp.get("target_spacing"))
    pre = dict(data.get("preprocessing") or {})
    pre["hu_window"] = _tuple(pre.get("hu_window"))
    roi = data.get("roi")
    if roi is not None:
        roi = RoiSpec(
            source=roi["source"],
            patch_size_voxels=_tuple(roi.get("patch_size_voxels")),
            patch_size_mm=_tuple(roi.get("patch_size_mm")),
        )
    arch = data.get("architecture")
    return ModelCard(
        schema_version=str(data["schema_version"]),
        name=data["name"],
        version=str(data["version"]),
        task=data["task"],
        labels=tuple(Label(**label) for label in data["labels"]),
        input=InputSpec(**inp),
        preprocessing=Preprocessing(**pre),
        output_activation=data["output_activation"],
        intended_use=data["intended_use"],
        training_data=data["training_data"],
        files=dict(data.get("files") or {}),
        architecture=Architecture(**arch) if arch else None,
        roi=roi,
        postprocessing=_postprocessing(data.get("postprocessing") or {}),
        lineage=Lineage(**(data.get("lineage") or {})),
        description=data.get("description", ""),
    )


def _postprocessing(data: dict) -> Postprocessing:
    data = dict(data)
    found = data.pop("candidate_filter", None)
    if found is not None:
        found = CandidateFilter(**{**found, **{key: tuple(found[key]) for key in ("slice_offsets_mm", "hu_window")
                                               if key in found}})
    return Postprocessing(**data, candidate_filter=found)


def card_to_dict(card: ModelCard) -> dict:
    """Plain JSON-ready dict (tuples become lists, unset optional blocks are dropped)."""
    data = json.loads(json.dumps(asdict(card)))
    for optional in ("architecture", "roi"):
        if data.get(optional) is None:
            data.pop(optional, None)
    if data["postprocessing"].get("candidate_filter") is None:
        data["postprocessing"].pop("candidate_filter", None)
    if not data["input"].get("slice_context"):
        data["input"].pop("slice_context", None)  # cards of one-slice models read as before
    return data


def validate_card_dict(data: dict, source: str = "<card>") -> None:
    """Check ``data`` against the published JSON Schema; ModelError lists the first problem."""
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise ModelError(f"{source}: model card field {where}: {first.message}")


def load_card(path: str | os.PathLike) -> ModelCard:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model card ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: model card is not valid JSON ({exc})") from exc
    return card_from_dict(data, str(path))


def save_card(card: ModelCard, path: str | os.PathLike) -> None:
    """Validate, then write to a temporary name and rename into place."""
    data = card_to_dict(card)
    validate_card_dict(data, str(path))
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
