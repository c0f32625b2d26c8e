"""The scans compression learns from: manifest cases loaded as volumes, cut into network-ready slices.

Calibration, fine-tuning and distillation read the manifest's ``calib`` / ``train`` cases through
:func:`load_cases` (all at once) or :class:`LazyCases` (one scan at a time: ``compress`` reads
train and eval this way); :func:`cut_slices` / :func:`slice_tensors` turn them into the exact
arrays the network sees at inference (same orientation, HU window and normalisation as
``app.core.inference.prepare``), so a model is never tuned on data pre-processed differently
from how it will run.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Sequence

import numpy as np

from app.core.manifest import Case, Manifest
from app.core.model_card import ModelCard
from app.core.progress import Progress, run_to_end
from app.core.volume import Volume


class DataError(ValueError):
    """A case of the manifest cannot be read; the message names the case and the file."""


@dataclass
class CaseData:
    case: str
    patient: str
    series: str
    volume: Volume
    labels: np.ndarray | None  # uint8 on the volume grid: 0 background, 1 nodule; None when unlabelled


# ---------------------------------------------------------------- loading


def load_cases(manifest: Manifest, split: str | Sequence[str]) -> Generator[Progress, None, list[CaseData]]:
    """Every case of ``split`` (one name or several) as volumes plus labels; one progress tick per case."""
    splits = (split,) if isinstance(split, str) else tuple(split)
    wanted = [c for c in manifest.cases if c.split in splits]
    out = []
    for number, case in enumerate(wanted, 1):
        out.append(load_case(manifest, case))
        yield Progress(number / len(wanted), f"loaded case {case.case} ({number}/{len(wanted)})")
    return out


class LazyCases(Sequence):
    """The cases of a split, each read from disk when it is reached and then let go.

    Evaluation runs every variant on one case before the next, so it needs one scan at a
    time: the 40 whole eval scans of the demo data hold about 6 GB as volumes and labels,
    which beside the train and calib scans a compression step keeps did not fit in 23 GB.
    Train scans come this way too: distilling on 184 of them needs each one only while its
    slices are cut (:func:`slice_tensors` streams). Indexing reads the scan again each time;
    iterate once where it matters."""

    def __init__(self, manifest: Manifest, split: str | None = None, cases: Sequence[Case] | None = None):
        self.manifest = manifest
        self.cases = list(manifest.cases_in(split) if cases is None else cases)
        for case in self.cases:  # what can be checked without reading: before hours of compression, not after
            _series_folder(manifest, case)

    def labelled(self) -> list[bool]:
        """Which cases have a label map, from the manifest alone (reading is left to each case)."""
        return [self.manifest.labels_path(case) is not None for case in self.cases]

    def subset(self, indices: Sequence[int]) -> "LazyCases":
        return LazyCases(self.manifest, cases=[self.cases[i] for i in indices])

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return load_case(self.manifest, self.cases[index])


def split_by_labels(cases: Sequence[CaseData]) -> tuple[Sequence[CaseData], Sequence[CaseData]]:
    """(cases with labels, cases without), without reading a lazy split's scans."""
    if isinstance(cases, LazyCases):
        flags = cases.labelled()
        return (cases.subset([i for i, f in enumerate(flags) if f]),
                cases.subset([i for i, f in enumerate(flags) if not f]))
    return [c for c in cases if c.labels is not None], [c for c in cases if c.labels is None]


def load_case(manifest: Manifest, case: Case) -> CaseData:
    volume = _read_volume(_series_folder(manifest, case), case)
    labels_path = manifest.labels_path(case)
    labels = None if labels_path is None else _read_labels(labels_path, volume, case)
    return CaseData(case.case, case.patient, case.series, volume, labels)


def _optional(module: str, name: str):
    """A loader of app.core if that module provides it (the DICOM/mask loaders), else None."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _series_folder(manifest: Manifest, case: Case) -> Path:
    """The case's series path, or a DataError: named only by UID, or not there."""
    path = manifest.series_path(case)
    if path is None:
        raise DataError(f"case {case.case}: series {case.series} is named by UID; "
                        "give its folder in the manifest to use it for compression")
    if not path.exists():
        raise DataError(f"case {case.case}: series not found: {path}")
    return path


def _read_volume(path: Path, case: Case) -> Volume:
    try:
        volume = _read_dicom_series(path, case)
        return volume if volume is not None else _read_with_sitk(path)
    except DataError:
        raise
    except Exception as exc:  # any reader failure becomes one clear per-case error
        raise DataError(f"case {case.case}: cannot read series {path} ({_first_line(exc)})") from exc


def _read_dicom_series(path: Path, case: Case) -> Volume | None:
    """The DICOM series at ``path`` through app.core's loader; None when it holds no DICOM (e.g. NIfTI)."""
    index_path = _optional("app.core.dicom_index", "index_path")
    load_series = _optional("app.core.dicom_load", "load_series")
    if index_path is None or load_series is None or path.suffix.lower() in (".nii", ".gz", ".nrrd", ".mha", ".mhd"):
        return None
    series = run_to_end(index_path(path)).all_series()
    if len(series) > 1:
        raise DataError(f"case {case.case}: {path} holds {len(series)} series; give one series folder per case")
    return run_to_end(load_series(series[0])) if series else None


def _read_with_sitk(path: Path) -> Volume:
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise DataError(f"{path}: no DICOM series in this folder")
        reader.SetFileNames(files)
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    voxels = sitk.GetArrayFromImage(image)
    voxels = voxels.astype(np.int16) if np.all(np.mod(voxels, 1) == 0) else voxels.astype(np.float32)
    return Volume(voxels=voxels, spacing=tuple(float(s) for s in reversed(image.GetSpacing())),
                  origin=tuple(image.GetOrigin()), direction=np.asarray(image.GetDirection()).reshape(3, 3))


def _read_labels(path: Path, volume: Volume, case: Case) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"case {case.case}: label map not found: {path}")
    loader = _optional("app.core.masks", "load_label_file")
    try:
        if loader is not None:
            labels = loader(path, volume)  # resampled (nearest) onto the series' grid
        else:
            import SimpleITK as sitk

            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except Exception as exc:
        raise DataError(f"case {case.case}: cannot read label map {path} ({_first_line(exc)})") from exc
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise DataError(f"case {case.case}: label map {path.name} is {labels.shape}, its series {volume.shape}")
    return (labels > 0).astype(np.uint8)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------- slices for the network


def slice_tensors(cases: Sequence[CaseData], card: ModelCard, *, with_labels: bool, max_slices: int | None = None,
                  foreground_fraction: float = 0.5, seed: int = 0, dtype=np.float32,
                  guide: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`cut_slices` without its progress."""
    return run_to_end(cut_slices(cases, card, with_labels=with_labels, max_slices=max_slices,
                                 foreground_fraction=foreground_fraction, seed=seed, dtype=dtype, guide=guide))


def cut_slices(cases: Sequence[CaseData], card: ModelCard, *, with_labels: bool, max_slices: int | None = None,
               foreground_fraction: float = 0.5, seed: int = 0, dtype=np.float32,
               guide: Callable[[np.ndarray], np.ndarray] | None = None,
               ) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray | None]]:
    """Axial slices pre-processed exactly as inference does: x (N, C, H, W) of ``dtype``, y (N, H, W) uint8;
    one progress tick per case (reading a lazy split's 184 scans takes minutes). A 2.5-D card
    (``input.slice_context``) gets each slice with its neighbours as the channels, as its runner
    feeds it; float16 halves what they hold (3 channels of 6000 whole slices: 9 GB, not 19).

    ``max_slices`` keeps a seeded sample in which about ``foreground_fraction`` of the slices
    contain a labelled nodule (when labels exist), so a small budget still sees lesions. The
    cases are read one after another and only the kept slices stay in memory: each case's share
    is what is left of the budget over the cases left, so a short case hands its share on.
    With ``with_labels`` every case must be labelled; ``y`` is None otherwise.

    ``guide`` stands in for the labels of a case that has none: given all its slices as the card
    reads them, (N, C, H, W), it says per slice whether a reference model sees a lesion there, and
    ``max_slices`` draws that case's lesion share from those slices. A distillation uses the
    teacher: where it raises an alarm on a scan it never saw is what a student must learn to copy,
    and a random sample of an unlabelled scan holds few of those slices.
    """
    if card.input.dims != 2:
        raise ValueError(f"{card.name}: compression data are axial slices; this card is {card.input.dims}D")
    if with_labels:
        _, missing = split_by_labels(cases)
        if len(missing):
            names = ", ".join(c.case for c in (missing.cases if isinstance(missing, LazyCases) else missing))
            raise DataError(f"labels are needed but these cases have none: {names}")
    from app.core.inference import pad_to_multiple

    images, labels = yield from _prepared_slices(cases, card, max_slices, foreground_fraction, seed, dtype, guide)
    x = _as_input(images, card)
    del images
    y = pad_to_multiple(labels, card.input.size_divisor) if with_labels else None
    return np.ascontiguousarray(x, dtype), y


def _as_input(images: np.ndarray, card: ModelCard) -> np.ndarray:
    """Prepared slices (N, y, x), or (N, 2k + 1, y, x) with their neighbours, as the network reads
    them: padded to its size divisor, with its channel axis."""
    from app.core.inference import pad_to_multiple

    x = pad_to_multiple(images, card.input.size_divisor)
    if not card.input.slice_context:
        x = x[:, None]
        x = np.repeat(x, card.input.channels, axis=1) if card.input.channels > 1 else x
    return x


def reference_input(x: np.ndarray, channels: int) -> np.ndarray:
    """Slices cut for a 2.5-D model, as a model reading fewer neighbours sees them: the middle
    ``channels`` (a one-slice original teaching a 2.5-D student reads the centre slice)."""
    if x.shape[1] == channels:
        return x
    if channels > x.shape[1] or (x.shape[1] - channels) % 2:
        raise ValueError(f"slices of {x.shape[1]} channels cannot feed a model of {channels}")
    edge = (x.shape[1] - channels) // 2
    return x[:, edge:edge + channels]


def _prepared_slices(cases: Sequence[CaseData], card: ModelCard, max_slices: int | None, foreground_fraction: float,
                     seed: int, dtype=np.float32, guide: Callable | None = None,
                     ) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray]]:
    from app.core.inference import neighbour_slices, prepare

    rng = np.random.default_rng(seed)
    want_fg = want_bg = None
    if max_slices is not None:
        want_fg = int(round(max_slices * foreground_fraction))
        want_bg = max_slices - want_fg
    images, labels = [], []
    for number, case in enumerate(cases):  # one case in memory at a time (a lazy split reads it here)
        prepared = prepare(case.volume, card)
        grid_labels = _labels_on_grid(case, prepared, card)
        keep = np.arange(len(grid_labels))
        context = card.input.slice_context
        if max_slices is not None:
            left = len(cases) - number
            has_fg = _has_lesion(grid_labels)
            if case.labels is None and guide is not None:  # where the reference sees lesion, for want of labels
                whole = neighbour_slices(prepared.array, keep, context) if context else prepared.array
                has_fg = np.asarray(guide(_as_input(whole, card)), bool)
            keep = _choose_slices(has_fg, -(-want_fg // left), -(-want_bg // left), rng, substitute=left == 1)
            want_fg -= int(has_fg[keep].sum())
            want_bg -= int((~has_fg[keep]).sum())
        images.append(np.ascontiguousarray(neighbour_slices(prepared.array, keep, context) if context
                                           else prepared.array[keep], dtype))
        labels.append(grid_labels[keep])
        yield Progress((number + 1) / len(cases), f"slices of case {case.case} ({number + 1}/{len(cases)})")
        del prepared, grid_labels, case
    shapes = {a.shape[-2:] for a in images}
    if len(shapes) > 1:  # slices of different sizes cannot share a batch: centre-crop to the smallest
        size = tuple(min(s[i] for s in shapes) for i in (0, 1))
        images, labels = [_crop(a, size) for a in images], [_crop(a, size) for a in labels]
    return _join(images), np.concatenate(labels)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate that lets go of each part once copied: the slices are held about once,
    not twice (6000 whole slices of 3 channels are 9 GB in float16)."""
    if not parts:
        return np.concatenate(parts)  # its own error, as before
    out = np.empty((sum(len(p) for p in parts),) + parts[0].shape[1:], parts[0].dtype)
    start = 0
    while parts:
        part = parts.pop(0)  # out of the list, so freed once copied
        out[start:start + len(part)] = part
        start += len(part)
    return out


def _labels_on_grid(case: CaseData, prepared, card: ModelCard) -> np.ndarray:
    """Labels moved the way ``prepare`` moved the voxels (reorient, resample nearest)."""
    from app.core.inference import _reorient, _resample

    if case.labels is None:
        return np.zeros(prepared.array.shape, np.uint8)
    labels = _reorient(np.asarray(case.labels), prepared.permutation, prepared.flips)
    if labels.shape != prepared.array.shape:
        labels = _resample(labels.astype(np.float32), None, None, order=0, shape=prepared.array.shape)
    return (labels > 0.5).astype(np.uint8)


def _crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    y0 = (array.shape[-2] - size[0]) // 2
    x0 = (array.shape[-1] - size[1]) // 2
    return array[..., y0:y0 + size[0], x0:x0 + size[1]]


def _choose_slices(has_fg: np.ndarray, n_fg: int, n_bg: int, rng, substitute: bool = True) -> np.ndarray:
    """Up to ``n_fg`` of the slices ``has_fg`` marks (a nodule) and ``n_bg`` of the others,
    drawn at random. With ``substitute`` (the last case of a budget), a kind that runs short is
    made up by the other; before that, the shortfall is left to the cases still to come."""
    everything = np.arange(len(has_fg))
    fg, bg = everything[has_fg], everything[~has_fg]
    n_fg, n_bg = max(0, n_fg), max(0, n_bg)
    take_fg, take_bg = min(len(fg), n_fg), min(len(bg), n_bg)
    if substitute:
        take_bg = min(len(bg), n_fg + n_bg - take_fg)
        take_fg = min(len(fg), n_fg + n_bg - take_bg)  # too few background slices: take more nodule slices
    chosen = np.concatenate([rng.choice(fg, take_fg, replace=False), rng.choice(bg, take_bg, replace=False)])
    return np.sort(chosen.astype(int))


def _has_lesion(labels: np.ndarray) -> np.ndarray:
    """Per slice of (N, y, x) labels: does it hold any lesion voxel (N may be 0)."""
    return labels.any(axis=(1, 2)) if len(labels) else np.zeros(0, bool)


def cases_from_arrays(volumes: Sequence[Volume], labels: Sequence[np.ndarray | None], patients=None) -> list[CaseData]:
    """CaseData for volumes already in memory (a notebook, a test, the GUI's open scans)."""
    patients = list(patients) if patients is not None else [f"P{i}" for i in range(len(volumes))]
    return [CaseData(f"case{i}", patients[i], v.series_uid or f"series{i}", v, l)
            for i, (v, l) in enumerate(zip(volumes, labels))]
