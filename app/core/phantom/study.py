"""One synthetic chest CT study: grid and anatomy, trees, nodules, noise, and its ground truth."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.core.phantom import anatomy
from app.core.progress import Progress
from app.core.phantom.anatomy import Chest
from app.core.phantom.grid import Grid
from app.core.phantom.nodules import Nodule, draw_nodule, place_nodules
from app.core.phantom.tubes import Segment, TreeStyle, blend, draw_tubes, grow_tree


@dataclass(frozen=True)
class Profile:
    name: str
    matrix: int
    pixel_mm: tuple[float, float]
    slice_choices_mm: tuple[float, ...]
    coverage_mm: tuple[float, float] | None  # None: fixed slice count
    slices: tuple[int, int]
    smallest_nodule_mm: float
    finest_vessel_mm: float  # vessel radius below which trees stop branching
    nodules: tuple[int, int]  # fewest, most nodules in a case that has any


PROFILES = {
    "full": Profile("full", 512, (0.6, 0.8), (1.0, 1.25, 1.5, 2.0, 2.5), (260.0, 310.0), (80, 300),
                    3.0, 0.45, (1, 5)),
    # Tiny voxels are ~50 mm³: nodules under 12 mm would be a handful of voxels, useless to tests.
    "tiny": Profile("tiny", 128, (2.6, 2.8), (7.0,), None, (32, 32), 12.0, 0.9, (2, 3)),
}


@dataclass
class Study:
    grid: Grid
    chest: Chest
    hu: np.ndarray  # float32 (z, y, x)
    lung: np.ndarray  # bool
    owner: np.ndarray  # uint8: index + 1 of the nodule owning each ground-truth voxel
    nodules: list[Nodule]
    vessels: list[Segment]
    noise_sd: float


def make_grid(rng: np.random.Generator, profile: Profile) -> Grid:
    pixel = round(float(rng.uniform(*profile.pixel_mm)), 4)
    thickness = float(rng.choice(profile.slice_choices_mm))
    if profile.coverage_mm is None:
        slices = profile.slices[0]
    else:
        slices = int(np.clip(round(rng.uniform(*profile.coverage_mm) / thickness), *profile.slices))
    half = (profile.matrix - 1) / 2 * pixel
    origin = (round(-half, 3), round(-half, 3), round(float(-rng.uniform(100, 400)), 2))
    return Grid(profile.matrix, profile.matrix, slices, pixel, thickness, origin)


# ---------------------------------------------------------------------------- trees


def _hilum(chest: Chest, side: int) -> np.ndarray:
    cx, cy = chest.cavity
    u = side * (chest.mediastinum_half_width + 0.12 * cx)
    s = chest.lung_base + 0.55 * chest.lung_height
    return np.array([chest.centre[0] + u, chest.centre[1] - 0.05 * cy, chest.z_first + s])


def _lobar_directions(side: int, rng, count: int = 4) -> list[np.ndarray]:
    """Trunks fanning out from the hilum to the lobes (x to the left, y to the back, z up)."""
    base = [(0.45 * side, -0.1, 0.9), (0.9 * side, -0.3, -0.1), (0.55 * side, 0.35, -0.8), (0.4 * side, -0.5, -0.7),
            (0.6 * side, 0.6, 0.4), (0.5 * side, -0.6, 0.3)]
    return [np.asarray(d) + rng.normal(scale=0.12, size=3) for d in base[:count]]


def grow_vessels(rng, chest: Chest, profile: Profile) -> list[Segment]:
    """Pulmonary arteries and veins of both lungs: two trees per lung from the hilum."""
    style = TreeStyle(finest_radius=profile.finest_vessel_mm)
    inside = lambda points: anatomy.points_in_lung(chest, points)  # noqa: E731
    segments: list[Segment] = []
    for side in (-1, 1):
        for offset in ((0.0, 0.0, 0.0), (0.0, -12.0, -18.0)):  # artery, then the vein below and in front
            root = _hilum(chest, side) + np.asarray(offset)
            segments += grow_tree(root, _lobar_directions(side, rng, 6), rng.uniform(4.5, 6.0), style, inside, rng)
    return segments


def grow_airways(rng, chest: Chest, profile: Profile) -> list[Segment]:
    """Trachea, main bronchi and the first generations of the bronchial tree."""
    cx, cy = chest.cavity
    top = chest.z_first + chest.lung_base + chest.lung_height + 80.0
    carina = np.array([chest.centre[0], chest.centre[1] - 0.15 * cy, chest.z_first + chest.lung_base + 0.68 * chest.lung_height])
    segments = [Segment((carina[0], carina[1], top), tuple(carina), 8.5, 8.5)]
    style = TreeStyle(finest_radius=max(1.2, 1.5 * profile.finest_vessel_mm), length_per_radius=(5.0, 8.0))
    inside = lambda points: anatomy.points_in_lung(chest, points)  # noqa: E731
    for side in (-1, 1):
        hilum = _hilum(chest, side) + np.array([0.0, 8.0, 6.0])
        segments.append(Segment(tuple(carina), tuple(hilum), 6.0, 5.5))
        segments += grow_tree(hilum, _lobar_directions(side, rng)[:3], 4.5, style, inside, rng)
    return segments


def aorta(chest: Chest) -> list[Segment]:
    """Ascending aorta, arch and descending aorta (unenhanced blood, 40 HU)."""
    cx, cy = chest.cavity
    r = 0.09 * cx
    z0, hs = chest.z_first, chest.heart()[0][2]
    arch_s = chest.lung_base + 0.80 * chest.lung_height
    ascending = (chest.centre[0] - 0.08 * cx, chest.centre[1] - 0.28 * cy)
    descending = (chest.centre[0] + chest.vertebra_radius + 0.6 * r + 4.0, chest.centre[1] + chest.spine_v - 0.55 * chest.vertebra_radius)
    up = Segment((*ascending, z0 + hs), (*ascending, z0 + arch_s), r, r)
    arch = Segment((*ascending, z0 + arch_s), (*descending, z0 + arch_s), r, r)
    down = Segment((*descending, z0 + arch_s), (*descending, z0 - 20.0), r * 0.9, r * 0.9)
    return [up, arch, down]


# ---------------------------------------------------------------------------- the image


def _render_anatomy(chest: Chest, grid: Grid, hu, lung, cavity):
    """Fill ``hu``, ``lung`` and ``cavity`` slice by slice; yields the fraction done."""
    x = grid.axis_mm("x") - np.float32(chest.centre[0])
    y = grid.axis_mm("y") - np.float32(chest.centre[1])
    u, v = np.meshgrid(x, y)  # (rows, cols): u varies along columns, v along rows
    outer = anatomy.outer_layers(chest, u, v, grid.cols * grid.pixel_mm / 2)
    for k, z in enumerate(grid.axis_mm("z")):
        hu[k], side, cavity[k] = anatomy.render_slice(chest, u, v, float(z) - chest.z_first, outer)
        lung[k] = side > 0
        if k % 16 == 0:
            yield k / grid.slices


def _draw_tubes(grid: Grid, hu, lung, cavity, vessels, airways, aortic) -> None:
    coverage = np.zeros(grid.shape, np.uint8)
    draw_tubes(aortic, grid, coverage)
    blend(hu, coverage, anatomy.BLOOD, cavity)
    lung &= coverage == 0
    for segments, value, wall in ((vessels, anatomy.BLOOD, 0.0), (airways, 20.0, 1.5), (airways, anatomy.AIR, 0.0)):
        coverage[:] = 0
        draw_tubes(segments, grid, coverage, extra_radius=wall)
        blend(hu, coverage, value, cavity)


def _noise_and_blur(rng, grid: Grid, hu, noise_sd: float) -> None:
    """Scanner blur and correlated noise: white noise blurred with the image, per slice.

    Blurring white noise of SD s with a Gaussian of sigma p pixels leaves s / (2·sqrt(pi)·p),
    so the white noise is scaled up by that factor to end at ``noise_sd``.
    """
    from scipy import ndimage

    sigma = 0.7
    white_sd = noise_sd * 2.0 * np.sqrt(np.pi) * sigma
    for k in range(grid.slices):
        noisy = hu[k] + rng.standard_normal(hu[k].shape, dtype=np.float32) * np.float32(white_sd)
        hu[k] = ndimage.gaussian_filter(noisy, sigma, mode="nearest")


def nodule_count(rng, profile: Profile, case_index: int) -> int:
    """Every fourth case (the 3rd, 7th, ...) has no nodule: a normal scan is part of the test."""
    if case_index % 4 == 2:
        return 0
    return int(rng.integers(profile.nodules[0], profile.nodules[1] + 1))


def build_study(rng: np.random.Generator, profile: Profile, case_index: int):
    """Generate one study; yields progress and returns the :class:`Study`."""
    grid = make_grid(rng, profile)
    coverage_mm = grid.slices * grid.slice_mm
    chest = anatomy.sample_chest(rng, grid.cols * grid.pixel_mm, coverage_mm, grid.origin[2])
    vessels = grow_vessels(rng, chest, profile)
    airways = grow_airways(rng, chest, profile)
    hu = np.empty(grid.shape, np.float32)
    lung = np.empty(grid.shape, bool)
    cavity = np.empty(grid.shape, bool)
    for fraction in _render_anatomy(chest, grid, hu, lung, cavity):
        yield Progress(0.5 * fraction, "drawing the anatomy")
    _draw_tubes(grid, hu, lung, cavity, vessels, airways, aorta(chest))
    yield Progress(0.7, "placing the nodules")
    owner = np.zeros(grid.shape, np.uint8)
    nodules = place_nodules(rng, chest, vessels, nodule_count(rng, profile, case_index), profile.smallest_nodule_mm)
    for tag, nodule in enumerate(nodules, 1):
        draw_nodule(nodule, grid, hu, lung, owner, tag)
    noise_sd = float(rng.uniform(10.0, 20.0))
    _noise_and_blur(rng, grid, hu, noise_sd)
    yield Progress(1.0, "phantom built")
    return Study(grid, chest, hu, lung, owner, nodules, vessels, noise_sd)
