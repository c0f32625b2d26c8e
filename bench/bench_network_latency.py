"""Network latency of compressed variants against the original as fp32 torch eager and ORT fp32.

    .venv/bin/python bench/bench_network_latency.py --variants CARD [CARD ...] [--model CARD]
        [--rounds 100] [--threads 1 2] [--trust]

One 512×512 slice through each network, median of interleaved rounds after a warm-up, every
contender in the same rounds (``compression.cost.measure_latency``), at each thread count.
The original runs twice — torch eager fp32 (the baseline every ratio is against) and ONNX
Runtime fp32 — and each variant as the application runs it. Prints medians and ratios; nothing
is asserted: machines are noisy.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "resources" / "models" / "lung-nodule-unet2d" / "card.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the original's card (fp32, torch weights + ONNX)")
    parser.add_argument("--variants", nargs="+", required=True, metavar="CARD")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trust", action="store_true",
                        help="run AOTInductor packages this machine's audit log did not see compiled (e.g. built "
                             "before packages were recorded there)")
    args = parser.parse_args(argv)

    from app.core.models import load_torch_module, open_model
    from app.core.progress import run_to_end
    from compression.cost import measure_latency, onnx_predictor, shape_for, torch_predictor, variant_predictor

    original = open_model(args.model)
    variants = [open_model(card, trust=args.trust) for card in args.variants]
    batch = np.random.default_rng(0).random((1, 1, 512, 512), dtype=np.float32)
    print(f"{'threads':>7}  {'contender':<40} {'median ms':>9} {'p10':>7} {'p90':>7} {'vs eager':>8} {'vs ORT':>7}")
    for threads in args.threads:
        predictors = {"original, torch fp32 eager": torch_predictor(
                          load_torch_module(original.as_format("state_dict")), threads)[0],
                      "original, ONNX Runtime fp32": onnx_predictor(original.files["onnx"], threads)[0]}
        batches = dict.fromkeys(predictors, batch)
        for variant in variants:  # a 2.5-D variant reads its neighbouring slices too
            predictors[variant.card.name] = variant_predictor(variant, threads=threads)[0]
            batches[variant.card.name] = np.random.default_rng(0).random(shape_for(variant.card, batch.shape),
                                                                         dtype=np.float32)
        stats = run_to_end(measure_latency(predictors, batches, warmup=3, rounds=args.rounds))
        ort = stats["original, ONNX Runtime fp32"].median_ms
        for name, s in stats.items():
            print(f"{threads:>7}  {name:<40} {s.median_ms:9.1f} {s.p10_ms:7.1f} {s.p90_ms:7.1f} "
                  f"{s.speedup:7.2f}x {ort / s.median_ms:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
