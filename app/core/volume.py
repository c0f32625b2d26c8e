"""The scan every part of MedCompress shares: voxels in patient space plus what it takes to show them.

Conventions (used by the loader, the viewer, inference and the exporters alike):

- ``voxels`` is indexed ``[k, j, i]`` = (slice, row, column), i.e. (z, y, x).
- ``spacing`` is in millimetres in the same (z, y, x) order as the array axes.
- ``origin`` is the patient LPS position (x, y, z, mm) of the centre of voxel ``[0, 0, 0]``.
- ``direction`` is a 3×3 matrix whose *columns* are the unit LPS vectors along increasing
  column index i, row index j and slice index k (the same convention as SimpleITK's
  ``GetDirection`` reshaped to 3×3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Volume:
    voxels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: str = "CT"
    # MONOCHROME1 volumes are shown inverted; the voxels themselves are never inverted.
    photometric: str = "MONOCHROME2"
    # True where the scanner wrote PixelPaddingValue (outside the field of view); None if none.
    padding_mask: np.ndarray | None = None
    # The DICOM's own default window as (center, width), if it had one.
    default_window: tuple[float, float] | None = None
    series_uid: str = ""
    study_uid: str = ""
    frame_of_reference_uid: str = ""
    # SOPInstanceUID of each slice in k order (empty for multi-frame objects).
    sop_uids: tuple[str, ...] = ()
    # Display-only description (series description, date, modality): never identifiers.
    description: dict[str, str] = field(default_factory=dict)
    # Human-readable warnings the UI must show: missing slices, uneven spacing, gantry tilt ...
    warnings: tuple[str, ...] = ()
    # True for each slice whose voxels are filled in; progressive loading fills it in over time.
    loaded: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.voxels.shape)  # type: ignore[return-value]

    @property
    def is_complete(self) -> bool:
        return self.loaded is None or bool(self.loaded.all())

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_patient(self, k: float, j: float, i: float) -> np.ndarray:
        """LPS millimetres of the voxel centre at (k, j, i); fractional indices allowed."""
        step = np.array([i * self.spacing[2], j * self.spacing[1], k * self.spacing[0]])
        return np.asarray(self.origin, dtype=float) + np.asarray(self.direction, float) @ step

    def patient_to_index(self, point_lps) -> np.ndarray:
        """Fractional (k, j, i) of an LPS point (mm)."""
        offset = np.asarray(point_lps, float) - np.asarray(self.origin, float)
        i, j, k = np.linalg.solve(np.asarray(self.direction, float), offset) / np.array(
            [self.spacing[2], self.spacing[1], self.spacing[0]]
        )
        return np.array([k, j, i])

    def slice_position_mm(self, k: int) -> float:
        """Position of slice k along the slice normal (mm), as scanners print it."""
        normal = np.asarray(self.direction, float)[:, 2]
        return float(normal @ self.index_to_patient(k, 0, 0))
