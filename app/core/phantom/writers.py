"""Writing a phantom study: a CT series (CT Image IOD), its DICOM SEG and NIfTI label maps.

Every UID comes from ``generate_uid(entropy_srcs=...)`` over the seed, the case and the role of
the object, and every date and time is fixed, so the same seed writes the same bytes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.core.atomic import atomic_output
from app.core.phantom.grid import Grid

MANUFACTURER = "MedCompress synthetic phantom"
SOFTWARE = "medcompress-demo-data 1"
RESEARCH_ONLY = "SYNTHETIC PHANTOM - research and demonstration only"


@dataclass(frozen=True)
class StudyIdentity:
    """Who and what the files describe: a made-up patient, never a real one."""
    seed: int
    case: str  # CASE001
    patient_name: str  # DEMO^CASE001
    patient_id: str
    patient_sex: str
    study_date: str  # YYYYMMDD
    kvp: float

    def uid(self, *role: object) -> str:
        from pydicom.uid import generate_uid

        return generate_uid(entropy_srcs=["medcompress-demo", str(self.seed), self.case, *map(str, role)])


def _patient_study_series(ds, who: StudyIdentity) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = who.patient_name
    ds.PatientID = who.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = who.patient_sex
    ds.PatientIdentityRemoved = "YES"  # nothing here ever identified anyone
    ds.DeidentificationMethod = "Synthetic data: no real patient"
    ds.StudyInstanceUID = who.uid("study")
    ds.StudyDate = who.study_date
    ds.StudyTime = "093000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST (synthetic phantom)"
    ds.FrameOfReferenceUID = who.uid("frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER


def _ct_template(who: StudyIdentity, grid: Grid, window: tuple[float, float]):
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage

    ds = Dataset()
    _patient_study_series(ds, who)
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = who.uid("ct-series")
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Chest 1 (synthetic phantom)"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ManufacturerModelName = "Phantom generator"
    ds.SoftwareVersions = SOFTWARE
    ds.ImageComments = RESEARCH_ONLY
    ds.ContentDate = ds.SeriesDate = ds.AcquisitionDate = who.study_date
    ds.ContentTime = ds.SeriesTime = ds.AcquisitionTime = "093100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = who.kvp
    ds.ConvolutionKernel = "STANDARD"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [round(grid.pixel_mm, 6)] * 2
    ds.SliceThickness = round(grid.slice_mm, 6)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = grid.rows, grid.cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = window
    ds.WindowCenterWidthExplanation = "LUNG"
    ds.BurnedInAnnotation = "NO"
    return ds


def ct_headers(who: StudyIdentity, grid: Grid, window=(-600, 1500)) -> list:
    """One header per slice (k ascending in z), without pixels.

    InstanceNumber runs head to feet, as a scanner numbers a head-first scan, so the order of
    the files is the reverse of the order in patient space: loaders must sort by position.
    """
    template = _ct_template(who, grid, window)
    headers = []
    for k in range(grid.slices):
        ds = copy.deepcopy(template)
        z = grid.origin[2] + k * grid.slice_mm
        ds.SOPInstanceUID = who.uid("ct", k)
        ds.InstanceNumber = grid.slices - k
        ds.ImagePositionPatient = [round(grid.origin[0], 4), round(grid.origin[1], 4), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        headers.append(ds)
    return headers


def _file_meta(ds):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def write_ct_series(headers: list, stored: np.ndarray, folder: Path) -> list[Path]:
    """Write each slice as its own file (stored values: uint16, HU + 1024); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(headers):
        ds.file_meta = _file_meta(ds)
        ds.PixelData = np.ascontiguousarray(stored[k], dtype="<u2").tobytes()
        path = folder / f"CT{ds.InstanceNumber:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        del ds.PixelData  # the headers live on (for the SEG); the pixels need not
        paths.append(path)
    return paths


def _deterministic_dimension_uids(seg, new_uid: str) -> None:
    """highdicom draws a random DimensionOrganizationUID; replace it everywhere it is used."""
    old = {item.DimensionOrganizationUID for item in seg.DimensionOrganizationSequence}

    def swap(dataset, element):
        if element.keyword == "DimensionOrganizationUID" and element.value in old:
            element.value = new_uid

    seg.walk(swap)


def write_seg(who: StudyIdentity, headers: list, truth: np.ndarray, path: Path) -> None:
    """The ground truth as a binary DICOM SEG with one segment, "Nodule", referencing the CT."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Nodule",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        tracking_uid=who.uid("segment", 1), tracking_id="Nodule ground truth",
    )
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=truth.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=who.uid("seg-series"), series_number=100,
        sop_instance_uid=who.uid("seg"), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="Phantom generator", software_versions=SOFTWARE,
        device_serial_number="0", content_description="Synthetic ground truth",
        content_label="NODULES", content_creator_name="Phantom^Generator",
        series_description="Nodule ground truth (synthetic phantom)",
        omit_empty_frames=bool(truth.any()),  # an empty SEG keeps its frames, so it stays valid
    )
    for keyword in ("InstanceCreationDate", "ContentDate", "SeriesDate"):
        setattr(seg, keyword, who.study_date)
    for keyword in ("InstanceCreationTime", "ContentTime", "SeriesTime"):
        setattr(seg, keyword, "100000")
    for item in seg.get("ContributingEquipmentSequence", []):  # highdicom stamps "now" here too
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{who.study_date}100000"
    _deterministic_dimension_uids(seg, who.uid("seg-dimension-organization"))
    with atomic_output(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)


def write_nifti(array: np.ndarray, grid: Grid, path: Path) -> None:
    """A label map on the CT's grid, with the geometry SimpleITK reads from the CT series."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((grid.pixel_mm, grid.pixel_mm, grid.slice_mm))
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
