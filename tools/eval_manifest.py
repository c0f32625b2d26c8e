"""Widen a demo data set's eval split with more generated cases, for verdicts with evidence.

    python tools/eval_manifest.py OUT/manifest.csv BASE/manifest.csv EXTRA/manifest.csv [...]
                                  [--calib CALIB/manifest.csv ...] [--train TRAIN/manifest.csv ...]
                                  [--unlabelled-train MORE/manifest.csv ...]

BASE keeps its train/calib/eval split (what the demo models were trained and calibrated on);
every case of each EXTRA manifest (e.g. ``main.py demo-data --seed 6``) joins the eval split,
and every case of each ``--calib`` manifest joins the calib split (more scans to choose the
lesion clean-up on; no model trains on them), and every case of each ``--train`` manifest joins the
train split (more scans to fine-tune or distil on: the 184-scan set of bench/README.md), and
every case of each ``--unlabelled-train`` manifest joins it without its labels (scans the
original never saw, for a distillation to learn how the original behaves on new scans).
Case names get a prefix per manifest (A, B, …) so they stay unique; paths are written relative
to OUT's folder. A patient in two of the manifests is refused: it would leak training data into
the evaluation. Nothing is copied or modified; only OUT is written.
"""
from __future__ import annotations

import argparse
import os
import string
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.manifest import Manifest, read_manifest, write_manifest  # noqa: E402


def widened(out: Path, base: Path, extras: list[Path], calib: list[Path] = (), train: list[Path] = (),
            unlabelled_train: list[Path] = ()) -> Manifest:
    cases, owner = [], {}
    for prefix, path in zip(string.ascii_uppercase, [base, *extras, *calib, *train, *unlabelled_train]):
        manifest = read_manifest(path)
        for case in manifest.cases:
            if owner.setdefault(case.patient, path) != path:
                raise SystemExit(f"{path}: patient {case.patient} is also in {owner[case.patient]}")

            def moved(relative: str) -> str:
                return os.path.relpath(manifest.root / relative, out.parent) if relative else ""

            cases.append(replace(case, case=f"{prefix}{case.case}",
                                 series=case.series if case.series_is_uid else moved(case.series),
                                 labels="" if path in unlabelled_train else moved(case.labels),
                                 split=(case.split if path == base else "calib" if path in calib
                                        else "train" if path in (*train, *unlabelled_train) else "eval")))
    return Manifest(cases=cases, root=out.parent)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("base", type=Path)
    parser.add_argument("extras", type=Path, nargs="*")
    # "extend": each repeat of an option adds its manifests (the default kept only the last one)
    parser.add_argument("--calib", type=Path, nargs="+", action="extend", default=[],
                        help="manifests whose cases join the calib split")
    parser.add_argument("--train", type=Path, nargs="+", action="extend", default=[],
                        help="manifests whose cases join the train split")
    parser.add_argument("--unlabelled-train", type=Path, nargs="+", action="extend", default=[],
                        help="manifests whose cases join the train split without their labels")
    args = parser.parse_args(argv)
    if not (args.extras or args.calib or args.train or args.unlabelled_train):
        parser.error("name at least one EXTRA, --calib, --train or --unlabelled-train manifest")
    manifest = widened(args.out.resolve(), args.base.resolve(), [p.resolve() for p in args.extras],
                       [p.resolve() for p in args.calib], [p.resolve() for p in args.train],
                       [p.resolve() for p in args.unlabelled_train])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, args.out)
    counts = {s: len(manifest.cases_in(s)) for s in ("train", "calib", "eval")}
    print(f"{args.out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
