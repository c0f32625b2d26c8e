"""Tubes: the vessels, airways and aorta of the phantom, grown as trees and drawn with partial volume.

A tree grows from a root by binary branching: each child turns away from its parent by a
random angle, is thinner (Murray-like radius ratios) and shorter, and the tree stops where the
tubes become thinner than the finest radius asked for or would leave the lung. Drawn on the
grid, a tube covers each voxel by the fraction of it inside the tube (a one-voxel-wide ramp
across the wall), so thin vessels fade out as they do on a real scan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from app.core.phantom.grid import Grid


@dataclass(frozen=True)
class Segment:
    start: tuple[float, float, float]  # LPS mm
    end: tuple[float, float, float]
    start_radius: float  # mm
    end_radius: float
    generation: int = 0


@dataclass(frozen=True)
class TreeStyle:
    finest_radius: float  # stop branching below this radius (mm)
    length_per_radius: tuple[float, float] = (4.0, 8.0)  # a branch is this many radii long
    continue_angle_deg: tuple[float, float] = (5.0, 25.0)  # the parent carries on, turning a little
    continue_ratio: tuple[float, float] = (0.78, 0.92)  # its radius / the parent's
    branch_angle_deg: tuple[float, float] = (35.0, 75.0)  # a side branch leaves at a wider angle
    radius_ratio: tuple[float, float] = (0.45, 0.75)  # and is thinner
    outward_pull: float = 0.35  # how strongly branches head away from the root
    max_generations: int = 24


def _perpendicular(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    other = rng.normal(size=3)
    other -= other.dot(direction) * direction
    return other / (np.linalg.norm(other) + 1e-12)


def _turn(direction: np.ndarray, angle: float, axis: np.ndarray) -> np.ndarray:
    """``direction`` turned by ``angle`` towards the perpendicular ``axis``."""
    return np.cos(angle) * direction + np.sin(angle) * axis


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def grow_tree(root: np.ndarray, directions: list[np.ndarray], radius: float, style: TreeStyle,
              inside: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator) -> list[Segment]:
    """Grow one tree from ``root`` with a first branch along each of ``directions``.

    ``inside(points (n, 3)) -> bool (n,)`` says where the tree may grow (the lung); the first
    generation may start outside it (at the hilum) but every branch must end inside.
    """
    segments: list[Segment] = []
    stack = [(np.asarray(root, float), _unit(np.asarray(d, float)), radius, 0) for d in directions]
    while stack:
        start, direction, r, generation = stack.pop()
        end = _grow_branch(start, direction, r, style, inside, rng)
        for _ in range(3 if end is None and generation > 0 else 0):  # blocked: look around once more
            direction = _unit(direction + rng.normal(scale=0.6, size=3))
            end = _grow_branch(start, direction, r, style, inside, rng)
            if end is not None:
                break
        if end is None:
            continue
        r_end = r * 0.95
        segments.append(Segment(tuple(start), tuple(end), r, r_end, generation))
        if r_end * style.continue_ratio[1] < style.finest_radius or generation >= style.max_generations:
            continue
        stack += _children(root, start, end, r_end, generation, style, rng)
    return segments


def _grow_branch(start, direction, r, style, inside, rng) -> np.ndarray | None:
    """The end of a branch, shortened if it would leave the lung; None if it cannot fit."""
    length = r * rng.uniform(*style.length_per_radius) + 2.0
    for fraction in (1.0, 0.6, 0.35):
        end = start + direction * length * fraction
        if inside(end[None, :])[0]:
            return end
    return None


def _children(root, start, end, r, generation, style, rng) -> list:
    """A continuation of the branch and a side branch, as pulmonary vessels divide."""
    direction = _unit(end - start)
    outward = _unit(end - root)
    axis = _perpendicular(direction, rng)
    children = []
    kinds = ((style.continue_angle_deg, style.continue_ratio), (style.branch_angle_deg, style.radius_ratio))
    for sign, (angles, ratios) in zip((1.0, -1.0), kinds):
        angle = np.deg2rad(rng.uniform(*angles))
        child = _unit(_turn(direction, angle, sign * axis) + style.outward_pull * outward)
        child_r = r * rng.uniform(*ratios)
        if child_r >= style.finest_radius:
            children.append((end, child, child_r, generation + 1))
    return children


# ---------------------------------------------------------------------------- drawing


def tube_coverage(segment: Segment, z, y, x, ramp_mm: float, extra_radius: float = 0.0) -> np.ndarray:
    """Fraction (0..1) of each voxel inside the tube, for broadcastable voxel coordinates (mm)."""
    a = np.asarray(segment.start, np.float32)
    v = np.asarray(segment.end, np.float32) - a
    length2 = max(float(v @ v), 1e-6)
    wx, wy, wz = x - a[0], y - a[1], z - a[2]
    along = np.clip((wx * v[0] + wy * v[1] + wz * v[2]) / length2, 0.0, 1.0)
    dist2 = (wx - along * v[0]) ** 2 + (wy - along * v[1]) ** 2 + (wz - along * v[2]) ** 2
    radius = segment.start_radius + along * (segment.end_radius - segment.start_radius) + extra_radius
    return np.clip(0.5 + (radius - np.sqrt(dist2)) / ramp_mm, 0.0, 1.0)


def draw_tubes(segments: list[Segment], grid: Grid, coverage: np.ndarray, extra_radius: float = 0.0) -> None:
    """Raise ``coverage`` (uint8, 0..255, grid shaped) to each tube's coverage of every voxel."""
    ramp = grid.pixel_mm
    for segment in segments:
        reach = max(segment.start_radius, segment.end_radius) + extra_radius + ramp
        low = np.minimum(segment.start, segment.end) - reach
        high = np.maximum(segment.start, segment.end) + reach
        box = grid.box_around(low, high)
        if box is None:
            continue
        z, y, x = grid.box_coordinates(box)
        covered = tube_coverage(segment, z, y, x, ramp, extra_radius)
        np.maximum(coverage[box], (covered * 255.0 + 0.5).astype(np.uint8), out=coverage[box])


def blend(hu: np.ndarray, coverage: np.ndarray, value: float, where: np.ndarray | None = None) -> None:
    """Mix ``value`` into ``hu`` in proportion to ``coverage`` (uint8 fraction), in place."""
    touched = coverage > 0
    if where is not None:
        touched &= where
    fraction = coverage[touched].astype(np.float32) / 255.0
    hu[touched] = hu[touched] * (1.0 - fraction) + value * fraction
