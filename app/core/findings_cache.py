"""Findings kept on disk per model variant × series, and the most recently used ones in memory.

A comparison runs every variant on every case; running a model again to look at a case once
more would waste minutes, so each variant's findings on a series are written once to
``<root>/<variant id>/<series key>/`` (uint8 labels, float16 probabilities, the lesion table —
:meth:`Findings.save`) and read back from there. The variant id is the caller's: the compare
code uses the weights' SHA-256 plus a digest of the card (the card decides pre-processing).

Memory: only findings live in the in-memory LRU; the volumes are held once by the caller and
shared by every variant (nothing here copies them). The arithmetic for the worst case the
compare view is built for, 20 cases × 4 variants of 300 × 512 × 512 voxels (78.6 M voxels):

- a volume: int16, 157 MB; all 20 volumes: 3.1 GB (shared, never copied per variant);
- one variant's findings on one case: uint8 labels 79 MB (+ float16 probabilities of two
  classes 315 MB when kept); 80 label maps: 6.3 GB, with probabilities 31 GB — too much;
- so the LRU is bounded by a byte budget (default 2 GB ≈ 25 label maps or 5 with
  probabilities), the rest waits on disk (labels.nii.gz compresses ~100×) and is reloaded
  in about a second when a view needs it. Peak ≈ 3.1 GB volumes + 2 GB cache + the few
  findings the screen shows, well inside 24 GB.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from app.core.findings import FINDINGS_FILE, Findings

DEFAULT_BUDGET_BYTES = 2 * 1024 ** 3


def series_key(volume) -> str:
    """The series' UID; a volume read without one is keyed by a hash of its voxels and grid."""
    if volume.series_uid:
        return volume.series_uid
    digest = hashlib.sha256(np.ascontiguousarray(volume.voxels).tobytes())
    digest.update(repr((tuple(volume.spacing), tuple(volume.origin))).encode())
    return "voxels-" + digest.hexdigest()[:32]


def findings_bytes(findings: Findings) -> int:
    """Bytes a Findings holds in arrays (what the memory budget counts)."""
    arrays = (findings.labels, findings.probabilities, findings.slice_scores)
    return sum(int(a.nbytes) for a in arrays if a is not None)


class FindingsCache:
    """Disk cache + in-memory LRU of :class:`Findings`, safe to use from several threads."""

    def __init__(self, root: str | os.PathLike, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)
        self._memory: OrderedDict[tuple[str, str], Findings] = OrderedDict()
        self._lock = threading.Lock()

    def folder(self, weights_sha256: str, key: str) -> Path:
        return self.root / (weights_sha256 or "unknown-weights") / _safe(key)

    def get(self, weights_sha256: str, key: str) -> Findings | None:
        """The findings from memory, else from disk (then kept in memory), else None."""
        with self._lock:
            found = self._memory.get((weights_sha256, key))
            if found is not None:
                self._memory.move_to_end((weights_sha256, key))
                return found
        folder = self.folder(weights_sha256, key)
        if not (folder / FINDINGS_FILE).is_file():
            return None
        findings = Findings.load(folder)
        self._remember(weights_sha256, key, findings)
        return findings

    def put(self, weights_sha256: str, key: str, findings: Findings) -> Path:
        """Write the findings to disk as one folder, atomically, and keep them in memory."""
        final = self.folder(weights_sha256, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
        try:
            findings.save(staging)
            if final.exists():  # an older copy (another run of the same weights): replace it whole
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._remember(weights_sha256, key, findings)
        return final

    def _remember(self, weights_sha256: str, key: str, findings: Findings) -> None:
        with self._lock:
            self._memory[(weights_sha256, key)] = findings
            self._memory.move_to_end((weights_sha256, key))
            self._evict()

    def _evict(self) -> None:
        """Drop the least recently used findings until the budget holds (the newest always stays)."""
        while len(self._memory) > 1 and self.memory_bytes > self.budget_bytes:
            self._memory.popitem(last=False)

    @property
    def memory_bytes(self) -> int:
        return sum(findings_bytes(f) for f in self._memory.values())

    def in_memory(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._memory)


def _safe(key: str) -> str:
    """A folder name from a series key (UIDs are safe already; paths are not)."""
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in key)[:120]
