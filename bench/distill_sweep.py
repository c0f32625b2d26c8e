"""Distillation settings for the demo UNet's student, tried one at a time and judged on the eval split.

Each try runs the real ``distill`` step (and ``quantize_int8_ort`` in weights mode) through
``compression.pipeline.run_steps`` and is judged by the same evaluation as
``bench_compression.py`` (every slice of each eval lesion ± 2 plus the middle of the scan),
side by side with the fp32 original in the same process. What it adds is a cache: the train
slices, their labels and the teacher's logits are computed once and memory-mapped from disk,
so a try costs only its training steps (≈ 13 min for 6000 steps on one core) and two tries can
share the two cores without holding 10 GB each.

    python bench/distill_sweep.py cache --data WIDE --cache DIR     # once: slices, labels, teacher, eval cases
    python bench/distill_sweep.py try NAME --cache DIR [--width 0.35] [--steps 6000] [--lr 1e-3]
                                  [--foreground-weight 10] [--use auto] [--init auto] [--focus 0]
                                  [--focus-every 2000] [--seed 0] [--threads 1]

No speed figure comes from here: latency and size are ``bench_compression.py``'s job. The
lesion slices leave out most of the original's false positives, so the lost and gained
counts here can fall far short of the whole-scan ones: judge a chosen student on whole
scans with ``main.py evaluate`` (for G: 7 lost here, 16 on whole scans, the same 2 nodules).
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_compression import DEMO_CARD, Contender, accuracy, lesion_slices, load_split  # noqa: E402


def cache(args) -> None:
    import torch

    from app.core.models import open_model
    from compression.data import slice_tensors
    from compression.pipeline import working_copy
    from compression.training import predict_logits

    torch.set_num_threads(args.threads)
    folder = Path(args.cache)
    folder.mkdir(parents=True, exist_ok=True)
    model = working_copy(open_model(args.model, prefer="state_dict"), Path(tempfile.mkdtemp()))
    start = time.perf_counter()
    with open(folder / "eval.pkl", "wb") as f:
        pickle.dump([lesion_slices(c) for c in load_split(Path(args.data), "eval")], f)
    per_case = [slice_tensors([c], model.card, with_labels=True) for c in load_split(Path(args.data), "train")]
    n = sum(len(x) for x, _ in per_case)
    shape = per_case[0][0].shape[1:]
    x = np.lib.format.open_memmap(folder / "x.npy", "w+", np.float32, (n,) + shape)
    y = np.lib.format.open_memmap(folder / "y.npy", "w+", np.uint8, (n,) + shape[1:])
    teacher = np.lib.format.open_memmap(folder / "teacher.npy", "w+", np.float16, (n, 2) + shape[1:])
    first = 0
    for xs, ys in per_case:
        x[first:first + len(xs)], y[first:first + len(xs)] = xs, ys
        teacher[first:first + len(xs)] = predict_logits(model.module, xs, dtype=np.float16)
        first += len(xs)
    for array in (x, y, teacher):
        array.flush()
    (folder / "source.json").write_text(json.dumps({"data": str(args.data), "model": str(args.model), "slices": n}))
    print(f"{n} train slices and {len(per_case)} cases cached in {time.perf_counter() - start:.0f} s")


def try_settings(args) -> None:
    import compression.steps.distill as distill_step
    from app.core.models import open_model
    from compression.evaluate import comparison_table
    from compression.pipeline import StepData, run_steps

    folder = Path(args.cache)
    source = json.loads((folder / "source.json").read_text())
    x, y = np.load(folder / "x.npy", mmap_mode="r"), np.load(folder / "y.npy", mmap_mode="r")
    teacher = np.load(folder / "teacher.npy", mmap_mode="r")
    # The step's own arrays, from the cache instead of recomputed and held in memory.
    distill_step._training_arrays = lambda model, data, use, max_slices: (
        {"x": x} if use == "teacher" else {"x": x, "y": y})
    distill_step._teacher = lambda model, data, slices: teacher
    parent = open_model(source["model"], prefer="state_dict")
    data_dir = Path(source["data"])
    data = StepData(train=load_split(data_dir, "train", 1), calib=load_split(data_dir, "calib", 2),
                    threads=args.threads, seed=args.seed)
    steps = [{"step": "distill", "width": args.width, "steps": args.steps, "lr": args.lr, "crop": args.crop,
              "batch_size": args.batch_size, "use": args.use, "init": args.init,
              "foreground_weight": args.foreground_weight, "focus": args.focus, "focus_every": args.focus_every},
             {"step": "quantize_int8_ort", "mode": "weights"}]
    start = time.perf_counter()
    variant = _report_progress(run_steps(parent, steps, data, folder / "variants", name=args.name), start)
    card = json.loads(variant.card_path.read_text())
    print("\n".join(card["lineage"]["metrics"]["compression"]["notes"]))
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    with open(folder / "eval.pkl", "rb") as f:
        eval_cases = pickle.load(f)
    comparison = accuracy([Contender("fp32 eager", "baseline", parent), Contender(args.name, "recipe", variant)],
                          eval_cases, args.threads, args.seed)
    print(comparison_table(comparison))


def _report_progress(generator, start: float):
    last = 0.0
    while True:
        try:
            tick = next(generator)
        except StopIteration as stop:
            return stop.value
        if time.perf_counter() - last > 60:
            print(f"{time.perf_counter() - start:6.0f} s  {tick.message}", flush=True)
            last = time.perf_counter()


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("cache")
    make.add_argument("--data", required=True, help="manifest folder: its train cases teach, its eval cases judge")
    make.add_argument("--model", default=str(DEMO_CARD))
    one = sub.add_parser("try")
    one.add_argument("name")
    one.add_argument("--width", type=float, default=0.35)
    one.add_argument("--steps", type=int, default=6000)
    one.add_argument("--lr", type=float, default=1e-3)
    one.add_argument("--crop", type=int, default=192)
    one.add_argument("--batch-size", type=int, default=8)
    one.add_argument("--foreground-weight", type=float, default=10.0, help="weight of the teacher's lesion pixels")
    one.add_argument("--use", default="auto", choices=("auto", "teacher", "both", "labels"))
    one.add_argument("--init", default="auto", choices=("auto", "teacher", "scratch"))
    one.add_argument("--focus", type=float, default=0.0,
                     help="share of each batch from the slices where the student misses the teacher's lesions")
    one.add_argument("--focus-every", type=int, default=2000, help="steps between re-scorings of those slices")
    one.add_argument("--seed", type=int, default=0)
    for p in (make, one):
        p.add_argument("--cache", required=True)
        p.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    (cache if args.command == "cache" else try_settings)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
