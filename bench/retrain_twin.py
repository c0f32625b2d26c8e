"""One experiment's driver: the demo UNet's last training run again, with another seed (1 Dec;
bench/README.md, "The original retrained with another seed").

    git show bf1bd3a:resources/models/lung-nodule-unet2d/model.pt > unet-1.2.0.pt
    .venv/bin/python bench/retrain_twin.py --data BIG184 --init unet-1.2.0.pt --seed 4 --out DIR
    .venv/bin/python main.py evaluate --models resources/models/lung-nodule-unet2d/card.json \\
        DIR/lung-nodule-unet2d/card.json --data BIG184/manifest.csv --threads 2

Demo UNet 1.3.0 is 1.2.0 trained 8000 more steps on the 184 train scans (solid nodules drawn ×3,
one-cycle to 1e-3, seed 3; docs/model-card.md). This repeats those steps from the same 1.2.0
weights on the same scans (BIG184's train split is the same 184 cases) with another seed, and
writes the result as a variant: 1.3.0's folder with the twin's weights, its ONNX export checked
against torch, and 1.3.0's clean-up and candidate filter unchanged, so that only the network's
seed differs. The verdict then shows how many of the original's own lesions a retrained original
loses: the zero-lost budget's floor. This is an experiment, not a feature.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ORIGINAL = Path(__file__).resolve().parents[1] / "resources" / "models" / "lung-nodule-unet2d"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder with manifest.csv whose train split trains the twin")
    parser.add_argument("--init", required=True, help="the weights 1.3.0 started from (1.2.0's model.pt)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from app.core.demo_models import iter_demo_cases, train_unet, write_model_folder
    from app.core.model_card import load_card
    from app.core.models import sha256_file
    from app.core.progress import run_with_bar

    start = time.perf_counter()
    net = run_with_bar(train_unet(iter_demo_cases(Path(args.data), ("train",)), args.seed, 0, threads=args.threads,
                                  polish_steps=args.steps, polish_lr=1e-3, init=Path(args.init), solid_weight=3))
    seconds = time.perf_counter() - start
    folder = Path(args.out) / ORIGINAL.name
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(ORIGINAL, partial)
    card = load_card(partial / "card.json")
    card = replace(card, version=f"{card.version}-seed{args.seed}").with_lineage(
        seed=args.seed, training_time_s=round(seconds, 1), parent_sha256=sha256_file(Path(args.init)))
    card = write_model_folder(net, card, partial, (1, 1, 64, 64), dynamic_spatial=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    print(f"trained in {seconds:.0f} s; ONNX against torch: max |logit difference| "
          f"{card.lineage.metrics['onnx_max_abs_logit_diff']:.1e}; written {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
