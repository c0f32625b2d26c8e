"""Scan → findings of a compressed variant against the original's fp32 pipelines, on whole scans.

    .venv/bin/python bench/bench_end_to_end.py --data MANIFEST --variant CARD [--model CARD]
        [--split eval] [--cases 3] [--threads 2]

Each scan of the split (the first ``--cases``) is read once, then runs through three runners in
turn, interleaved scan by scan: the original in torch eager fp32, the original in ONNX Runtime
fp32, and the variant as the application runs it. Timed from the read volume to the findings:
pre-processing, network, post-processing, the candidate filter. Prints per-scan seconds and the
ratios of the totals; nothing is asserted: machines are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "resources" / "models" / "lung-nodule-unet2d" / "card.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a manifest CSV")
    parser.add_argument("--variant", type=Path, required=True, help="the compressed variant's card")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the original's card (torch weights + ONNX)")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from app.core.inference import make_runner
    from app.core.manifest import read_manifest
    from app.core.models import open_model
    from app.core.progress import run_to_end
    from compression.data import LazyCases

    cases = LazyCases(read_manifest(args.data), args.split)
    original, variant = open_model(args.model), open_model(args.variant)
    runners = {"original, torch fp32 eager": make_runner(original, threads=args.threads, backend="torch"),
               "original, ONNX Runtime fp32": make_runner(original, threads=args.threads, backend="onnxruntime"),
               variant.card.name: make_runner(variant, threads=args.threads)}
    totals = dict.fromkeys(runners, 0.0)
    for index in range(min(args.cases, len(cases))):
        case = cases[index]
        volume = case.volume
        seconds = {}
        for name, runner in runners.items():
            start = time.perf_counter()
            run_to_end(runner.run(volume))
            seconds[name] = time.perf_counter() - start
            totals[name] += seconds[name]
        print(f"{case.case} ({volume.voxels.shape[0]} slices): "
              + ", ".join(f"{name} {s:.2f} s" for name, s in seconds.items()), flush=True)
    eager, ort, mine = totals.values()
    print(f"total at {args.threads} thread(s): eager {eager:.1f} s, ORT {ort:.1f} s, {variant.card.name} {mine:.1f} s; "
          f"{eager / mine:.2f}x the eager pipeline, {ort / mine:.2f}x the ORT pipeline")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
