"""Compression on the demo segmentation UNet at 512×512: each technique alone and the best recipes,
side by side with fp32 torch eager, ONNX Runtime fp32 and ORT's default ``quantize_static``.

For every contender, measured in one run on this machine:

- deployed size (the files a stock runtime loads) and its ratio to the fp32 ONNX file;
- network latency on one 512×512 slice, median of interleaved rounds after a warm-up, at 1
  and 2 threads, as ratios to fp32 torch eager and to ORT fp32;
- Dice against ground truth and fidelity against the original on the eval split, with the
  evaluation's paired-bootstrap intervals (or "insufficient evidence" below 30 cases / 50
  lesions ≥ 6 mm: the bench data is small, the point estimates are still printed);
- end to end (scan → findings, pre- and post-processing included) for the best recipe
  against the fp32 eager pipeline.

Then the issue's targets for the best recipe, each marked met or not with the real figure.

    python bench/bench_compression.py [--model CARD] [--data DIR] [--threads 1 2] [--rounds 5]
                                      [--latency-rounds 30] [--finetune-steps 30]
                                      [--recipe-finetune-steps 600] [--variant CARD ...] [--out DIR]
    python bench/bench_compression.py --quick      # the harness on tiny data and an untrained UNet

``--data`` is the demo data the model was trained on (its manifest's train/calib/eval split);
without it the demo generator writes full-size phantom cases (seed 2026) under the data folder
and reuses them on later runs. Each eval case is judged on the slices that decide lesion
verdicts (see :func:`lesion_slices`) so that a dozen contenders can be judged within minutes on
2 CPU cores. Those slices leave out most of a scan's false positives, and so most of what a
variant can lose or gain there: the best recipe's target verdict (Dice drop, lost lesions) is
therefore judged again on the whole eval scans, beside the original and ORT's default int8
(``--no-whole-scans`` skips it). The end-to-end figure runs a contiguous piece of a real eval scan.

The bench's own recipes train on a few scans for minutes. ``--variant`` judges presets built
from the same model by ``main.py compress`` on the whole train split instead (e.g. ``smallest``),
beside the techniques and baselines of the same run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DEMO_CARD = REPO / "resources" / "models" / "lung-nodule-unet2d" / "card.json"
SLICE = (1, 1, 512, 512)
TARGETS = {"size_ratio": 20.0, "speedup_vs_eager": 4.0, "speedup_vs_ort": 2.5, "max_dice_drop": 0.01,
           "max_lost_large": 0, "end_to_end": 3.0}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Contender:
    name: str
    kind: str  # "baseline" | "technique" | "recipe"
    variant: object = None  # ModelVariant
    error: str = ""
    build_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- data


def bench_data(args) -> Path:
    """The data folder: --data, or generated demo cases (cached under the data root)."""
    if args.data:
        return Path(args.data)
    from app.paths import data_root

    size = "tiny" if args.quick else "full"
    root = data_root() / "bench-compression" / f"{size}-{args.cases}-seed{args.data_seed}"
    if not (root / "bench-manifest.done").is_file():
        generate(root, args.cases, args.data_seed, size)
    return root


def generate(root: Path, cases: int, seed: int, size: str) -> None:
    from app.core.demo_data import generate_demo_data
    from app.core.manifest import build_manifest, read_manifest, write_manifest
    from app.core.progress import run_to_end

    log(f"generating {cases} {size} demo cases (seed {seed}) in {root}")
    run_to_end(generate_demo_data(root, cases=cases, seed=seed, size=size))
    # More eval cases than the demo's 60/20/20: the verdicts are what this bench is about.
    old = read_manifest(root / "manifest.csv")
    records = [(c.case, c.patient, c.series, c.labels) for c in old.cases]
    write_manifest(build_manifest(records, {"train": 0.4, "calib": 0.2, "eval": 0.4}, seed=seed, root=root),
                   root / "manifest.csv")
    (root / "bench-manifest.done").write_text("ok\n")


def load_split(data_dir: Path, split: str, limit: int | None = None) -> list:
    """The first ``limit`` cases of a split (manifest order), read with SimpleITK."""
    from app.core.demo_models import read_labels, read_series_volume
    from app.core.manifest import read_manifest
    from compression.data import CaseData

    manifest = read_manifest(data_dir / "manifest.csv" if data_dir.is_dir() else data_dir)
    cases = []
    for case in manifest.cases_in(split)[:limit]:
        volume = read_series_volume(manifest.series_path(case))
        labels = read_labels(manifest.labels_path(case), volume.shape)
        cases.append(CaseData(case.case, case.patient, case.series, volume, labels))
    return cases


def lesion_slices(case, margin: int = 2, middle: int = 8):
    """The case reduced to the axial slices that judge lesions: every slice of each ground-truth
    lesion (± ``margin``) plus the middle of the scan (± ``middle`` slices, for false positives),
    runs of adjacent slices kept together and separated by one air slice, so that no two runs'
    lesions can join. Whole lesions are kept because the lesion clean-up measures their 3-D
    shape (a lesion cut to one slice would look like a plate); a 2D network sees each slice
    alone, so its output on a kept slice is what it would be in the whole scan. False positives
    on the slices left out are not counted, and a vessel cut short by a run's end can look less
    elongated than in the whole scan: the same for every contender.
    """
    from app.core.lesions import label_instances

    instances, count = label_instances(case.labels)
    n = case.volume.shape[0]
    keep = set(range(max(0, n // 2 - middle), min(n, n // 2 + middle + 1)))
    for k in np.flatnonzero(instances.reshape(n, -1).any(axis=1)):
        keep.update(range(max(0, k - margin), min(n, k + margin + 1)))
    runs = _runs(sorted(keep))
    air = np.full((1,) + case.volume.shape[1:], -1000, case.volume.voxels.dtype)
    voxels = [part for run in runs for part in (case.volume.voxels[run], air)][:-1]
    labels = [part for run in runs for part in (case.labels[run], np.zeros_like(air, np.uint8))][:-1]
    volume = replace(case.volume, voxels=np.concatenate(voxels), padding_mask=None, sop_uids=(), loaded=None)
    return replace(case, volume=volume, labels=np.concatenate(labels).astype(np.uint8))


def _runs(indices: list[int]) -> list[slice]:
    runs, start = [], indices[0]
    for previous, current in zip(indices, indices[1:] + [None]):
        if current != previous + 1:
            runs.append(slice(start, previous + 1))
            start = current
    return runs


# ---------------------------------------------------------------- the model


def bench_model(args, work: Path):
    from app.core.models import open_model

    if args.model:
        return open_model(args.model, prefer="state_dict")
    if DEMO_CARD.is_file() and not args.quick:
        return open_model(DEMO_CARD, prefer="state_dict")
    if not args.quick:
        raise SystemExit(f"{DEMO_CARD} is missing: train the demo model first (python main.py train-demo) "
                         "or pass --model, or run --quick")
    return untrained_demo_unet(work / "untrained")


def untrained_demo_unet(folder: Path):
    """The pinned demo architecture with random weights: exercises the harness, not accuracy."""
    import torch

    from app.core.demo_models import unet_card, write_model_folder
    from app.core.model_card import Lineage
    from app.core.models import build_network, open_model

    torch.manual_seed(0)
    card = unet_card(Lineage(), "none: untrained (bench --quick)")
    net = build_network(card.architecture).eval()
    write_model_folder(net, card, folder, (1, 1, 64, 64), True)
    return open_model(folder / "card.json", prefer="state_dict")


# ---------------------------------------------------------------- contenders


def technique_recipes(ft: int) -> dict[str, list[dict]]:
    """Each technique alone (the wizard's defaults, with --finetune-steps of recovery where it has any)."""
    crop = {"crop": 128, "batch_size": 8}
    return {
        "int8 ORT static per-channel (u8/s8)": [{"step": "quantize_int8_ort", "mode": "static",
                                                 "per_channel": True, "calibrate": "percentile"}],
        "int8 ORT dynamic": [{"step": "quantize_int8_ort", "mode": "dynamic"}],
        "channels -50 % + fine-tune": [{"step": "prune_channels", "ratio": 0.5, "finetune_steps": ft, **crop}],
        "unstructured 80 % + fine-tune (sparse file)": [{"step": "prune_unstructured", "sparsity": 0.8,
                                                         "finetune_steps": ft, **crop}],
        "sparsity training (group lasso)": [{"step": "sparsity_train", "steps": ft, **crop}],
        "weight clustering (16 clusters)": [{"step": "cluster_weights", "clusters": 16}],
        "bf16": [{"step": "half_precision", "precision": "bf16"}],
        "fp16 ONNX": [{"step": "half_precision", "precision": "fp16"}],
        "distillation to a ½-width student": [{"step": "distill", "width": 0.5, "steps": 2 * ft, **crop}],
        "int8 torch (PT2E)": [{"step": "quantize_int8_torch"}],
    }


def best_recipes(ft: int) -> dict[str, list[dict]]:
    """Fewer channels (speed and size), then int8 (size again), ``ft`` recovery steps each: a
    narrower student distilled from the original (labels mixed in) with int8 weights and float
    compute (static int8 slows narrow networks down on this CPU), and channel pruning with a
    fine-tune then static int8, for comparison."""
    crop = {"crop": 192, "batch_size": 8}
    static = {"step": "quantize_int8_ort", "mode": "static", "per_channel": True, "calibrate": "percentile"}
    weights = {"step": "quantize_int8_ort", "mode": "weights"}
    recipes = {f"recipe: {width:g}-width student distilled + int8 weights": [
        {"step": "distill", "width": width, "steps": ft, "lr": 1e-3, **crop}, weights] for width in (0.5, 0.35)}
    recipes["recipe: channels -65 % + ft + int8"] = [
        {"step": "prune_channels", "ratio": 0.65, "finetune_steps": ft // 3, **crop},
        {"step": "finetune", "steps": ft - ft // 3, **crop}, static]
    return recipes


def build_contenders(parent, train, calib, out: Path, args) -> list[Contender]:
    contenders = [Contender("fp32 torch eager", "baseline", parent),
                  Contender("ORT fp32", "baseline", parent.as_format("onnx"))]
    contenders.append(ort_default_quantize(parent, calib, out))
    recipes = {} if args.variant else best_recipes(args.recipe_finetune_steps)
    for kind, steps_by_name in (("technique", technique_recipes(args.finetune_steps)), ("recipe", recipes)):
        for name, steps in steps_by_name.items():
            if args.only and not any(o in name for o in args.only):
                continue
            contenders.append(compress(parent, name, kind, steps, train, calib, out, args))
    contenders += [prebuilt(card, parent) for card in args.variant]
    return contenders


def prebuilt(card: str, parent) -> Contender:
    """A variant built elsewhere (a preset run through ``main.py compress`` on many more scans than
    this bench trains on), judged as a recipe. It must descend from the bench's model: its verdicts
    compare it with that network."""
    from app.core.models import open_model, sha256_file

    variant = open_model(card)
    own = {sha256_file(path) for role, path in parent.files.items() if role in ("weights", "onnx")}
    if variant.card.lineage.parent_sha256 not in own:
        raise SystemExit(f"{card}: its parent (SHA-256 {str(variant.card.lineage.parent_sha256)[:12]}…) "
                         f"is not this bench's model, {parent.card.name} {parent.card.version}")
    log(f"judging a variant built elsewhere: {card}")
    return Contender(f"recipe: {variant.card.name} (built by main.py compress)", "recipe", variant)


def ort_default_quantize(parent, calib, out: Path) -> Contender:
    """The off-the-shelf baseline: quantize_static with every option left at its default."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from app.core.model_card import save_card
    from compression.data import slice_tensors

    start = time.perf_counter()
    x, _ = slice_tensors(calib, parent.card, with_labels=False, max_slices=16)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.batches, None)

    folder = out / "ort-default-quantize-static"
    folder.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger()  # ORT's quantizer warns per layer on the root logger
    level, quiet.level = quiet.level, logging.ERROR
    try:
        quantize_static(str(parent.as_format("onnx").main_file), str(folder / "model.onnx"), Reader())
    finally:
        quiet.setLevel(level)
    files = {"onnx": "model.onnx"}
    if "candidate_filter" in parent.files:  # the lesion clean-up's second network goes along unchanged
        shutil.copyfile(parent.files["candidate_filter"], folder / "candidate_filter.onnx")
        files["candidate_filter"] = "candidate_filter.onnx"
    save_card(replace(parent.card, name="ort-default-int8", files=files), folder / "card.json")
    from app.core.models import open_model

    return Contender("ORT default quantize_static", "baseline", open_model(folder / "card.json"),
                     build_s=time.perf_counter() - start)


def compress(parent, name, kind, steps, train, calib, out: Path, args) -> Contender:
    from app.core.progress import run_to_end
    from compression.pipeline import StepData, run_steps

    start = time.perf_counter()
    data = StepData(train=train, calib=calib, threads=max(args.threads), seed=args.seed)
    folder_name = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    if args.reuse and (out / folder_name / "card.json").is_file():
        from app.core.models import open_model

        log(f"reusing {out / folder_name} for: {name}")
        return Contender(name, kind, open_model(out / folder_name / "card.json", trust=True))  # this bench's own
    log(f"compressing: {name}")
    try:
        variant = run_to_end(run_steps(parent, steps, data, out, name=folder_name))
    except Exception as exc:  # a technique that is not there yet, or refuses this model: say so, go on
        reason = traceback.format_exception_only(type(exc), exc)[-1].strip()
        log(f"  {name}: not measured ({reason})")
        return Contender(name, kind, error=reason, build_s=time.perf_counter() - start)
    log(f"  built in {time.perf_counter() - start:.0f} s")
    return Contender(name, kind, variant, build_s=time.perf_counter() - start)


def e2e_scan(data_dir: Path, slices: int):
    """The first eval scan, its central ``slices`` slices (a contiguous piece of a real scan)."""
    case = load_split(data_dir, "eval", 1)[0]
    k0 = max(0, case.volume.shape[0] // 2 - slices // 2)
    cut = slice(k0, k0 + slices)
    volume = case.volume
    origin = np.asarray(volume.origin) + np.asarray(volume.direction)[:, 2] * volume.spacing[0] * k0
    return replace(case, volume=replace(volume, voxels=volume.voxels[cut], origin=tuple(origin), padding_mask=None,
                                        sop_uids=tuple(volume.sop_uids[cut]), loaded=None), labels=case.labels[cut])


# ---------------------------------------------------------------- measuring


def predictor(contender: Contender, threads: int):
    """The network as the application runs it (the torch int8 variant: its AOTInductor package)."""
    from compression.cost import variant_predictor

    return variant_predictor(contender.variant, "cpu", threads)[0]


def latencies(contenders: list[Contender], threads: int, rounds: int) -> dict[str, float]:
    """Median ms per 512×512 slice, every contender interleaved in the same rounds."""
    from app.core.progress import run_to_end
    from compression.cost import measure_latency

    live = [c for c in contenders if c.variant is not None]
    predictors = {c.name: predictor(c, threads) for c in live}
    batch = np.random.default_rng(0).random(SLICE, dtype=np.float32)
    stats = run_to_end(measure_latency(predictors, batch, warmup=3, rounds=rounds))
    return {name: s.median_ms for name, s in stats.items()}


def judgeable(contenders: list[Contender], threads: int) -> list[Contender]:
    """Contenders the application's runners can open (a file ORT runs may still fail the ONNX checker)."""
    from compression.cost import torch_autocast_hint
    from app.core.inference import make_runner

    ok = []
    for c in contenders:
        if c.variant is None:
            continue
        try:
            if not torch_autocast_hint(c.variant):
                make_runner(c.variant, threads=threads)
            ok.append(c)
        except Exception as exc:  # say which and why; the others are still judged
            c.notes.append("not judged: " + traceback.format_exception_only(type(exc), exc)[-1].strip())
            log(f"  {c.name}: {c.notes[-1]}")
    return ok


def accuracy(contenders: list[Contender], eval_cases: list, threads: int, seed: int):
    from app.core.progress import run_to_end
    from compression.evaluate import evaluate

    live = judgeable(contenders, threads)
    return run_to_end(evaluate([c.variant for c in live], eval_cases, names=[c.name for c in live],
                               threads=threads, seed=seed))


def whole_scan_accuracy(contenders: list[Contender], data_dir: Path, args):
    """``contenders`` on the whole eval scans, read one more time (the lesion-slice copies replaced
    them); the first is the original (ORT fp32 when built: the same weights as eager, judged faster),
    which the evaluation compares the others with. The off-the-shelf baseline goes along, so that
    "ahead of it at equal accuracy" is judged where the original's false positives are."""
    return accuracy(contenders, load_split(data_dir, "eval", args.eval_cases), max(args.threads), args.seed)


def end_to_end(original, best, case, threads: int, rounds: int = 2) -> dict[str, float]:
    """Seconds from scan to findings (pre-processing, network, post-processing), interleaved."""
    from app.core.inference import make_runner
    from app.core.progress import run_to_end

    runners = {"fp32 eager pipeline": make_runner(original.variant, threads=threads, backend="torch"),
               best.name: make_runner(best.variant, threads=threads)}
    for runner in runners.values():
        run_to_end(runner.run(case.volume))  # warm-up, and the model load is paid here
    seconds = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            run_to_end(runner.run(case.volume))
            seconds[name].append(time.perf_counter() - start)
    return {name: float(np.median(v)) for name, v in seconds.items()}


# ---------------------------------------------------------------- report


def sizes(contenders: list[Contender]) -> dict[str, dict]:
    from compression.cost import archive_size, deployed_size

    out = {}
    for c in contenders:
        if c.variant is not None:
            archive, kind = archive_size(c.variant)
            out[c.name] = {"deployed": deployed_size(c.variant), "archive": archive, "archive_kind": kind}
    return out


def verdict_text(comparison, name: str, metric: str) -> str:
    try:
        return comparison.variant(name).verdicts[metric].text(4)
    except (StopIteration, KeyError):
        return "n/a"


def table(contenders, size, latency, comparison) -> str:
    fp32_bytes = size["ORT fp32"]["deployed"]
    threads = sorted(latency)
    head = ["contender", "deployed", "size ×"]
    for t in threads:
        head += [f"ms @{t}t", f"vs eager @{t}t", f"vs ORT @{t}t"]
    head += ["Dice", "Dice drop", "fidelity Dice", "lost ≥6 mm (of them nodules)", "nodules ≥6 mm missed"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in contenders:
        if c.variant is None:
            rows.append(f"| {c.name} | not measured: {c.error} |" + " |" * (len(head) - 2))
            continue
        cells = [c.name, f"{size[c.name]['deployed'] / 1e6:.2f} MB", f"{fp32_bytes / size[c.name]['deployed']:.1f}×"]
        for t in threads:
            ms = latency[t][c.name]
            cells += [f"{ms:.0f}", f"{latency[t]['fp32 torch eager'] / ms:.2f}×", f"{latency[t]['ORT fp32'] / ms:.2f}×"]
        cells += [verdict_text(comparison, c.name, m) for m in ("dice", "dice_drop", "fidelity_dice")]
        lost, nodules, missed = (verdict_text(comparison, c.name, m).split(" ")[0].split(".")[0]
                                 for m in ("lesions_lost_large", "lesions_lost_large_true", "nodules_missed_large"))
        cells += [f"{lost} ({nodules})", missed]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def choose_best(contenders, size, latency, comparison) -> Contender | None:
    """The recipe that meets the most targets (ties: the smaller file); None when the run
    holds techniques only (``--only`` without a recipe). A recipe that failed to build is fatal."""
    recipes = [c for c in contenders if c.kind == "recipe" and c.variant is not None]
    if not recipes:
        if any(c.kind == "recipe" for c in contenders):
            raise SystemExit("no recipe could be built; see the errors above")
        return None
    return max(recipes, key=lambda c: (sum(targets(c, size, latency, comparison, None).values()),
                                       -size[c.name]["deployed"]))


def targets(best, size, latency, comparison, e2e, whole=None) -> dict[str, bool]:
    """Each target met or not; the accuracy ones from ``whole`` (the whole-scan comparison) when given."""
    result = (whole or comparison).variant(best.name)
    where = " (whole scans)" if whole is not None else ""
    met = {
        "size ≥ 20× smaller": size["ORT fp32"]["deployed"] / size[best.name]["deployed"] >= TARGETS["size_ratio"],
        f"Dice drop ≤ 0.01{where}": result.value("dice_drop") <= TARGETS["max_dice_drop"],
        f"no lost lesion ≥ 6 mm{where}": result.value("lesions_lost_large") <= TARGETS["max_lost_large"],
    }
    for t, ms in latency.items():
        met[f"≥ 4× fp32 eager @{t}t"] = ms["fp32 torch eager"] / ms[best.name] >= TARGETS["speedup_vs_eager"]
        met[f"≥ 2.5× ORT fp32 @{t}t"] = ms["ORT fp32"] / ms[best.name] >= TARGETS["speedup_vs_ort"]
        met[f"faster than ORT default int8 @{t}t"] = ms[best.name] < ms["ORT default quantize_static"]
    met["smaller than ORT default int8"] = (size[best.name]["deployed"]
                                           < size["ORT default quantize_static"]["deployed"])
    if e2e is not None:
        met["end to end ≥ 3×"] = e2e["fp32 eager pipeline"] / e2e[best.name] >= TARGETS["end_to_end"]
    return met


# ---------------------------------------------------------------- main


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model card (default: the demo UNet in resources/models)")
    parser.add_argument("--data", help="demo data folder with manifest.csv (default: generated)")
    parser.add_argument("--cases", type=int, default=6, help="demo cases to generate (default 6)")
    parser.add_argument("--data-seed", type=int, default=2026)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5, help="end-to-end rounds (whole scans, interleaved)")
    parser.add_argument("--latency-rounds", type=int, default=30,
                        help="interleaved one-slice rounds per thread count: five single calls swung a ratio by 10 %%")
    parser.add_argument("--lesion-margin", type=int, default=2,
                        help="eval slices kept above and below each lesion")
    parser.add_argument("--e2e-slices", type=int, default=32, help="slices of the end-to-end scan (a real eval scan cut)")
    parser.add_argument("--train-cases", type=int, default=4, help="at most this many train cases (memory, time)")
    parser.add_argument("--calib-cases", type=int, default=2)
    parser.add_argument("--eval-cases", type=int, default=None, help="default: the whole eval split")
    parser.add_argument("--finetune-steps", type=int, default=30, help="recovery steps of a technique alone")
    parser.add_argument("--recipe-finetune-steps", type=int, default=600, help="recovery steps of a recipe")
    parser.add_argument("--only", nargs="*", help="only contenders whose name contains one of these")
    parser.add_argument("--variant", nargs="+", default=[], metavar="CARD",
                        help="variants already built from the same model (e.g. a preset by main.py compress), "
                             "judged as the recipes in place of the bench's own")
    parser.add_argument("--out", help="where the variants and results go (default: a scratch folder)")
    parser.add_argument("--reuse", action="store_true", help="open variants already built in --out instead of rebuilding")
    parser.add_argument("--no-whole-scans", dest="whole_scans", action="store_false",
                        help="judge the best recipe's accuracy targets on the lesion slices only")
    parser.add_argument("--quick", action="store_true", help="tiny data, untrained UNet: checks the harness only")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.rounds, args.finetune_steps, args.recipe_finetune_steps = 5, 2, 2, 3
        args.latency_rounds = 2
    return args


def main(argv=None) -> int:
    import tempfile

    args = parse(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-compression-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parent = bench_model(args, out)
    data_dir = bench_data(args)
    train = load_split(data_dir, "train", args.train_cases)
    calib = load_split(data_dir, "calib", args.calib_cases)
    eval_cases = [lesion_slices(c, args.lesion_margin) for c in load_split(data_dir, "eval", args.eval_cases)]
    log(f"model {parent.card.name}; {len(train)} train, {len(calib)} calib, {len(eval_cases)} eval cases "
        f"({sum(c.volume.shape[0] for c in eval_cases)} slices judged); cpu threads {os.cpu_count()}")
    contenders = build_contenders(parent, train, calib, out / "variants", args)
    size = sizes(contenders)
    latency = {}
    for t in args.threads:
        log(f"latency at {t} thread(s), {args.latency_rounds} interleaved rounds")
        latency[t] = latencies(contenders, t, args.latency_rounds)
    log("accuracy on the eval split (every contender on every case)")
    comparison = accuracy(contenders, eval_cases, max(args.threads), args.seed)
    best = choose_best(contenders, size, latency, comparison)
    e2e, e2e_slices = {}, 0
    if best is not None:
        log(f"end to end: {best.name} vs the fp32 eager pipeline")
        scan = e2e_scan(data_dir, args.e2e_slices)
        e2e, e2e_slices = end_to_end(contenders[0], best, scan, max(args.threads), args.rounds), scan.volume.shape[0]
    whole = None
    if best is not None and args.whole_scans:
        log(f"accuracy on the whole eval scans: the original, ORT's default int8 and {best.name}")
        del eval_cases  # the lesion-slice copies: the whole scans take their place
        original = next((c for c in contenders if c.name == "ORT fp32" and c.variant is not None), contenders[0])
        baseline = next(c for c in contenders if c.name == "ORT default quantize_static")
        whole = whole_scan_accuracy([original, baseline, best], data_dir, args)
    report(contenders, size, latency, comparison, best, e2e, out, args, time.perf_counter() - started, e2e_slices,
           whole)
    return 0


def report(contenders, size, latency, comparison, best, e2e, out, args, seconds, e2e_slices, whole=None) -> None:
    from compression.evaluate import comparison_record

    print()
    print(table(contenders, size, latency, comparison))
    print(f"\n{comparison.evidence}; {len(comparison.cases)} eval cases, {comparison.large_lesions} lesions ≥ 6 mm")
    met = {}
    if best is None:
        print("\nno recipe among the contenders: techniques only, so no end-to-end run and no target verdict")
    else:
        print(f"\nend to end ({e2e_slices}-slice scan → findings, {max(args.threads)} threads): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in e2e.items())
              + f" → {e2e['fp32 eager pipeline'] / e2e[best.name]:.2f}×")
        met = targets(best, size, latency, comparison, e2e, whole)
        if whole is not None:
            print(f"\nwhole eval scans ({len(whole.cases)} cases, {whole.large_lesions} lesions ≥ 6 mm):")
            for judged in (v for v in whole.variants if not v.is_reference):
                print(f"  {judged.name}: " + ", ".join(
                    f"{m} {verdict_text(whole, judged.name, m)}"
                    for m in ("dice", "dice_drop", "sensitivity_large", "false_positives_per_case", "fidelity_dice",
                              "lesions_lost_large", "lesions_lost_large_true", "nodules_missed_large",
                              "lesions_gained_large")))
        print(f"\nbest recipe: {best.name}")
        for name, ok in met.items():
            print(f"  {'MET    ' if ok else 'NOT MET'} {name}")
    print(f"\nbench took {seconds / 60:.1f} min; variants and results in {out}")
    record = {"contenders": [{"name": c.name, "kind": c.kind, "error": c.error, "build_s": c.build_s, "notes": c.notes}
                             for c in contenders],
              "size": size, "latency_ms": latency, "end_to_end_s": e2e, "best": best.name if best else None,
              "targets": met, "evaluation": comparison_record(comparison),
              "whole_scan_evaluation": comparison_record(whole) if whole is not None else None, "args": vars(args)}
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
