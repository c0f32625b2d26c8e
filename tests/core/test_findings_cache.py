"""The findings cache: one folder per weights × series on disk, a byte budget in memory."""
from __future__ import annotations

import numpy as np

from app.core.findings import Findings
from app.core.findings_cache import FindingsCache, findings_bytes, series_key
from app.core.volume import Volume


def _findings(seed: int, shape=(4, 16, 16)) -> Findings:
    labels = (np.random.default_rng(seed).random(shape) > 0.9).astype(np.uint8)
    probabilities = np.stack([1.0 - labels, labels]).astype(np.float16)
    return Findings(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3), series_uid=f"1.2.{seed}",
                    labels=labels, probabilities=probabilities, model={"model_name": "m"})


def test_written_findings_come_back_from_disk_as_uint8_labels_and_float16_probabilities(tmp_path):
    cache = FindingsCache(tmp_path)
    original = _findings(1)
    folder = cache.put("sha-a", "1.2.1", original)
    assert folder == tmp_path / "sha-a" / "1.2.1"
    again = FindingsCache(tmp_path).get("sha-a", "1.2.1")
    assert again.labels.dtype == np.uint8 and again.probabilities.dtype == np.float16
    assert np.array_equal(again.labels, original.labels)
    assert FindingsCache(tmp_path).get("sha-b", "1.2.1") is None   # other weights: not cached


def test_memory_stays_within_the_budget_least_recently_used_first(tmp_path):
    one = findings_bytes(_findings(0))
    cache = FindingsCache(tmp_path, budget_bytes=2 * one)
    for n in range(3):
        cache.put("sha", f"s{n}", _findings(n))
    assert cache.in_memory() == [("sha", "s1"), ("sha", "s2")] and cache.memory_bytes <= 2 * one
    cache.get("sha", "s1")            # touched: now the most recent
    cache.get("sha", "s0")            # evicted earlier: read back from disk, evicts s2
    assert cache.in_memory() == [("sha", "s1"), ("sha", "s0")]


def test_a_volume_without_a_series_uid_is_keyed_by_its_voxels():
    voxels = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    a = Volume(voxels=voxels, spacing=(1.0, 1.0, 1.0))
    b = Volume(voxels=voxels.copy(), spacing=(1.0, 1.0, 1.0))
    c = Volume(voxels=voxels + 1, spacing=(1.0, 1.0, 1.0))
    assert series_key(a) == series_key(b) != series_key(c)
    assert series_key(Volume(voxels=voxels, spacing=(1.0, 1.0, 1.0), series_uid="1.2.3")) == "1.2.3"
