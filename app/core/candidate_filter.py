"""The candidate filter: a second network that tells nodules from the vessel and pleura pieces
a segmentation also marks (the false-positive reduction stage of LUNA16-style detectors).

The segmentation's lesion candidates (components of foreground ≥ 0.5) are each scored from
small patches around their centre — one per slice offset of the windowed scan, sampled in
millimetres so that the filter sees the same anatomy at any pixel spacing, plus the
segmentation's own probability on the centre slice — and the card's threshold drops the
low-scoring ones. The geometry lives in the card (:class:`app.core.model_card.CandidateFilter`);
the network is an ONNX file beside it, run on the CPU: a few hundred 32×32 patches per scan
take milliseconds, so it never needs the accelerator the segmentation may use.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from app.core.model_card import CandidateFilter, ModelError

FILE_ROLE = "candidate_filter"


def candidate_centres(instances: np.ndarray, count: int, offset=(0, 0, 0)) -> np.ndarray:
    """(count, 3) centres of mass of lesions 1..count in voxel (z, y, x), ``offset`` added
    (the corner of the box ``instances`` was cut from)."""
    if count == 0:
        return np.zeros((0, 3))
    inside = np.flatnonzero(instances.reshape(-1))
    ids = instances.reshape(-1)[inside]
    sizes = np.bincount(ids, minlength=count + 1)[1:].astype(np.float64)
    coords = np.unravel_index(inside, instances.shape)
    centres = np.stack([np.bincount(ids, weights=c, minlength=count + 1)[1:] for c in coords], axis=1)
    return centres / np.maximum(sizes, 1)[:, None] + np.asarray(offset, np.float64)


def candidate_patches(voxels: np.ndarray, foreground: np.ndarray, centres: np.ndarray,
                      spacing: tuple[float, float, float], spec: CandidateFilter) -> np.ndarray:
    """(N, channels, patch_px, patch_px) float32 filter inputs for the candidates at ``centres``
    (voxel z, y, x) of a scan ``voxels`` (HU, z-y-x, ``spacing`` in mm) whose segmentation gave
    ``foreground``: the scan at each slice offset, clipped to the window and scaled to 0..1,
    and the foreground probability on the centre slice. Outside the scan reads as air / 0."""
    from scipy.ndimage import map_coordinates

    lo, hi = spec.hu_window
    n, size = len(centres), int(spec.patch_px)
    out = np.zeros((n, spec.channels, size, size), np.float32)
    steps = (np.arange(size) - (size - 1) / 2.0) * spec.pixel_mm
    dz, dy, dx = (float(s) for s in spacing)
    for i, (z, y, x) in enumerate(centres):
        rows, cols = np.meshgrid(y + steps / dy, x + steps / dx, indexing="ij")
        grid = np.stack([rows, cols])
        centre_slice = int(np.clip(round(z), 0, len(voxels) - 1))
        for c, mm in enumerate(spec.slice_offsets_mm):
            k = int(np.clip(round(z + mm / dz), 0, len(voxels) - 1))
            out[i, c] = map_coordinates(np.asarray(voxels[k], np.float32), grid, order=1, mode="constant", cval=lo,
                                        output=np.float32)
        # scipy interpolates neither float16 (kept probabilities) nor most integer scans' types natively
        out[i, -1] = map_coordinates(np.asarray(foreground[centre_slice], np.float32), grid, order=1,
                                     mode="constant", cval=0.0, output=np.float32)
    scan = out[:, :-1]
    np.clip(scan, lo, hi, out=scan)
    scan -= lo
    scan /= float(hi - lo)
    return out


class FilterSession:
    """The filter's ONNX Runtime session (CPU, no thread spinning); thread-safe scoring."""

    def __init__(self, path: Path, spec: CandidateFilter, threads: int | None = None):
        import onnxruntime as ort

        from app.core.inference import _first_line, session_options

        self.path, self.spec = Path(path), spec
        try:
            self.session = ort.InferenceSession(str(path), session_options(ort, threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"{path}: ONNX Runtime cannot load the candidate filter ({_first_line(exc)})") from exc
        inputs = self.session.get_inputs()
        shape = inputs[0].shape
        want = [spec.channels, spec.patch_px, spec.patch_px]
        if len(inputs) != 1 or len(shape) != 4 or any(isinstance(a, int) and a != b for a, b in zip(shape[1:], want)):
            raise ModelError(f"{path}: the candidate filter takes input {shape}, but its card describes "
                             f"patches (N, {', '.join(map(str, want))})")
        self._input = inputs[0].name
        self._lock = threading.Lock()

    def scores(self, patches: np.ndarray, batch: int = 256) -> np.ndarray:
        """One score in [0, 1] per patch stack."""
        if len(patches) == 0:
            return np.zeros(0, np.float32)
        parts = []
        with self._lock:
            for start in range(0, len(patches), batch):
                out = self.session.run(None, {self._input: np.ascontiguousarray(patches[start:start + batch],
                                                                                np.float32)})[0]
                parts.append(np.asarray(out, np.float32).reshape(len(out), -1)[:, 0])
        return np.concatenate(parts)

    def score_lesions(self, voxels, foreground, instances, count, spacing, offset=(0, 0, 0)) -> np.ndarray:
        """Scores of lesions 1..count of ``instances`` (cut from the scan at ``offset``)."""
        return self.scores(lesion_patches(voxels, foreground, instances, count, spacing, self.spec, offset))


def lesion_patches(voxels, foreground, instances, count, spacing, spec: CandidateFilter,
                   offset=(0, 0, 0)) -> np.ndarray:
    """The filter's inputs for lesions 1..count of ``instances`` (cut from the scan at ``offset``):
    patches at their centres of mass; (0, channels, patch_px, patch_px) when there are none."""
    return candidate_patches(voxels, foreground, candidate_centres(instances, count, offset), spacing, spec)


def filter_file(files: dict, card_path) -> Path:
    """The card's candidate_filter file, or a ModelError naming the card (``open_model`` checks
    every card that names a filter here, and the runner finds the file through it)."""
    if FILE_ROLE not in files:
        raise ModelError(f"{card_path}: postprocessing names a candidate_filter but 'files' has no "
                         f"{FILE_ROLE!r} entry")
    return Path(files[FILE_ROLE])
