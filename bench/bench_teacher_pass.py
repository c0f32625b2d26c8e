"""A teacher's pass over many slices, as distillation's guide makes it: eager torch against its ONNX export.

    .venv/bin/python bench/bench_teacher_pass.py [--model CARD] [--slices 32] [--rounds 3] [--threads 2]

``distill(guided=True)`` runs the teacher over every slice of the unlabelled train scans. On the
CPU it runs a torch teacher as an ONNX export (``compression.export.export_onnx``, checked against
torch) through ``compression.training.onnx_logits``, in batches of 8, instead of
``predict_logits`` in eager torch. This times both on the same random 512×512 slices, in
interleaved rounds after a warm-up, in one process, and prints the median per slice and the
ratio. Nothing is asserted: machines are noisy.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.bench_network_latency import DEFAULT_MODEL  # noqa: E402  (the same original)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the teacher's card (torch weights)")
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from app.core.models import load_torch_module, open_model
    from compression.export import export_onnx
    from compression.training import onnx_logits, predict_logits

    torch.set_num_threads(args.threads)
    variant = open_model(args.model)
    module = load_torch_module(variant.as_format("state_dict"))
    channels = variant.card.input.channels
    x = np.random.default_rng(0).random((args.slices, channels, 512, 512), dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teacher.onnx"
        export_onnx(module, path, (1, channels, 64, 64))
        contenders = {"torch eager": lambda: predict_logits(module, x, dtype=np.float16),
                      "ONNX export": lambda: onnx_logits(path, x, threads=args.threads, dtype=np.float16)}
        times = {name: [] for name in contenders}
        for run in contenders.values():  # warm-up
            run()
        for _ in range(args.rounds):
            for name, run in contenders.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.slices * 1000)
    eager = statistics.median(times["torch eager"])
    print(f"{variant.card.name} {variant.card.version}: {args.slices} slices of 512x512, batches of 8, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:12s} {median:7.1f} ms a slice  ({eager / median:.2f}x torch eager)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
