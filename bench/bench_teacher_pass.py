"""A teacher's pass over many slices, as distillation's guide makes it: eager torch against its ONNX export.

    .venv/bin/python bench/bench_teacher_pass.py [--model CARD] [--slices 32] [--rounds 3] [--threads 2]
                                                 [--data MANIFEST]

``distill(guided=True)`` runs the teacher over every slice of the unlabelled train scans. On the
CPU it runs a torch teacher as an ONNX export (``compression.export.export_onnx``, checked against
torch) through ``compression.training.onnx_logits``, in batches of 8, instead of
``predict_logits`` in eager torch (the student's targets stay in eager torch: bench/README.md,
"The teacher's targets from its ONNX export"). This times both on the same 512×512 slices, in
interleaved rounds after a warm-up, in one process, and prints the median per slice and the
ratio. It also prints how far the two sets of float16 logits (what the student learns from)
differ: the share that are equal, the largest gap in foreground probability, and the mask pixels
that change. ``--data`` takes the slices from a manifest's train scans, as ``cut_slices`` draws
them (half with a nodule), instead of random ones. Nothing is asserted: machines are noisy.
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
    parser.add_argument("--data", help="a manifest: real slices from its train scans instead of random ones")
    args = parser.parse_args(argv)

    import torch

    from app.core.models import load_torch_module, open_model
    from compression.export import export_onnx
    from compression.training import onnx_logits, predict_logits

    torch.set_num_threads(args.threads)
    variant = open_model(args.model)
    module = load_torch_module(variant.as_format("state_dict"))
    channels = variant.card.input.channels
    x = (_train_slices(args.data, variant.card, args.slices) if args.data else
         np.random.default_rng(0).random((args.slices, channels, 512, 512), dtype=np.float32))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "teacher.onnx"
        export_onnx(module, path, (1, channels, 64, 64))
        contenders = {"torch eager": lambda: predict_logits(module, x, dtype=np.float16),
                      "ONNX export": lambda: onnx_logits(path, x, threads=args.threads, dtype=np.float16)}
        times = {name: [] for name in contenders}
        eager_logits, onnx_out = (run() for run in contenders.values())  # the warm-up, and what they give
        for _ in range(args.rounds):
            for name, run in contenders.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / len(x) * 1000)
    eager = statistics.median(times["torch eager"])
    print(f"{variant.card.name} {variant.card.version}: {len(x)} {'train' if args.data else 'random'} slices of "
          f"{x.shape[-2]}x{x.shape[-1]}, batches of 8, {args.threads} thread(s), median of {args.rounds} "
          f"interleaved rounds")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:12s} {median:7.1f} ms a slice  ({eager / median:.2f}x torch eager)")
    print("  " + _agreement(eager_logits, onnx_out))
    return 0


def _train_slices(manifest: str, card, n: int) -> np.ndarray:
    from app.core.manifest import read_manifest
    from app.core.progress import run_to_end
    from compression.data import LazyCases, cut_slices

    train = LazyCases(read_manifest(manifest), "train")
    cases = train.subset(range(min(len(train), max(1, n // 32))))  # about 32 slices from each
    x, _ = run_to_end(cut_slices(cases, card, with_labels=False, max_slices=n, seed=0))
    return x


def _agreement(a: np.ndarray, b: np.ndarray) -> str:
    """How far two (N, 2, H, W) float16 logit arrays differ, as a student's targets."""
    def foreground(logits):
        return 1 / (1 + np.exp(logits[:, 0].astype(np.float32) - logits[:, 1].astype(np.float32)))

    changed = int(((a[:, 1] > a[:, 0]) != (b[:, 1] > b[:, 0])).sum())
    return (f"float16 logits equal: {float((a == b).mean()):.4%}; largest foreground-probability gap "
            f"{float(np.abs(foreground(a) - foreground(b)).max()):.1e}; mask pixels changed: {changed} "
            f"of {int((a[:, 1] > a[:, 0]).sum())} lesion pixels")


if __name__ == "__main__":
    raise SystemExit(main())
