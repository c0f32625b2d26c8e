"""A heartbeat on the UI thread that measures how long the event loop was kept from running.

Every benchmark that claims "the UI stays responsive" uses this: a precise timer fires every
few milliseconds; the lateness of each beat is how long the event loop was blocked. The
budget for every job kind is max stall <= 50 ms and p99 <= 16 ms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PySide6.QtCore import QObject, Qt, QTimer

STALL_BUDGET_MAX_MS = 50.0
STALL_BUDGET_P99_MS = 16.0


@dataclass(frozen=True)
class StallStats:
    samples: int
    max_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def within_budget(self) -> bool:
        return self.max_ms <= STALL_BUDGET_MAX_MS and self.p99_ms <= STALL_BUDGET_P99_MS

    def __str__(self) -> str:
        verdict = "within budget" if self.within_budget else "OVER budget"
        return (f"{self.samples} beats, max stall {self.max_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
                f"mean {self.mean_ms:.2f} ms ({verdict}: max <= {STALL_BUDGET_MAX_MS:.0f}, "
                f"p99 <= {STALL_BUDGET_P99_MS:.0f})")


def stall_stats(stalls_ms) -> StallStats:
    stalls = np.asarray(stalls_ms, dtype=float)
    if stalls.size == 0:
        return StallStats(0, 0.0, 0.0, 0.0)
    return StallStats(int(stalls.size), float(stalls.max()),
                      float(np.percentile(stalls, 99)), float(stalls.mean()))


class StallMeter(QObject):
    """Start it, run the workload while the event loop spins, stop it to read the stats."""

    def __init__(self, interval_ms: int = 5, parent: QObject | None = None):
        super().__init__(parent)
        self._interval_s = interval_ms / 1000.0
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self._beat)
        self._last = 0.0
        self._stalls: list[float] = []

    def start(self) -> None:
        self._stalls = []
        self._last = time.perf_counter()
        self._timer.start()

    def stop(self) -> StallStats:
        self._timer.stop()
        return stall_stats(self._stalls)

    def _beat(self) -> None:
        now = time.perf_counter()
        self._stalls.append(max(0.0, (now - self._last - self._interval_s) * 1000.0))
        self._last = now
