"""Where a stack of slices sits in patient space, and what is odd about it.

Slices are ordered by their position along the slice normal (the cross product of the row
and column directions), as DICOM defines them; file names and InstanceNumber only break
ties. The spacing between slices comes from those positions, not from SliceThickness, and
every irregularity a clinician must know about becomes a warning: missing slices, uneven
spacing, gantry tilt, slices at the same position.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np

_TILT_DEG = 0.1  # below this a tilt is rounding noise in ImagePositionPatient
_UNEVEN_MM = 0.01


@dataclass
class StackGeometry:
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # LPS of voxel [0, 0, 0]
    direction: np.ndarray  # columns: LPS unit vectors of increasing i, j, k
    warnings: list[str] = field(default_factory=list)


def plane_axes(orientation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice normal from ImageOrientationPatient."""
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:6], float)
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def stack_geometry(slices: list) -> tuple[list, StackGeometry]:
    """Sort slices (objects with .header, .position, .number) and describe their grid."""
    h = slices[0].header
    warnings: list[str] = []
    if h.orientation is None or not np.any(h.orientation):
        warnings.append("no ImageOrientationPatient: axial orientation assumed")
        row, col, normal = np.eye(3)
    else:
        row, col, normal = plane_axes(h.orientation)
    pixel = h.pixel_spacing or _missing_pixel_spacing(warnings)
    if any(s.position is None for s in slices):
        ordered = sorted(slices, key=lambda s: s.number)
        if len(slices) > 1:
            warnings.append("no ImagePositionPatient: slices ordered by InstanceNumber, "
                            "spacing from SliceThickness")
        dz = float(h.slice_thickness or 1.0)
        origin = np.zeros(3) if slices[0].position is None else ordered[0].position
    else:
        ordered = sorted(slices, key=lambda s: (float(normal @ s.position), s.number))
        along = np.array([normal @ s.position for s in ordered])
        dz = _slice_spacing(along, h.slice_thickness, warnings)
        warnings += _tilt_warning(ordered, normal)
        origin = ordered[0].position
    direction = np.column_stack([row, col, normal])
    spacing = (float(dz), float(pixel[0]), float(pixel[1]))
    return ordered, StackGeometry(spacing, tuple(float(v) for v in origin), direction, warnings)


def _missing_pixel_spacing(warnings: list[str]) -> tuple[float, float]:
    warnings.append("no PixelSpacing: 1 mm pixels assumed, measurements are not in mm")
    return (1.0, 1.0)


def _slice_spacing(along: np.ndarray, thickness, warnings: list[str]) -> float:
    if along.size < 2:
        return float(thickness or 1.0)
    steps = np.diff(along)
    same = steps < 1e-3
    if same.any():
        warnings.append(f"{int(same.sum())} slice(s) share a position with another slice "
                        "(several acquisitions in one series?)")
    real = steps[~same]
    if real.size == 0:
        return float(thickness or 1.0)
    dz = float(statistics.median(real.tolist()))  # np.median's first call imports ~70 ms
    warnings += _gap_warnings(along, steps, dz)
    return dz


def _gap_warnings(along: np.ndarray, steps: np.ndarray, dz: float) -> list[str]:
    out = []
    for k in np.flatnonzero(steps > 1.5 * dz):
        missing = int(round(steps[k] / dz)) - 1
        out.append(f"missing slices: a gap of {steps[k]:.2f} mm between slices {k} and {k + 1} "
                   f"(at {along[k]:.2f} and {along[k + 1]:.2f} mm; about {max(missing, 1)} "
                   "missing)")
    regular = steps[(steps >= 1e-3) & (steps <= 1.5 * dz)]
    if regular.size and np.ptp(regular) > max(_UNEVEN_MM, 0.01 * dz):
        out.append(f"uneven slice spacing: {regular.min():.2f} to {regular.max():.2f} mm "
                   f"(the median {dz:.2f} mm is used)")
    return out


def _tilt_warning(ordered: list, normal: np.ndarray) -> list[str]:
    step = ordered[-1].position - ordered[0].position
    length = float(np.linalg.norm(step))
    if len(ordered) < 2 or length < 1e-6:
        return []
    angle = float(np.degrees(np.arccos(min(1.0, abs(normal @ step) / length))))
    if angle <= _TILT_DEG:
        return []
    return [f"gantry tilt of {angle:.1f} degrees: the slices are sheared; the volume is laid "
            "out along the slice normal, so positions along the stack are approximate"]
