"""Multi-frame objects (enhanced CT/MR, RT dose, NM) as stacks of slices.

Enhanced objects keep each frame's position and rescale in the per-frame functional groups
(falling back to the shared ones); RT dose grids give positions as offsets along the normal
(GridFrameOffsetVector) and their scaling as DoseGridScaling.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np

from app.core.dicom_geometry import plane_axes


def multiframe_slices(series, header):
    """(slices, reader, warnings) for the single multi-frame object of ``series``."""
    from app.core.dicom_load import SeriesLoadError, _read_dataset, _reason, _Slice

    try:
        ds = _read_dataset(header.path)
    except Exception as exc:  # noqa: BLE001
        raise SeriesLoadError(f"series {series.key}: {header.path}: {_reason(exc)}") from None
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    header = _with_plane(header, shared, per_frame)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    positions = _frame_positions(ds, header, shared, per_frame, n)
    warnings = [] if positions else ["no frame positions: frames stacked in file order"]
    slices = []
    for i in range(n):
        slope, intercept = _frame_rescale(ds, shared, per_frame[i] if i < len(per_frame) else None)
        position = positions[i] if positions else None
        slices.append(_Slice(header.path, header, i, position, slope, intercept, i))
    return slices, _frame_reader(ds), warnings


def _first(seq):
    return seq[0] if seq else None


def _group_value(groups: list, sequence: str, keyword: str):
    for group in groups:
        items = group.get(sequence) if group is not None else None
        if items:
            if keyword in items[0]:
                return items[0][keyword].value
    return None


def _with_plane(header, shared, per_frame):
    first = per_frame[0] if per_frame else None
    orientation = _group_value([first, shared], "PlaneOrientationSequence",
                               "ImageOrientationPatient")
    spacing = _group_value([first, shared], "PixelMeasuresSequence", "PixelSpacing")
    thickness = _group_value([first, shared], "PixelMeasuresSequence", "SliceThickness")
    changes = {}
    if orientation is not None:
        changes["orientation"] = tuple(float(v) for v in orientation)
    if spacing is not None:
        changes["pixel_spacing"] = tuple(float(v) for v in spacing)
    if thickness is not None:
        changes["slice_thickness"] = float(thickness)
    return dataclasses.replace(header, **changes)


def _frame_positions(ds, header, shared, per_frame, n: int):
    if per_frame and len(per_frame) == n:
        found = [_group_value([g, shared], "PlanePositionSequence", "ImagePositionPatient")
                 for g in per_frame]
        if all(p is not None for p in found):
            return [np.asarray([float(v) for v in p]) for p in found]
    offsets = ds.get("GridFrameOffsetVector")
    if offsets is not None and header.position is not None and header.orientation is not None:
        normal = plane_axes(header.orientation)[2]
        start = np.asarray(header.position, float)
        return [start + float(o) * normal for o in list(offsets)[:n]]
    return None


def _frame_rescale(ds, shared, frame_group) -> tuple[float, float]:
    slope = _group_value([frame_group, shared], "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_value([frame_group, shared], "PixelValueTransformationSequence",
                             "RescaleIntercept")
    if slope is None:
        slope = ds.get("RescaleSlope", ds.get("DoseGridScaling", 1.0))
    if intercept is None:
        intercept = ds.get("RescaleIntercept", 0.0)
    return float(slope if slope not in (None, "") else 1.0), \
        float(intercept if intercept not in (None, "") else 0.0)


def _frame_reader(ds):
    from pydicom.pixels import get_decoder

    lock = threading.Lock()  # one Dataset: decode its frames one at a time
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)

    def read(s) -> np.ndarray:
        with lock:
            return decoder.as_array(ds, index=s.frame)[0]

    return read
