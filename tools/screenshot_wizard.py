"""docs/screenshot-wizard.png: the compression wizard's Run page in the middle of a real run.

A tiny UNet and three tiny synthetic studies (as the stall bench makes them), an expert recipe
(prune 50 %, fine-tune), grabbed once the loss chart has enough points; then the run is cancelled.
Run: xvfb-run -a .venv/bin/python tools/screenshot_wizard.py [--out docs/screenshot-wizard.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot-wizard.png"))
    parser.add_argument("--losses", type=int, default=45, help="loss points on the chart when grabbed")
    args = parser.parse_args()
    from PySide6.QtWidgets import QApplication

    from app.compress_config import EXPERT, CompressConfig, DataChoice
    from app.jobs import JobManager
    from bench.bench_wizard_stalls import tiny_inputs
    from widgets.compress_wizard import CompressWizard

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as tmp:
        model, manifest = tiny_inputs(Path(tmp))
        config = CompressConfig(model=str(model), data=DataChoice(manifest=str(manifest)), preset=EXPERT,
                                steps=[{"step": "prune_unstructured", "sparsity": 0.5},
                                       {"step": "finetune", "steps": 400, "lr": 0.002}],
                                output=str(Path(tmp) / "out"), name="tiny-unet-prune50-ft")
        jobs = JobManager()
        wizard = CompressWizard(jobs, [], config)
        wizard.setStartId(wizard.pageIds()[4])
        wizard.show()
        run = wizard.run_page
        deadline = time.monotonic() + 600
        while len(run.losses) < args.losses and run.state == "running" and time.monotonic() < deadline:
            app.processEvents()
            time.sleep(0.01)
        for _ in range(30):   # let the coalesced redraw land
            app.processEvents()
            time.sleep(0.01)
        saved = wizard.grab().save(args.out)
        print(f"{'saved' if saved else 'could not save'} {args.out} ({len(run.losses)} loss points, {run.state})")
        wizard.reject()
        jobs.shutdown()
    return 0 if saved else 1


if __name__ == "__main__":
    sys.exit(main())
