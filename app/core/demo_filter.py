"""The demo segmentation's candidate filter, trained here (``train-demo --filter-only``).

The demo UNet marks nearly every nodule somewhere (0.93 of those ≥ 6 mm before any clean-up)
but also about fifty vessel and pleura pieces per scan; the shape rule it shipped with drops
the plate-shaped segments of nodules it saw on a few slices only, together with the pieces.
A filter network that looks at each candidate in context does better (the false-positive
reduction stage of the LUNA16 detectors): three small CNNs (seeds), each on patches at five
through-plane offsets plus the UNet's probability, averaged over four flips and transposes,
exported as one ONNX file. It learns from the UNet's candidates on train scans (label: does
the candidate overlap a truth lesion); its threshold — and a minimum lesion size — are chosen
on the calib split; the eval split is then measured through the ordinary runner, filter included.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np

from app.core.candidate_filter import FILE_ROLE
from app.core.model_card import CandidateFilter, Postprocessing, load_card, save_card
from app.core.progress import Progress

log = logging.getLogger(__name__)

FILTER_FILE = "candidate_filter.onnx"
FILTER_SPEC = CandidateFilter(threshold=0.5)  # geometry; the threshold is chosen on calib
FILTER_WIDTHS = (16, 32, 64, 64)
FILTER_SEEDS = (0, 1, 2)
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 0.96, 0.05))
MIN_MM3 = (0.0, 10.0, 20.0, 40.0)


def filter_network(channels: int, widths=FILTER_WIDTHS):
    """Four conv blocks (3×3, batch norm, ReLU), three poolings, global average, one logit."""
    import torch

    layers, previous = [], channels
    for i, width in enumerate(widths):
        layers += [torch.nn.Conv2d(previous, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
        layers.append(torch.nn.MaxPool2d(2) if i + 1 < len(widths) else torch.nn.AdaptiveAvgPool2d(1))
        previous = width
    layers += [torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(previous, 1)]
    return torch.nn.Sequential(*layers)


def ensemble(nets):
    """One module: the mean sigmoid of every net over the patch, its two flips and its transpose."""
    import torch

    class Ensemble(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.nets = torch.nn.ModuleList(nets)

        def forward(self, x):
            views = (x, torch.flip(x, [3]), torch.flip(x, [2]), x.transpose(2, 3))
            scores = [torch.sigmoid(net(view)) for net in self.nets for view in views]
            return torch.stack(scores).mean(0)

    return Ensemble().eval()


def train_filter_net(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 30, threads: int = 2, net=None,
                     lr: float = 2e-3):
    """One filter CNN (a fresh one, or ``net`` fine-tuned); positives weighted by the class ratio;
    flips, quarter turns and the through-plane reversal as augmentation (yields progress per
    epoch, returns the net)."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    net = filter_network(x.shape[1]) if net is None else net
    batch = 64
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=epochs * (len(y) // batch + 1))
    pos_weight = torch.tensor((len(y) - y.sum()) / max(1.0, y.sum()), dtype=torch.float32)
    reverse = list(range(x.shape[1] - 2, -1, -1)) + [x.shape[1] - 1]  # slices reversed, probability kept
    for epoch in range(epochs):
        net.train()
        order, total = rng.permutation(len(y)), 0.0
        for first in range(0, len(y), batch):
            idx = order[first:first + batch]
            xb = x[idx].astype(np.float32)
            if rng.random() < 0.5:
                xb = xb[..., ::-1]
            if rng.random() < 0.5:
                xb = xb[..., ::-1, :]
            xb = np.rot90(xb, int(rng.integers(4)), axes=(2, 3))
            if rng.random() < 0.5:
                xb = xb[:, reverse]
            out = net(torch.from_numpy(np.ascontiguousarray(xb)))[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                out, torch.from_numpy(y[idx].astype(np.float32)), pos_weight=pos_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.item()) * len(idx)
        yield Progress((epoch + 1) / epochs, f"filter seed {seed} epoch {epoch + 1}/{epochs} loss {total / len(y):.4f}")
    return net.eval()


def choose_filter_rule(candidates, scores, spec: CandidateFilter, top: int = 10):
    """Threshold and minimum size on the calib candidates, by sensitivity − 0.05 × FP per case
    then Dice (the shape rule's criterion); returns (Postprocessing, table of the best rows)."""
    from app.core.demo_models import rank_clean_up

    rows = []
    for mm3 in MIN_MM3:
        for threshold in THRESHOLDS:
            key, row = rank_clean_up(candidates, [(case.mm3 >= mm3) & (s >= threshold)
                                                  for case, s in zip(candidates, scores)])
            rows.append((key, mm3, threshold, row))
    rows.sort(key=lambda r: r[0], reverse=True)
    _, mm3, threshold, _ = rows[0]
    rule = Postprocessing(min_lesion_mm3=mm3, candidate_filter=replace(spec, threshold=float(threshold)))
    return rule, {f"{m:g}mm3/score {t:g}": row for _, m, t, row in rows[:top]}


def fit_candidate_filter(folder: Path, data_dir: Path, train_cases: Iterable, train_names: list[str],
                         threads: int = 2, epochs: int = 30, seeds=FILTER_SEEDS, spec: CandidateFilter = FILTER_SPEC):
    """Train the filter on the UNet in ``folder``'s candidates on ``train_cases``, choose its
    rule on ``data_dir``'s calib split, write it into the folder and its card, then measure the
    eval split through the runner. A generator of Progress; returns the eval metrics."""
    from app.core.candidate_filter import FilterSession
    from app.core.demo_models import (
        _onnx_runner,
        evaluate_segmentation,
        export_onnx,
        iter_demo_cases,
        lesion_candidates,
    )
    from app.core.models import sha256_file
    from app.core.progress import scaled

    start = time.perf_counter()
    card_path = folder / "card.json"
    card = load_card(card_path)
    if card.postprocessing.candidate_filter is not None:  # candidates are the raw components: no filter needed
        card = replace(card, postprocessing=Postprocessing())
    save_card(card, card_path)
    runner = _onnx_runner(folder, threads)
    xs, ys, count = [], [], 0
    for candidates in lesion_candidates(runner, train_cases, patches=spec):
        xs.append(candidates.patches)
        ys.append(candidates.on_truth())
        count += 1
        yield Progress(min(0.4, 0.4 * count / max(1, len(train_names))),
                       f"filter candidates: {count} train scans, {sum(map(len, ys))} candidates")
    x, y = np.concatenate(xs), np.concatenate(ys).astype(np.float32)
    del xs
    log.info("filter: %d train candidates, %d on a nodule", len(y), int(y.sum()))
    nets = []
    for i, seed in enumerate(seeds):
        lo, hi = 0.4 + 0.2 * i / len(seeds), 0.4 + 0.2 * (i + 1) / len(seeds)
        nets.append((yield from scaled(train_filter_net(x, y, seed, epochs, threads), lo, hi, "")))
    module = ensemble(nets)
    training_s = time.perf_counter() - start
    yield Progress(0.62, "choosing the filter threshold on the calib split")
    diff = export_onnx(module, folder / FILTER_FILE, (5, spec.channels, spec.patch_px, spec.patch_px),
                       dynamic_spatial=False)
    calib = list(lesion_candidates(runner, iter_demo_cases(data_dir, ("calib",)), patches=spec))
    exported = FilterSession(folder / FILTER_FILE, spec, threads)  # calib scores what the runner will run
    rule, table = choose_filter_rule(calib, [exported.scores(c.patches) for c in calib], spec)
    recipe = dict(card.lineage.recipe or {})
    recipe["postprocessing"] = (f"candidate filter: {len(seeds)} CNNs {list(FILTER_WIDTHS)} (seeds {list(seeds)}), "
                                f"{epochs} epochs on {len(y)} UNet candidates ({int(y.sum())} on a nodule) of "
                                f"{count} scans, 4 test-time views; threshold and minimum size chosen on calib")
    filter_metrics = {"filter_train_candidates": int(len(y)), "filter_train_positives": int(y.sum()),
                      "filter_train_scans": count, "filter_training_time_s": round(training_s, 1),
                      "filter_onnx_max_abs_diff": diff, "filter_sha256": sha256_file(folder / FILTER_FILE),
                      "calib_filter_grid (sensitivity, fp/case, dice)": table}
    metrics = {k: v for k, v in card.lineage.metrics.items() if not k.startswith(("filter_", "calib_filter"))}
    card = replace(card, files={**card.files, FILE_ROLE: FILTER_FILE}, postprocessing=rule)
    card = card.with_lineage(recipe=recipe, metrics={**metrics, **filter_metrics})
    save_card(card, card_path)
    yield Progress(0.7, f"evaluating the UNet with its candidate filter on the eval split ({rule.describe()})")
    result = evaluate_segmentation(_onnx_runner(folder, threads), iter_demo_cases(data_dir, ("eval",)))
    card = card.with_lineage(metrics={**card.lineage.metrics, **result})
    save_card(card, card_path)
    log.info("UNet + filter: %s", json.dumps(result))
    return {**result, **filter_metrics}
