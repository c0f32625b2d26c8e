"""``python main.py compare``: the compare view's work without a window.

    python main.py compare --models ORIGINAL COMPRESSED [...] --data PATH --report OUT.html
                           [--pdf OUT.pdf] [--seg-out DIR] [--split eval] [--identify]

PATH is a manifest (or the folder holding manifest.csv; its ``--split`` cases are used) or one
DICOM series folder. The first model is the reference. Findings are cached under
``$MEDCOMPRESS_HOME/findings-cache`` so a second report on the same data runs no model again.
"""
from __future__ import annotations

import sys
from pathlib import Path

from app.core.progress import run_with_bar, scaled


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("compare", help="compare 2-4 model variants on a study or an eval split: "
                                              "disagreements, accuracy, HTML/PDF report, DICOM SEG")
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="model cards or files; the first is the reference (the original). Lesion-type "
                        "classifiers among them are compared on the first segmentation model's lesions")
    p.add_argument("--data", required=True, help="manifest.csv, its folder, or one DICOM series folder")
    p.add_argument("--report", required=True, help="the HTML report to write")
    p.add_argument("--pdf", help="also write the report as PDF")
    p.add_argument("--seg-out", help="write each variant's findings as DICOM SEG (+ lesion measurements as "
                                     "DICOM SR, TID 1500) into this folder")
    p.add_argument("--split", default="eval", help="which manifest split to compare on (default eval)")
    p.add_argument("--volume-change", type=float, default=None, metavar="PCT",
                   help="list matched lesions whose volume changed by more than PCT %% (default 25)")
    p.add_argument("--threads", type=int, default=None, help="inference threads per model")
    p.add_argument("--identify", action="store_true",
                   help="name cases as the manifest does (default: Case 1, Case 2 …, de-identified)")
    p.set_defaults(handler=run_cli)


def run_cli(args) -> int:
    from app.core.models import ModelError, open_model
    from compression.compare import CompareError
    from compression.data import DataError

    try:
        variants = [open_model(m) for m in args.models]
        return _compare(args, variants)
    except (CompareError, DataError, ModelError, FileNotFoundError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2


def _compare(args, variants) -> int:
    from app.core.audit import audit_data_root
    from app.core.findings_cache import FindingsCache
    from compression.compare import InProcessRunner, check_variants, compare, load_compare_cases, split_by_task
    from compression.compare_report import export_segs, write_reports

    variants, classifiers = split_by_task(variants)
    check_variants(variants, classifiers)
    cases = run_with_bar(scaled(load_compare_cases(args.data, args.split), 0.0, 1.0, "loading cases: "))
    cache = FindingsCache(audit_data_root() / "findings-cache")
    options = {"classifiers": classifiers}
    if args.volume_change is not None:
        options["volume_change_pct"] = args.volume_change
    run = run_with_bar(scaled(compare(variants, cases, cache, InProcessRunner(threads=args.threads), **options),
                                  0.0, 1.0, "comparing: "))
    for path in write_reports(run, args.report, args.pdf, identify=args.identify):
        print(f"report: {path}")
    if args.seg_out:
        for path in export_segs(run, Path(args.seg_out), identify=args.identify):
            print(f"seg: {path}")
    _print_summary(run)
    return 0


def _print_summary(run) -> None:
    from compression.compare_report import disagreement_counts

    for line in disagreement_counts(run):
        print(line)
