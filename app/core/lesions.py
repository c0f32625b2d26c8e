"""Lesions: the one rule for finding, measuring and matching them, shared by every view.

The lesion list, the findings, the evaluation and the compare view all call these functions,
so "lesion 3, 8.4 mm" means the same thing everywhere.

- A lesion is a connected component (26-connected by default) of one class in a label map.
- Size is measured as Lung-RADS measures it: on the axial slice of greatest extent, the long
  axis (greatest in-plane diameter) and the short axis (greatest extent perpendicular to it),
  in millimetres with the real, possibly anisotropic, pixel spacing; the mean diameter is
  their average. The volume (mL) is reported beside it. "Axial" means a slice k of the
  volume's grid, i.e. the acquisition plane (axial for every chest CT).
- Two label maps are compared lesion by lesion with :func:`match_lesions`.
"""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from app.core.atomic import write_text_atomic
from app.core.volume import Volume

# Directions (radians) at which in-plane calipers are laid; 0.5° steps keep the error of a
# diameter below 0.004 % (1 - cos 0.25°), far under a pixel.
_CALIPER_ANGLES = np.deg2rad(np.arange(0.0, 180.0, 0.5))


@dataclass(frozen=True)
class Lesion:
    lesion_id: int  # 1-based, ordered by descending volume
    label: int  # class value in the semantic label map
    centre_index: tuple[float, float, float]  # (k, j, i) centroid
    centre_lps: tuple[float, float, float]  # mm, via Volume.index_to_patient
    long_axis_mm: float  # on the axial slice of greatest extent
    short_axis_mm: float  # greatest extent perpendicular to the long axis, same slice
    mean_diameter_mm: float  # Lung-RADS: (long + short) / 2
    volume_ml: float
    voxel_count: int
    mean_hu: float | None  # padding voxels excluded; None when every voxel is padding
    slice_range: tuple[int, int]  # first, last k (inclusive)
    bbox: tuple[int, int, int, int, int, int]  # k0, k1, j0, j1, i0, i1 (exclusive ends)


# ---------------------------------------------------------------------------- instances


def _structure(connectivity: int) -> np.ndarray:
    from scipy import ndimage

    ranks = {6: 1, 18: 2, 26: 3}
    if connectivity not in ranks:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    return ndimage.generate_binary_structure(3, ranks[connectivity])


def label_instances(labels: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Split a semantic label map into lesions: connected components of each class.

    Returns an int32 instance map (0 = background) whose ids 1..n are ordered by descending
    voxel count; equal sizes keep the order in which scipy meets them (raster order of their
    first voxel, classes in ascending value), so the numbering is deterministic.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3-D label map, got shape {labels.shape}")
    structure = _structure(connectivity)
    components = np.zeros(labels.shape, dtype=np.int32)
    box = occupied_box(labels)
    if box is None:
        return components, 0
    # Lesions fill a sliver of a scan: labelling, and numbering by size, only the box around
    # them is many times faster than any pass over the whole volume.
    inner, count = labels[box], 0
    inner_components = np.zeros(inner.shape, dtype=np.int32)
    for value in np.unique(inner):
        if value == 0:
            continue
        comp, n = ndimage.label(inner == value, structure=structure)
        inner_components[comp > 0] = comp[comp > 0] + count
        count += n
    inner_components = _renumber_by_size(inner_components, count)
    if inner.shape == labels.shape:  # the map is its own box (the caller cropped it): no second copy
        return inner_components, count
    components[box] = inner_components
    return components, count


def occupied_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every non-zero voxel of a 3-D map: its slices from one
    projection, then rows and columns from those slices only."""
    slices = np.flatnonzero(np.any(labels, axis=(1, 2)))
    if slices.size == 0:
        return None
    k = slice(int(slices[0]), int(slices[-1]) + 1)
    plane = np.any(labels[k], axis=0)
    rows, columns = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return k, slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)


def _renumber_by_size(components: np.ndarray, count: int) -> np.ndarray:
    if count == 0:
        return components
    # Only the labelled voxels are read and written: lesions are a sliver of a scan, and a gather
    # over every voxel took most of the post-processing of a 119-slice scan.
    flat = components.reshape(-1)
    inside = np.flatnonzero(flat)
    ids = flat[inside]
    sizes = np.bincount(ids, minlength=count + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # stable: ties keep their first-met order
    new_id = np.zeros(count + 1, dtype=np.int32)
    new_id[order + 1] = np.arange(1, count + 1, dtype=np.int32)
    flat[inside] = new_id[ids]  # in place: the caller's array is its own, freshly labelled
    return components


# ---------------------------------------------------------------------------- measurement


def _calipers(points_mm: np.ndarray, pixel_mm: tuple[float, float]) -> tuple[float, float]:
    """Long axis and perpendicular extent (mm) of a set of pixels given by their centres.

    The outline measured is the one marching squares draws at the mask's 0.5 level: it runs
    through the midpoints of the boundary pixels' edges, so along a direction u the extent is
    the spread of the centres' projections plus max(|u_x|·dx, |u_y|·dy) (each pixel seen as
    the diamond spanned by its edge midpoints). Taking the pixels' full squares instead would
    add their corners and overstate every diagonal diameter by up to 0.4 pixel.
    """
    points_mm = _hull_points(points_mm)
    cos, sin = np.cos(_CALIPER_ANGLES), np.sin(_CALIPER_ANGLES)
    dy, dx = pixel_mm
    projection = points_mm[:, 1:2] * cos + points_mm[:, 0:1] * sin  # (points, angles)
    pixel_width = np.maximum(np.abs(cos) * dx, np.abs(sin) * dy)
    extent = projection.max(axis=0) - projection.min(axis=0) + pixel_width
    best = int(np.argmax(extent))
    perpendicular = (best + len(_CALIPER_ANGLES) // 2) % len(_CALIPER_ANGLES)
    return float(extent[best]), float(extent[perpendicular])


def _hull_points(points: np.ndarray) -> np.ndarray:
    """The convex hull's vertices (they carry every caliper extent); all points if degenerate."""
    if len(points) < 16:
        return points
    from scipy.spatial import ConvexHull, QhullError

    try:
        return points[ConvexHull(points).vertices]
    except QhullError:  # collinear pixels: the hull is a segment, the points will do
        return points


def _boundary_pixels(mask2d: np.ndarray) -> np.ndarray:
    """(j, i) of the pixels on the rim of a 2-D mask: the hull never needs the interior."""
    from scipy import ndimage

    rim = mask2d & ~ndimage.binary_erosion(mask2d)
    return np.argwhere(rim)


def _axial_diameters(component: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[float, float]:
    """(long, short) in mm on the axial slice whose long axis is greatest."""
    best = (0.0, 0.0, 0)
    for k in range(component.shape[0]):
        plane = component[k]
        area = int(plane.sum())
        if area == 0:
            continue
        points_mm = _boundary_pixels(plane) * np.asarray(spacing_yx, float)
        long_mm, short_mm = _calipers(points_mm, spacing_yx)
        # Ties on the long axis go to the slice with the larger area (more of the lesion).
        if (long_mm, area) > (best[0], best[2]):
            best = (long_mm, short_mm, area)
    return best[0], best[1]


def _mean_hu(volume: Volume, component: np.ndarray, box: tuple[slice, ...]) -> float | None:
    inside = component
    if volume.padding_mask is not None:
        inside = component & ~np.asarray(volume.padding_mask)[box]
    if not inside.any():
        return None
    return float(np.asarray(volume.voxels)[box][inside].astype(np.float64).mean())


def _measure(lesion_id: int, label: int, component: np.ndarray, box: tuple[slice, ...],
             volume: Volume) -> Lesion:
    offsets = np.array([s.start for s in box], dtype=float)
    centre = tuple(float(c) for c in np.argwhere(component).mean(axis=0) + offsets)
    long_mm, short_mm = _axial_diameters(component, (volume.spacing[1], volume.spacing[2]))
    voxel_count = int(component.sum())
    k_slices = np.flatnonzero(component.any(axis=(1, 2))) + box[0].start
    return Lesion(
        lesion_id=lesion_id,
        label=label,
        centre_index=centre,  # type: ignore[arg-type]
        centre_lps=tuple(float(v) for v in volume.index_to_patient(*centre)),  # type: ignore[arg-type]
        long_axis_mm=long_mm,
        short_axis_mm=short_mm,
        mean_diameter_mm=(long_mm + short_mm) / 2.0,
        volume_ml=voxel_count * volume.voxel_volume_ml,
        voxel_count=voxel_count,
        mean_hu=_mean_hu(volume, component, box),
        slice_range=(int(k_slices[0]), int(k_slices[-1])),
        bbox=(box[0].start, box[0].stop, box[1].start, box[1].stop, box[2].start, box[2].stop),
    )


def _dominant_label(labels: np.ndarray | None, component: np.ndarray, box: tuple[slice, ...]) -> int:
    """The class most of the lesion's voxels carry (an instance map may straddle classes)."""
    if labels is None:
        return 1
    values = np.asarray(labels)[box][component]
    values = values[values != 0]
    if values.size == 0:
        return 1
    uniques, counts = np.unique(values, return_counts=True)
    return int(uniques[np.argmax(counts)])


def lesion_table(labels: np.ndarray | None, volume: Volume, *, min_voxels: int = 1,
                 instances: np.ndarray | None = None, connectivity: int = 26) -> list[Lesion]:
    """Measure every lesion of a label map lying on ``volume``'s grid.

    ``labels`` is a semantic map (0 = background). Lesions are its connected components
    (:func:`label_instances`) unless ``instances`` gives them explicitly (value = lesion id,
    e.g. a ground-truth instance mask); then ``labels`` only supplies each lesion's class and
    may be None. Lesions smaller than ``min_voxels`` are left out; the others keep their ids.
    Returned in descending voxel count (ties by id).
    """
    from scipy import ndimage

    reference = labels if labels is not None else instances
    if reference is None:
        raise ValueError("lesion_table needs a label map or an instance map")
    for name, array in (("labels", labels), ("instances", instances)):
        if array is not None and tuple(np.shape(array)) != tuple(volume.shape):
            raise ValueError(f"{name} shape {np.shape(array)} does not match the volume {volume.shape}")
    if instances is None:
        instances, _ = label_instances(np.asarray(labels), connectivity)
    instances = np.asarray(instances)
    if instances.dtype.kind not in "iu":
        raise ValueError(f"an instance map holds integer lesion ids, not {instances.dtype}")
    lesions = []
    for index, box in enumerate(_find_objects(instances), 1):
        if box is None:
            continue
        component = instances[box] == index
        if int(component.sum()) < min_voxels:
            continue
        label = _dominant_label(labels, component, box)
        lesions.append(_measure(index, label, component, box, volume))
    return sorted(lesions, key=lambda lesion: (-lesion.voxel_count, lesion.lesion_id))


def _find_objects(instances: np.ndarray) -> list[tuple[slice, ...] | None]:
    """``ndimage.find_objects`` read from the box around the lesions, not the whole scan."""
    from scipy import ndimage

    box = occupied_box(instances)
    if box is None:
        return []
    return [None if found is None else tuple(slice(f.start + b.start, f.stop + b.start) for f, b in zip(found, box))
            for found in ndimage.find_objects(instances[box])]


def lesion_elongation(instances: np.ndarray, count: int, spacing: Sequence[float]) -> np.ndarray:
    """How tube- or plate-like each lesion 1..count is: sqrt(largest / smallest) principal
    second moment of its voxels in millimetres (1 for a ball, ~2 for a 2:1 ellipsoid).

    The moments are those of the solid voxel boxes (centre covariance plus spacing²/12 on the
    diagonal), so a lesion one slice thick is measured as a thin plate, not as a line. Vessels
    that a slice-wise network marks slice after slice become long tubes, and a dome cut by one
    slice a wide plate, while nodules stay near 1: the classic 3-D false-positive filter.
    """
    inside = np.nonzero(instances)
    ids = instances[inside].astype(np.int64)
    weights = np.bincount(ids, minlength=count + 1)[1:].astype(float)
    coords = [axis.astype(float) * float(step) for axis, step in zip(inside, spacing)]
    safe = np.maximum(weights, 1.0)
    means = [np.bincount(ids, c, minlength=count + 1)[1:] / safe for c in coords]
    moments = np.zeros((count, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            cross = np.bincount(ids, coords[a] * coords[b], minlength=count + 1)[1:] / safe
            moments[:, a, b] = moments[:, b, a] = cross - means[a] * means[b]
        moments[:, a, a] += float(spacing[a]) ** 2 / 12.0
    eig = np.linalg.eigvalsh(moments) if count else np.zeros((0, 3))
    return np.sqrt(np.maximum(eig[:, -1], 1e-12) / np.maximum(eig[:, 0], 1e-12))


# ---------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class LesionMatch:
    matched: list[tuple[int, int, float]]  # (reference id, test id, Dice of the pair)
    missed: list[int]  # reference ids with no partner (false negatives)
    added: list[int]  # test ids with no partner (false positives)


def _overlaps(reference: np.ndarray, test: np.ndarray) -> list[tuple[int, int, int]]:
    """(ref id, test id, overlapping voxels) for every pair that shares at least one voxel."""
    both = (reference > 0) & (test > 0)
    ref_ids = reference[both].astype(np.int64)
    test_ids = test[both].astype(np.int64)
    stride = int(test_ids.max()) + 1 if test_ids.size else 1
    pairs, counts = np.unique(ref_ids * stride + test_ids, return_counts=True)
    return [(int(p // stride), int(p % stride), int(c)) for p, c in zip(pairs, counts)]


def match_lesions(reference_instances: np.ndarray, test_instances: np.ndarray) -> LesionMatch:
    """Pair the lesions of two instance maps one to one.

    The rule: every (reference, test) pair that shares at least one voxel is a candidate.
    Candidates are taken greedily in order of descending overlap (voxel count), then
    descending Dice, then ascending reference id and test id; a candidate is accepted when
    neither of its lesions is already paired. Reference lesions left unpaired are *missed*,
    test lesions left unpaired are *added*. Dice of a pair = 2·|A∩B| / (|A| + |B|) with
    whole-lesion sizes. Lesion ids are the map values (0 = background).
    """
    reference = np.asarray(reference_instances)
    test = np.asarray(test_instances)
    if reference.shape != test.shape:
        raise ValueError(f"instance maps differ in shape: {reference.shape} vs {test.shape}")
    ref_sizes = _sizes(reference)
    test_sizes = _sizes(test)
    matched = pair_lesions(_overlaps(reference, test), ref_sizes, test_sizes)
    missed = sorted(set(ref_sizes) - {r for r, _, _ in matched})
    added = sorted(set(test_sizes) - {t for _, t, _ in matched})
    return LesionMatch(matched=matched, missed=missed, added=added)


def pair_lesions(overlaps, ref_sizes, test_sizes) -> list[tuple[int, int, float]]:
    """The pairing rule of :func:`match_lesions` on precomputed (ref id, test id, overlapping
    voxels) triples and whole-lesion sizes (mappings or arrays indexed by id): sorted
    (ref id, test id, Dice) pairs."""
    candidates = []
    for ref_id, test_id, overlap in overlaps:
        dice = 2.0 * overlap / (ref_sizes[ref_id] + test_sizes[test_id])
        candidates.append((-overlap, -dice, ref_id, test_id))
    matched, used_ref, used_test = [], set(), set()
    for _, neg_dice, ref_id, test_id in sorted(candidates):
        if ref_id in used_ref or test_id in used_test:
            continue
        used_ref.add(ref_id)
        used_test.add(test_id)
        matched.append((ref_id, test_id, -neg_dice))
    return sorted(matched)


def _sizes(instances: np.ndarray) -> dict[int, int]:
    ids, counts = np.unique(instances[instances > 0], return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


# ---------------------------------------------------------------------------- CSV

LESION_COLUMNS = (
    "lesion_id", "label", "centre_x_mm", "centre_y_mm", "centre_z_mm", "long_axis_mm",
    "short_axis_mm", "mean_diameter_mm", "volume_ml", "mean_hu", "slice_first", "slice_last",
    "voxel_count",
)
_INT_COLUMNS = {"lesion_id", "label", "slice_first", "slice_last", "voxel_count"}


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _lesion_row(lesion: Lesion) -> dict[str, str | int]:
    x, y, z = lesion.centre_lps
    return {
        "lesion_id": lesion.lesion_id,
        "label": lesion.label,
        "centre_x_mm": _fmt(x, 2),
        "centre_y_mm": _fmt(y, 2),
        "centre_z_mm": _fmt(z, 2),
        "long_axis_mm": _fmt(lesion.long_axis_mm, 2),
        "short_axis_mm": _fmt(lesion.short_axis_mm, 2),
        "mean_diameter_mm": _fmt(lesion.mean_diameter_mm, 2),
        "volume_ml": _fmt(lesion.volume_ml, 4),
        "mean_hu": _fmt(lesion.mean_hu, 1),
        "slice_first": lesion.slice_range[0],
        "slice_last": lesion.slice_range[1],
        "voxel_count": lesion.voxel_count,
    }


def _extra_columns(extra: dict[int, dict] | None) -> list[str]:
    columns: list[str] = []
    for values in (extra or {}).values():
        columns += [c for c in values if c not in columns and c not in LESION_COLUMNS]
    return columns


def write_lesion_csv(lesions: Iterable[Lesion], path: str | os.PathLike,
                     extra: dict[int, dict] | None = None) -> None:
    """Write a lesion table as CSV (atomically); ``extra`` adds columns per lesion id."""
    columns = list(LESION_COLUMNS) + _extra_columns(extra)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for lesion in lesions:
        row = _lesion_row(lesion)
        row.update({k: v for k, v in (extra or {}).get(lesion.lesion_id, {}).items() if k in columns})
        writer.writerow(row)
    write_text_atomic(path, buffer.getvalue())


def _parse(column: str, text: str):
    if text == "":
        return None
    if column in _INT_COLUMNS:
        return int(text)
    if column in LESION_COLUMNS:
        return float(text)
    for kind in (int, float):  # extra columns: numbers when they read as numbers
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_lesion_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a lesion CSV as dicts: ids and counts as int, measurements as float, '' as None."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("lesion_id",) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a lesion table (no column {missing[0]!r})")
        return [{c: _parse(c, v or "") for c, v in row.items()} for row in reader]


def equivalent_diameter_mm(volume_ml: float) -> float:
    """Diameter of the sphere with this volume: a shape-free size for filters and plots."""
    return 2.0 * (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)


__all__: Sequence[str] = (
    "Lesion", "LesionMatch", "LESION_COLUMNS", "label_instances", "lesion_table",
    "match_lesions", "write_lesion_csv", "read_lesion_csv", "equivalent_diameter_mm",
)
