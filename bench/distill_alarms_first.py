"""One experiment's driver: label-free distillation whose unseen scans are drawn first where the
original reports a false positive (30 Nov; bench/README.md, "The original's false alarms drawn
first").

    .venv/bin/python bench/distill_alarms_first.py compress --model CARD --data MANIFEST --recipe R.yaml \\
        --out DIR [--threads N] [--seed S]

It runs ``main.py`` with its arguments, changed in one way. For each train scan the manifest
lists without labels but that has a label map beside its series (``labels_beside``), the
original runs with its whole clean-up (network, size and shape limits, candidate filter). Its
final lesions with no voxel within one slice and 3 pixels of a labelled nodule are its false
positives. Every slice that holds one is drawn first into that scan's share of ``max_slices``,
before the slices the guide picks. The labels choose slices only. With ``use: teacher`` the
student still learns nothing but the teacher's outputs, so it is asked to copy the alarms,
not to unlearn them. It prints how many false positives and slices it found.

This is an experiment, not a feature. It wraps private functions of ``compression.data`` and
``compression.steps.distill`` as they stand at the commit that added it. The student it gave
was not adopted, so ``distill`` has no such option.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import compression.data as cd  # noqa: E402
from compression.steps import distill as dm  # noqa: E402

NEAR = (3, 7, 7)  # slices, pixels, pixels: a lesion this close to a labelled nodule is on it
FOUND = {"false_positives": 0, "scans": 0, "slices": 0, "alarm_slices": 0, "alarm_voxels": 0}
_state = {"grid": None, "alarm": None, "labels": {}, "runner": None, "model": None, "threads": None}
_labels_on_grid, _choose_slices = cd._labels_on_grid, cd._choose_slices


def false_positives(found: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int]:
    """The lesions of ``found`` (a mask) with no voxel within ``NEAR`` of ``truth``, and their count."""
    from scipy import ndimage

    from app.core.lesions import label_instances

    instances, count = label_instances(found.astype(np.uint8))
    near = ndimage.maximum_filter(truth.astype(np.uint8), size=NEAR) > 0
    on_truth = np.unique(instances[near & (instances > 0)])
    return np.isin(instances, on_truth, invert=True) & (instances > 0), count - len(on_truth)


def labels_on_grid(case, prepared, card):
    """As ``cd._labels_on_grid``; for an unlabelled scan with labels beside it, the original's
    false positives are kept (on the network's grid) for the guide and the draw."""
    from types import SimpleNamespace

    from app.core.inference import make_runner
    from app.core.models import open_model
    from app.core.progress import run_to_end

    _state["grid"] = None
    path = _state["labels"].get(case.case)
    if case.labels is None and path is not None:
        if _state["runner"] is None:
            _state["runner"] = make_runner(open_model(_state["model"]), threads=_state["threads"])
        truth = cd._read_labels(path, case.volume, SimpleNamespace(case=case.case))
        found = run_to_end(_state["runner"].run(case.volume)).labels > 0
        false, count = false_positives(found, truth)
        FOUND["false_positives"] += count
        _state["grid"] = _labels_on_grid(dataclasses.replace(case, labels=false.astype(np.uint8)), prepared, card)
    return _labels_on_grid(case, prepared, card)


def choose_slices(has_fg, n_fg, n_bg, rng, substitute=True):
    """The alarm slices first (within the case's lesion share), then the usual draw of the rest."""
    alarm, _state["alarm"] = _state["alarm"], None
    if alarm is None or not alarm.any():
        return _choose_slices(has_fg, n_fg, n_bg, rng, substitute)
    first = np.flatnonzero(alarm)[:max(8, n_fg)]
    rest = np.setdiff1d(np.arange(len(has_fg)), first)
    drawn = _choose_slices(has_fg[rest], n_fg - len(first), n_bg, rng, substitute)
    return np.sort(np.concatenate([first, rest[drawn]]).astype(int))


class AlarmGuide(dm._TeacherGuide):
    def __call__(self, x):
        seen = super().__call__(x)
        grid = _state["grid"]
        if grid is not None:
            _state["alarm"] = grid.any(axis=(1, 2))
            FOUND["scans"] += 1
            FOUND["slices"] += len(x)
            FOUND["alarm_slices"] += int(_state["alarm"].sum())
            FOUND["alarm_voxels"] += int(grid.sum())
        return seen

    def note(self):
        return ((super().note() or "") + f" Drawn first: the {FOUND['alarm_slices']} slices of {FOUND['scans']} "
                f"scans that hold one of the original's {FOUND['false_positives']} false positives after its "
                f"clean-up, found with labels beside those scans (bench/distill_alarms_first.py).")


def main(argv: list[str]) -> int:
    from app.core.manifest import labels_beside, read_manifest

    import main as app_main

    args = app_main.build_parser().parse_args(argv)
    manifest = read_manifest(args.data)
    for case in manifest.cases:
        series = manifest.series_path(case)
        if case.split == "train" and not case.labels and series is not None and series.exists():
            found = labels_beside(series, series.parent.parent)
            if found is not None:
                _state["labels"][case.case] = found
    _state["model"], _state["threads"] = args.model, args.threads
    cd._labels_on_grid, cd._choose_slices, dm._TeacherGuide = labels_on_grid, choose_slices, AlarmGuide
    code = app_main.main(argv)
    print(f"{len(_state['labels'])} unlabelled train scans with labels beside them; found: {FOUND}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
