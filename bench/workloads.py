"""CPU-heavy job bodies for the responsiveness benchmarks (importable by child processes)."""
from __future__ import annotations

import time

import numpy as np

from app.core.progress import Progress


def numpy_products(seconds: float):
    """BLAS work: releases the GIL, uses every core it is given."""
    a = np.random.default_rng(0).random((400, 400))
    end, steps = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        a = a @ a / np.linalg.norm(a)
        steps += 1
        yield Progress(None, f"{steps} products")
    return steps


def python_loop(seconds: float):
    """Pure-Python work that holds the GIL between yields: the worst case for a thread job."""
    end, total = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        total += sum(i * i for i in range(5_000))
        yield Progress(None, "adding")
    return total
