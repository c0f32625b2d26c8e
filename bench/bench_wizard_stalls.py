"""UI stalls while the compression wizard runs a job (budget: max <= 50 ms, p99 <= 16 ms).

Side by side in one process: the wizard idle on its Run page (baseline), then the same wizard
while a real compression run (a tiny UNet, tiny synthetic scans: load, prune, fine-tune with a
live loss chart, evaluate, time) works in its child process and streams progress to the page.
Run: .venv/bin/python bench/bench_wizard_stalls.py  (under xvfb-run, or offscreen)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def tiny_inputs(folder: Path) -> tuple[Path, Path]:
    """Three tiny synthetic studies and a tiny real UNet (built in a child: this process stays torch-free)."""
    import subprocess

    from app.core.demo_data import generate_demo_data
    from app.core.progress import run_to_end

    run_to_end(generate_demo_data(folder / "data", cases=3, seed=0, size="tiny"))
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                    "from tests.core.model_fixtures import small_unet; small_unet(Path(sys.argv[1]))",
                    str(folder / "model")], check=True, cwd=root, capture_output=True)
    return folder / "model" / "card.json", folder / "data" / "manifest.csv"


class GcPauses:
    """Python's cyclic collector stops the UI thread too: count its pauses while measuring."""

    def __init__(self):
        import gc

        self.pauses: list[float] = []
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, _info) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((time.perf_counter() - self._start) * 1000.0)

    def take(self) -> list[float]:
        taken, self.pauses = self.pauses, []
        return taken


def measure(app, seconds: float | None, until=None):
    """Heartbeat stats while the event loop spins for ``seconds`` or until ``until()`` is true."""
    from app.stall_meter import StallMeter

    meter = StallMeter()
    meter.start()
    end = time.monotonic() + (seconds or 0)
    while (until is None and time.monotonic() < end) or (until is not None and not until()):
        app.processEvents()
        time.sleep(0.001)   # an idle UI thread sleeps in its event loop
    return meter.stop()


def one_round(app, wizard, gc_pauses: GcPauses) -> list[tuple[str, object]]:
    """Idle 5 s, one compression run, idle as long as the run: the stall stats of each, in order."""
    run = wizard.run_page
    before = measure(app, 5.0)
    gc_pauses.take()
    start = time.monotonic()
    run.start()
    busy = measure(app, None, until=lambda: run.state != "running")
    seconds = time.monotonic() - start
    gc_busy = gc_pauses.take()
    after = measure(app, seconds)   # as long as the run: the longer the window, the larger its max
    print(f"  GC pauses on the UI thread during the run: {len(gc_busy)} (longest {max(gc_busy, default=0):.1f} ms); "
          f"{run.log.document().blockCount()} log lines and {len(run.losses)} loss points drawn")
    return [("wizard idle before the run (baseline)", before),
            (f"wizard Run page, compression job ({seconds:.0f} s, {run.state})", busy),
            (f"wizard idle after the run, as long (baseline)", after)]


def print_stats(rows) -> None:
    for name, stats in rows:
        verdict = "ok" if stats.within_budget else "OVER BUDGET"
        print(f"{name:56s} {stats.max_ms:8.1f} {stats.p99_ms:8.1f} {stats.mean_ms:8.2f}  {verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="idle/run/idle rounds (the machine is shared)")
    args = parser.parse_args()
    import statistics

    from PySide6.QtWidgets import QApplication

    from app.compress_config import EXPERT, CompressConfig, DataChoice
    from app.jobs import JobManager
    from widgets.compress_wizard import CompressWizard

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as tmp:
        model, manifest = tiny_inputs(Path(tmp))
        config = CompressConfig(model=str(model), data=DataChoice(manifest=str(manifest)), preset=EXPERT,
                                steps=[{"step": "prune_unstructured", "sparsity": 0.5},
                                       {"step": "finetune", "steps": args.finetune_steps}],
                                max_dice_drop="0.5", output=str(Path(tmp) / "out"))
        jobs = JobManager()
        wizard = CompressWizard(jobs, [], config)
        wizard.setStartId(wizard.pageIds()[4])   # the live Run page (it starts the job when shown)
        wizard.run_page.initializePage = lambda: None   # ... here each run starts after its idle baseline
        wizard.show()
        gc_pauses = GcPauses()
        rounds = []
        print(f"{'scenario':56s} {'max ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}  verdict")
        for k in range(args.rounds):
            wizard.config_model.set("name", f"bench-{k}")
            rounds.append(one_round(app, wizard, gc_pauses))
            print_stats(rounds[-1])
        print(f"median over {args.rounds} rounds (a noisy neighbour's spike lands in one round, not all):")
        for i, (name, _stats) in enumerate(rounds[0]):
            values = [r[i][1] for r in rounds]
            print(f"{name.split(' (')[0]:56s} {statistics.median(v.max_ms for v in values):8.1f} "
                  f"{statistics.median(v.p99_ms for v in values):8.1f} {statistics.median(v.mean_ms for v in values):8.2f}")
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ("torch", "onnxruntime"))
        print(f"torch/onnxruntime in the UI process: {heavy or 'none'}")
        wizard.close()
        jobs.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
