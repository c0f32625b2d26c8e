"""``python main.py infer``: run one or more models on every series under a path, headless.

    python main.py infer --model CARD_OR_FILE [--model CLASSIFIER] --data PATH [--series-uid UID]
                         [--device cpu|cuda:0] [--threads N] [--seed S] --out DIR

PATH is a series folder, a folder of studies, a zip of either, or a manifest CSV. For each
series it writes ``OUT/<SeriesInstanceUID>/`` with ``labels.nii.gz``, ``lesions.csv``,
``timing.json`` and ``findings.json``. With several ``--model``s, each gets a subfolder named
after its card, and a lesion classifier scores the lesions the segmentation before it found.
A bad series is reported and skipped; a bad model stops the run with its message.
"""
from __future__ import annotations

import logging
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("infer", help="run models on scans and write findings (NIfTI, lesion CSV, timing)")
    parser.add_argument("--model", action="append", required=True, metavar="CARD_OR_FILE",
                        help="model card, model file with its card beside it, or MONAI bundle; repeat to chain "
                             "a lesion classifier after a segmentation model")
    parser.add_argument("--data", required=True, metavar="PATH", help="series folder, folder of studies, zip or manifest")
    parser.add_argument("--series-uid", help="only this SeriesInstanceUID")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("onnxruntime", "torch"), help="default: ONNX Runtime when the card has an ONNX file")
    parser.add_argument("--trust", action="store_true", help="allow pickled models / non-MONAI bundle code (only for files you trust)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(handler=run_cli)


def run_cli(args) -> int:
    from app.core.model_card import ModelError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    _seed(args.seed)
    try:
        runners = [_runner(path, args) for path in args.model]
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures = 0
    with _readable_folder(Path(args.data)) as data:
        for label, load in iter_series(data, args.series_uid):
            failures += not _infer_one(label, load, runners, Path(args.out))
    return 1 if failures else 0


def _seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)


def _runner(path: str, args):
    from app.core.inference import make_runner
    from app.core.models import open_model

    variant = open_model(path, trust=args.trust)
    return make_runner(variant, device=args.device, threads=args.threads, backend=args.backend)


def _infer_one(label: str, load, runners, out: Path) -> bool:
    """Run every model on one series; False (after saying why) when the series cannot be used."""
    from app.core.model_card import ModelError
    from app.core.progress import run_to_end

    try:
        start = time.perf_counter()
        volume = load()
        load_s = time.perf_counter() - start
    except Exception as exc:  # any reader failure is this series' problem, not the run's
        print(f"error: {label}: cannot load the series ({exc})", file=sys.stderr)
        return False
    folder = out / (volume.series_uid or _safe_name(label))
    lesions = None
    try:
        for runner in runners:
            findings = run_to_end(runner.run(volume, lesions=lesions))
            findings.timing.load_s += load_s
            lesions = findings.lesions if findings.labels is not None else lesions
            target = folder if len(runners) == 1 else folder / runner.card.name
            findings.save(target)
            print(f"{label}: {runner.card.name} → {target} ({len(findings.lesions)} lesions, "
                  f"{findings.timing.total_s:.2f} s on {runner.provider})")
    except ModelError as exc:
        print(f"error: {label}: {exc}", file=sys.stderr)
        return False
    return True


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[-80:] or "series"


# ---------------------------------------------------------------- finding series


class _readable_folder:
    """A zip is unpacked to a temporary folder for the run; anything else is used in place."""

    def __init__(self, path: Path):
        self.path = path
        self._tmp = None

    def __enter__(self) -> Path:
        if self.path.is_file() and zipfile.is_zipfile(self.path):
            self._tmp = tempfile.TemporaryDirectory(prefix="medcompress-infer-")
            with zipfile.ZipFile(self.path) as archive:
                archive.extractall(self._tmp.name)
            return Path(self._tmp.name)
        return self.path

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def iter_series(path: Path, series_uid: str | None = None) -> Iterator[tuple[str, object]]:
    """(label, load()) for each series under ``path``; ``load`` returns a Volume."""
    if path.is_file() and path.suffix.lower() == ".csv":
        yield from _manifest_series(path, series_uid)
        return
    for folder, uid, files in _dicom_series(path):
        if series_uid and uid != series_uid:
            continue
        yield f"{folder} [{uid}]", (lambda f=files: _read_files(f))


def _manifest_series(path: Path, series_uid: str | None):
    from app.core.manifest import read_manifest

    manifest = read_manifest(path)
    for case in manifest.cases:
        series = manifest.series_path(case)
        if series is None:
            continue
        for folder, uid, files in _dicom_series(series):
            if series_uid and uid != series_uid:
                continue
            yield f"case {case.case} [{uid}]", (lambda f=files: _read_files(f))


def _dicom_series(root: Path):
    """(folder, SeriesInstanceUID, sorted files) for every DICOM series below ``root``."""
    import SimpleITK as sitk

    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder")
    folders = [root] if root.is_dir() else [root.parent]
    folders += sorted(p for p in root.rglob("*") if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ():
            yield folder, uid, sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)


def _read_files(files) -> "object":
    """Read a series through the project's DICOM loader when present, else SimpleITK."""
    from app.core.demo_models import volume_from_sitk
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    volume = volume_from_sitk(image)
    uid = reader.GetMetaData(0, "0020|000e").strip() if reader.HasMetaDataKey(0, "0020|000e") else ""
    from dataclasses import replace

    return replace(volume, series_uid=uid)
