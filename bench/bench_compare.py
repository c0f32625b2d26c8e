"""Comparing variants: what the findings cache saves, and what the report costs, side by side.

    .venv/bin/python bench/bench_compare.py [--cases 3] [--size tiny|full]

Two real ONNX variants (the density-threshold pair of the compare tests) on every demo case.
Getting the findings three times in one run: cold (every model runs), warm (a fresh session:
read back from the disk cache) and hot (the same session: in memory); then assembling the
comparison (disagreements, evaluation, bootstrap) and writing the HTML and PDF reports.
Prints seconds and ratios against the cold run. Nothing is asserted: machines are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    args = parser.parse_args(argv)

    from app.core.demo_data import generate_demo_data
    from app.core.findings_cache import FindingsCache
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from app.core.report import write_html, write_pdf
    from compression.compare import InProcessRunner, assemble, collect_findings, load_compare_cases
    from compression.compare_report import report_data
    from tests.compression.compare_fixtures import original_and_degraded

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["MEDCOMPRESS_HOME"] = str(root / "home")
        run_to_end(generate_demo_data(root / "demo", cases=args.cases, seed=5, size=args.size))
        variants = [open_model(p) for p in original_and_degraded(root / "models")]
        cases = [c for split in ("train", "calib", "eval")
                 for c in run_to_end(load_compare_cases(root / "demo", split=split))]
        cache = FindingsCache(root / "cache")
        runner = InProcessRunner(threads=1)
        _, cold = _timed(lambda: run_to_end(collect_findings(variants, cases, cache, runner)))
        _, warm = _timed(lambda: run_to_end(collect_findings(variants, cases, FindingsCache(root / "cache"), runner)))
        _, hot = _timed(lambda: run_to_end(collect_findings(variants, cases, cache, runner)))
        run, assembling = _timed(lambda: run_to_end(assemble(variants, cases, cache)))
        data, build = _timed(lambda: report_data(run))
        _, html = _timed(lambda: write_html(data, root / "r.html"))
        _, pdf = _timed(lambda: write_pdf(data, root / "r.pdf"))
    print(f"{len(cases)} case(s) ({args.size}) x {len(variants)} variants, "
          f"{len(run.all_disagreements())} disagreements")
    print("findings of every variant on every case:")
    for name, seconds in (("cold (models run)", cold), ("warm (disk cache)", warm), ("hot (memory)", hot)):
        print(f"  {name:<20} {seconds:7.3f} s   {seconds / cold:5.2f}x of cold")
    print(f"assembling (disagreements, evaluation, bootstrap) {assembling:.2f} s")
    print(f"report: data and images {build:.2f} s, HTML {html:.3f} s, PDF {pdf:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
