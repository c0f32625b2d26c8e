"""Lung nodules: varied size, shape and density, placed free, against the pleura or on a vessel.

Sizes are mean diameters (Lung-RADS) of 3–30 mm. Shapes: round (a slightly uneven ellipsoid),
lobulated (a cluster of spheres), spiculated (a bumpy core with thin spikes). Densities: solid
(0–60 HU), ground-glass (−650…−450 HU, faint, with vessels still visible through it) and
part-solid (a ground-glass halo round a solid core). The ground truth of a nodule is where it
covers at least half a voxel inside the lung, kept as one connected piece.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from app.core.phantom.anatomy import Chest, points_in_lung
from app.core.phantom.grid import Grid
from app.core.phantom.tubes import Segment, tube_coverage

KINDS = ("solid", "part-solid", "ground-glass")
_KIND_ODDS = (0.5, 0.2, 0.3)
_SHAPE_ODDS = {  # round, lobulated, spiculated
    "solid": (0.45, 0.30, 0.25), "part-solid": (0.40, 0.30, 0.30), "ground-glass": (0.6, 0.4, 0.0)}
_PLACE_ODDS = (0.40, 0.25, 0.35)  # free, pleural, vascular
_DIRECTIONS = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)
                        if (a, b, c) != (0, 0, 0)], float)
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)


@dataclass(frozen=True)
class Nodule:
    centre: tuple[float, float, float]  # LPS mm
    radius: float  # half the intended mean diameter (mm)
    kind: str  # solid, part-solid, ground-glass
    shape: str  # round, lobulated, spiculated
    place: str  # free, pleural, vascular
    solid_hu: float
    glass_hu: float
    core_fraction: float  # part-solid: radius of the solid core / radius
    axes: tuple[float, float, float] = (1.0, 1.0, 1.0)  # round: relative half axes
    rotation: tuple[tuple[float, ...], ...] = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
    lobes: tuple[tuple[float, float, float, float], ...] = ()  # (dx, dy, dz, r) mm
    spikes: tuple[Segment, ...] = ()
    waves: tuple[tuple[float, float, float, float], ...] = field(default=())  # texture (kx, ky, kz, phase)

    @property
    def reach(self) -> float:
        """Distance from the centre beyond which the nodule covers nothing."""
        return self.radius * (2.2 if self.spikes else 1.5) + 2.0


# ---------------------------------------------------------------------------- design


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _lobes(rng, radius):
    count = rng.integers(3, 7)
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    offsets = directions * radius * rng.uniform(0.35, 0.5, size=(count, 1))
    radii = radius * rng.uniform(0.45, 0.62, size=count)
    core = [(0.0, 0.0, 0.0, 0.78 * radius)]
    return tuple(core + [tuple(map(float, (*o, r))) for o, r in zip(offsets, radii)])


def _spikes(rng, centre, radius):
    count = rng.integers(6, 15)
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    spikes = []
    for d in directions:
        start = np.asarray(centre) + d * radius * 0.7
        end = np.asarray(centre) + d * radius * rng.uniform(1.4, 2.1)
        spikes.append(Segment(tuple(start), tuple(end), radius * rng.uniform(0.1, 0.18), 0.25))
    return tuple(spikes)


def _waves(rng):
    k = rng.normal(size=(3, 3))
    k *= (2 * np.pi / rng.uniform(3.0, 8.0, size=(3, 1))) / np.linalg.norm(k, axis=1, keepdims=True)
    return tuple((*map(float, kk), float(rng.uniform(0, 2 * np.pi))) for kk in k)


def design_nodule(rng: np.random.Generator, centre, radius: float, kind: str, place: str) -> Nodule:
    shape = ("round", "lobulated", "spiculated")[rng.choice(3, p=_SHAPE_ODDS[kind])]
    axes = rng.uniform(0.85, 1.15, size=3)
    return Nodule(
        centre=tuple(map(float, centre)), radius=float(radius), kind=kind, shape=shape, place=place,
        solid_hu=float(rng.uniform(0.0, 60.0)), glass_hu=float(rng.uniform(-650.0, -450.0)),
        core_fraction=float(rng.uniform(0.35, 0.6)),
        axes=tuple(map(float, axes / np.cbrt(axes.prod()))),
        rotation=tuple(map(tuple, _random_rotation(rng).tolist())),
        lobes=_lobes(rng, radius) if shape == "lobulated" else (),
        spikes=_spikes(rng, centre, radius) if shape == "spiculated" else (),
        waves=_waves(rng),
    )


# ---------------------------------------------------------------------------- placement


def _lung_points(rng, chest: Chest, count=256) -> np.ndarray:
    cx, cy = chest.cavity
    low = np.array([chest.centre[0] - cx, chest.centre[1] - cy, chest.z_first + chest.lung_base - 40.0])
    high = np.array([chest.centre[0] + cx, chest.centre[1] + cy,
                     chest.z_first + chest.lung_base + chest.lung_height])
    points = rng.uniform(low, high, size=(count, 3))
    return points[points_in_lung(chest, points)]


def _ball_inside(chest, centre, radius) -> np.ndarray:
    return points_in_lung(chest, np.asarray(centre) + _DIRECTIONS * radius)


def _free_centre(rng, chest, radius, vessels):
    for point in _lung_points(rng, chest):
        if _ball_inside(chest, point, 1.15 * radius).all():
            return point
    return None


def _pleural_centre(rng, chest, radius, vessels):
    for point in _lung_points(rng, chest):
        if _ball_inside(chest, point, 0.6 * radius).all() and not _ball_inside(chest, point, 1.15 * radius).all():
            return point
    return None


def _vascular_centre(rng, chest, radius, vessels):
    candidates = [s for s in vessels if 0.8 <= s.end_radius <= 4.0 and s.generation >= 1]
    if not candidates:
        return None
    for index in rng.choice(len(candidates), size=min(40, len(candidates)), replace=False):
        segment = candidates[index]
        a, b = np.asarray(segment.start), np.asarray(segment.end)
        along = a + rng.uniform(0.2, 0.8) * (b - a)
        axis = b - a
        side = rng.normal(size=3)
        side -= side.dot(axis) / axis.dot(axis) * axis
        point = along + side / np.linalg.norm(side) * (radius + 0.6 * segment.end_radius)
        if points_in_lung(chest, point[None])[0] and _ball_inside(chest, point, 0.9 * radius).all():
            return point
    return None


_PLACERS = {"free": _free_centre, "pleural": _pleural_centre, "vascular": _vascular_centre}


def _apart(point, radius, placed: list[Nodule]) -> bool:
    """Far enough from every placed nodule that even spikes and lobes cannot touch."""
    return all(np.linalg.norm(np.asarray(point) - n.centre) > 1.6 * (radius + n.radius) + 8.0 for n in placed)


def _draw_kind_and_size(rng, smallest_mm: float) -> tuple[str, float]:
    kind = KINDS[rng.choice(3, p=_KIND_ODDS)]
    low = max(smallest_mm, 3.0 if kind == "solid" else 6.0)
    diameter = float(np.exp(rng.uniform(np.log(low), np.log(30.0))))
    return kind, diameter / 2.0


def place_nodules(rng: np.random.Generator, chest: Chest, vessels: list[Segment], count: int,
                  smallest_mm: float) -> list[Nodule]:
    """``count`` nodules inside the lungs, apart from each other (fewer if the lungs are full)."""
    placed: list[Nodule] = []
    for _ in range(count):
        kind, radius = _draw_kind_and_size(rng, smallest_mm)
        place = ("free", "pleural", "vascular")[rng.choice(3, p=_PLACE_ODDS)]
        for attempt_place in (place, "free", "free"):
            centre = _PLACERS[attempt_place](rng, chest, radius, vessels)
            if centre is not None and _apart(centre, radius, placed):
                placed.append(design_nodule(rng, centre, radius, kind, attempt_place))
                break
    return placed


# ---------------------------------------------------------------------------- drawing


def _signed_distance(nodule: Nodule, z, y, x) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to the nodule's body (spikes apart)."""
    cx, cy, cz = nodule.centre
    dx, dy, dz = x - cx, y - cy, z - cz
    if nodule.lobes:
        distances = [np.sqrt((dx - ox) ** 2 + (dy - oy) ** 2 + (dz - oz) ** 2) - r for ox, oy, oz, r in nodule.lobes]
        return np.minimum.reduce(distances)
    rot = np.asarray(nodule.rotation)
    a, b, c = nodule.axes
    p0 = (rot[0, 0] * dx + rot[1, 0] * dy + rot[2, 0] * dz) / a
    p1 = (rot[0, 1] * dx + rot[1, 1] * dy + rot[2, 1] * dz) / b
    p2 = (rot[0, 2] * dx + rot[1, 2] * dy + rot[2, 2] * dz) / c
    core = 0.85 if nodule.spikes else 1.0
    return np.sqrt(p0**2 + p1**2 + p2**2) - core * nodule.radius


def _texture(nodule: Nodule, z, y, x) -> np.ndarray:
    """Slow wavy variation (up to ±54 HU) so ground glass is not a flat disc."""
    total = 0.0
    for kx, ky, kz, phase in nodule.waves:
        total = total + np.cos(kx * x + ky * y + kz * z + phase)
    return 18.0 * total


def nodule_coverage(nodule: Nodule, z, y, x, ramp_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(whole nodule, solid part) coverage fractions 0..1 of the voxels at (z, y, x)."""
    distance = _signed_distance(nodule, z, y, x)
    whole = np.clip(0.5 - distance / ramp_mm, 0.0, 1.0)
    for spike in nodule.spikes:
        whole = np.maximum(whole, tube_coverage(spike, z, y, x, ramp_mm))
    if nodule.kind == "solid":
        return whole, whole
    if nodule.kind == "ground-glass":
        return whole, np.zeros_like(whole)
    shrink = nodule.radius * (1.0 - nodule.core_fraction)
    return whole, np.clip(0.5 - (distance + shrink) / ramp_mm, 0.0, 1.0)


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    pieces, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(pieces.ravel())[1:]
    return pieces == (int(np.argmax(sizes)) + 1)


def draw_nodule(nodule: Nodule, grid: Grid, hu: np.ndarray, lung: np.ndarray, owner: np.ndarray, tag: int) -> int:
    """Paint a nodule into ``hu`` (lung voxels only) and its ground truth into ``owner``; voxels drawn."""
    reach = nodule.reach
    box = grid.box_around(np.asarray(nodule.centre) - reach, np.asarray(nodule.centre) + reach)
    if box is None:
        return 0
    z, y, x = grid.box_coordinates(box)
    whole, solid = nodule_coverage(nodule, z, y, x, grid.pixel_mm)
    background = hu[box]
    glass = nodule.glass_hu + _texture(nodule, z, y, x)
    painted = background * (1.0 - whole) + glass * whole
    painted = painted * (1.0 - solid) + nodule.solid_hu * solid
    in_lung = lung[box]
    # max(): vessels and airway walls stay visible through ground glass, as on real scans.
    hu[box] = np.where(in_lung, np.maximum(background, painted), background)
    truth = _largest_piece((whole >= 0.5) & in_lung & (owner[box] == 0))
    owner[box][truth] = tag
    return int(truth.sum())
