"""GPU figures for the demo UNet: inference and distillation training on CUDA against the CPU.

    python bench/bench_gpu.py [--slices NPZ] [--json OUT.json] [--rounds 50]
    python bench/bench_gpu.py --cut-slices MANIFEST --slices NPZ      # once, where the scans are

Run on a machine whose torch sees a CUDA device (the project's lent GPU machine: see
bench/README.md, "On a GPU"). Everything is measured in this one process:

- **Inference**, one 512×512 slice and a batch of 16, median of interleaved rounds after a
  warm-up (``compression.cost.measure_latency``; each call returns the logits on the host, so
  the GPU's copy back is included, as the application pays it): torch eager fp32 on the CPU (the
  baseline), then on the GPU fp32 (TF32 off), fp32 with cuDNN's TF32 (torch's default), fp16
  and bf16 autocast, and fp16 autocast with channels-last memory.
- **Fidelity** of each GPU contender on real slices (``--slices``: an .npz with ``x`` float
  slices pre-processed as inference does and ``y`` their labels): mask Dice against the CPU's
  fp32 mask and Dice against the labels.
- **Distillation training** of the 0.35-width student (the ``smallest`` recipe's: batch 8, crop
  192, foreground ×30) with the real ``train_loop``, teacher logits computed on the GPU: steps and
  slices per second on the GPU (fp16 autocast with a grad scaler, bf16, fp32; batch 8 and 32)
  against the CPU fp32 at batch 8.

Prints a table of medians and ratios; nothing is asserted (machines are noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "resources" / "models" / "lung-nodule-unet2d" / "card.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--slices", help="npz with x (N,1,512,512) pre-processed slices and y labels")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=300, help="GPU steps per precision (the CPU runs a tenth)")
    parser.add_argument("--parts", nargs="+", choices=("inference", "training"), default=["inference", "training"])
    parser.add_argument("--json")
    parser.add_argument("--cut-slices", metavar="MANIFEST",
                        help="write --slices from the first 4 eval cases of MANIFEST (48 slices, half with a "
                             "nodule) and stop: run this where the scans are, then carry the .npz")
    args = parser.parse_args(argv)
    if args.cut_slices:
        return cut_slices(args.cut_slices, args.model, args.slices)

    import torch

    if not torch.cuda.is_available():
        print("torch sees no CUDA device: nothing to measure here")
        return 2
    from app.core.models import open_model

    original = open_model(args.model)
    environment = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
                   "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version()}
    print("environment:", json.dumps(environment))
    if args.slices:
        data = np.load(args.slices)
        x, y = data["x"].astype(np.float32), data["y"]
    else:  # noise: speed only, the fidelity lines are then meaningless and left out
        x, y = np.random.default_rng(0).random((16, 1, 512, 512), dtype=np.float32), None
    results = {"environment": environment, "slices": int(len(x))}
    if "inference" in args.parts:
        results["inference"] = inference(original, x, y, args.rounds)
    if "training" in args.parts:
        results["training"] = training(original, x, y, args.train_steps)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


def cut_slices(manifest_path: str, model: str, out: str | None) -> int:
    """48 pre-processed slices of the first 4 eval cases, half with a labelled nodule, as float16."""
    from app.core.manifest import read_manifest
    from app.core.models import open_model
    from compression.data import LazyCases, slice_tensors

    if not out:
        raise SystemExit("--cut-slices needs --slices OUT.npz")
    cases = LazyCases(read_manifest(manifest_path), "eval")
    x, y = slice_tensors([cases[i] for i in range(min(4, len(cases)))], open_model(model).card, with_labels=True,
                         max_slices=48, foreground_fraction=0.5, seed=0)
    np.savez_compressed(out, x=x.astype(np.float16), y=y)
    print(f"{len(x)} slices ({int((y.reshape(len(y), -1) > 0).any(1).sum())} with a nodule) written to {out}")
    return 0


# name -> (device, autocast, channels_last, cuDNN TF32); the first is the baseline.
CONTENDERS = {"CPU fp32 eager": ("cpu", None, False, False),
              "GPU fp32 (TF32 off)": ("cuda", None, False, False),
              "GPU fp32 + TF32 (torch default)": ("cuda", None, False, True),
              "GPU fp16 autocast": ("cuda", "fp16", False, False),
              "GPU bf16 autocast": ("cuda", "bf16", False, False),
              "GPU fp16 autocast, channels-last": ("cuda", "fp16", True, False)}


def _predictor(original, device, autocast, channels_last, tf32):
    import torch

    from app.core.models import load_torch_module
    from compression.cost import torch_predictor

    module = load_torch_module(original.as_format("state_dict"), device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    predict, _ = torch_predictor(module, None, device, autocast)

    def run(batch):
        torch.backends.cudnn.allow_tf32 = tf32  # global: set before each contender's call
        return predict(batch)
    return run


def inference(original, x, y, rounds):
    import torch

    from app.core.progress import run_to_end
    from compression.cost import measure_latency
    from compression.training import mask_dice

    predictors = {name: _predictor(original, *spec) for name, spec in CONTENDERS.items()}
    out = {}
    for batch_size, n_rounds in ((1, rounds), (16, max(5, rounds // 5))):
        batch = np.ascontiguousarray(x[:batch_size]) if len(x) >= batch_size else np.repeat(x[:1], batch_size, 0)
        stats = run_to_end(measure_latency(predictors, batch, warmup=5, rounds=n_rounds))
        tf32 = stats["GPU fp32 + TF32 (torch default)"].median_ms
        print(f"\ninference, batch {batch_size} of 512x512, median of {n_rounds} interleaved rounds")
        print(f"{'contender':<36} {'ms/batch':>9} {'ms/slice':>9} {'vs CPU':>8} {'vs GPU fp32+TF32':>17}")
        for name, s in stats.items():
            print(f"{name:<36} {s.median_ms:9.2f} {s.median_ms / batch_size:9.3f} {s.speedup:7.1f}x "
                  f"{tf32 / s.median_ms:16.2f}x")
            out.setdefault(name, {})[f"batch{batch_size}"] = {"median_ms": s.median_ms, "p10_ms": s.p10_ms,
                                                               "p90_ms": s.p90_ms, "vs_cpu": s.speedup}
    if y is None:
        return out
    reference = None
    print(f"\nfidelity on {len(x)} real slices (masks = argmax)")
    print(f"{'contender':<36} {'mask Dice vs CPU fp32':>22} {'Dice vs labels':>15}")
    for name, predict in predictors.items():
        masks = np.concatenate([predict(np.ascontiguousarray(x[i:i + 8])).float().argmax(1).numpy() > 0
                                for i in range(0, len(x), 8)])
        reference = masks if reference is None else reference
        fidelity, truth = mask_dice(masks, reference), mask_dice(masks, y > 0)
        print(f"{name:<36} {fidelity:22.4f} {truth:15.4f}")
        out[name].update({"mask_dice_vs_cpu_fp32": fidelity, "dice_vs_labels": truth})
    torch.backends.cudnn.allow_tf32 = True
    return out


def training(original, x, y, gpu_steps):
    import torch

    from app.core.models import build_network, load_torch_module
    from app.core.progress import run_to_end
    from compression.steps.distill import student_architecture
    from compression.training import TrainConfig, make_distillation_loss, predict_logits, train_loop

    teacher = load_torch_module(original.as_format("state_dict"), "cpu")
    start = time.perf_counter()
    logits = predict_logits(teacher, x, device="cuda", amp="off", dtype=np.float16)
    teacher_s = time.perf_counter() - start
    arrays = {"x": x, "teacher": logits}
    if y is not None:
        arrays["y"] = y
    arch = student_architecture(original.card.architecture, 0.35, None)
    loss = make_distillation_loss(1.0, 0.5 if y is not None else 0.0, 30.0)
    runs = {"GPU fp16 autocast + grad scaler": ("cuda", "fp16", gpu_steps, 8),
            "GPU bf16 autocast": ("cuda", "bf16", gpu_steps, 8),
            "GPU fp32": ("cuda", "off", gpu_steps, 8),
            "GPU fp32, batch 32": ("cuda", "off", gpu_steps // 2, 32),
            "GPU bf16 autocast, batch 32": ("cuda", "bf16", gpu_steps // 2, 32),
            "CPU fp32": ("cpu", "off", max(10, gpu_steps // 10), 8)}
    out = {"teacher_logits_s": teacher_s, "slices": int(len(x))}
    print(f"\nteacher logits on {len(x)} slices on the GPU: {teacher_s:.2f} s (first call included)")
    print(f"\ndistillation of the 0.35-width student, crop 192 (train_loop); 'vs CPU' compares slices per second")
    print(f"{'run':<34} {'steps':>6} {'s':>7} {'steps/s':>8} {'slices/s':>9} {'vs CPU':>7} {'loss first→last':>18}")
    for name, (device, amp, steps, batch) in runs.items():
        torch.manual_seed(0)
        net = build_network(arch)
        config = TrainConfig(steps=steps, batch_size=batch, lr=3e-3, seed=0, device=device, amp=amp, crop=192)
        run_to_end(train_loop(net, arrays, loss, TrainConfig(**{**config.__dict__, "steps": 5})))  # warm-up
        stats = run_to_end(train_loop(net, arrays, loss, config))
        out[name] = {"steps": steps, "batch": batch, "seconds": stats["seconds"], "steps_per_s": steps / stats["seconds"],
                     "slices_per_s": steps * batch / stats["seconds"],
                     "loss_first": stats["loss_first"], "loss_last": stats["loss_last"], "amp": stats["amp"]}
    cpu = out["CPU fp32"]["slices_per_s"]
    for name in runs:
        r = out[name]
        r["vs_cpu"] = r["slices_per_s"] / cpu
        print(f"{name:<34} {r['steps']:>6} {r['seconds']:7.1f} {r['steps_per_s']:8.1f} {r['slices_per_s']:9.0f} "
              f"{r['vs_cpu']:6.1f}x "
              f"{r['loss_first']:8.3f} → {r['loss_last']:.3f}")
    return out


if __name__ == "__main__":
    sys.exit(main())
