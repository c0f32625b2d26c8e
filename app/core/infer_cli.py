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
import time
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
    parser.add_argument("--backend", choices=("onnxruntime", "torch", "torch-aoti"),
                        help="default: on the CPU, the card's AOTInductor package (torch int8) when this machine "
                             "compiled it or with --trust; else ONNX Runtime when it has an ONNX file, else torch")
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
    done = failures = 0
    for label, load in iter_series(Path(args.data), args.series_uid):
        ok = _infer_one(label, load, runners, Path(args.out))
        done, failures = done + ok, failures + (not ok)
    if done + failures == 0:
        print(f"error: {args.data}: no image series found" + (f" with UID {args.series_uid}" if args.series_uid else ""),
              file=sys.stderr)
    return 1 if failures or not done else 0


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


def iter_series(path: Path, series_uid: str | None = None) -> Iterator[tuple[str, object]]:
    """(label, load()) for each image series under ``path``; ``load`` returns a Volume.

    ``path`` may be a series folder, a folder of studies, a DICOMDIR, a zip (the project's
    DICOM index reads all of them) or a manifest CSV, whose cases' series are indexed in turn.
    """
    if path.is_file() and path.suffix.lower() == ".csv":
        from app.core.manifest import read_manifest

        manifest = read_manifest(path)
        for case in manifest.cases:
            series = manifest.series_path(case)
            if series is not None:
                yield from _indexed_series(series, series_uid, f"case {case.case} ")
        return
    yield from _indexed_series(path, series_uid, "")


def _indexed_series(path: Path, series_uid: str | None, prefix: str):
    from app.core.dicom_index import index_path
    from app.core.progress import run_to_end

    if not path.exists():
        print(f"error: {path}: no such file or folder", file=sys.stderr)
        return
    index = run_to_end(index_path(path))
    for problem in index.problems:
        log.warning("%s: %s", problem.path, problem.reason)
    for entry in index.image_series():
        if series_uid and entry.series_uid != series_uid:
            continue
        yield f"{prefix}{entry.description or path.name} [{entry.series_uid}]", (lambda e=entry: _load(e))


def _load(entry):
    from app.core.dicom_load import load_series
    from app.core.progress import run_to_end

    return run_to_end(load_series(entry))
