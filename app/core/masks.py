"""Label volumes onto a loaded scan's voxel grid: NIfTI/NRRD files and DICOM SEG.

Masks come from elsewhere (a model, an annotation tool, the demo generator) on their own
grid; everything downstream (overlays, lesion tables, Dice) needs them voxel-for-voxel on the
volume's grid, so label files are resampled with nearest neighbour (labels never blend) and
SEG frames are placed by their ImagePositionPatient onto the volume's slices.
"""
from __future__ import annotations

import os

import numpy as np

from app.core.volume import Volume

_POSITION_TOLERANCE = 0.01  # in voxels: a frame must sit on a slice, not between two


class MaskError(ValueError):
    """A mask does not fit the volume; the message says how."""


def _smallest_label_type(labels: np.ndarray) -> np.ndarray:
    top = int(labels.max()) if labels.size else 0
    if top > np.iinfo(np.uint16).max:
        raise MaskError(f"label values up to {top} do not fit 16 bits")
    return labels.astype(np.uint8 if top <= 255 else np.uint16, copy=False)


def volume_grid_image(volume: Volume):
    """An empty SimpleITK image with the volume's grid (size, spacing, origin, direction)."""
    import SimpleITK as sitk

    z, y, x = volume.shape
    ref = sitk.Image([int(x), int(y), int(z)], sitk.sitkUInt8)
    ref.SetSpacing([float(volume.spacing[2]), float(volume.spacing[1]), float(volume.spacing[0])])
    ref.SetOrigin([float(v) for v in volume.origin])
    ref.SetDirection([float(v) for v in np.asarray(volume.direction, float).ravel()])
    return ref


def load_label_file(path, volume: Volume) -> np.ndarray:
    """A NIfTI/NRRD label volume resampled (nearest neighbour) onto ``volume``: (z, y, x)."""
    import SimpleITK as sitk

    path = os.fspath(path)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        raise MaskError(f"{path}: not a readable label volume ({str(exc).strip()[:160]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MaskError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per "
                        "voxel; a label volume has one")
    if image.GetDimension() != 3:
        raise MaskError(f"{path}: is {image.GetDimension()}-D; a label volume is 3-D")
    resampled = sitk.Resample(image, volume_grid_image(volume), sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    labels = sitk.GetArrayFromImage(resampled)
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise MaskError(f"{path}: holds fractional values; expected whole-number labels")
    if labels.min() < 0:
        raise MaskError(f"{path}: holds negative labels")
    return _smallest_label_type(labels)


def load_seg(seg_path, volume: Volume) -> tuple[np.ndarray, list[dict]]:
    """A DICOM SEG as a label map on ``volume`` (segment number per voxel) + its segments.

    Each frame lands on the slice its ImagePositionPatient falls on; where segments overlap,
    the higher segment number wins. Segment dicts: number, label, description, colour (RGB
    0-255, when the SEG recommends one).
    """
    import highdicom as hd

    seg_path = os.fspath(seg_path)
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is "not a usable SEG"
        raise MaskError(f"{seg_path}: not a readable DICOM SEG ({str(exc)[:160]})") from None
    labels = np.zeros(volume.shape, np.uint16)
    frames = _seg_frames(seg)
    _in_plane_check(seg, volume, seg_path)
    for n, (position, segment, pixels) in enumerate(frames):
        k = _slice_of(position, volume, seg_path, n)
        _paint(labels[k], pixels, segment, seg)
    return _smallest_label_type(labels), segment_descriptions(seg)


def _seg_frames(seg):
    """(position, segment number, frame pixels) per frame."""
    pixels = seg.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    shared = seg.SharedFunctionalGroupsSequence[0]
    out = []
    for n, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float)
        # With a single segment, writers (highdicom) put its identification in the shared group.
        ident = group.get("SegmentIdentificationSequence") or \
            shared.get("SegmentIdentificationSequence")
        segment = int(ident[0].ReferencedSegmentNumber) if ident else 1
        out.append((position, segment, pixels[n]))
    return out


def _in_plane_check(seg, volume: Volume, path: str) -> None:
    rows, cols = int(seg.Rows), int(seg.Columns)
    if (rows, cols) != volume.shape[1:]:
        raise MaskError(f"{path}: frames are {rows}x{cols}, the series {volume.shape[1]}x"
                        f"{volume.shape[2]}; a resampled SEG is not supported")
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    direction = np.asarray(volume.direction, float)
    if not np.allclose(orientation, np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-3):
        raise MaskError(f"{path}: its frames are not in the plane of the series' slices")


def _slice_of(position: np.ndarray, volume: Volume, path: str, n: int) -> int:
    k, j, i = volume.patient_to_index(position)
    k_round = int(round(k))
    off_grid = abs(k - k_round) > _POSITION_TOLERANCE or abs(j) > 0.5 or abs(i) > 0.5
    if off_grid or not 0 <= k_round < volume.shape[0]:
        raise MaskError(f"{path}: frame {n + 1} at {np.round(position, 2).tolist()} mm does not "
                        "fall on a slice of the series")
    return k_round


def _paint(target: np.ndarray, pixels: np.ndarray, segment: int, seg) -> None:
    kind = str(seg.get("SegmentationType", "BINARY"))
    if kind == "LABELMAP":
        np.copyto(target, pixels.astype(np.uint16), where=pixels > 0)
        return
    if kind == "FRACTIONAL":
        top = float(seg.get("MaximumFractionalValue", 255))
        mask = pixels >= top / 2
    else:
        mask = pixels > 0
    target[mask] = np.maximum(target[mask], segment)


def segment_descriptions(seg) -> list[dict]:
    out = []
    for item in seg.get("SegmentSequence", []) or []:
        entry = {"number": int(item.SegmentNumber), "label": str(item.get("SegmentLabel", "")),
                 "description": str(item.get("SegmentDescription", ""))}
        lab = item.get("RecommendedDisplayCIELabValue")
        if lab is not None:
            entry["colour"] = _lab_to_rgb_formula([int(v) for v in lab])
        out.append(entry)
    return out


def _lab_to_rgb_formula(dicom_lab: list[int]) -> tuple[int, int, int]:
    """DICOM-scaled CIELab (PS3.3 C.10.7.1.1) to sRGB, D65 white."""
    L = dicom_lab[0] / 65535 * 100
    a, b = (v / 65535 * 255 - 128 for v in dicom_lab[1:])
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200

    def inv(t):
        return t**3 if t**3 > 0.008856 else (t - 16 / 116) / 7.787

    xyz = np.array([0.95047 * inv(fx), 1.0 * inv(fy), 1.08883 * inv(fz)])
    m = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    lin = np.clip(m @ xyz, 0, 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return tuple(int(round(v * 255)) for v in srgb)
