"""The candidate filter made smaller: fewer ensemble members, int8 weights.

The demo UNet's filter (three CNNs averaged over four flipped views, 183 k weights, 770 kB) goes
unchanged into every variant, so it bounds every size ratio: the 240 kB distilled student
deploys at 987 kB, 7.2× instead of 27×. Two reductions, each optional:

- ``members``: keep that many networks of an averaged ensemble (the filter's output is the mean
  of its members' sigmoids; ensemble pruning; None or 0 keeps them all). Which ones is chosen by
  how well their average reproduces the whole ensemble's keep/drop decisions on the check
  candidates below.
- ``int8``: the convolution weights stored in int8 behind a DequantizeLinear (per output
  channel, symmetric; the rewrite of ``quantize_int8_ort(mode="weights")``). A stock ONNX
  Runtime loads it and computes in float; the weights take a quarter of the bytes. With
  ``weight_bits=4`` they are 4-bit indices into a 16-value codebook per tensor instead (an
  eighth of the bytes; the same check below decides whether that is safe).

The patches are a few hundred 32 × 32 stacks per scan, so speed is not what matters; the
decisions are. The check candidates are the real ones: the parent model runs on the calib scans
(up to ``max_cases``), and every component of its foreground ≥ 0.5 is scored by the float
filter and by the reduced one. The step reports the largest score change and how many keep/drop
decisions at the card's threshold flip; more than ``max_flip_share`` flipping fails it. The
evaluation then judges the whole variant.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from app.core.candidate_filter import FILE_ROLE as FILTER_ROLE
from app.core.progress import Progress

from compression.pipeline import StepData, StepError, WorkingModel


def compress_filter(model: WorkingModel, data: StepData, *, members: int | None = None, int8: bool = True,
                    weight_bits: int = 8, max_cases: int = 8, max_flip_share: float = 0.02):
    """Reduce the candidate filter; a model without one is left as it is (and the log says so)."""
    from app.core.candidate_filter import FilterSession

    from compression.steps.quantize_ort import weights_only

    if weight_bits not in (4, 8):
        raise ValueError(f"the filter's weights are stored in 8 or 4 bits, not {weight_bits}")
    source = model.extra_files.get(FILTER_ROLE)
    spec = model.card.postprocessing.candidate_filter
    if source is None or spec is None:
        model.skipped.append((FILTER_ROLE, "the model has no candidate filter; nothing to compress"))
        model.notes.append("compress_filter: no candidate filter in this model; skipped.")
        yield Progress(1.0, "no candidate filter")
        return model
    source = Path(source)
    patches = yield from _check_candidates(model, data, spec, max_cases)
    if not len(patches):  # nothing to judge a reduced filter by: it stays as it is, after hours of earlier steps
        model.skipped.append((FILTER_ROLE, "the parent marks no candidate on the calib scans to check a reduced "
                                           "filter on; kept as it was"))
        model.notes.append("compress_filter: no candidate on the calib scans to check the reduced filter on; "
                           "the filter is kept unchanged.")
        yield Progress(1.0, "candidate filter kept")
        return model
    reference = FilterSession(source, spec, data.threads).scores(patches)
    kept = None
    current = source
    if members:  # None or 0: every member
        current, kept, total = _fewer_members(source, model.scratch("filter_members.onnx"), members, patches,
                                              reference, spec, data.threads)
        yield Progress(0.7, f"kept ensemble member(s) {kept} of {total}")
    count = 0
    if int8:
        target = model.scratch("candidate_filter.onnx")
        count = weights_only(current, target, op_types=("Conv",), bits=weight_bits)
        current = target
        yield Progress(0.8, f"{count} filter weight tensors stored in {weight_bits} bits")
    scores = FilterSession(current, spec, data.threads).scores(patches)
    flips = _flips(reference, scores, spec.threshold)
    check = {"members_kept": kept, "weight_tensors_int8": count, "weight_bits": weight_bits if int8 else 32,
             "check_candidates": int(len(patches)),
             "max_score_change": float(np.abs(scores - reference).max()),  # patches: at least one
             "decisions_flipped": flips, "threshold": spec.threshold,
             "file_bytes": {"before": source.stat().st_size, "after": current.stat().st_size}}
    model.metrics["candidate_filter_compression"] = check
    if flips > max_flip_share * len(patches):
        raise StepError(f"the reduced candidate filter flips {flips} of {len(patches)} keep/drop decisions at "
                        f"threshold {spec.threshold:g} on the calib candidates (allowed {max_flip_share:.0%})")
    model.extra_files[FILTER_ROLE] = current
    what = ([f"ensemble members {kept} kept"] if kept is not None else []) + (
        [f"{count} Conv weight tensors in {'int8' if weight_bits == 8 else '4 bits'}"] if int8 else [])
    model.notes.append(
        f"Candidate filter: {', '.join(what) or 'unchanged'} ({check['file_bytes']['before'] / 1e3:.0f} kB → "
        f"{check['file_bytes']['after'] / 1e3:.0f} kB). On the parent's {len(patches)} candidates in the calib "
        f"scans the score moved by at most {check['max_score_change']:.4f} and {flips} keep/drop decision(s) "
        f"flipped.")
    yield Progress(1.0, "candidate filter reduced")
    return model


def _flips(reference: np.ndarray, scores: np.ndarray, threshold: float) -> int:
    return int(np.count_nonzero((reference >= threshold) != (scores >= threshold)))


def _check_candidates(model: WorkingModel, data: StepData, spec, max_cases: int):
    """Filter inputs for the parent's candidates (foreground ≥ 0.5) on the calib (else train) scans."""
    from app.core.candidate_filter import lesion_patches
    from app.core.inference import make_runner
    from app.core.lesions import label_instances
    from app.core.progress import run_to_end

    cases = data.calib if len(data.calib) else data.train
    if not len(cases) or model.parent is None:
        raise StepError("compress_filter needs calib (or train) scans and the parent model to check the "
                        "filter's decisions on")
    runner = make_runner(model.parent, threads=data.threads, keep_probabilities=True)
    stacks = []
    n = min(len(cases), max_cases)
    for index in range(n):
        case = cases[index]
        foreground = run_to_end(runner.run(case.volume)).probabilities[-1].astype(np.float32)
        instances, count = label_instances((foreground > 0.5).astype(np.uint8))
        stacks.append(lesion_patches(case.volume.voxels, foreground, instances, count, case.volume.spacing, spec))
        yield Progress(0.6 * (index + 1) / n, f"candidates of calib case {case.case} ({index + 1}/{n})")
    return np.concatenate(stacks)  # n ≥ 1: checked above


def _fewer_members(source: Path, target: Path, members: int, patches, reference, spec, threads):
    """Keep ``members`` networks of the averaged ensemble whose average flips fewest decisions."""
    import onnx

    from app.core.candidate_filter import FilterSession

    graph_model = onnx.load(str(source))
    concat, groups = _ensemble_branches(graph_model.graph)
    if not 1 <= members <= len(groups):
        raise StepError(f"compress_filter: members must be 1..{len(groups)} for this filter, not {members}")
    best = None
    for chosen in itertools.combinations(range(len(groups)), members):
        _write_members(graph_model, concat, [groups[i] for i in chosen], target)
        scores = FilterSession(target, spec, threads).scores(patches)
        key = (_flips(reference, scores, spec.threshold), float(np.abs(scores - reference).max()))
        if best is None or key < best[0]:
            best = (key, chosen)
    _write_members(graph_model, concat, [groups[i] for i in best[1]], target)
    return target, list(best[1]), len(groups)


def _ensemble_branches(graph):
    """The Concat whose mean is the output, and its inputs grouped by network (the weights they read)."""
    producer = {out: node for node in graph.node for out in node.output}
    output = producer.get(graph.output[0].name)
    concat = producer.get(output.input[0]) if output is not None and output.op_type in ("ReduceMean", "Mean") else None
    if concat is None or concat.op_type != "Concat":
        raise StepError("compress_filter: this filter is not an averaged ensemble (no mean of a Concat at its "
                        "output); keep all members")
    weights = {init.name for init in graph.initializer}
    groups: dict[frozenset, list[str]] = {}
    for name in concat.input:
        groups.setdefault(_weights_read(name, producer, weights), []).append(name)
    return concat, list(groups.values())


def _weights_read(name: str, producer: dict, weights: set) -> frozenset:
    seen, stack, found = set(), [name], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in weights:
            found.add(current)
        node = producer.get(current)
        if node is not None:
            stack.extend(node.input)
    return frozenset(found)


def _write_members(graph_model, concat, kept_groups: list[list[str]], target: Path) -> None:
    """A copy of the model whose Concat reads only ``kept_groups``, dead nodes and weights removed."""
    import onnx

    from app.core.atomic import atomic_output

    pruned = onnx.ModelProto()
    pruned.CopyFrom(graph_model)
    graph = pruned.graph
    node = next(n for n in graph.node if list(n.output) == list(concat.output))
    del node.input[:]
    node.input.extend([name for group in kept_groups for name in group])
    needed = {o.name for o in graph.output}
    alive = []
    for n in reversed(graph.node):
        if any(out in needed for out in n.output):
            alive.append(n)
            needed.update(n.input)
    del graph.node[:]
    graph.node.extend(reversed(alive))
    unused = [init for init in graph.initializer if init.name not in needed]
    for init in unused:
        graph.initializer.remove(init)
    with atomic_output(target) as tmp:
        onnx.save(pruned, str(tmp))
