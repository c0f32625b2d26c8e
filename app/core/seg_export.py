"""A model variant's findings as a DICOM SEG that PACS, OHIF and 3D Slicer can display.

The SEG references the source CT series (every frame names the CT slice it lies on, at that
slice's ImagePositionPatient), says which algorithm made it (name and version from the model
card, type AUTOMATIC, family "Artificial Intelligence"), codes each segment (category
"Morphologically abnormal structure", type "Nodule" for nodule labels) and marks the series
"research use". The lesion table goes beside it as a DICOM Comprehensive 3D SR (TID 1500): one
measurement group per lesion (long and short axis, mean diameter, volume) on the SEG's segment.
Written to a temporary name and renamed into place; each export is appended to the audit log.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from app.core.atomic import atomic_output

MANUFACTURER = "MedCompress"
SERIES_DESCRIPTION_SUFFIX = "(AI, research use only)"
# How close (mm) a CT slice's position must lie to a volume slice to be taken as the same.
POSITION_TOLERANCE_MM = 0.01


class SegExportError(ValueError):
    """The SEG cannot be written as asked; the message names the file and the reason."""


@dataclass(frozen=True)
class SegExport:
    path: Path
    segments: tuple[str, ...]
    frames: int
    source_series_uid: str


# ---------------------------------------------------------------- the source slices


def source_slices(files: Sequence[str | os.PathLike], volume) -> list:
    """The CT headers of ``files`` in the volume's slice order (k = 0 first), pixels not read.

    Slices are matched by SOPInstanceUID when the volume lists them, else by their position
    along the slice normal, so the SEG's frames sit exactly on the volume's slices."""
    import pydicom

    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    headers = [h for h in headers if getattr(h, "SeriesInstanceUID", None) and "ImagePositionPatient" in h]
    if volume.series_uid:
        headers = [h for h in headers if h.SeriesInstanceUID == volume.series_uid]
    if volume.sop_uids:
        by_uid = {h.SOPInstanceUID: h for h in headers}
        missing = [uid for uid in volume.sop_uids if uid not in by_uid]
        if missing:
            raise SegExportError(f"{len(missing)} slice(s) of the volume are not among the source files")
        return [by_uid[uid] for uid in volume.sop_uids]
    return _by_position(headers, volume)


def _by_position(headers: list, volume) -> list:
    normal = np.asarray(volume.direction, float)[:, 2]
    wanted = [volume.slice_position_mm(k) for k in range(volume.shape[0])]
    positions = {round(float(normal @ np.asarray(h.ImagePositionPatient, float)), 3): h for h in headers}
    ordered = []
    for k, position in enumerate(wanted):
        match = [h for p, h in positions.items() if abs(p - position) <= POSITION_TOLERANCE_MM]
        if not match:
            raise SegExportError(f"no source slice lies at the volume's slice {k + 1} ({position:.2f} mm)")
        ordered.append(match[0])
    return ordered


def series_files(folder: str | os.PathLike) -> list[Path]:
    """Every file of a series folder (non-DICOM files are dropped when read)."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


# ---------------------------------------------------------------- segments


def _segment_codes(name: str):
    from pydicom.sr.codedict import codes

    if "nodule" in name.lower() or "lesion" in name.lower():
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule
    return codes.SCT.Tissue, codes.SCT.Tissue


def segment_descriptions(card, values: Sequence[int]):
    """One AUTOMATIC segment per label value, with the algorithm named from the model card."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name=card.name, version=card.version or "unknown", family=codes.cid7162.ArtificialIntelligence)
    names = {label.value: label.name for label in card.labels}
    colours = {label.value: label.colour for label in card.labels}
    descriptions = []
    for number, value in enumerate(values, 1):
        category, kind = _segment_codes(names.get(value, f"label {value}"))
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=names.get(value, f"label {value}")[:64],
            segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=_display_colour(colours.get(value))))
    return descriptions


def _display_colour(colour: str | None):
    """The card's label colour as the SEG's recommended display colour (PACS show it so)."""
    import highdicom as hd

    try:
        return hd.color.CIELabColor.from_string(colour) if colour else None
    except ValueError:
        return None


def _label_values(card, labels: np.ndarray) -> list[int]:
    """The card's foreground labels (all of them, found or not: an empty segment is still a result)."""
    values = [label.value for label in card.labels if label.value != 0]
    return values or sorted(int(v) for v in np.unique(labels) if v != 0) or [1]


# ---------------------------------------------------------------- writing


def export_seg(labels: np.ndarray, volume, source_files: Sequence[str | os.PathLike], card,
               path: str | os.PathLike, *, weights_sha256: str = "", series_number: int = 901) -> SegExport:
    """Write ``labels`` (uint8 on ``volume``'s grid) as a DICOM SEG referencing the source CT."""
    import highdicom as hd

    labels = np.asarray(labels)
    if labels.shape != tuple(volume.shape):
        raise SegExportError(f"labels {labels.shape} do not lie on the volume's grid {volume.shape}")
    sources = source_slices(source_files, volume)
    values = _label_values(card, labels)
    frames = np.stack([labels == v for v in values], axis=-1)   # (slices, rows, cols, segments)
    version = f"{card.version or 'unknown'}"
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(card, values), series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=f"{card.name}"[:64], software_versions=version[:64],
        device_serial_number=(weights_sha256 or "unknown")[:16],
        series_description=f"{card.name} {version} {SERIES_DESCRIPTION_SUFFIX}"[:64],
        content_label="AI_FINDINGS", content_description="AI findings, research use only"[:64],
        omit_empty_frames=bool(frames.any()))   # an empty result keeps its frames, so it stays valid
    with atomic_output(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    _audit(path, card, weights_sha256, volume, seg)
    return SegExport(Path(path), tuple(s.SegmentLabel for s in seg.SegmentSequence),
                     int(seg.NumberOfFrames), str(sources[0].SeriesInstanceUID))


def _audit(path, card, weights_sha256: str, volume, seg) -> None:
    from app.core.audit import append_audit

    append_audit("export", kind="DICOM SEG", path=str(Path(path).resolve()), model=card.name,
                 model_version=card.version, weights_sha256=weights_sha256,
                 source_series_uid=str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
                 seg_series_uid=str(seg.SeriesInstanceUID), frames=int(seg.NumberOfFrames))


def read_seg_labels(path: str | os.PathLike, volume, source_files: Sequence[str | os.PathLike]) -> np.ndarray:
    """A SEG written by :func:`export_seg` back onto the volume's grid (label value = segment number),
    through highdicom alone, frame by frame via the source slice each frame references."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    sources = source_slices(source_files, volume)
    uids = [s.SOPInstanceUID for s in sources]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    labels = np.zeros(volume.shape, np.uint8)
    for channel, number in enumerate(numbers):
        labels[pixels[..., channel] > 0] = number
    return labels


# ---------------------------------------------------------------- lesion measurements as DICOM SR


def _lesion_group(lesion, seg, algorithm):
    """TID 1411 for one lesion: Lung-RADS axes, mean diameter and volume, on the SEG's segment."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    millilitre = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
    measurements = [hd.sr.Measurement(name, value=round(float(value), 3), unit=unit, algorithm_id=algorithm)
                    for name, value, unit in ((codes.SCT.LongAxis, lesion.long_axis_mm, codes.UCUM.Millimeter),
                                              (codes.SCT.ShortAxis, lesion.short_axis_mm, codes.UCUM.Millimeter),
                                              (codes.SCT.Diameter, lesion.mean_diameter_mm, codes.UCUM.Millimeter),
                                              (codes.SCT.Volume, lesion.volume_ml, millilitre))]
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=lesion.label_segment,
        source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Lesion {lesion.lesion_id}"),
        referenced_segment=segment, finding_type=codes.SCT.Nodule, algorithm_id=algorithm,
        measurements=measurements)


@dataclass(frozen=True)
class _SrLesion:
    lesion_id: int
    label_segment: int
    long_axis_mm: float
    short_axis_mm: float
    mean_diameter_mm: float
    volume_ml: float


def export_lesion_sr(lesions: Sequence, seg_path: str | os.PathLike, card, path: str | os.PathLike, *,
                     weights_sha256: str = "", series_number: int = 902) -> Path:
    """The lesion table as a DICOM Comprehensive 3D SR (TID 1500 measurement report), each lesion
    a measurement group referencing its segment of the SEG written by :func:`export_seg`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    seg = hd.seg.segread(str(seg_path))
    segment_of = {int(s.SegmentNumber): int(s.SegmentNumber) for s in seg.SegmentSequence}
    algorithm = hd.sr.AlgorithmIdentification(name=card.name, version=card.version or "unknown")
    groups = [_lesion_group(_SrLesion(l.lesion_id, segment_of.get(_segment_number(card, l.label), 1),
                                      l.long_axis_mm, l.short_axis_mm, l.mean_diameter_mm, l.volume_ml),
                            seg, algorithm) for l in lesions]
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=card.name[:64],
                                                       manufacturer_name=MANUFACTURER, model_name=card.version or "")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, imaging_measurements=groups or None,
                                     procedure_reported=hd.sr.CodedConcept("24627-2", "LN", "CT Chest"))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg], content=report[0], series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"{card.name} lesions {SERIES_DESCRIPTION_SUFFIX}"[:64])
    with atomic_output(path) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    from app.core.audit import append_audit

    append_audit("export", kind="DICOM SR", path=str(Path(path).resolve()), model=card.name,
                 model_version=card.version, weights_sha256=weights_sha256, lesions=len(groups),
                 seg_sop_instance_uid=str(seg.SOPInstanceUID))
    return Path(path)


def _segment_number(card, label_value: int) -> int:
    """The SEG numbers segments 1.. in the order of the card's foreground labels."""
    values = [label.value for label in card.labels if label.value != 0] or [label_value]
    return values.index(label_value) + 1 if label_value in values else 1
