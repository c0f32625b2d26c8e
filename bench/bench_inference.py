"""End-to-end scan → findings with the demo segmentation model: torch eager vs ONNX Runtime.

    .venv/bin/python bench/bench_inference.py [--series DIR] [--model CARD] [--repeats 1]

A 300-slice 512×512 demo CT series (generated into a temporary folder unless ``--series``
names one) goes through the whole path — read the DICOM series, load the model, pre-process,
network, post-process (argmax, lesion table) — with torch eager fp32 and ONNX Runtime fp32 on
CPU, at 1 and 2 threads, in the same run. Prints the time split per configuration and the
ratios against torch eager at 1 thread. Nothing is asserted: machines are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "resources" / "models" / "lung-nodule-unet2d" / "card.json"
CONFIGS = (("torch", 1), ("onnxruntime", 1), ("torch", 2), ("onnxruntime", 2))


def write_demo_series(folder: Path, slices: int = 300, seed: int = 11) -> Path:
    """A demo-generator chest CT with exactly ``slices`` 512×512 slices, as DICOM files."""
    from app.core.phantom import writers
    from app.core.phantom.study import PROFILES, build_study
    from app.core.progress import run_to_end

    profile = replace(PROFILES["full"], coverage_mm=None, slices=(slices, slices))
    study = run_to_end(build_study(np.random.default_rng(seed), profile, 1))
    who = writers.StudyIdentity(seed=seed, case="BENCH001", patient_name="DEMO^BENCH001", patient_id="DEMO-BENCH",
                                patient_sex="F", study_date="20240101", kvp=120.0)
    stored = (np.clip(np.rint(study.hu), -1024, 3071) + 1024).astype(np.uint16)
    writers.write_ct_series(writers.ct_headers(who, study.grid), stored, folder)
    return folder


def load_volume(folder: Path):
    from app.core.infer_cli import iter_series

    (_, load), = list(iter_series(folder))
    return load()


def run_config(backend: str, threads: int, series: Path, model: Path) -> dict:
    from app.core.inference import OnnxRunner, TorchRunner
    from app.core.models import open_model
    from app.core.progress import run_to_end

    start = time.perf_counter()
    volume = load_volume(series)
    scan_s = time.perf_counter() - start
    variant = open_model(model)
    if backend == "torch":
        runner = TorchRunner(variant.as_format("state_dict"), threads=threads, batch_size=4)
    else:
        runner = OnnxRunner(variant, providers=("cpu",), threads=threads, batch_size=4)
    findings = run_to_end(runner.run(volume))
    t = findings.timing
    return {"config": f"{backend} fp32, {threads} thread{'s' if threads > 1 else ''}", "scan_s": scan_s,
            "model_s": t.load_s, "pre_s": t.preprocess_s, "net_s": t.network_s, "post_s": t.postprocess_s,
            "total_s": scan_s + t.total_s, "lesions": len(findings.lesions), "slices": volume.shape[0],
            "labels": findings.labels}


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n{rows[0]['slices']}-slice series; ratios are against {base['config']} (higher = faster)\n")
    print("| configuration | load scan s | load model s | pre s | network s | post s | total s | "
          "network ×| end-to-end ×| lesions |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['scan_s']:.2f} | {r['model_s']:.2f} | {r['pre_s']:.2f} | {r['net_s']:.2f} | "
              f"{r['post_s']:.2f} | {r['total_s']:.2f} | {base['net_s'] / r['net_s']:.2f} | "
              f"{base['total_s'] / r['total_s']:.2f} | {r['lesions']} |")
    shares = [(r["scan_s"] + r["model_s"] + r["pre_s"] + r["post_s"]) / r["total_s"] for r in rows]
    print(f"\nshare of end-to-end time outside the network: {min(shares):.0%}–{max(shares):.0%}")
    agree = [float(np.mean(r["labels"] == base["labels"])) for r in rows[1:]]
    print(f"voxel agreement of every configuration with the baseline labels: min {min(agree):.6f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=Path, help="a DICOM series folder (default: generate a 300-slice demo series)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        series = args.series
        if series is None:
            start = time.perf_counter()
            series = write_demo_series(Path(tmp) / "CT", args.slices)
            print(f"generated the demo series in {time.perf_counter() - start:.1f} s")
        load_volume(series)  # warm the file cache so every configuration reads the scan alike
        rows = []
        for backend, threads in CONFIGS:
            rows.append(run_config(backend, threads, series, args.model))
            print(f"{rows[-1]['config']}: {rows[-1]['total_s']:.1f} s", flush=True)
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
