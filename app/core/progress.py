"""Progress and cancellation for long operations.

Every long operation in MedCompress is a plain generator: each ``yield Progress(...)`` reports
how far it got and is a point where the job runner may stop it (by closing the generator,
which raises ``GeneratorExit`` there, or by the runner raising :class:`Cancelled`). The
generator's ``return`` value is the result. Nothing here knows about Qt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    fraction: float | None  # 0..1, or None when the amount of work is not known yet
    message: str = ""
    # Optional structured payload for the UI (e.g. a loss value for a live chart, a slice index).
    data: Any = None


class Cancelled(Exception):
    """The user cancelled: not an error, and never shown as one."""


# A long operation: yields progress, returns its result.
Job = Generator[Progress, None, T]


def run_to_end(gen: Generator[Any, None, T]) -> T:
    """Drive a job generator without a UI (tests, CLI, child processes); returns its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def scaled(gen: Generator[Progress, None, T], start: float, stop: float, prefix: str = ""):
    """Re-emit a sub-job's progress mapped into [start, stop] of its parent; returns its result."""
    while True:
        try:
            p = next(gen)
        except StopIteration as done:
            return done.value
        frac = None if p.fraction is None else start + (stop - start) * p.fraction
        yield Progress(frac, f"{prefix}{p.message}", p.data)
