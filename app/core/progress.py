"""Progress and cancellation for long operations.

Every long operation in MedCompress is a plain generator: each ``yield Progress(...)`` reports
how far it got and is a point where the job runner may stop it (by closing the generator,
which raises ``GeneratorExit`` there, or by the runner raising :class:`Cancelled`). The
generator's ``return`` value is the result. Nothing here knows about Qt.
"""
from __future__ import annotations

from dataclasses import dataclass
import inspect
import sys
from typing import Any, Callable, Generator, TextIO, TypeVar

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
            p = as_progress(next(gen))
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


# -- command lines ------------------------------------------------------------------------
class ProgressBar:
    """A one-line text bar on a terminal; plain lines (one per new message) when piped to a file."""

    def __init__(self, stream: TextIO | None = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.width = width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_line = ""
        self._last_message = None

    def __call__(self, progress: Progress) -> None:
        line = self.render(progress)
        if self.interactive:
            self.stream.write("\r" + line.ljust(len(self._last_line)))
        elif progress.message != self._last_message:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_line, self._last_message = line, progress.message

    def render(self, progress: Progress) -> str:
        if progress.fraction is None:
            return f"[{'.' * self.width}]      {progress.message}"[:160]
        filled = int(round(max(0.0, min(1.0, progress.fraction)) * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        return f"[{bar}] {progress.fraction * 100:3.0f}% {progress.message}"[:160]

    def done(self) -> None:
        if self.interactive and self._last_line:
            self.stream.write("\n")
            self.stream.flush()
        self._last_line = ""


def run_with_bar(job: Generator[Progress, None, Any], bar: "ProgressBar | None" = None) -> Any:
    """Drive a job from a command line, showing its progress on stderr; returns its result."""
    bar = bar or ProgressBar()
    try:
        return drive(job, lambda: False, bar)
    finally:
        bar.done()
