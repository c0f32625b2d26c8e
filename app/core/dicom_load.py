"""Load an indexed series into a ``Volume`` in patient space, centre slice first.

``open_series`` sorts the slices from the headers the index already read (by position along
the slice normal, never by file name or InstanceNumber), allocates the whole array and decodes
the centre slice, so the viewer can show something at once; ``SeriesLoader.fill`` then reads
the rest, centre outward, on a small thread pool (file reads and numpy release the GIL).

Uncompressed little-endian slices take a fast path: the index recorded where Pixel Data
starts, so the loader reads exactly those bytes into a buffer and rescales them into the
volume, with no pydicom Dataset. Everything else (compressed syntaxes, multi-frame, odd
layouts) is decoded by pydicom and its plugins. Both give the same values: the tests compare
them on every file of pydicom's corpus the fast path accepts.
"""
from __future__ import annotations

import dataclasses
import io
import os
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np

from app.core.dicom_geometry import stack_geometry
from app.core.dicom_header import IMPLICIT_VR_LE, NATIVE_SYNTAXES, InstanceHeader, read_header
from app.core.dicom_index import ZIP_MEMBER_SEPARATOR, SeriesEntry
from app.core.progress import Progress
from app.core.volume import Volume

_CHUNK = 8  # slices per pool task; progress is reported per chunk
_WORKERS = max(1, min(4, os.cpu_count() or 1))
_INT16 = (-32768, 32767)
# A damaged header can claim 65535 x 65535 images; refuse before touching that memory.
MAX_VOLUME_BYTES = 16 * 2**30


class SeriesLoadError(Exception):
    """A series cannot be loaded; the message names the series or file and why."""


class _NeedsFloat(Exception):
    """A slice's rescaled values do not fit int16 after all."""


@dataclass
class _Slice:
    """One slice to read: a single-frame file, or one frame of a multi-frame object."""

    path: str
    header: InstanceHeader
    frame: int | None = None
    position: np.ndarray | None = None
    slope: float = 1.0
    intercept: float = 0.0
    number: int = 0  # InstanceNumber or frame number: only breaks ties in position


# --------------------------------------------------------------------------- reading bytes

def read_file_bytes(path: str) -> bytes:
    """All bytes of a file or a zip member ("archive.zip::member"), opened read-only."""
    archive, member = split_zip_path(path)
    if member is None:
        with open(path, "rb") as fp:
            return fp.read()
    with zipfile.ZipFile(archive) as zf, zf.open(member) as fp:
        return fp.read()


def split_zip_path(path: str) -> tuple[str, str | None]:
    if ZIP_MEMBER_SEPARATOR in path:
        archive, member = path.split(ZIP_MEMBER_SEPARATOR, 1)
        return archive, member
    return path, None


def _raw_dtype(h: InstanceHeader) -> np.dtype:
    kind = "i" if h.pixel_representation else "u"
    return np.dtype(f"<{kind}{h.bits_allocated // 8}")


def fast_path_accepts(h: InstanceHeader) -> bool:
    """Whether the slice's stored pixels can be read straight from the file's bytes."""
    return (h.transfer_syntax in NATIVE_SYNTAXES and h.pixel_offset is not None
            and h.pixel_length is not None and h.samples_per_pixel == 1
            and h.number_of_frames == 1 and h.bits_allocated in (8, 16, 32)
            and h.bits_stored <= h.bits_allocated
            and h.photometric in ("MONOCHROME1", "MONOCHROME2")
            and h.pixel_length in (_frame_bytes(h), _frame_bytes(h) + 1))


def _frame_bytes(h: InstanceHeader) -> int:
    return h.rows * h.columns * h.bits_allocated // 8


def read_stored_fast(h: InstanceHeader, buffer: np.ndarray | None = None) -> np.ndarray:
    """Stored values of a fast-path slice as (rows, columns), read at the recorded offset."""
    header_bytes = 8 if h.transfer_syntax == IMPLICIT_VR_LE else 12
    dtype = _raw_dtype(h)
    out = buffer if buffer is not None else np.empty((h.rows, h.columns), dtype)
    start = h.pixel_offset + header_bytes
    if ZIP_MEMBER_SEPARATOR in h.path:
        data = read_file_bytes(h.path)
        _check_pixel_tag(h, data[h.pixel_offset : h.pixel_offset + 4])
        out[...] = np.frombuffer(data, dtype, h.rows * h.columns, start).reshape(out.shape)
        return out
    with open(h.path, "rb", buffering=0) as fp:
        fp.seek(h.pixel_offset)
        _check_pixel_tag(h, fp.read(header_bytes)[:4])
        got = fp.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise ValueError(f"file ends {out.nbytes - got} bytes early (truncated)")
    return out


def _check_pixel_tag(h: InstanceHeader, tag: bytes) -> None:
    # The file may have changed since it was indexed: never read pixels from elsewhere.
    if tag != b"\xe0\x7f\x10\x00":
        raise ValueError("Pixel Data is no longer where the index found it; re-index the folder")


def read_stored_pydicom(path: str) -> np.ndarray:
    """Stored values through pydicom's decoders (any transfer syntax with a plugin)."""
    return _read_dataset(path).pixel_array


def _read_dataset(path: str):
    import pydicom

    archive, member = split_zip_path(path)
    if member is None:
        return pydicom.dcmread(path)
    return pydicom.dcmread(io.BytesIO(read_file_bytes(path)))


# --------------------------------------------------------------------------- the loader

class SeriesLoader:
    """A series being loaded: ``volume`` is allocated, ``first_slice`` already filled."""

    def __init__(self, series: SeriesEntry, slices: list[_Slice], volume: Volume,
                 first_slice: int, read_stored: Callable[[_Slice], np.ndarray]):
        self.series = series
        self.volume = volume
        self.first_slice = first_slice
        self._slices = slices
        self._read_stored = read_stored
        self._stop = threading.Event()
        self._failed: list[str] = []
        try:
            self._fill_slice(first_slice)
        except _NeedsFloat:
            self._switch_to_float()
            self._fill_slice(first_slice)

    def fill(self) -> Generator[Progress, None, Volume]:
        """Fill the remaining slices, centre outward; yields Progress(data=(k_lo, k_hi)).

        ``(k_lo, k_hi)`` is the half-open range of slices around ``first_slice`` that is
        filled so far. The returned Volume is authoritative: in the rare series whose values
        turn out not to fit int16, it is a float32 copy of the one ``volume`` started as.
        """
        while True:
            pending = [k for k in centre_out_order(len(self._slices), self.first_slice)
                       if not self.volume.loaded[k]]
            if not pending:
                break
            overflowed = yield from self._fill_pending(pending)
            if overflowed:
                self._switch_to_float()
        self._finish_warnings()
        yield Progress(1.0, "Loaded", (0, len(self._slices)))
        return self.volume

    def _fill_pending(self, pending: list[int]):
        chunks = [pending[i : i + _CHUNK] for i in range(0, len(pending), _CHUNK)]
        pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="series-load")
        overflowed = False
        try:
            futures = [pool.submit(self._fill_chunk, chunk) for chunk in chunks]
            for future in futures:
                overflowed |= future.result()
                yield self._progress()
        finally:
            # Cancelled (generator closed) or done: stop queued chunks, wait for running ones
            # so no thread writes into the volume after we return.
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._stop.clear()
        return overflowed

    def _fill_chunk(self, ks: list[int]) -> bool:
        overflowed = False
        for k in ks:
            if self._stop.is_set():
                break
            try:
                self._fill_slice(k)
            except _NeedsFloat:
                overflowed = True
                self._stop.set()
        return overflowed

    def _fill_slice(self, k: int) -> None:
        s = self._slices[k]
        try:
            stored = self._read_stored(s)
        except Exception as exc:  # noqa: BLE001 - one bad file must not sink the series
            self._mark_unreadable(k, s, exc)
            return
        write_hu(stored, s.slope, s.intercept, self.volume.voxels[k])
        if self.volume.padding_mask is not None and s.header.padding_value is not None:
            np.equal(stored, s.header.padding_value, out=self.volume.padding_mask[k])
        self.volume.loaded[k] = True

    def _mark_unreadable(self, k: int, s: _Slice, exc: Exception) -> None:
        self.volume.voxels[k] = s.intercept if self.volume.voxels.dtype.kind == "f" else \
            int(np.clip(s.intercept, *_INT16))
        self._failed.append(f"slice {k} ({s.path}) could not be decoded "
                            f"({_reason(exc)}); it is shown blank")
        self.volume.loaded[k] = True

    def _switch_to_float(self) -> None:
        voxels = self.volume.voxels.astype(np.float32)
        note = "values do not fit 16-bit integers: loaded as float32"
        self.volume = dataclasses.replace(self.volume, voxels=voxels,
                                          warnings=self.volume.warnings + (note,))

    def _finish_warnings(self) -> None:
        if self._failed:
            self.volume = dataclasses.replace(
                self.volume, warnings=self.volume.warnings + tuple(self._failed))
            self._failed = []

    def _progress(self) -> Progress:
        lo, hi = loaded_range(self.volume.loaded, self.first_slice)
        n = len(self._slices)
        done = int(self.volume.loaded.sum())
        return Progress(done / n, f"Loading slices {done}/{n}", (lo, hi))


def write_hu(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """Rescale stored values into ``out`` (int16 or float32) as pydicom's apply_rescale does."""
    if out.dtype == np.int16:
        lo, hi = int(stored.min()), int(stored.max())
        shift = int(intercept)
        if lo + shift < _INT16[0] or hi + shift > _INT16[1] or slope != 1:
            raise _NeedsFloat
        np.add(stored, np.int32(shift), out=out, casting="unsafe")
        return
    # float64 arithmetic then one rounding to float32, exactly like arr * slope + intercept.
    out[...] = stored.astype(np.float64) * slope + intercept


def centre_out_order(n: int, centre: int) -> list[int]:
    order = [centre]
    for step in range(1, n):
        for k in (centre + step, centre - step):
            if 0 <= k < n:
                order.append(k)
    return order


def loaded_range(loaded: np.ndarray, centre: int) -> tuple[int, int]:
    """Half-open range of filled slices around ``centre``."""
    if not loaded[centre]:
        return centre, centre
    left = np.flatnonzero(~loaded[:centre])
    right = np.flatnonzero(~loaded[centre:])
    lo = int(left[-1]) + 1 if left.size else 0
    hi = centre + int(right[0]) if right.size else len(loaded)
    return lo, hi


def _reason(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines())
    return text[:300] if text else type(exc).__name__


# ------------------------------------------------------------------------------ opening

def open_series(series: SeriesEntry) -> SeriesLoader:
    """Read headers (from the index), sort, allocate, and decode the first-shown slice."""
    if series.kind != "image":
        raise SeriesLoadError(f"series {series.key} is a {series.kind} object, not an image "
                              "series: open the image series it refers to instead")
    headers = series.instances or _headers_of(series)
    if len(headers) == 1 and headers[0].number_of_frames > 1:
        from app.core.dicom_multiframe import multiframe_slices

        slices, reader, warnings = multiframe_slices(series, headers[0])
    else:
        slices, warnings = _single_frame_slices(series, headers)
        reader = _single_frame_reader()
    _check_decoders(series, {s.header.transfer_syntax for s in slices})
    slices, geometry = stack_geometry(slices)
    volume = _allocate(series, slices, geometry, warnings + geometry.warnings)
    return SeriesLoader(series, slices, volume, len(slices) // 2, reader)


def load_series(series: SeriesEntry) -> Generator[Progress, None, Volume]:
    """Open a series and fill it: a job generator returning the complete Volume."""
    yield Progress(0.0, f"Opening {series.description or series.key}")
    loader = open_series(series)
    return (yield from loader.fill())


def _headers_of(series: SeriesEntry) -> list[InstanceHeader]:
    headers = []
    for path in series.files:
        try:
            headers.append(read_header(path, **_zip_opener(path)))
        except (ValueError, OSError) as exc:
            raise SeriesLoadError(f"series {series.key}: {path}: {_reason(exc)}") from None
    return headers


def _zip_opener(path: str) -> dict:
    archive, member = split_zip_path(path)
    if member is None:
        return {}
    data = read_file_bytes(path)
    return {"opener": lambda: io.BytesIO(data), "size": len(data)}


def _single_frame_slices(series: SeriesEntry, headers: list[InstanceHeader]):
    """Slices of the largest group of same-size, same-orientation images, and warnings."""
    warnings: list[str] = []
    usable = [h for h in headers if h.has_pixels is not False]
    if not usable:
        raise SeriesLoadError(f"series {series.key}: none of its {len(headers)} files has "
                              "pixel data")
    groups: dict[tuple, list[InstanceHeader]] = {}
    for h in usable:
        key = (h.rows, h.columns, tuple(round(v, 3) for v in h.orientation or ()))
        groups.setdefault(key, []).append(h)
    keep = max(groups.values(), key=len)
    if len(groups) > 1:
        others = len(usable) - len(keep)
        warnings.append(f"mixed sizes or orientations: {others} image(s) unlike the other "
                        f"{len(keep)} ({keep[0].rows}x{keep[0].columns}) were left out")
    slices = [_Slice(h.path, h, None, _position(h.position), h.slope, h.intercept,
                     h.instance_number or 0) for h in keep]
    if any(h.samples_per_pixel != 1 for h in keep):
        raise SeriesLoadError(f"series {series.key} holds colour (RGB) images; only greyscale "
                              "scans open as volumes")
    return slices, warnings


def _position(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value, float)


def _single_frame_reader() -> Callable[[_Slice], np.ndarray]:
    local = threading.local()

    def read(s: _Slice) -> np.ndarray:
        h = s.header
        if fast_path_accepts(h):
            # One buffer per thread: no allocation per slice.
            key = (h.rows, h.columns, h.bits_allocated, h.pixel_representation)
            if getattr(local, "key", None) != key:
                local.key, local.buffer = key, np.empty((h.rows, h.columns), _raw_dtype(h))
            return read_stored_fast(h, local.buffer)
        return read_stored_pydicom(h.path)

    return read


def _check_decoders(series: SeriesEntry, syntaxes: set[str]) -> None:
    compressed = sorted(s for s in syntaxes if s and s not in NATIVE_SYNTAXES)
    if not compressed:
        return  # and pydicom need not even be imported: the first slice comes sooner
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    for syntax in compressed:
        name = UID(syntax).name if UID(syntax).is_valid else syntax
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise SeriesLoadError(f"series {series.key}: transfer syntax {syntax} ({name}) "
                                  "has no decoder in pydicom") from None
        if not decoder.is_available:
            raise SeriesLoadError(f"series {series.key}: transfer syntax {syntax} ({name}) "
                                  "has no decoder installed") from None


def _allocate(series: SeriesEntry, slices: list[_Slice], geometry, warnings) -> Volume:
    h = slices[0].header
    dtype = np.int16 if _integral(slices) else np.float32
    shape = (len(slices), h.rows, h.columns)
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size > MAX_VOLUME_BYTES or min(shape) < 1:
        raise SeriesLoadError(f"series {series.key}: {shape[0]} x {h.rows} x {h.columns} "
                              f"voxels ({size / 2**30:.1f} GiB) is not a loadable volume")
    padded = any(s.header.padding_value is not None for s in slices)
    return Volume(
        voxels=np.empty(shape, dtype),
        spacing=geometry.spacing, origin=geometry.origin, direction=geometry.direction,
        modality=h.modality or series.modality,
        photometric=h.photometric or "MONOCHROME2",
        padding_mask=np.zeros(shape, bool) if padded else None,
        default_window=h.window, series_uid=series.series_uid, study_uid=series.study_uid,
        frame_of_reference_uid=h.frame_of_reference_uid,
        sop_uids=tuple(s.header.sop_uid for s in slices) if slices[0].frame is None else (),
        description={"series": series.description, "date": series.date,
                     "modality": series.modality},
        warnings=tuple(warnings), loaded=np.zeros(len(slices), bool))


def _integral(slices: list[_Slice]) -> bool:
    """int16 when every slice rescales by whole numbers within int16's range."""
    for s in slices:
        if s.slope != 1 or s.intercept != int(s.intercept):
            return False
        if s.header.bits_allocated > 16 and s.header.bits_stored > 16:
            return False
    # Ranges that could overflow are checked slice by slice while loading (_NeedsFloat).
    return True


# ---------------------------------------------------------------------------- thumbnails

def series_thumbnail(series: SeriesEntry, size: int = 64) -> np.ndarray:
    """uint8 (size, size) picture of the centre slice in the default window, for browsers."""
    if series.kind != "image":
        return np.zeros((size, size), np.uint8)
    loader = open_series(series)
    image = loader.volume.voxels[loader.first_slice].astype(np.float32)
    center, width = loader.volume.default_window or _auto_window(image)
    grey = np.clip((image - (center - width / 2)) / max(width, 1e-6), 0, 1)
    if loader.volume.photometric == "MONOCHROME1":
        grey = 1 - grey
    return _fit_square((grey * 255).astype(np.uint8), size)


def _auto_window(image: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [1, 99])
    return (lo + hi) / 2, max(hi - lo, 1.0)


def _fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour scale to fit ``size``, centred on black (keeps the aspect ratio)."""
    rows, cols = image.shape
    scale = size / max(rows, cols)
    h, w = max(1, round(rows * scale)), max(1, round(cols * scale))
    ys = np.minimum((np.arange(h) / scale).astype(int), rows - 1)
    xs = np.minimum((np.arange(w) / scale).astype(int), cols - 1)
    out = np.zeros((size, size), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = image[np.ix_(ys, xs)]
    return out
