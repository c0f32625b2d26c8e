"""Progress and cancellation for long operations.

Every long operation in MedCompress is a plain generator: each ``yield Progress(...)`` reports
how far it got and is a point where the job runner may stop it (by closing the generator,
which raises ``GeneratorExit`` there, or by the runner raising :class:`Cancelled`). The
generator's ``return`` value is the result. Nothing here knows about Qt.
"""
from __future__ import annotations

from dataclasses import dataclass
import inspect
from typing import Any, Callable, Generator, TypeVar

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


def as_progress(item: Any) -> Progress:
    """Jobs may also yield a bare fraction or a message; normalise to Progress."""
    if isinstance(item, Progress):
        return item
    if isinstance(item, (int, float)):
        return Progress(float(item))
    return Progress(None, str(item))


class ProgressThrottle:
    """Pass progress on only when it changed meaningfully (Orange3's set_progress_value rule)."""

    def __init__(self, min_step: float = 0.005):
        self._min_step = min_step
        self._last: tuple[float | None, str] = (-1.0, "")

    def worth_sending(self, p: Progress) -> bool:
        last_frac, last_msg = self._last
        moved = (p.fraction is None) != (last_frac is None) or (
            p.fraction is not None and last_frac is not None
            and abs(p.fraction - last_frac) >= self._min_step)
        if moved or p.message != last_msg or p.data is not None or p.fraction == 1.0:
            self._last = (p.fraction, p.message)
            return True
        return False


def drive(gen_or_value: Any, is_cancelled: Callable[[], bool],
          report: Callable[[Progress], None]) -> Any:
    """Run a job body to its end on this thread, honouring cancel at every yield.

    A plain (non-generator) value is returned as it is, so simple functions are jobs too.
    """
    if not inspect.isgenerator(gen_or_value):
        return gen_or_value
    gen = gen_or_value
    throttle = ProgressThrottle()
    try:
        while True:
            if is_cancelled():
                raise Cancelled()
            try:
                item = next(gen)
            except StopIteration as done:
                return done.value
            progress = as_progress(item)
            if throttle.worth_sending(progress):
                report(progress)
    finally:
        gen.close()
