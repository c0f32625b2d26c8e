"""The chest: body, fat and muscle, ribs, spine, heart, mediastinum, lungs and upper abdomen.

Every structure is an analytic shape in patient millimetres, evaluated one axial slice at a
time (vectorised over the slice), so a 300-slice 512×512 study costs seconds. Positions are
relative to the body's centre (u to the patient's left, v to the back) and the height s above
the first slice. The lung test is the same function for a slice and for loose points, so the
vessel trees and nodules grow exactly where the image shows lung.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Hounsfield units of the tissues (unenhanced CT).
AIR, FAT, MUSCLE, BLOOD, LIVER, SPLEEN = -1000.0, -100.0, 45.0, 40.0, 58.0, 45.0
MEDIASTINAL_FAT, LUNG, CORTICAL_BONE, MARROW, DISC, CSF, CARTILAGE = -90.0, -860.0, 750.0, 220.0, 85.0, 12.0, 120.0
TABLE = -250.0


@dataclass(frozen=True)
class Chest:
    """One synthetic patient's chest, all lengths in mm."""
    centre: tuple[float, float]  # LPS (x, y) of the body's centre
    z_first: float  # patient z of the first slice; s = z - z_first
    body: tuple[float, float]  # half width, half depth of the skin outline
    fat: float  # subcutaneous fat thickness
    muscle: float  # chest wall muscle thickness
    lung_base: float  # s of the top of the right diaphragm dome
    lung_height: float  # from the dome to the apex
    vertebra_radius: float
    rib_phase: float  # s offset of the rib pattern
    rib_pitch: float  # vertical distance between ribs

    @property
    def cavity(self) -> tuple[float, float]:
        """Half axes of the thoracic cavity (inside the ribs)."""
        wall = self.fat + self.muscle + 9.0
        return (self.body[0] - wall, self.body[1] - wall)

    @property
    def spine_v(self) -> float:
        return 0.62 * self.cavity[1]

    @property
    def mediastinum_half_width(self) -> float:
        return 0.17 * self.cavity[0]

    def heart(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Centre (u, v, s) and half axes of the heart ellipsoid."""
        cx, cy = self.cavity
        centre = (0.12 * cx, -0.12 * cy, self.lung_base + 0.22 * self.lung_height)
        return centre, (0.40 * cx, 0.52 * cy, 0.28 * self.lung_height)

    def dome(self, u, v, side: int):
        """s of the diaphragm under each point, for the right (side -1) or left (+1) dome."""
        cx, cy = self.cavity
        top = self.lung_base - (15.0 if side > 0 else 0.0)
        return top - 55.0 * (((u - side * 0.5 * cx) / (0.62 * cx)) ** 2 + (v / cy) ** 2)


def sample_chest(rng: np.random.Generator, fov_mm: float, coverage_mm: float, z_first: float) -> Chest:
    half_width = rng.uniform(0.80, 0.90) * fov_mm / 2
    return Chest(
        centre=(rng.uniform(-0.02, 0.02) * fov_mm, rng.uniform(-0.04, 0.0) * fov_mm),
        z_first=z_first,
        body=(half_width, half_width * rng.uniform(0.62, 0.72)),
        fat=rng.uniform(5.0, 16.0),
        muscle=rng.uniform(5.0, 9.0),
        lung_base=rng.uniform(55.0, 62.0),
        lung_height=coverage_mm - 72.0,
        vertebra_radius=rng.uniform(14.0, 18.0),
        rib_phase=rng.uniform(0.0, 30.0),
        rib_pitch=rng.uniform(0.11, 0.13) * (coverage_mm - 72.0),
    )


# ---------------------------------------------------------------------------- lungs


def _apex_scale(chest: Chest, s):
    """The lungs narrow to a rounded cap over their top 45 %."""
    h = (s - chest.lung_base) / chest.lung_height
    above = np.clip((h - 0.55) / 0.45, 0.0, None)
    return np.sqrt(np.clip(1.0 - above**2, 0.0, 1.0)), h


def _outside_heart(chest: Chest, u, v, s):
    (hu_, hv, hs), (au, av, as_) = chest.heart()
    return ((u - hu_) / (1.08 * au)) ** 2 + ((v - hv) / (1.08 * av)) ** 2 + ((s - hs) / (1.08 * as_)) ** 2 > 1.0


def _outside_spine(chest: Chest, u, v):
    """Lungs stop short of the vertebra and of the descending aorta to its left."""
    r = chest.vertebra_radius
    return ~((v > chest.spine_v - r - 16.0) & (u > -(r + 9.0)) & (u < r + 38.0))


def lung_side(chest: Chest, u, v, s) -> np.ndarray:
    """0 outside the lungs, 1 in the right lung, 2 in the left (broadcast over u, v, s)."""
    cx, cy = chest.cavity
    scale, h = _apex_scale(chest, s)
    common = ((u / cx) ** 2 + (v / cy) ** 2 < 0.985**2) & (h <= 1.0)
    common &= _outside_heart(chest, u, v, s) & _outside_spine(chest, u, v)
    result = np.zeros(np.broadcast(u, v, s).shape, np.uint8)
    for side, code in ((-1, 1), (1, 2)):
        lobe = ((u - side * 0.52 * cx) / (0.58 * cx * scale + 1e-6)) ** 2
        lobe = lobe + ((v - 0.05 * cy) / (1.02 * cy * scale + 1e-6)) ** 2 < 1.0
        here = common & lobe & (side * u > chest.mediastinum_half_width) & (s > chest.dome(u, v, side))
        result[here] = code
    return result


def points_in_lung(chest: Chest, points_xyz: np.ndarray) -> np.ndarray:
    """Whether LPS points (n, 3) lie in a lung."""
    p = np.asarray(points_xyz, float)
    u, v, s = p[:, 0] - chest.centre[0], p[:, 1] - chest.centre[1], p[:, 2] - chest.z_first
    return lung_side(chest, u, v, s) > 0


# ---------------------------------------------------------------------------- one slice


def _superellipse(u, v, a, b, power=2.4):
    return np.abs(u / a) ** power + np.abs(v / b) ** power <= 1.0


def _ribs(chest: Chest, u, v, s):
    """(bone, cortex, cartilage) masks of the ribs crossing this slice."""
    cx, cy = chest.cavity
    rho = np.sqrt((u / cx) ** 2 + (v / cy) ** 2)
    depth = (rho - 1.0) * 0.5 * (cx + cy)  # mm outward from the pleura
    theta = np.abs(np.arctan2(u, v))  # 0 at the back, pi at the front
    rise = s - chest.rib_phase + 0.22 * chest.lung_height * theta / np.pi  # ribs run down to the front
    index, within = np.divmod(rise, chest.rib_pitch)
    height = 0.42 * chest.rib_pitch
    bone = (depth > 1.0) & (depth < 8.0) & (within < height) & (theta > 0.30) & (theta < 2.75)
    bone &= (index >= 1) & (index <= 11)
    cortex = bone & ((depth < 2.5) | (depth > 6.5) | (within < 1.5) | (within > height - 1.5))
    return bone, cortex, bone & (theta > 2.3)


def _spine(chest: Chest, u, v, s):
    """(vertebral body, its cortex, disc, posterior arch, spinal canal) masks."""
    r, vc = chest.vertebra_radius, chest.spine_v
    dist = np.sqrt(u**2 + (v - vc) ** 2)
    body = dist < r
    disc = body & (np.mod(s - chest.rib_phase, 0.13 * chest.lung_height) < 6.0)
    canal_v = vc + r + 9.0
    canal_dist = np.sqrt(u**2 + (v - canal_v) ** 2)
    canal = canal_dist < 7.5
    arch = ((canal_dist >= 7.5) & (canal_dist < 13.0) & (v > vc + r)) | (
        (np.abs(u) < 4.0) & (v > canal_v + 7.0) & (v < canal_v + 38.0))
    return body & ~disc, body & (dist > r - 2.0) & ~disc, disc, arch, canal


def _abdomen(chest: Chest, u, v, s, cavity):
    """Liver under the right dome, spleen and stomach wall under the left."""
    below_right = cavity & (s < chest.dome(u, v, -1)) & (u < 0.25 * chest.cavity[0])
    below_left = cavity & (s < chest.dome(u, v, 1)) & ~below_right
    return below_right, below_left


def outer_layers(chest: Chest, u: np.ndarray, v: np.ndarray, fov_half: float) -> np.ndarray:
    """Air, table, subcutaneous fat and chest wall muscle: the same on every slice."""
    bx, by = chest.body
    hu = np.full(u.shape, AIR, np.float32)
    hu[(v > by + 10.0) & (v < by + 16.0) & (np.abs(u) < 0.85 * fov_half)] = TABLE
    hu[_superellipse(u, v, bx, by)] = FAT
    hu[_superellipse(u, v, bx - chest.fat, by - chest.fat)] = MUSCLE
    return hu


def render_slice(chest: Chest, u: np.ndarray, v: np.ndarray, s: float, outer: np.ndarray):
    """HU (float32) and masks (lung side, thoracic cavity) of the axial slice at height s.

    ``u`` and ``v`` are full 2-D arrays (rows, cols) of body-centred coordinates in mm;
    ``outer`` is :func:`outer_layers` of the same grid.
    """
    cx, cy = chest.cavity
    hu = outer.copy()
    ring = _box_of(u, v, cx + 9.0, cy + 9.0)  # ribs lie just outside the cavity
    bone, cortex, cartilage = _ribs(chest, u[ring], v[ring], s)
    hu_ring = hu[ring]
    hu_ring[bone] = MARROW
    hu_ring[cortex] = CORTICAL_BONE
    hu_ring[cartilage] = CARTILAGE
    cavity = (u / cx) ** 2 + (v / cy) ** 2 <= 1.0
    hu[cavity] = MEDIASTINAL_FAT
    (hu_c, hv, hs), (au, av, as_) = chest.heart()
    hu[((u - hu_c) / au) ** 2 + ((v - hv) / av) ** 2 + ((s - hs) / as_) ** 2 <= 1.0] = BLOOD
    liver, spleen = _abdomen(chest, u, v, s, cavity)
    hu[liver], hu[spleen] = LIVER, SPLEEN
    hu[(np.abs(u) < chest.vertebra_radius + 18.0) & (v > chest.spine_v) & ~cavity & (hu > FAT)] = MUSCLE
    body, body_cortex, disc, arch, canal = _spine(chest, u, v, s)
    hu[body], hu[body_cortex], hu[disc], hu[arch], hu[canal] = MARROW, CORTICAL_BONE, DISC, CORTICAL_BONE, CSF
    side = np.zeros(u.shape, np.uint8)
    inner = _box_of(u, v, cx, cy)  # the lungs lie inside the cavity: test only there
    side[inner] = lung_side(chest, u[inner], v[inner], s)
    lung = side > 0
    # Dependent (posterior) lung is denser, as on every supine scan.
    hu[lung] = (LUNG + 45.0 * v / cy)[lung]
    return hu, side, cavity


def _box_of(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> tuple[slice, slice]:
    """Rows and columns of a (rows, cols) coordinate grid that cover |u| <= half_u, |v| <= half_v."""
    rows = np.flatnonzero(np.abs(v[:, 0]) <= half_v)
    cols = np.flatnonzero(np.abs(u[0, :]) <= half_u)
    if rows.size == 0 or cols.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
