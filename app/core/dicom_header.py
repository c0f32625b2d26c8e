"""What indexing and loading need from one DICOM file's header, read fast and never written.

Indexing a CD export must handle thousands of files a second, and pydicom builds a full
``Dataset`` per file (about 1 ms). ``read_header`` walks the little-endian element stream of
the first few kilobytes itself, keeps only the attributes listed in ``_WANTED``, and stops at
Pixel Data, whose offset it records so the loader can read pixels without parsing again.
Anything it is not sure about (big endian, deflate, no 'DICM' prefix, a character set other
than Latin-1/UTF-8, SEG/RTSTRUCT/PR and enhanced multi-frame objects, whose references
live in sequences) goes through pydicom instead, so the answer is the same either way:
``tests/core/test_dicom_index.py`` checks the two against each other on pydicom's corpus.
"""
from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass

HEAD_BYTES = 16 * 1024  # first read; most headers end well before this

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
NATIVE_SYNTAXES = {IMPLICIT_VR_LE, EXPLICIT_VR_LE}
# Syntaxes whose data set the fast parser cannot walk: big endian and deflated.
_NOT_WALKABLE = {"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_TEXT_CHARSETS = {"": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 6": "latin-1",
                  "ISO 2022 IR 6": "latin-1", "ISO_IR 192": "utf-8"}

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_PR_PREFIX = "1.2.840.10008.5.1.4.1.1.11."

PIXEL_DATA_TAG = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


class NotForFastParser(Exception):
    """The fast parser declines this file; pydicom reads it instead."""


class NeedMoreBytes(Exception):
    """The header runs past the bytes read so far."""


@dataclass(slots=True)
class InstanceHeader:
    """One file's (or zip member's) header data, as the index and the loader use it."""

    path: str
    sop_uid: str = ""
    sop_class_uid: str = ""
    transfer_syntax: str = ""
    patient_id: str = ""
    patient_name: str = ""
    study_uid: str = ""
    study_date: str = ""
    study_description: str = ""
    series_uid: str = ""
    series_date: str = ""
    series_description: str = ""
    series_number: int | None = None
    modality: str = ""
    instance_number: int | None = None
    frame_of_reference_uid: str = ""
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    rows: int = 0
    columns: int = 0
    samples_per_pixel: int = 1
    photometric: str = ""
    bits_allocated: int = 0
    bits_stored: int = 0
    pixel_representation: int = 0
    number_of_frames: int = 1
    slope: float = 1.0
    intercept: float = 0.0
    window: tuple[float, float] | None = None
    padding_value: int | None = None
    smallest_value: int | None = None
    largest_value: int | None = None
    image_type: tuple[str, ...] = ()
    # Offset of the Pixel Data element's tag and its value length (None: not found / not known).
    pixel_offset: int | None = None
    pixel_length: int | None = None
    has_pixels: bool | None = None  # None: not known without decoding (pydicom-read files)
    file_size: int = 0
    referenced_series_uid: str | None = None
    read_by: str = "fast"  # "fast" or "pydicom", for tests and diagnostics

    @property
    def kind(self) -> str:
        return object_kind(self.sop_class_uid, self.rows)


def object_kind(sop_class_uid: str, rows: int) -> str:
    """What a DICOM object is for the browser: an image, or which non-image object."""
    if sop_class_uid == SEG_CLASS:
        return "SEG"
    if sop_class_uid == RTSTRUCT_CLASS:
        return "RTSTRUCT"
    if sop_class_uid.startswith(_SR_PREFIX):
        return "SR"
    if sop_class_uid.startswith(_PR_PREFIX):
        return "PR"
    return "image" if rows else "other"


# tag -> (attribute, VR used when the file is implicit VR, converter name)
_WANTED: dict[int, tuple[str, str]] = {
    0x00080005: ("charset", "CS"),
    0x00080008: ("image_type", "CS"),
    0x00080016: ("sop_class_uid", "UI"),
    0x00080018: ("sop_uid", "UI"),
    0x00080020: ("study_date", "DA"),
    0x00080021: ("series_date", "DA"),
    0x00080060: ("modality", "CS"),
    0x00081030: ("study_description", "LO"),
    0x0008103E: ("series_description", "LO"),
    0x00100010: ("patient_name", "PN"),
    0x00100020: ("patient_id", "LO"),
    0x00180050: ("slice_thickness", "DS"),
    0x0020000D: ("study_uid", "UI"),
    0x0020000E: ("series_uid", "UI"),
    0x00200011: ("series_number", "IS"),
    0x00200013: ("instance_number", "IS"),
    0x00200032: ("position", "DS"),
    0x00200037: ("orientation", "DS"),
    0x00200052: ("frame_of_reference_uid", "UI"),
    0x00280002: ("samples_per_pixel", "US"),
    0x00280004: ("photometric", "CS"),
    0x00280008: ("number_of_frames", "IS"),
    0x00280010: ("rows", "US"),
    0x00280011: ("columns", "US"),
    0x00280030: ("pixel_spacing", "DS"),
    0x00280100: ("bits_allocated", "US"),
    0x00280101: ("bits_stored", "US"),
    0x00280103: ("pixel_representation", "US"),
    0x00280106: ("smallest_value", "XS"),
    0x00280107: ("largest_value", "XS"),
    0x00280120: ("padding_value", "XS"),
    0x00281050: ("window_center", "DS"),
    0x00281051: ("window_width", "DS"),
    0x00281052: ("intercept", "DS"),
    0x00281053: ("slope", "DS"),
}


# ---------------------------------------------------------------------------- reading bytes

def read_header(path: str, *, opener=None, size: int | None = None) -> InstanceHeader:
    """Header of one file, or of a zip member when ``opener`` opens it (with its ``size``).

    Files are only ever opened for reading. Raises ``ValueError`` (message = the reason the
    UI shows) for anything unreadable.
    """
    with (opener() if opener else open(path, "rb")) as fp:
        if size is None:
            size = os.fstat(fp.fileno()).st_size
        head = fp.read(HEAD_BYTES)
        try:
            return _parse_or_extend(path, fp, head, size)
        except NotForFastParser:
            fp.seek(0)
            return read_header_with_pydicom(path, fp, size)


def _parse_or_extend(path: str, fp, head: bytes, size: int) -> InstanceHeader:
    try:
        return parse_header(path, head, size, complete=len(head) >= size)
    except NeedMoreBytes:
        whole = head + fp.read()
        try:
            return parse_header(path, whole, len(whole), complete=True)
        except NeedMoreBytes:
            raise NotForFastParser from None  # truncated inside the header: pydicom says why


# --------------------------------------------------------------------------- fast parsing

def parse_header(path: str, buf: bytes, size: int, *, complete: bool) -> InstanceHeader:
    """Walk a Part 10 file's little-endian element stream up to Pixel Data."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise NotForFastParser
    h = InstanceHeader(path=path, file_size=size)
    pos, meta = _read_meta(buf, 132)
    h.transfer_syntax = meta.get(0x00020010, "")
    if not h.transfer_syntax or h.transfer_syntax in _NOT_WALKABLE:
        raise NotForFastParser
    if _needs_pydicom(meta.get(0x00020002, "")):
        raise NotForFastParser
    values = _walk_top_level(buf, pos, h, explicit=h.transfer_syntax != IMPLICIT_VR_LE,
                             complete=complete)
    try:
        _apply_values(h, values)
    except (ValueError, struct.error):
        raise NotForFastParser from None  # malformed value: pydicom's reading decides
    h.sop_class_uid = h.sop_class_uid or meta.get(0x00020002, "")
    _require_instance_uid(h)
    return h


_INT_FIELDS = {"rows": 0, "columns": 0, "samples_per_pixel": 1, "bits_allocated": 0,
               "bits_stored": 0, "pixel_representation": 0, "number_of_frames": 1}


def _require_instance_uid(h: InstanceHeader) -> None:
    """Last step of both readers: an instance UID, and numbers that really are numbers."""
    for name, default in _INT_FIELDS.items():
        try:
            setattr(h, name, int(getattr(h, name)))
        except (TypeError, ValueError):
            setattr(h, name, default)
    h.number_of_frames = max(h.number_of_frames, 1)
    if not h.sop_uid and h.sop_class_uid != DICOMDIR_CLASS:
        raise ValueError("not a DICOM image or object (no SOP Instance UID)")


def _needs_pydicom(sop_class: str) -> bool:
    # Their references live in sequences, which the fast parser skips.
    return sop_class in (SEG_CLASS, RTSTRUCT_CLASS) or sop_class.startswith(_PR_PREFIX)


def _read_meta(buf: bytes, pos: int) -> tuple[int, dict[int, str]]:
    """The file meta group (always explicit VR little endian)."""
    meta: dict[int, str] = {}
    while pos + 8 <= len(buf):
        group = struct.unpack_from("<H", buf, pos)[0]
        if group != 0x0002:
            break
        tag, vr, length, start = _element_header(buf, pos, explicit=True)
        if length == 0xFFFFFFFF or start + length > len(buf):
            raise NotForFastParser
        if vr == b"UI":
            meta[tag] = _text(buf[start : start + length], "latin-1")
        pos = start + length
    return pos, meta


def _element_header(buf: bytes, pos: int, *, explicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR or b'', value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(buf):
        raise NeedMoreBytes
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = (group << 16) | elem
    if not explicit or group == 0xFFFE:
        return tag, b"", struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise NeedMoreBytes
        return tag, vr, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    if not vr.isalpha():
        raise NotForFastParser  # garbage where a VR should be: let pydicom report it
    return tag, vr, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _walk_top_level(buf: bytes, pos: int, h: InstanceHeader, *, explicit: bool,
                    complete: bool) -> dict[str, tuple[str, bytes]]:
    values: dict[str, tuple[str, bytes]] = {}
    while True:
        if pos + 8 > len(buf):
            if complete:
                h.has_pixels = False
                return values
            raise NeedMoreBytes
        tag, vr, length, start = _element_header(buf, pos, explicit=explicit)
        if tag >= 0x7FE00008 or tag >> 16 == 0x5200:
            _note_pixel_data(h, tag, pos, length)
            return values
        if length == 0xFFFFFFFF:
            pos = _skip_undefined(buf, start, explicit=explicit and vr != b"UN")
            continue
        if start + length > len(buf):
            if complete:
                raise NotForFastParser
            raise NeedMoreBytes
        wanted = _WANTED.get(tag)
        if wanted:
            # UN (an explicit file whose writer did not know the VR) reads as the dictionary VR
            use_vr = vr.decode() if vr and vr != b"UN" else wanted[1]
            values[wanted[0]] = (use_vr, buf[start : start + length])
        pos = start + length


def _note_pixel_data(h: InstanceHeader, tag: int, pos: int, length: int) -> None:
    if tag >> 16 == 0x5200:
        raise NotForFastParser  # enhanced multi-frame: positions live in functional groups
    if tag != PIXEL_DATA_TAG:
        h.has_pixels = False
        if tag in (0x7FE00008, 0x7FE00009):
            raise NotForFastParser  # float pixel data: pydicom's business
        return
    h.has_pixels = True
    h.pixel_offset = pos
    h.pixel_length = None if length == 0xFFFFFFFF else length


def _skip_undefined(buf: bytes, pos: int, *, explicit: bool) -> int:
    """Offset just past an undefined-length sequence starting at ``pos`` (its first item)."""
    while True:
        tag, _, length, start = _element_header(buf, pos, explicit=False)
        if tag == _SEQ_END:
            return start
        if tag != _ITEM:
            raise NotForFastParser
        pos = start + length if length != 0xFFFFFFFF else _skip_item(buf, start, explicit)


def _skip_item(buf: bytes, pos: int, explicit: bool) -> int:
    while True:
        if pos + 8 > len(buf):
            raise NeedMoreBytes
        if struct.unpack_from("<I", buf, pos)[0] == 0xE00DFFFE:  # item delimiter (LE halves)
            return pos + 8
        tag, vr, length, start = _element_header(buf, pos, explicit=explicit)
        if length == 0xFFFFFFFF:
            pos = _skip_undefined(buf, start, explicit=explicit and vr != b"UN")
        else:
            pos = start + length


# ------------------------------------------------------------------------ value decoding

def _apply_values(h: InstanceHeader, values: dict[str, tuple[str, bytes]]) -> None:
    charsets = [c.strip() for c in
                _text(values.pop("charset", ("CS", b""))[1], "latin-1").split("\\")]
    if any(c not in _TEXT_CHARSETS for c in charsets) or len(set(charsets) - {""}) > 1:
        raise NotForFastParser  # ISO 2022 code extensions and friends: pydicom decodes them
    encoding = _TEXT_CHARSETS[charsets[-1]]
    h.pixel_representation = _decode("US", values.pop("pixel_representation", ("US", b"")))[0] \
        if "pixel_representation" in values else 0
    window = {}
    for name, (vr, raw) in values.items():
        value = _decode(vr, (vr, raw), encoding, h.pixel_representation)
        if name.startswith("window_"):
            window[name] = value
        else:
            _set_attribute(h, name, value)
    _set_window(h, window.get("window_center"), window.get("window_width"))


def _set_attribute(h: InstanceHeader, name: str, value) -> None:
    if name in ("position", "orientation", "pixel_spacing"):
        want = {"position": 3, "orientation": 6, "pixel_spacing": 2}[name]
        setattr(h, name, tuple(value) if value and len(value) == want else None)
    elif name == "image_type":
        h.image_type = tuple(value)
    elif name in ("series_number", "instance_number", "slice_thickness",
                  "smallest_value", "largest_value", "padding_value"):
        setattr(h, name, value[0] if value else None)
    elif name in ("slope", "intercept"):
        if value:
            setattr(h, name, float(value[0]))
    elif name == "number_of_frames":
        h.number_of_frames = value[0] if value else 1
    elif isinstance(value, list):
        if value:
            setattr(h, name, value[0])
    else:
        setattr(h, name, value)


def _set_window(h: InstanceHeader, center, width) -> None:
    if center and width and width[0] > 0:
        h.window = (float(center[0]), float(width[0]))


def _decode(vr: str, item: tuple[str, bytes], encoding: str = "latin-1", pixel_rep: int = 0):
    raw = item[1]
    if vr == "XS":  # US or SS, decided by Pixel Representation (implicit VR files)
        vr = "SS" if pixel_rep else "US"
    if vr in ("US", "SS", "UL", "SL"):
        fmt = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}[vr]
        n = len(raw) // struct.calcsize(fmt)
        return list(struct.unpack_from(f"<{n}{fmt}", raw)) if n else []
    text = _text(raw, encoding)
    if vr == "PN":
        return text.rstrip("=")  # empty trailing component groups, as pydicom shows names
    if vr == "DS":
        return [float(v) for v in text.split("\\") if v.strip()]
    if vr == "IS":
        return [int(float(v)) for v in text.split("\\") if v.strip()]
    if vr == "CS" and "\\" in text:
        return [v.strip() for v in text.split("\\")]
    if vr == "CS":
        return [text] if text else []
    return text


def _text(raw: bytes, encoding: str) -> str:
    return raw.decode(encoding, errors="replace").strip("\x00 ").strip()


# ---------------------------------------------------------------------- pydicom fallback

def read_header_with_pydicom(path: str, fp, size: int) -> InstanceHeader:
    """The same header through pydicom, for files the fast parser declines."""
    ds = _dcmread_header(fp)
    h = InstanceHeader(path=path, file_size=size, read_by="pydicom")
    meta = getattr(ds, "file_meta", None)
    h.transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta else ""
    h.sop_class_uid = str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", ""))
    h.sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    _copy_dataset(h, ds)
    _require_instance_uid(h)
    h.has_pixels = _pixels_follow(ds, fp, h.transfer_syntax)
    return h


def _dcmread_header(fp):
    # Broken files make pydicom warn on every odd value; their reason reaches the UI anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _dcmread_header_quietly(fp)


def _dcmread_header_quietly(fp):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError:
        fp.seek(0)
        try:
            # No 'DICM' prefix: old ACR-NEMA style files are still read, garbage is not.
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not DICOM"
            raise ValueError(f"not a DICOM file ({type(exc).__name__})") from None
        if "SOPInstanceUID" not in ds and "DirectoryRecordSequence" not in ds:
            raise ValueError("not a DICOM file (no DICM prefix, no DICOM attributes)") from None
        return ds
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"broken DICOM header: {_short(exc)}") from None


def _pixels_follow(ds, fp, syntax: str) -> bool | None:
    if "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return True
    if syntax in _NOT_WALKABLE or not syntax:
        return None
    peek = fp.read(4)
    return peek in (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")


def _copy_dataset(h: InstanceHeader, ds) -> None:
    for name, keyword in _KEYWORDS.items():
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if name == "image_type":
            value = [str(v).strip() for v in (value if not isinstance(value, str) else [value])]
        elif name in _LIST_VALUES:
            value = _as_list(value)
        else:
            value = _plain(value)
        _set_attribute(h, name, value)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    _set_window(h, _as_list(center) if center is not None else None,
                _as_list(width) if width is not None else None)
    h.referenced_series_uid = _referenced_series(ds)
    _copy_multiframe_geometry(h, ds)


_KEYWORDS = {
    "image_type": "ImageType", "study_date": "StudyDate", "series_date": "SeriesDate",
    "modality": "Modality", "study_description": "StudyDescription",
    "series_description": "SeriesDescription", "patient_name": "PatientName",
    "patient_id": "PatientID", "slice_thickness": "SliceThickness", "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID", "series_number": "SeriesNumber",
    "instance_number": "InstanceNumber", "position": "ImagePositionPatient",
    "orientation": "ImageOrientationPatient", "frame_of_reference_uid": "FrameOfReferenceUID",
    "samples_per_pixel": "SamplesPerPixel", "photometric": "PhotometricInterpretation",
    "number_of_frames": "NumberOfFrames", "rows": "Rows", "columns": "Columns",
    "pixel_spacing": "PixelSpacing", "bits_allocated": "BitsAllocated",
    "bits_stored": "BitsStored", "pixel_representation": "PixelRepresentation",
    "smallest_value": "SmallestImagePixelValue", "largest_value": "LargestImagePixelValue",
    "padding_value": "PixelPaddingValue", "intercept": "RescaleIntercept", "slope": "RescaleSlope",
}
_LIST_VALUES = {"position", "orientation", "pixel_spacing", "series_number",
                "instance_number", "slice_thickness", "smallest_value", "largest_value",
                "padding_value", "slope", "intercept", "number_of_frames"}


def _as_list(value) -> list:
    from pydicom.multival import MultiValue

    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    out = []
    for v in items:
        try:
            out.append(_number(v))
        except (TypeError, ValueError):
            out.append(str(v).strip())
    return out


def _number(v):
    if isinstance(v, (bytes, str)) and not str(v).strip():
        raise ValueError
    f = float(v)
    return int(f) if isinstance(v, int) or (type(v).__name__ == "IS") else f


def _plain(value):
    if isinstance(value, (int, float)):
        return [int(value)] if isinstance(value, int) else value
    return str(value).strip()


def _referenced_series(ds) -> str | None:
    """The image series a SEG, RTSTRUCT or presentation state refers to."""
    for item in ds.get("ReferencedSeriesSequence", []) or []:
        if "SeriesInstanceUID" in item:
            return str(item.SeriesInstanceUID)
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        for study in frame.get("RTReferencedStudySequence", []) or []:
            for series in study.get("RTReferencedSeriesSequence", []) or []:
                return str(series.SeriesInstanceUID)
    return None


def _copy_multiframe_geometry(h: InstanceHeader, ds) -> None:
    """Enhanced objects keep spacing/orientation in the shared functional groups."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared:
        return
    group = shared[0]
    for seq, attr, keyword in (("PlaneOrientationSequence", "orientation", "ImageOrientationPatient"),
                               ("PixelMeasuresSequence", "pixel_spacing", "PixelSpacing")):
        if getattr(h, attr) is None and group.get(seq) and keyword in group[seq][0]:
            _set_attribute(h, attr, _as_list(group[seq][0][keyword]))


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
