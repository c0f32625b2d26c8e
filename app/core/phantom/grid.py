"""The voxel grid a phantom is drawn on: axial slices, patient LPS millimetres."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    rows: int
    cols: int
    slices: int
    pixel_mm: float  # square pixels
    slice_mm: float  # slice spacing = slice thickness (contiguous axial slices)
    origin: tuple[float, float, float]  # LPS (x, y, z) of voxel [0, 0, 0]; z ascends with k

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.slices, self.rows, self.cols)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) spacing in mm, the order of the array axes."""
        return (self.slice_mm, self.pixel_mm, self.pixel_mm)

    def axis_mm(self, axis: str) -> np.ndarray:
        """Patient coordinates (mm) of the voxel centres along x (i), y (j) or z (k)."""
        count, step, start = {
            "x": (self.cols, self.pixel_mm, self.origin[0]),
            "y": (self.rows, self.pixel_mm, self.origin[1]),
            "z": (self.slices, self.slice_mm, self.origin[2]),
        }[axis]
        return (start + step * np.arange(count)).astype(np.float32)

    def box_around(self, low_xyz, high_xyz) -> tuple[slice, slice, slice] | None:
        """Index slices (k, j, i) of the voxels whose centres may lie in an LPS box; None if outside."""
        low = np.asarray(low_xyz, float) - np.asarray(self.origin)
        high = np.asarray(high_xyz, float) - np.asarray(self.origin)
        steps = np.array([self.pixel_mm, self.pixel_mm, self.slice_mm])
        counts = (self.cols, self.rows, self.slices)
        lo = np.maximum(np.floor(low / steps).astype(int), 0)
        hi = np.minimum(np.ceil(high / steps).astype(int) + 1, counts)
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def box_coordinates(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (z, y, x) patient coordinates of a box: shapes (K,1,1), (1,J,1), (1,1,I)."""
        z = self.axis_mm("z")[box[0]][:, None, None]
        y = self.axis_mm("y")[box[1]][None, :, None]
        x = self.axis_mm("x")[box[2]][None, None, :]
        return z, y, x
