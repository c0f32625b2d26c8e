"""Writers of small, real DICOM CT series with a chosen geometry, for tests and benchmarks.

Each writer produces files a scanner could have written (CT Image Storage, proper UIDs, the
Image Plane and Image Pixel modules), so the loader is tested on the cases that break naive
readers: a rescale slope of 0.5, feet-first and prone patients, oblique planes, gantry tilt,
a missing slice, MONOCHROME1 and PixelPaddingValue. No real person's data: the patient is
always a named phantom.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

# Image orientation (row direction, column direction) a scanner writes for each patient position.
ORIENTATION_FOR_POSITION = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


@dataclass
class SeriesSpec:
    """The geometry and encoding of a test series; defaults give a plain axial CT."""

    shape: tuple[int, int, int] = (10, 64, 64)  # (slices, rows, columns)
    pixel_spacing: tuple[float, float] = (0.7, 0.8)  # (between rows, between columns) mm
    slice_step: float = 2.5  # mm between slice centres along the slice normal
    first_position: tuple[float, float, float] = (-22.4, -25.6, -100.0)
    patient_position: str = "HFS"
    # Rotation of the whole plane about the patient's anterior-posterior axis (oblique series).
    oblique_deg: float = 0.0
    gantry_tilt_deg: float = 0.0
    slope: float = 1.0
    intercept: float = -1024.0
    signed: bool = False
    bits_stored: int = 12
    monochrome1: bool = False
    padding_value: int | None = None
    missing_slices: tuple[int, ...] = ()
    transfer_syntax: str = EXPLICIT_VR_LE
    shuffle_names: bool = False
    seed: int = 0
    series_uid: str = ""
    study_uid: str = ""
    patient_id: str = "PHANTOM-001"
    series_number: int = 1
    description: str = "Phantom chest"
    window: tuple[float, float] | None = (40.0, 400.0)


@dataclass
class WrittenSeries:
    paths: list[str]  # in slice order (before any missing slice was dropped: only written ones)
    stored: np.ndarray  # stored pixel values (slices, rows, cols) of the written slices
    hu: np.ndarray  # stored * slope + intercept
    positions: list[tuple[float, float, float]]
    row_dir: np.ndarray
    col_dir: np.ndarray
    spec: SeriesSpec
    series_uid: str
    sop_uids: list[str] = field(default_factory=list)


def plane_directions(spec: SeriesSpec) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines (LPS) for the spec's patient position and obliquity."""
    row, col = (np.asarray(v, float) for v in ORIENTATION_FOR_POSITION[spec.patient_position])
    a = np.deg2rad(spec.oblique_deg)
    about_y = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    row, col = about_y @ row, about_y @ col
    t = np.deg2rad(spec.gantry_tilt_deg)
    # A tilted gantry tilts the image plane about the patient's left-right axis ...
    about_x = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    return about_x @ row, about_x @ col


def slice_positions(spec: SeriesSpec, row: np.ndarray, col: np.ndarray) -> list[np.ndarray]:
    normal = np.cross(row, col)
    if spec.gantry_tilt_deg:
        # ... while the table still moves straight along z: the stack is sheared.
        head = np.array([0.0, 0.0, 1.0 if normal[2] >= 0 else -1.0])
        step = head * spec.slice_step / np.cos(np.deg2rad(spec.gantry_tilt_deg))
    else:
        step = normal * spec.slice_step
    start = np.asarray(spec.first_position, float)
    return [start + k * step for k in range(spec.shape[0])]


def phantom_slice(spec: SeriesSpec, k: int) -> np.ndarray:
    """Stored values of slice k: a body ellipse with a bright 'spine', different per slice."""
    _, rows, cols = spec.shape
    rng = np.random.default_rng([spec.seed, k])
    y, x = np.ogrid[0:rows, 0:cols]
    body = ((y - rows / 2) / (rows * 0.4)) ** 2 + ((x - cols / 2) / (cols * 0.45)) ** 2 <= 1
    hi = 2 ** (spec.bits_stored - 1) - 1 if spec.signed else 2**spec.bits_stored - 1
    lo = -(2 ** (spec.bits_stored - 1)) if spec.signed else 0
    image = np.where(body, 1024 + 40 + 7 * k, 24 + 7 * k).astype(np.int32)
    image += rng.integers(-20, 21, size=image.shape, dtype=np.int32)
    image[rows // 2 + rows // 5 : rows // 2 + rows // 5 + 3, cols // 2 - 2 : cols // 2 + 2] = 2000
    if spec.padding_value is not None:
        image[~body] = spec.padding_value
    return np.clip(image, lo, hi)


def phantom_pixels(spec: SeriesSpec) -> np.ndarray:
    return np.stack([phantom_slice(spec, k) for k in range(spec.shape[0])])


def write_ct_series(folder: str | os.PathLike, spec: SeriesSpec | None = None, *,
                    keep_pixels: bool = True) -> WrittenSeries:
    """Write a CT series into ``folder`` (created if needed); returns what was written.

    ``keep_pixels=False`` writes slice by slice without keeping the stack (benchmark-sized
    series); ``stored`` and ``hu`` are then empty.
    """
    from pydicom.uid import generate_uid

    spec = spec or SeriesSpec()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row, col = plane_directions(spec)
    positions = slice_positions(spec, row, col)
    series_uid = spec.series_uid or generate_uid()
    study_uid = spec.study_uid or generate_uid()
    frame_uid = generate_uid()
    keep = [k for k in range(spec.shape[0]) if k not in spec.missing_slices]
    names = _file_names(len(keep), spec)
    out = WrittenSeries([], np.empty((0,)), np.empty((0,)), [tuple(positions[k]) for k in keep],
                        row, col, spec, series_uid)
    kept = []
    for n, k in enumerate(keep):
        stored = phantom_slice(spec, k)
        if keep_pixels:
            kept.append(stored)
        ds = _ct_dataset(spec, stored, positions[k], row, col, k + 1)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.FrameOfReferenceUID = frame_uid
        path = folder / names[n]
        ds.save_as(path, enforce_file_format=True)
        out.paths.append(str(path))
        out.sop_uids.append(ds.SOPInstanceUID)
    if kept:
        out.stored = np.stack(kept)
        out.hu = out.stored * spec.slope + spec.intercept
    return out


def _file_names(count: int, spec: SeriesSpec) -> list[str]:
    names = [f"IM{n:05d}.dcm" for n in range(count)]
    if spec.shuffle_names:
        order = np.random.default_rng(spec.seed + 1).permutation(count)
        names = [names[i] for i in order]
    return names


def _ct_dataset(spec: SeriesSpec, stored: np.ndarray, position, row, col, instance: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = spec.transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    _patient_and_study(ds, spec)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [round(float(v), 6) for v in position]
    ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row, *col)]
    ds.SliceThickness = spec.slice_step
    ds.PixelSpacing = list(spec.pixel_spacing)
    if spec.gantry_tilt_deg:
        ds.GantryDetectorTilt = spec.gantry_tilt_deg
    _pixel_module(ds, spec, stored)
    return ds


def _patient_and_study(ds, spec: SeriesSpec) -> None:
    ds.PatientName, ds.PatientID = "Phantom^Test", spec.patient_id
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.Modality, ds.Manufacturer = "CT", "MedCompress phantom"
    ds.SeriesNumber, ds.SeriesDescription = spec.series_number, spec.description
    ds.StudyDescription = "Phantom study"
    ds.PatientPosition = spec.patient_position
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP, ds.AcquisitionNumber, ds.PositionReferenceIndicator = 120, 1, ""


def _pixel_module(ds, spec: SeriesSpec, stored: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if spec.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored = 16, spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 1 if spec.signed else 0
    ds.RescaleIntercept, ds.RescaleSlope = spec.intercept, spec.slope
    ds.RescaleType = "HU"
    if spec.window:
        ds.WindowCenter, ds.WindowWidth = spec.window
    if spec.padding_value is not None:
        ds.PixelPaddingValue = spec.padding_value
    ds.PixelData = stored.astype("<i2" if spec.signed else "<u2").tobytes()
    if spec.transfer_syntax == EXPLICIT_VR_LE or spec.transfer_syntax == "1.2.840.10008.1.2":
        return
    from pydicom.uid import UID

    # Compressed test series: pydicom encodes RLE natively; others need their encoder plugin.
    ds.compress(UID(spec.transfer_syntax), stored.astype("<i2" if spec.signed else "<u2"))


def bundled_test_files(pattern: str = "**/*.dcm") -> list[str]:
    """pydicom's bundled test files, found on disk only.

    ``pydicom.data.get_testdata_files`` also asks the network for its downloadable files,
    which hangs where there is no network; this looks only at what is installed.
    """
    from pydicom.data.data_manager import DATA_ROOT

    root = Path(DATA_ROOT) / "test_files"
    return sorted(str(p) for p in root.glob(pattern) if p.is_file())


def bundled_test_file(name: str) -> str:
    from pydicom.data.data_manager import DATA_ROOT

    path = Path(DATA_ROOT) / "test_files" / name
    if not path.is_file():
        raise FileNotFoundError(path)
    return str(path)
