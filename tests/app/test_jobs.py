"""The job manager with real threads and real child processes."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.jobs import JobState
from app.process_jobs import new_scratch_folder, scratch_root, sweep_stale_scratch
from tests.app import job_bodies


def _collect(manager):
    events = []
    manager.progress.connect(lambda j, f, m, d: events.append(("progress", f, m, d)))
    manager.finished.connect(lambda j, r: events.append(("finished", r)))
    manager.failed.connect(lambda j, m, t: events.append(("failed", m, t)))
    manager.cancelled.connect(lambda j: events.append(("cancelled",)))
    return events


def test_progress_arrives_in_order_then_the_result(qtbot, job_manager):
    events = _collect(job_manager)
    with qtbot.waitSignal(job_manager.finished, timeout=10_000):
        handle = job_manager.submit("count", job_bodies.count_to, 20)
    fractions = [e[1] for e in events if e[0] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [e[3] for e in events if e[0] == "progress"] == list(range(20))
    assert events[-1] == ("finished", 200)
    assert handle.state is JobState.FINISHED


def test_a_plain_function_is_a_job_too(qtbot, job_manager):
    with qtbot.waitSignal(job_manager.finished, timeout=10_000) as blocker:
        job_manager.submit("double", job_bodies.plain_value, 21)
    assert blocker.args[1] == 42


def test_an_error_reaches_one_place_with_its_traceback(qtbot, job_manager):
    with qtbot.waitSignal(job_manager.failed, timeout=10_000) as blocker:
        handle = job_manager.submit("fails", job_bodies.fail_after, 3)
    _, message, detail = blocker.args
    assert message == "the input had 3 slices, at least 4 were needed"
    assert "Traceback" in detail and "fail_after" in detail
    assert handle.state is JobState.FAILED
    assert job_manager.record(handle.job_id).error == message


def test_cancel_mid_run_stops_at_the_next_yield(qtbot, job_manager, tmp_path):
    marker = tmp_path / "ticks"
    handle = job_manager.submit("endless", job_bodies.endless, str(marker))
    ticks_so_far = lambda: len(marker.read_text().split()) if marker.exists() else 0  # noqa: E731
    qtbot.waitUntil(lambda: ticks_so_far() > 3, timeout=10_000)
    with qtbot.waitSignal(job_manager.cancelled, timeout=10_000):
        handle.cancel()
    ticks = ticks_so_far()
    qtbot.wait(200)
    assert ticks_so_far() == ticks, "the job kept running after it was cancelled"
    assert handle.state is JobState.CANCELLED


def test_one_job_per_owner_the_old_one_is_cancelled(qtbot, job_manager):
    first = job_manager.submit("load A", job_bodies.endless, owner="viewer")
    with qtbot.waitSignal(job_manager.finished, timeout=10_000):
        second = job_manager.submit("load B", job_bodies.count_to, 3, owner="viewer")
    qtbot.waitUntil(lambda: first.state is JobState.CANCELLED, timeout=10_000)
    assert second.state is JobState.FINISHED


def test_heavy_jobs_run_one_at_a_time(qtbot, job_manager):
    a = job_manager.submit("heavy A", job_bodies.endless, heavy=True)
    b = job_manager.submit("heavy B", job_bodies.count_to, 2, heavy=True)
    qtbot.waitUntil(lambda: a.state is JobState.RUNNING, timeout=10_000)
    qtbot.wait(300)
    assert b.state is JobState.QUEUED
    a.cancel()
    qtbot.waitUntil(lambda: b.state is JobState.FINISHED, timeout=10_000)


def test_child_process_job_reports_progress_and_result(qtbot, job_manager):
    events = _collect(job_manager)
    with qtbot.waitSignal(job_manager.finished, timeout=30_000):
        job_manager.submit("count in child", job_bodies.count_to, 5, 0.01, in_process=True)
    assert [e[3] for e in events if e[0] == "progress"] == list(range(5))
    assert events[-1] == ("finished", 50)


def test_child_process_error_keeps_the_child_traceback(qtbot, job_manager):
    with qtbot.waitSignal(job_manager.failed, timeout=30_000) as blocker:
        job_manager.submit("fails in child", job_bodies.fail_after, 2, in_process=True)
    assert "at least 3 were needed" in blocker.args[1]
    assert "fail_after" in blocker.args[2]


def _wait_for_pids(qtbot, pid_file: Path):
    qtbot.waitUntil(lambda: pid_file.exists() and bool(pid_file.read_text()), timeout=30_000)
    child, grandchild, scratch = pid_file.read_text().split()
    return int(child), int(grandchild), Path(scratch)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); its /proc status says so
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["kill-from-outside", "kill-button", "cancel"])
def test_child_and_grandchild_end_and_scratch_goes(qtbot, job_manager, tmp_path, how):
    pid_file = tmp_path / "pids"
    beats = []
    handle = job_manager.submit("spin", job_bodies.with_grandchild, str(pid_file), in_process=True)
    child, grandchild, scratch = _wait_for_pids(qtbot, pid_file)
    assert scratch.exists() and scratch.parent == scratch_root()
    signal_name = job_manager.cancelled if how == "cancel" else job_manager.failed
    with qtbot.waitSignal(signal_name, timeout=30_000) as blocker:
        if how == "kill-from-outside":
            os.kill(child, 9)
        elif how == "kill-button":
            handle.kill()
        else:
            handle.cancel()
        start = time.monotonic()
        while time.monotonic() - start < 0.3:  # the UI keeps processing events meanwhile
            qtbot.wait(10)
            beats.append(time.monotonic())
    if how == "kill-from-outside":
        assert "ended unexpectedly (killed by SIGKILL)" in blocker.args[1]
    elif how == "kill-button":
        assert "killed" in blocker.args[1]
    qtbot.waitUntil(lambda: _gone(child) and _gone(grandchild), timeout=10_000)
    assert not scratch.exists(), "the scratch folder (and its partial output) was left behind"
    assert len(beats) >= 10, "the UI stopped processing events while the child was ended"


def test_stale_scratch_of_a_dead_app_is_swept(tmp_path):
    mine = new_scratch_folder()
    dead = scratch_root() / "job-999999999-1"
    dead.mkdir()
    (dead / "half-written.onnx").write_bytes(b"partial")
    removed = sweep_stale_scratch()
    assert dead in removed and not dead.exists()
    assert mine.exists(), "a live app's scratch folder must be kept"
    mine.rmdir()
