"""Tasks the compute-process tests run in the child (importable there)."""
from __future__ import annotations

import os
import time

import numpy as np

from app.core.progress import Progress


def invert(cache, volume):
    """Returns the negated voxels and the child's pid; progress per slice."""
    out = np.empty_like(volume.voxels)
    for k in range(volume.shape[0]):
        out[k] = -volume.voxels[k]
        yield Progress((k + 1) / volume.shape[0], f"slice {k + 1}")
    return {"voxels": out, "pid": os.getpid(), "modules": sorted(cache.__dict__)}


def slow_slices(cache, volume, marker: str):
    for k in range(volume.shape[0]):
        with open(marker, "a") as f:
            f.write(f"{k}\n")
        time.sleep(0.05)
        yield Progress((k + 1) / volume.shape[0], f"slice {k + 1}")
    return "done"


def crash(cache):
    os._exit(3)
    yield  # pragma: no cover - makes this a generator


def remember(cache, key, value=None):
    """Keeps state across requests: proves the process (and its loaded models) persist."""
    store = cache.__dict__.setdefault("store", {})
    if value is not None:
        store[key] = value
    return store.get(key)
