"""Job bodies the tests run, importable so that child processes can run them too."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from app.core.progress import Progress


def count_to(n: int, delay_s: float = 0.0):
    for i in range(n):
        if delay_s:
            time.sleep(delay_s)
        yield Progress((i + 1) / n, f"step {i + 1} of {n}", data=i)
    return n * 10


def fail_after(n: int):
    for i in range(n):
        yield Progress(i / n, "working")
    raise ValueError(f"the input had {n} slices, at least {n + 1} were needed")


def endless(marker: str | None = None):
    """Runs until cancelled; writes a marker file each step so a test can see it running."""
    i = 0
    while True:
        i += 1
        if marker:
            with open(marker, "a") as f:   # append: a reader never sees a half-written file
                f.write(f"{i}\n")
        time.sleep(0.02)
        yield Progress(None, f"tick {i}")


def with_grandchild(pid_file: str, scratch: Path):
    """Starts a grandchild process, writes both pids, then spins (GIL-heavy) until stopped."""
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (scratch / "partial-output.bin").write_bytes(b"\0" * 1024)
    Path(pid_file).write_text(f"{os.getpid()} {grandchild.pid} {scratch}")
    a = np.random.default_rng(0).random((200, 200))
    while True:
        for _ in range(20):
            a = a @ a / np.linalg.norm(a)
        yield Progress(None, "multiplying")


def heavy_matmul(seconds: float):
    a = np.random.default_rng(0).random((300, 300))
    end = time.monotonic() + seconds
    steps = 0
    while time.monotonic() < end:
        a = a @ a / np.linalg.norm(a)
        steps += 1
        yield Progress(None, f"{steps} products")
    return steps


def python_busy_loop(seconds: float):
    """Pure-Python work that holds the GIL between yields (the worst case for a thread job)."""
    end = time.monotonic() + seconds
    total = 0
    while time.monotonic() < end:
        total += sum(i * i for i in range(2000))
        yield Progress(None, "adding")
    return total


def plain_value(x):
    return x * 2
