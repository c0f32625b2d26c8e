"""How long the UI event loop stalls while jobs run, per job kind (budget: max <= 50 ms, p99 <= 16 ms).

Runs in one process, side by side: an idle baseline, then each job kind for the same time,
with the stall meter's heartbeat on the UI thread. Run: .venv/bin/python bench/bench_stalls.py
(under xvfb-run, or it falls back to QT_QPA_PLATFORM=offscreen).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not os.environ.get("DISPLAY"):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtWidgets import QApplication  # noqa: E402

from app.jobs import JobManager  # noqa: E402
from app.stall_meter import StallMeter  # noqa: E402
from bench import workloads  # noqa: E402


def measure(app, jobs: JobManager, seconds: float, submit=None):
    meter = StallMeter()
    done = []
    handle = submit(jobs) if submit else None
    if handle is not None:
        jobs.finished.connect(lambda j, r: done.append(j))
        jobs.failed.connect(lambda j, m, d: done.append(j))
    meter.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end or (handle is not None and handle.job_id not in done):
        app.processEvents()
        time.sleep(0.001)   # an idle UI thread sleeps in the event loop, not in a busy loop
    return meter.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    app = QApplication.instance() or QApplication([])
    jobs = JobManager()
    s = args.seconds
    scenarios = [
        ("idle (baseline)", None),
        ("child process, numpy (compression-like)",
         lambda j: j.submit("numpy", workloads.numpy_products, s, in_process=True)),
        ("heavy lane thread, numpy (inference-like)",
         lambda j: j.submit("numpy", workloads.numpy_products, s, heavy=True)),
        ("light pool thread, pure Python (holds the GIL)",
         lambda j: j.submit("python", workloads.python_loop, s)),
        ("child process, pure Python",
         lambda j: j.submit("python", workloads.python_loop, s, in_process=True)),
    ]
    print(f"{'scenario':48s} {'max ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}  verdict")
    baseline = None
    for name, submit in scenarios:
        stats = measure(app, jobs, s, submit)
        baseline = baseline or stats
        verdict = "ok" if stats.within_budget else "OVER BUDGET"
        print(f"{name:48s} {stats.max_ms:8.1f} {stats.p99_ms:8.1f} {stats.mean_ms:8.2f}  {verdict}")
    jobs.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
