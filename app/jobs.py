"""The one job manager: runs Qt-free generator jobs off the UI thread and reports through signals.

A job is a generator function (see ``app.core.progress``): each ``yield Progress(...)`` is a
progress tick and a cancel point; its ``return`` value is the result. The manager runs it

- on a thread pool (light work: indexing, loading, thumbnails), or
- on the single heavy lane, one at a time, with lowered priority (inference, evaluation), or
- in a child process of its own (``in_process=True``: training, quantisation, anything
  GIL-heavy or crash-prone), supervised from the heavy lane; see ``app.process_jobs``.

Workers never touch widgets: they emit the manager's private signals, which Qt queues onto
the UI thread, where the manager updates its records and re-emits its public signals.
Exactly one ``JobManager`` exists per window and is passed to whoever needs it.
"""
from __future__ import annotations

import enum
import itertools
import os
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot

from app.core.progress import Cancelled, Progress, drive
from app.process_jobs import CancelToken, run_in_child


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobRecord:
    job_id: int
    name: str
    heavy: bool
    in_process: bool
    owner: str | None
    token: CancelToken
    state: JobState = JobState.QUEUED
    fraction: float | None = 0.0
    message: str = ""
    error: str = ""
    detail: str = ""


class _ThreadJob(QRunnable):
    def __init__(self, manager: "JobManager", record: JobRecord, fn, args, kwargs):
        super().__init__()
        self.setAutoDelete(True)
        self._manager, self._record = manager, record
        self._fn, self._args, self._kwargs = fn, args, kwargs

    def run(self) -> None:
        rec, mgr = self._record, self._manager
        if rec.token.cancelled:
            mgr._sig_cancelled.emit(rec.job_id)
            return
        mgr._sig_started.emit(rec.job_id)
        if rec.heavy:
            _lower_this_thread_priority()
        try:
            if rec.in_process:
                result = run_in_child(self._fn, self._args, self._kwargs, rec.token,
                                      lambda p: mgr._sig_progress.emit(rec.job_id, p))
            else:
                result = drive(self._fn(*self._args, **self._kwargs), lambda: rec.token.cancelled,
                               lambda p: mgr._sig_progress.emit(rec.job_id, p))
        except Cancelled:
            mgr._sig_cancelled.emit(rec.job_id)
        except BaseException as exc:  # noqa: BLE001 - every job error goes to one place
            detail = getattr(exc, "detail", None) or traceback.format_exc()
            mgr._sig_failed.emit(rec.job_id, _short_message(exc), detail)
        else:
            mgr._sig_finished.emit(rec.job_id, result)


def _short_message(exc: BaseException) -> str:
    text = str(exc).strip()
    return text if text else type(exc).__name__


def _lower_this_thread_priority() -> None:
    try:  # Linux: a thread id is a scheduling entity of its own
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class JobHandle:
    def __init__(self, manager: "JobManager", job_id: int):
        self._manager, self.job_id = manager, job_id

    @property
    def state(self) -> JobState:
        return self._manager.record(self.job_id).state

    def cancel(self) -> None:
        self._manager.cancel(self.job_id)

    def kill(self) -> None:
        """Child-process jobs only: end the whole process group at once, no grace period."""
        self._manager.kill(self.job_id)


class JobManager(QObject):
    # Public signals, always emitted on the UI thread.
    added = Signal(int)
    changed = Signal(int)                         # state or progress of a job changed
    progress = Signal(int, object, str, object)   # job_id, fraction|None, message, data
    finished = Signal(int, object)                # job_id, result
    failed = Signal(int, str, str)                # job_id, short message, traceback
    cancelled = Signal(int)

    # Private relays: emitted from pool threads, queued to the UI thread.
    _sig_started = Signal(int)
    _sig_progress = Signal(int, object)
    _sig_finished = Signal(int, object)
    _sig_failed = Signal(int, str, str)
    _sig_cancelled = Signal(int)

    def __init__(self, light_threads: int = 2, parent: QObject | None = None):
        super().__init__(parent)
        self._light = QThreadPool(self)
        self._light.setMaxThreadCount(light_threads)
        self._heavy = QThreadPool(self)   # heavy compute runs one job at a time
        self._heavy.setMaxThreadCount(1)
        self._ids = itertools.count(1)
        self._records: dict[int, JobRecord] = {}
        self._callbacks: dict[int, tuple[Callable | None, Callable | None, Callable | None]] = {}
        self._sig_started.connect(self._on_started)
        self._sig_progress.connect(self._on_progress)
        self._sig_finished.connect(self._on_finished)
        self._sig_failed.connect(self._on_failed)
        self._sig_cancelled.connect(self._on_cancelled)

    # -- submitting ---------------------------------------------------------------------
    def submit(self, name: str, fn: Callable, *args, heavy: bool = False, in_process: bool = False,
               owner: str | None = None, on_result: Callable | None = None,
               on_error: Callable | None = None, on_progress: Callable | None = None,
               **kwargs) -> JobHandle:
        """Queue ``fn(*args, **kwargs)``. An ``owner`` has one job at a time: its previous
        job is cancelled first. ``in_process`` jobs are heavy and need an importable ``fn``.
        ``on_result(result)``, ``on_error(message, detail)`` and ``on_progress(Progress)`` are
        called on the UI thread for this job only."""
        if owner is not None:
            for rec in self._records.values():
                if rec.owner == owner and not rec.state.is_final:
                    self.cancel(rec.job_id)
        heavy = heavy or in_process
        rec = JobRecord(next(self._ids), name, heavy, in_process, owner, CancelToken())
        self._records[rec.job_id] = rec
        self._callbacks[rec.job_id] = (on_result, on_error, on_progress)
        self.added.emit(rec.job_id)
        (self._heavy if heavy else self._light).start(_ThreadJob(self, rec, fn, args, kwargs))
        return JobHandle(self, rec.job_id)

    # -- control ------------------------------------------------------------------------
    def cancel(self, job_id: int) -> None:
        rec = self._records[job_id]
        if not rec.state.is_final:
            rec.token.cancel()

    def kill(self, job_id: int) -> None:
        rec = self._records[job_id]
        if not rec.state.is_final:
            rec.token.kill()

    def cancel_all(self) -> None:
        for job_id in list(self._records):
            self.cancel(job_id)

    def shutdown(self, timeout_ms: int = 10_000) -> bool:
        """Cancel everything and wait for the pools; called when the window closes."""
        self.cancel_all()
        done = self._light.waitForDone(timeout_ms) and self._heavy.waitForDone(timeout_ms)
        return bool(done)

    def record(self, job_id: int) -> JobRecord:
        return self._records[job_id]

    def records(self) -> list[JobRecord]:
        return list(self._records.values())

    def active_count(self) -> int:
        return sum(not r.state.is_final for r in self._records.values())

    # -- relays (UI thread) ---------------------------------------------------------------
    @Slot(int)
    def _on_started(self, job_id: int) -> None:
        self._records[job_id].state = JobState.RUNNING
        self.changed.emit(job_id)

    @Slot(int, object)
    def _on_progress(self, job_id: int, p: Progress) -> None:
        rec = self._records[job_id]
        if rec.state.is_final:
            return
        rec.fraction, rec.message = p.fraction, p.message or rec.message
        self.progress.emit(job_id, p.fraction, p.message, p.data)
        self.changed.emit(job_id)
        on_progress = self._callbacks.get(job_id, (None, None, None))[2]
        if on_progress is not None:
            on_progress(p)

    @Slot(int, object)
    def _on_finished(self, job_id: int, result: Any) -> None:
        rec = self._records[job_id]
        rec.state, rec.fraction = JobState.FINISHED, 1.0
        self.finished.emit(job_id, result)
        self.changed.emit(job_id)
        on_result = self._callbacks.pop(job_id, (None, None, None))[0]
        if on_result is not None:
            on_result(result)

    @Slot(int, str, str)
    def _on_failed(self, job_id: int, message: str, detail: str) -> None:
        rec = self._records[job_id]
        rec.state, rec.error, rec.detail = JobState.FAILED, message, detail
        self.failed.emit(job_id, message, detail)
        self.changed.emit(job_id)
        on_error = self._callbacks.pop(job_id, (None, None, None))[1]
        if on_error is not None:
            on_error(message, detail)

    @Slot(int)
    def _on_cancelled(self, job_id: int) -> None:
        self._records[job_id].state = JobState.CANCELLED
        self._callbacks.pop(job_id, None)
        self.cancelled.emit(job_id)
        self.changed.emit(job_id)
