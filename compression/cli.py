"""``python main.py compress`` and ``python main.py evaluate``: the compression library, headless.

    python main.py compress --model CARD --data PATH --recipe R.yaml --out DIR
                            [--device cpu|cuda:0] [--threads N] [--seed S] [--name NAME]
                            [--search size latency [--time-limit S] [--candidates N]]
    python main.py evaluate --models A B ... --data PATH [--device ...] [--threads N] [--seed S]

PATH is a manifest CSV, or a folder of scans: a folder holding ``manifest.csv`` uses it, any
other folder is indexed (DICOM headers only) and split by patient with the seed. ``--recipe``
is a recipe file or a preset name (safe-int8, smallest, fastest).

``compress`` refuses an eval split that shares a patient or series with calib/train before it
compresses anything, writes the new variant to ``DIR/NAME`` (atomically), judges it against the
original on the eval split and prints the comparison; exit status 0 when the variant keeps to
the recipe's budget, 3 when it does not (the variant is still written, and the table says why),
2 for input that cannot be used. With ``--search`` it tries the recipe and then candidate recipes
(cheapest first) within the recipe's budget and the time limit, keeps every variant, and prints
every trial and the Pareto front (exit 0 when the front is not empty). Every run is appended to
the audit log.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Generator, Sequence, TextIO

from app.core.progress import Progress, ProgressBar, run_with_bar

EXIT_OK, EXIT_BAD_INPUT, EXIT_OVER_BUDGET = 0, 2, 3


def add_cli(subparsers) -> None:
    compress = subparsers.add_parser("compress", help="compress a model with a recipe and judge it on the eval split")
    compress.add_argument("--model", required=True, metavar="CARD", help="the model to compress (card or model file)")
    _data_arguments(compress)
    compress.add_argument("--recipe", required=True, metavar="R.yaml",
                          help="recipe file, or a preset name: safe-int8, smallest, fastest")
    compress.add_argument("--out", required=True, metavar="DIR", help="folder the new variant is written into")
    compress.add_argument("--name", help="the new variant's folder name (default: model-recipe)")
    compress.add_argument("--reference", metavar="CARD",
                          help="the original to recover towards and judge against, when --model is already a "
                               "variant of it (distillation's teacher, output calibration's and the filter refit's "
                               "reference; default: --model itself)")
    compress.add_argument("--search", nargs="+", choices=("size", "latency"), metavar="OBJECTIVE",
                          help="search instead: try the recipe and candidate recipes within the recipe's budget, "
                               "and print the Pareto front for these objectives (size, latency)")
    compress.add_argument("--time-limit", type=float, metavar="S",
                          help="search: start no candidate after S seconds; the distilled student trains in "
                               "half of the seconds left when it starts")
    compress.add_argument("--candidates", type=int, metavar="N", help="search: try at most N candidates")
    compress.add_argument("--finetune-steps", type=int, default=200, help="search: recovery steps of the candidates")
    compress.set_defaults(handler=run_compress)
    evaluate = subparsers.add_parser("evaluate", help="compare model variants on the eval split, with intervals")
    evaluate.add_argument("--models", nargs="+", required=True, metavar="CARD",
                          help="variants to compare; the first is the original the others are judged against")
    _data_arguments(evaluate)
    evaluate.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    evaluate.add_argument("--trust", action="store_true",
                          help="also run AOTInductor packages this machine did not compile (torch int8; "
                               "compiled native code), rather than their float files: only for variants you trust")
    evaluate.set_defaults(handler=run_evaluate)


def _data_arguments(parser) -> None:
    parser.add_argument("--data", required=True, metavar="PATH", help="manifest CSV, or a folder split by patient")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, training and bootstrap")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the intervals")


# ---------------------------------------------------------------- progress bar


# ---------------------------------------------------------------- data


def data_manifest(path: str | os.PathLike, seed: int = 0, bar: ProgressBar | None = None):
    """A manifest from a CSV, a folder's ``manifest.csv``, or a folder of series split by patient."""
    from app.core.manifest import check_manifest, read_manifest

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such manifest or folder")
    if path.is_file():
        manifest = read_manifest(path)
    elif (path / "manifest.csv").is_file():
        manifest = read_manifest(path / "manifest.csv")
    else:
        manifest = run_with_bar(folder_manifest(path, seed), bar or ProgressBar())
    problems = check_manifest(manifest)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    return manifest


def folder_manifest(folder: Path, seed: int = 0) -> Generator[Progress, None, Any]:
    """Index a folder's DICOM series (headers only) and split them by patient with ``seed``."""
    from app.core.dicom_index import index_path
    from app.core.manifest import manifest_from_index

    index = yield from index_path(folder)
    manifest = manifest_from_index(index, folder, seed=seed)
    if not manifest.cases:
        raise ValueError(f"{folder}: no image series found (and no manifest.csv)")
    return manifest


def load_split(manifest, split: str, bar: ProgressBar) -> list:
    from compression.data import load_cases

    if not manifest.cases_in(split):
        return []
    return run_with_bar(load_cases(manifest, split), bar)


# ---------------------------------------------------------------- compress


def run_compress(args) -> int:
    return _guarded(lambda: _compress(args, ProgressBar(), sys.stdout))


def _compress(args, bar: ProgressBar, out: TextIO) -> int:
    from app.core.audit import append_audit
    from app.core.models import open_model
    from compression.evaluate import check_eval_split
    from compression.data import LazyCases
    from compression.pipeline import StepData, run_steps
    from compression.recipe import check_steps, resolve_recipe

    parent = open_model(args.model)
    reference = open_model(args.reference) if getattr(args, "reference", None) else None
    if reference is not None and getattr(args, "search", None):
        raise ValueError("--reference compresses a variant further with one recipe; a search starts from the original "
                         "(give it as --model)")
    recipe = resolve_recipe(args.recipe)
    check_steps(recipe)
    manifest = data_manifest(args.data, args.seed, bar)
    check_eval_split(manifest)  # before anything is compressed, not after
    splits = {"calib": load_split(manifest, "calib", bar),
              # read one at a time as a step cuts their slices, or as the verdict reaches them
              "train": LazyCases(manifest, "train"), "eval": LazyCases(manifest, "eval")}
    data = StepData(train=splits["train"], calib=splits["calib"], teacher=reference, device=args.device,
                    threads=args.threads, seed=args.seed)
    if getattr(args, "search", None):
        return _search(args, parent, recipe, data, splits["eval"], bar, out)
    name = args.name or _free_name(Path(args.out), f"{parent.card.name}-{recipe.name}")
    started = time.perf_counter()
    variant = run_with_bar(run_steps(parent, recipe.steps, data, Path(args.out), name=name,
                                     recipe=recipe.as_dict()), bar)
    print(f"variant written: {variant.card_path.parent}", file=out)
    audit = {"model": str(parent.card_path or parent.main_file), "parent_sha256": parent.weights_sha256,
             "reference": str(reference.card_path or reference.main_file) if reference else None,
             "variant": str(variant.card_path.parent), "weights_sha256": variant.weights_sha256,
             "recipe": recipe.as_dict(), "data": str(args.data), "seed": args.seed, "device": args.device,
             "threads": args.threads, "seconds": round(time.perf_counter() - started, 1)}
    if not splits["eval"]:
        print("no eval cases: the variant was not judged", file=out)
        append_audit("compress", **audit, verdict="not judged (no eval cases)")
        return EXIT_OK
    failures, record = _judge(reference or parent, variant, splits["eval"], manifest, recipe.budget, args, bar, out)
    append_audit("compress", **audit, verdict="within budget" if not failures else "over budget",
                 failures=failures, evaluation=record)
    return EXIT_OK if not failures else EXIT_OVER_BUDGET


def _judge(parent, variant, eval_cases, manifest, budget, args, bar, out) -> tuple[list[str], dict]:
    from compression import evaluate as ev
    from compression.search import deployable_baseline

    comparison = run_with_bar(ev.evaluate([parent, variant], eval_cases, manifest=manifest,
                                          names=["original", variant.card.name], device=args.device,
                                          threads=args.threads, seed=args.seed, resamples=args.resamples), bar)
    print(ev.comparison_table(comparison, _cost_columns([deployable_baseline(parent), variant], comparison)),
          file=out)
    failures = ev.budget_failures(comparison.variants[1], budget)
    verdict = "within the budget" if not failures else "over the budget: " + "; ".join(failures)
    caveat = "" if comparison.sufficient else f" ({comparison.evidence})"
    print(f"{variant.card.name}: {verdict}{caveat}", file=out)
    record = ev.comparison_record(comparison)
    _write_json(Path(args.out) / f"{variant.card_path.parent.name}.evaluation.json", record)
    return failures, record


def _search(args, parent, recipe, data, eval_cases, bar: ProgressBar, out: TextIO) -> int:
    """The recipe first, then the search's candidates; every variant kept under OUT/<model>-search."""
    from app.core.audit import append_audit
    from compression.search import Candidate, candidate_recipes, pipeline_runner, search

    if not eval_cases:
        raise ValueError(f"{args.data}: the eval split is empty; a search needs eval scans to judge candidates on")
    candidates = [Candidate(recipe.name, recipe.steps, "the recipe as given")]
    candidates += candidate_recipes(args.search, None, args.finetune_steps,
                                    candidate_filter="candidate_filter" in parent.files)
    candidates = candidates[: args.candidates] if args.candidates else candidates
    folder = Path(args.out) / _free_name(Path(args.out), f"{parent.card.name}-search")
    runner = pipeline_runner(parent, data, eval_cases, folder, recipe.budget, device=args.device,
                             threads=args.threads, seed=args.seed, resamples=args.resamples)
    result = run_with_bar(search(candidates, runner, recipe.budget, objectives=args.search,
                                 time_limit_s=args.time_limit), bar)
    print(result.table(), file=out)
    print(f"Pareto front ({', '.join(args.search)} and Dice drop, within the budget): "
          + (", ".join(t.candidate.name for t in result.front) or "empty"), file=out)
    append_audit("search", model=str(parent.card_path or parent.main_file), parent_sha256=parent.weights_sha256,
                 folder=str(folder), objectives=list(args.search), budget=recipe.as_dict()["budget"],
                 trials=[{"name": t.candidate.name, "steps": t.candidate.steps, "values": t.values,
                          "failures": t.failures, "error": t.error,
                          "weights_sha256": t.variant.weights_sha256 if t.variant else None} for t in result.trials],
                 front=[t.candidate.name for t in result.front], seed=args.seed)
    return EXIT_OK if result.front else EXIT_OVER_BUDGET


def _free_name(out_dir: Path, base: str) -> str:
    name, n = base, 2
    while (out_dir / name).exists():
        name, n = f"{base}-{n}", n + 1
    return name


# ---------------------------------------------------------------- evaluate


def run_evaluate(args) -> int:
    return _guarded(lambda: _evaluate(args, ProgressBar(), sys.stdout))


def _evaluate(args, bar: ProgressBar, out: TextIO) -> int:
    from app.core.audit import append_audit
    from app.core.models import open_model
    from compression import evaluate as ev
    from compression.data import LazyCases

    variants = [open_model(m, trust=args.trust) for m in args.models]
    manifest = data_manifest(args.data, args.seed, bar)
    ev.check_eval_split(manifest)
    cases = LazyCases(manifest, "eval")  # one scan in memory at a time
    if not cases:
        raise ValueError(f"{args.data}: the eval split is empty; nothing to judge the models on")
    comparison = run_with_bar(ev.evaluate(variants, cases, manifest=manifest, device=args.device,
                                          threads=args.threads, seed=args.seed, resamples=args.resamples), bar)
    print(ev.comparison_table(comparison, _cost_columns(variants, comparison)), file=out)
    record = ev.comparison_record(comparison)
    if args.json:
        _write_json(Path(args.json), record)
    append_audit("evaluate", models=[str(m) for m in args.models],
                 sha256=[v.weights_sha256 for v in variants], data=str(args.data), seed=args.seed, evaluation=record)
    return EXIT_OK


def _cost_columns(variants: Sequence, comparison) -> dict[str, dict[str, str]]:
    """Deployed size (and ratio to the first variant) and median network time per case; with a
    candidate filter, the network's own size ratio too (the filter is the same on every side)."""
    import statistics

    from compression.cost import deployed_size, network_size, size_text

    sizes = [deployed_size(v) for v in variants]
    networks = [network_size(v) for v in variants]
    filtered = any(n != s for n, s in zip(networks, sizes))
    columns = {}
    for result, size, network in zip(comparison.variants, sizes, networks):
        seconds = [r.network_s for r in result.rows if r.network_s == r.network_s]
        columns[result.name] = {
            "deployed": size_text(size), "smaller": f"{sizes[0] / size:.1f}x",
            **({"network smaller": f"{networks[0] / network:.1f}x"} if filtered else {}),
            "network s/case": f"{statistics.median(seconds):.3f}" if seconds else "",
        }
    return columns


# ---------------------------------------------------------------- shared


def _write_json(path: Path, record: dict) -> None:
    from app.core.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def _guarded(body: Callable[[], int]) -> int:
    """Input the user can fix is one line on stderr and exit status 2, not a traceback."""
    from app.core.model_card import ModelError
    from compression.recipe import RecipeError

    try:
        return body()
    except (ModelError, RecipeError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
