"""How a scan is put on the screen: window/level, radiological orientation, reformats, MIP, measurements.

Pure numpy, no Qt: the viewer widgets call these per frame, tests call them directly.

Orientation. Whatever the patient position (head- or feet-first, supine or prone) and however
the slices were acquired, every view is drawn in the radiological convention:

- axial: patient's right on the screen's left, anterior at the top (seen from the feet);
- coronal: patient's right on the screen's left, superior at the top (seen from the front);
- sagittal: anterior on the screen's left, superior at the top (seen from the patient's left).

This is done without copying voxels: :func:`display_axes` finds, for each patient axis, the
array axis nearest to it (oblique scans snap to the nearest one) and whether it runs backwards;
:func:`canonical_view` is then a transposed, flipped numpy view whose axes run
(superior→inferior, anterior→posterior, right→left). Each view slices one of those axes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Radiologists' presets as (width, level) in HU, in the order of the number keys 1–5.
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -600.0),
    "mediastinum": (400.0, 40.0),
    "abdomen": (350.0, 40.0),
    "bone": (2500.0, 480.0),
    "brain": (80.0, 40.0),
}

VIEWS = ("axial", "coronal", "sagittal")

# Canonical axis c runs along LPS component _CANON_LPS[c] in direction _CANON_SIGN[c]:
# 0 = toward inferior (-z), 1 = toward posterior (+y), 2 = toward the patient's left (+x).
_CANON_LPS = (2, 1, 0)
_CANON_SIGN = (-1.0, 1.0, 1.0)

# For each view: the canonical axis it slices through, then the canonical axes of its rows, columns.
VIEW_AXES: dict[str, tuple[int, int, int]] = {
    "axial": (0, 1, 2),
    "coronal": (1, 0, 2),
    "sagittal": (2, 0, 1),
}


# --- window / level -------------------------------------------------------------------------

def window_bounds(width: float, level: float) -> tuple[float, float]:
    """HU shown as black and as white for a window (width, level)."""
    width = max(float(width), 1.0)
    return level - width / 2.0, level + width / 2.0


def window_lut_int16(width: float, level: float, inverted: bool = False) -> np.ndarray:
    """A 65536-entry uint8 table indexed by int16 voxels *viewed as uint16*.

    One fancy-index through it turns a slice into display bytes: cheaper per frame than any
    float rescale, and the table itself is rebuilt only when the window changes.
    """
    hu = np.arange(65536, dtype=np.int64).astype(np.uint16).view(np.int16).astype(np.float32)
    lut = window_to_uint8(hu, width, level)
    return 255 - lut if inverted else lut


def window_to_uint8(values: np.ndarray, width: float, level: float, inverted: bool = False) -> np.ndarray:
    """Map HU to display grey levels: below the window black, above white, linear between."""
    low, high = window_bounds(width, level)
    scaled = (np.asarray(values, dtype=np.float32) - low) * (255.0 / (high - low))
    grey = np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
    return 255 - grey if inverted else grey


def apply_window(slice_hu: np.ndarray, lut_int16: np.ndarray | None, width: float, level: float,
                 inverted: bool = False) -> np.ndarray:
    """Display bytes for one 2D slice: through the int16 table when possible, else computed."""
    if slice_hu.dtype == np.int16 and lut_int16 is not None:
        return lut_int16[np.ascontiguousarray(slice_hu).view(np.uint16)]
    return window_to_uint8(slice_hu, width, level, inverted)


def default_window(default: tuple[float, float] | None, modality: str = "CT",
                   sample: np.ndarray | None = None) -> tuple[float, float]:
    """(width, level) for the 0 key: the DICOM's own window; else soft tissue for CT; else (MR,
    PET ...) the 1st–99th percentile of a sample slice, as most viewers do for unwindowed series."""
    if default is not None and default[1] > 0:
        center, width = default
        return float(width), float(center)
    if modality == "CT":
        return PRESETS["mediastinum"]
    if sample is not None and np.size(sample):
        low, high = np.percentile(np.asarray(sample, dtype=np.float32), [1, 99])
        if high > low:
            return float(high - low), float((high + low) / 2)
    return 2000.0, 1000.0


# --- text around the image -----------------------------------------------------------------

def dicom_date(text) -> str:
    """DICOM dates (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    text = str(text or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


def series_caption(volume) -> str:
    """'Chest 1 · CT · 2023-07-01' from a volume's display description (never identifiers)."""
    d = volume.description or {}
    title = d.get("series_description") or d.get("series") or d.get("description") or ""
    parts = [title, d.get("modality") or volume.modality, dicom_date(d.get("date", ""))]
    return " · ".join(p for p in parts if p)


# --- orientation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class DisplayAxes:
    """For each canonical axis (S→I, A→P, R→L): the array axis (0=k, 1=j, 2=i) and whether it is flipped."""

    array_axis: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]
    # LPS unit vector of each array axis (k, j, i), kept to name oblique edges honestly.
    axis_lps: tuple[tuple[float, float, float], ...]

    def canonical_axis_of(self, array_axis: int) -> int:
        return self.array_axis.index(array_axis)


def _array_axis_vectors(direction) -> np.ndarray:
    """Rows = LPS unit vectors of array axes (k, j, i); the direction matrix's columns are (i, j, k)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    return np.stack([d[:, 2], d[:, 1], d[:, 0]])


def display_axes(direction) -> DisplayAxes:
    """Match each patient axis to the array axis nearest to it (oblique → nearest axis)."""
    vectors = _array_axis_vectors(direction)
    best = max(itertools.permutations(range(3)),
               key=lambda perm: sum(abs(vectors[perm[c], _CANON_LPS[c]]) for c in range(3)))
    flipped = tuple(bool(np.sign(vectors[best[c], _CANON_LPS[c]]) != _CANON_SIGN[c]) for c in range(3))
    return DisplayAxes(tuple(best), flipped, tuple(tuple(v) for v in vectors))


def canonical_view(voxels: np.ndarray, axes: DisplayAxes) -> np.ndarray:
    """The voxels as a (S→I, A→P, R→L) numpy view: transposes and flips, never a copy."""
    view = voxels.transpose(axes.array_axis)
    flips = tuple(slice(None, None, -1) if f else slice(None) for f in axes.flipped)
    return view[flips]


def _mirrored(value: float, n: int, flipped: bool) -> float:
    return (n - 1 - float(value)) if flipped else float(value)


def canonical_to_array(canonical_index, axes: DisplayAxes, shape) -> tuple[float, float, float]:
    """Array (k, j, i) of a canonical (S→I, A→P, R→L) index; fractional indices allowed."""
    out = [0.0, 0.0, 0.0]
    for c, a in enumerate(axes.array_axis):
        out[a] = _mirrored(canonical_index[c], shape[a], axes.flipped[c])
    return tuple(out)


def array_to_canonical(array_index, axes: DisplayAxes, shape) -> tuple[float, float, float]:
    """Canonical (S→I, A→P, R→L) index of an array (k, j, i); each axis's flip is its own inverse."""
    return tuple(_mirrored(array_index[a], shape[a], axes.flipped[c]) for c, a in enumerate(axes.array_axis))


def canonical_spacing(spacing, axes: DisplayAxes) -> tuple[float, float, float]:
    """Voxel size (mm) along each canonical axis."""
    return tuple(float(spacing[a]) for a in axes.array_axis)


_LETTERS = {0: ("R", "L"), 1: ("A", "P"), 2: ("I", "S")}


def direction_letters(vector_lps, min_share: float = 0.3) -> str:
    """Patient direction letters of an LPS vector, strongest first: (1,0,0) → "L", oblique → "LA"."""
    v = np.asarray(vector_lps, dtype=float)
    order = np.argsort(-np.abs(v))
    letters = [_LETTERS[int(a)][int(v[a] > 0)] for a in order if abs(v[a]) >= min_share]
    return "".join(letters[:2]) or "?"


def _screen_vector(axes: DisplayAxes, canonical_axis: int) -> np.ndarray:
    """LPS direction in which a canonical axis's index grows on screen (from the scan's true axes)."""
    a = axes.array_axis[canonical_axis]
    vector = np.asarray(axes.axis_lps[a], dtype=float)
    return -vector if axes.flipped[canonical_axis] else vector


def orientation_letters(view: str, axes: DisplayAxes) -> dict[str, str]:
    """Letters at the edges of a view: {'left','right','top','bottom'} (e.g. axial R, L, A, P)."""
    _, rows, cols = VIEW_AXES[view]
    right = _screen_vector(axes, cols)
    down = _screen_vector(axes, rows)
    return {"left": direction_letters(-right), "right": direction_letters(right),
            "top": direction_letters(-down), "bottom": direction_letters(down)}


# --- slices, reformats and MIP ------------------------------------------------------------

def view_slice(canonical: np.ndarray, view: str, index: int, slab_voxels: int = 1) -> np.ndarray:
    """The 2D image of a view at a canonical slice index (rows down, columns right on screen).

    With ``slab_voxels`` > 1 it is the maximum intensity projection over that many slices
    centred on ``index`` — the thick slab radiologists use to tell nodules from vessels.
    """
    axis, rows, cols = VIEW_AXES[view]
    n = canonical.shape[axis]
    index = int(np.clip(index, 0, n - 1))
    before = (slice(None),) * axis
    if slab_voxels <= 1:
        # Basic indexing: a view, no copy; the remaining axes are already (rows, cols).
        return canonical[before + (index,)]
    lo = max(0, index - slab_voxels // 2)
    hi = min(n, lo + slab_voxels)
    return canonical[before + (slice(lo, hi),)].max(axis=axis)


def slab_voxels(slab_mm: float, spacing_mm: float) -> int:
    """How many slices a slab of ``slab_mm`` covers (at least 1, odd so it centres on the slice)."""
    if slab_mm <= 0:
        return 1
    n = max(1, int(round(slab_mm / max(spacing_mm, 1e-6))))
    return n if n % 2 == 1 else n + 1


def view_pixel_size(view: str, canonical_spacing_mm) -> tuple[float, float]:
    """(row height, column width) in mm of a view's pixels: the aspect that keeps anatomy unsquashed."""
    _, rows, cols = VIEW_AXES[view]
    return float(canonical_spacing_mm[rows]), float(canonical_spacing_mm[cols])


def view_index_to_canonical(view: str, slice_index: float, row: float, col: float) -> tuple[float, float, float]:
    """Canonical index of a pixel (row, col) in a view showing ``slice_index``."""
    axis, rows, cols = VIEW_AXES[view]
    out = [0.0, 0.0, 0.0]
    out[axis], out[rows], out[cols] = slice_index, row, col
    return tuple(out)


def loaded_along_view(loaded: np.ndarray | None, view: str, axes: DisplayAxes, index: int):
    """Which part of a view is loaded: (slice_loaded, row_mask, col_mask) for progressive display.

    Slices arrive along array axis k; depending on the view, k is the slice axis, the rows or
    the columns. Masks are None when everything along them is loaded.
    """
    if loaded is None or loaded.all():
        return True, None, None
    axis, rows, cols = VIEW_AXES[view]
    k_canonical = axes.canonical_axis_of(0)
    along = loaded[::-1] if axes.flipped[k_canonical] else loaded
    if k_canonical == axis:
        return bool(along[int(index)]), None, None
    if k_canonical == rows:
        return True, along, None
    return True, None, along


# --- what is under the cursor, and measurements ------------------------------------------

def voxel_value(voxels: np.ndarray, kji) -> float | None:
    """Voxel value at a (k, j, i) index (nearest voxel), or None outside the volume."""
    idx = tuple(int(round(v)) for v in kji)
    if any(v < 0 or v >= n for v, n in zip(idx, voxels.shape)):
        return None
    return float(voxels[idx])


def ruler_distance_mm(p0_mm, p1_mm) -> float:
    """Length of a ruler between two points given in screen millimetres (already spacing-scaled)."""
    return float(np.hypot(p1_mm[0] - p0_mm[0], p1_mm[1] - p0_mm[1]))


def ellipse_mask(shape, centre_rc, radii_rc) -> np.ndarray:
    """Pixels of a 2D image whose centres lie inside an axis-aligned ellipse (rows, cols units)."""
    rr, cc = np.ogrid[:shape[0], :shape[1]]
    ry, rx = max(radii_rc[0], 1e-6), max(radii_rc[1], 1e-6)
    return ((rr - centre_rc[0]) / ry) ** 2 + ((cc - centre_rc[1]) / rx) ** 2 <= 1.0


@dataclass(frozen=True)
class RoiStats:
    mean_hu: float | None
    sd_hu: float | None
    area_mm2: float
    pixels: int


def roi_stats(image_hu: np.ndarray, inside: np.ndarray, pixel_size_mm, padding: np.ndarray | None = None) -> RoiStats:
    """Mean and SD (HU) of the pixels inside an ROI, padding excluded; area of the ROI in mm²."""
    area = float(inside.sum()) * float(pixel_size_mm[0]) * float(pixel_size_mm[1])
    counted = inside if padding is None else inside & ~padding
    values = np.asarray(image_hu, dtype=np.float64)[counted]
    if values.size == 0:
        return RoiStats(None, None, area, 0)
    return RoiStats(float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0,
                    area, int(values.size))


# --- overlays ------------------------------------------------------------------------------

# Distinct colours for labels without a colour of their own (nodule red first).
DEFAULT_LABEL_COLOURS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]


def rgb_of(colour) -> tuple[int, int, int]:
    """A colour as model cards and SEG files give it: "#rrggbb", (r, g, b) 0–255 or 0–1 floats."""
    if isinstance(colour, str):
        text = colour.lstrip("#")
        if len(text) != 6:
            raise ValueError(f"not a #rrggbb colour: {colour!r}")
        return tuple(int(text[n:n + 2], 16) for n in (0, 2, 4))
    values = [float(v) for v in list(colour)[:3]]
    if all(v <= 1.0 for v in values) and any(0 < v < 1 for v in values):
        values = [v * 255 for v in values]
    return tuple(int(round(min(max(v, 0), 255))) for v in values)


def label_colour(colours: dict, value: int) -> tuple[int, int, int]:
    """The colour of a label value: its own if given, else a distinct default."""
    if value in colours:
        return rgb_of(colours[value])
    return DEFAULT_LABEL_COLOURS[(value - 1) % len(DEFAULT_LABEL_COLOURS)]


def label_lut(colours: dict, hidden=()) -> np.ndarray:
    """256×4 RGBA table for a uint8 label slice: 0 and hidden labels transparent."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    for value in range(1, 256):
        lut[value] = (*label_colour(colours, value), 255)
    for value in hidden:
        if 0 < value < 256:
            lut[value, 3] = 0
    return lut


def label_slice_uint8(labels_2d: np.ndarray) -> np.ndarray:
    """Label values as uint8 for a 256-entry table (instance ids above 255 wrap, never vanish)."""
    if labels_2d.dtype == np.uint8:
        return np.ascontiguousarray(labels_2d)
    wrapped = np.where(labels_2d > 0, (labels_2d.astype(np.int64) - 1) % 255 + 1, 0)
    return wrapped.astype(np.uint8)


def outline(labels_2d: np.ndarray) -> np.ndarray:
    """Keep only the boundary pixels of each label region (a pixel whose 4-neighbours differ)."""
    edge = np.zeros(labels_2d.shape, dtype=bool)
    edge[1:, :] |= labels_2d[1:, :] != labels_2d[:-1, :]
    edge[:-1, :] |= labels_2d[:-1, :] != labels_2d[1:, :]
    edge[:, 1:] |= labels_2d[:, 1:] != labels_2d[:, :-1]
    edge[:, :-1] |= labels_2d[:, :-1] != labels_2d[:, 1:]
    return np.where(edge, labels_2d, 0).astype(labels_2d.dtype)


def heat_lut(alpha: int = 255) -> np.ndarray:
    """256×4 table for probabilities 0..1 scaled to 0..255: dark red → yellow → white; 0 transparent."""
    t = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(t * 3, 0, 1), np.clip(t * 3 - 1, 0, 1), np.clip(t * 3 - 2, 0, 1)], axis=1)
    lut = np.concatenate([(rgb * 255).astype(np.uint8), np.full((256, 1), alpha, np.uint8)], axis=1)
    lut[0, 3] = 0
    return lut


def probability_to_uint8(prob_2d: np.ndarray, threshold: float) -> np.ndarray:
    """Probabilities to heat-map bytes: below the threshold 0 (transparent), else 1..255."""
    p = np.asarray(prob_2d, dtype=np.float32)
    scaled = np.clip(p * 255.0 + 0.5, 1, 255).astype(np.uint8)
    return np.where(p >= threshold, scaled, 0).astype(np.uint8)


# --- a scan ready for display --------------------------------------------------------------

class DisplayedScan:
    """A volume with its radiological-orientation views, built in microseconds (no voxel copies)."""

    def __init__(self, volume):
        self.volume = volume
        self.axes = display_axes(volume.direction)
        self.canonical = canonical_view(volume.voxels, self.axes)
        self.spacing = canonical_spacing(volume.spacing, self.axes)
        self.padding = None if volume.padding_mask is None else self.orient(volume.padding_mask)
        self.inverted = str(volume.photometric).upper() == "MONOCHROME1"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.voxels.shape)

    def orient(self, array_on_grid: np.ndarray) -> np.ndarray:
        """Any array on the volume's (k, j, i) grid (labels, probabilities) in canonical order."""
        if array_on_grid.shape[:3] != self.shape:
            raise ValueError(f"overlay shape {array_on_grid.shape} does not match the scan {self.shape}")
        return canonical_view(array_on_grid, self.axes)

    def to_canonical(self, kji) -> tuple[int, int, int]:
        return tuple(int(round(v)) for v in array_to_canonical(kji, self.axes, self.shape))

    def to_array(self, canonical_index) -> tuple[float, float, float]:
        return canonical_to_array(canonical_index, self.axes, self.shape)

    def array_step(self, canonical_axis: int, delta: int) -> tuple[int, int]:
        """(array axis, signed step) that moves ``delta`` along a canonical axis."""
        sign = -1 if self.axes.flipped[canonical_axis] else 1
        return self.axes.array_axis[canonical_axis], sign * int(delta)
