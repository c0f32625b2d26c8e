"""The compute process: persistent, shared-memory exchange, cancel, and recovery after a crash."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.compute import ComputeClient, ComputeError
from app.core.progress import Cancelled, Progress, run_to_end
from app.core.volume import Volume
from app.jobs import JobState
from tests.app import compute_tasks


@pytest.fixture
def compute():
    client = ComputeClient()
    yield client
    client.close()


def _volume(slices=8, size=256) -> Volume:
    rng = np.random.default_rng(1)
    voxels = rng.integers(-1000, 1000, (slices, size, size), dtype=np.int16)
    return Volume(voxels=voxels, spacing=(2.0, 0.7, 0.7), padding_mask=voxels < -990)


def test_volume_goes_through_shared_memory_and_comes_back(compute):
    volume = _volume()
    assert volume.voxels.nbytes >= (1 << 20)   # large enough to travel as shared memory
    ticks = []
    gen = compute.run(compute_tasks.invert, volume)
    while True:
        try:
            ticks.append(next(gen))
        except StopIteration as done:
            result = done.value
            break
    assert np.array_equal(result["voxels"], -volume.voxels)
    assert [t.fraction for t in ticks if isinstance(t, Progress) and t.fraction][-1] == 1.0
    assert result["pid"] != __import__("os").getpid()


def test_the_process_persists_between_requests(compute):
    run_to_end(compute.run(compute_tasks.remember, "model", "loaded once"))
    pid = compute.pid
    assert run_to_end(compute.run(compute_tasks.remember, "model")) == "loaded once"
    assert compute.pid == pid


def test_cancel_stops_the_child_within_one_step(compute, tmp_path):
    marker = tmp_path / "slices"
    gen = compute.run(compute_tasks.slow_slices, _volume(slices=200, size=32), str(marker))
    while not marker.exists() or len(marker.read_text().split()) < 3:
        next(gen)
    gen.close()   # what the job runner does on cancel
    seen = len(marker.read_text().split())
    import time
    time.sleep(0.3)
    assert len(marker.read_text().split()) <= seen + 1, "more than one step ran after cancel"
    assert run_to_end(compute.run(compute_tasks.remember, "alive", 1)) == 1


def test_a_crashed_child_fails_the_job_and_the_next_run_works(compute):
    with pytest.raises(ComputeError, match="stopped unexpectedly"):
        run_to_end(compute.run(compute_tasks.crash))
    assert run_to_end(compute.run(compute_tasks.remember, "k", 7)) == 7


def test_killing_the_compute_process_during_a_job_fails_it(qtbot, job_manager, compute, tmp_path):
    marker = tmp_path / "slices"
    handle = job_manager.submit("Run model", compute.run, compute_tasks.slow_slices,
                                _volume(slices=400, size=32), str(marker), heavy=True)
    qtbot.waitUntil(lambda: marker.exists(), timeout=60_000)
    with qtbot.waitSignal(job_manager.failed, timeout=30_000) as blocker:
        compute.kill()
    assert "compute process stopped unexpectedly" in blocker.args[1]
    assert handle.state is JobState.FAILED
    with qtbot.waitSignal(job_manager.finished, timeout=60_000) as done:
        job_manager.submit("again", compute.run, compute_tasks.remember, "k", 3, heavy=True)
    assert done.args[1] == 3
