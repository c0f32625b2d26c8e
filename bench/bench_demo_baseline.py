"""How hard is the demo data? A classical, non-learned nodule finder scored on it.

The baseline is what one would write without machine learning: threshold the lungs out of the
body, close them so nodules against the chest wall stay inside, threshold dense tissue inside
them, and keep the connected blobs whose size and roundness look like a nodule. It is scored
against the ground truth with Dice (pooled over all voxels, and per case) and with the shared
lesion matching rule. The phantom is meant to defeat it (vessels cut across look like nodules,
ground-glass nodules are faint, nodules touch vessels and pleura), so a model trained on the
data has something to learn: the pooled Dice should stay at or below 0.6.

    python bench/bench_demo_baseline.py [--cases 8] [--seed 0] [--size full|tiny] [--out DIR]

Also prints the time to generate each case (not a pass/fail figure: it depends on the machine).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THRESHOLD_HU = -400.0  # what is air when the lungs are found
# Dense-tissue thresholds tried for the nodules: -400 HU (solid tissue only) and -650 HU (low
# enough to catch ground glass); each is scored, so the verdict does not hang on one choice.
NODULE_THRESHOLDS_HU = (-400.0, -650.0)
DIAMETER_MM = (3.0, 30.0)  # Lung-RADS size range of a nodule (sphere-equivalent diameter)
MAX_ELONGATION = 2.5  # longest / shortest principal axis: vessels are longer
MIN_FILL = 0.25  # voxels / bounding-box voxels: branching vessels fill their box poorly


def read_case(case_dir: Path):
    """CT (HU, (z, y, x)) with its spacing, and the ground-truth mask, via SimpleITK."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(case_dir / "CT")))
    image = reader.Execute()
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "nodules.nii.gz"))) > 0
    sx, sy, sz = image.GetSpacing()
    return hu, (sz, sy, sx), truth


def _largest(mask: np.ndarray, keep: int = 1) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep_ids = np.argsort(-sizes)[:keep] + 1
    return np.isin(labels, keep_ids)


def lung_mask(hu: np.ndarray, spacing) -> np.ndarray:
    """Air inside the body, closed and filled slice by slice so nodules and vessels stay in."""
    from scipy import ndimage

    body = _largest(hu > -500.0)
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    air = _largest((hu < THRESHOLD_HU) & body, keep=2)
    radius = max(1, int(round(6.0 / spacing[1])))
    disk = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
    return np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(s, disk, iterations=1)) for s in air])


def _looks_like_nodule(component: np.ndarray, spacing) -> bool:
    count = int(component.sum())
    volume_mm3 = count * float(np.prod(spacing))
    diameter = 2.0 * (3.0 * volume_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
    if not DIAMETER_MM[0] <= diameter <= DIAMETER_MM[1]:
        return False
    if count / component.size < MIN_FILL:
        return False
    points = np.argwhere(component) * np.asarray(spacing)
    if len(points) < 4:
        return True
    eigen = np.sort(np.linalg.eigvalsh(np.cov(points.T)))
    return bool(np.sqrt(eigen[-1] / max(eigen[0], 1e-6)) <= MAX_ELONGATION)


def baseline(hu: np.ndarray, spacing, lungs: np.ndarray, threshold_hu: float) -> np.ndarray:
    """The classical nodule finder: dense blobs of nodule size and roundness inside the lungs."""
    from scipy import ndimage

    dense = (hu > threshold_hu) & lungs
    labels, _ = ndimage.label(dense, structure=np.ones((3, 3, 3), bool))
    found = np.zeros(hu.shape, bool)
    for index, box in enumerate(ndimage.find_objects(labels), 1):
        if box is not None and _looks_like_nodule(labels[box] == index, spacing):
            found[box] |= labels[box] == index
    return found


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


class Tally:
    """Voxel and lesion counts of one baseline setting over all cases."""

    def __init__(self):
        self.overlap = self.total = self.found = self.true = self.false = 0
        self.per_case: list[float] = []

    def add(self, found: np.ndarray, truth: np.ndarray) -> str:
        from app.core.lesions import label_instances, match_lesions

        self.per_case.append(dice(found, truth))
        self.overlap += int((found & truth).sum())
        self.total += int(found.sum()) + int(truth.sum())
        match = match_lesions(label_instances(truth.astype(np.uint8))[0], label_instances(found.astype(np.uint8))[0])
        self.found += len(match.matched)
        self.true += len(match.matched) + len(match.missed)
        self.false += len(match.added)
        return (f"Dice {self.per_case[-1]:.3f}, found {len(match.matched)}/{len(match.matched) + len(match.missed)}"
                f" nodules, {len(match.added)} false")

    @property
    def pooled_dice(self) -> float:
        return 2.0 * self.overlap / max(self.total, 1)

    def summary(self) -> str:
        return (f"pooled Dice {self.pooled_dice:.3f} (mean per case {np.mean(self.per_case):.3f}; nodules found "
                f"{100 * self.found / max(self.true, 1):.0f} %, {self.false / len(self.per_case):.1f} false per case)")


def score(cases: list[Path]) -> dict[float, Tally]:
    tallies = {t: Tally() for t in NODULE_THRESHOLDS_HU}
    for case_dir in cases:
        hu, spacing, truth = read_case(case_dir)
        lungs = lung_mask(hu, spacing)
        for threshold, tally in tallies.items():
            line = tally.add(baseline(hu, spacing, lungs, threshold), truth)
            print(f"  {case_dir.name} at {threshold:.0f} HU: {line}", flush=True)
    return tallies


def generate(out: Path, cases: int, seed: int, size: str) -> list[Path]:
    from app.core.demo_data import generate_demo_data

    steps = generate_demo_data(out, cases=cases, seed=seed, size=size)
    started, last_case = time.perf_counter(), None
    while True:
        try:
            progress = next(steps)
        except StopIteration as done:
            summary = done.value
            break
        case = progress.message.split(":")[0]
        if case != last_case and last_case is not None and case.startswith("CASE"):
            print(f"  generated {last_case} in {time.perf_counter() - started:.1f} s", flush=True)
            started = time.perf_counter()
        last_case = case if case.startswith("CASE") else last_case
    print(f"  generated {last_case} in {time.perf_counter() - started:.1f} s", flush=True)
    for case in summary.cases:
        print(f"  {case.case}: {case.slices} slices, {case.nodules} nodule(s)")
    return [c.series_dir.parent for c in summary.cases]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--out", help="keep the generated data here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="demo-baseline-") as scratch:
        out = Path(args.out or scratch)
        print(f"Generating {args.cases} {args.size} case(s), seed {args.seed}, into {out}")
        cases = generate(out, args.cases, args.seed, args.size)
        print("Scoring the threshold + blob-filter baseline")
        tallies = score(cases)
    for threshold, tally in tallies.items():
        print(f"baseline at {threshold:.0f} HU: {tally.summary()}")
    best = max(t.pooled_dice for t in tallies.values())
    print(f"best baseline pooled Dice {best:.3f}; target <= 0.6 ->", "OK" if best <= 0.6 else "TOO EASY")
    return 0


if __name__ == "__main__":
    sys.exit(main())
