"""Child-process jobs: GIL-heavy or crash-prone work runs in a process of its own.

The supervisor (a heavy-lane pool thread of the job manager) spawns
``python -m app.process_jobs`` in a new session, so the child and every grandchild it starts
share one process group that cancel and kill reach as a whole. The job spec goes down the
child's stdin as a pickle; progress and the result come back as length-prefixed pickles on
a pipe of their own. Cancel is cooperative first (a byte on stdin, honoured at the next
``yield``), then the group is killed after a grace period. The scratch folder belongs to the
supervisor, which removes it however the child ended; folders left by a crashed app are
swept at the next start-up.

This module is Qt-free on purpose: the child imports it and must not load Qt.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from app.core.progress import Cancelled, Progress, drive

CANCEL_GRACE_S = 5.0
_HEADER = struct.Struct("!I")


class CancelToken:
    """Set from the UI thread, read by workers; ``kill`` skips the cooperative grace period."""

    def __init__(self):
        self._cancel = threading.Event()
        self._kill = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def kill(self) -> None:
        self._kill.set()
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def killed(self) -> bool:
        return self._kill.is_set()


class ChildJobError(RuntimeError):
    """A child job failed; ``detail`` holds its traceback (or how the process died)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


# -- supervisor side ------------------------------------------------------------------------
def scratch_root() -> Path:
    from app.paths import scratch_root as root
    return root()


def new_scratch_folder() -> Path:
    folder = scratch_root() / f"job-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    return folder


def sweep_stale_scratch() -> list[Path]:
    """Remove scratch folders whose owning app process is gone (it crashed or was killed)."""
    removed = []
    for folder in scratch_root().glob("job-*"):
        try:
            owner = int(folder.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if owner != os.getpid() and not _pid_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def target_name(fn: Callable) -> str:
    module, qualname = fn.__module__, fn.__qualname__
    if module == "__main__" or "<locals>" in qualname:
        raise ValueError(f"{qualname} cannot run in a child process: it must be importable")
    return f"{module}:{qualname}"


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = "PASSIVE"   # idle OpenMP threads must not spin on the UI's cores
    env["MEDCOMPRESS_CHILD"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_in_child(fn: Callable, args: tuple, kwargs: dict, token: CancelToken,
                 report: Callable[[Progress], None]) -> Any:
    """Run ``fn(*args, **kwargs)`` in a child process group; returns its result."""
    scratch = new_scratch_folder()
    read_fd, write_fd = os.pipe()
    spec = {"target": target_name(fn), "args": args, "kwargs": kwargs,
            "scratch": str(scratch), "fd": write_fd, "sys_path": list(sys.path)}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.process_jobs"], stdin=subprocess.PIPE,
            pass_fds=(write_fd,), start_new_session=True, env=child_environment(),
            cwd=str(Path(__file__).resolve().parent.parent))
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    os.close(write_fd)
    try:
        proc.stdin.write(pickle.dumps(spec))
        proc.stdin.flush()
        return _supervise(proc, read_fd, token, report)
    finally:
        _kill_group(proc)
        os.close(read_fd)
        shutil.rmtree(scratch, ignore_errors=True)


def _supervise(proc: subprocess.Popen, read_fd: int, token: CancelToken,
               report: Callable[[Progress], None]) -> Any:
    reader = _MessageReader(read_fd)
    cancel_sent_at: float | None = None
    while True:
        if token.killed:
            _kill_group(proc)
            raise ChildJobError("The job's process was killed.")
        if token.cancelled and cancel_sent_at is None:
            cancel_sent_at = time.monotonic()
            _send_cancel(proc)
        if cancel_sent_at is not None and time.monotonic() - cancel_sent_at > CANCEL_GRACE_S:
            _kill_group(proc)
            raise Cancelled()
        message = reader.next_message(timeout=0.05)
        if message is None:
            if reader.closed:
                return _ended_without_result(proc)
            continue
        kind = message[0]
        if kind == "progress":
            report(message[1])
        elif kind == "result":
            return message[1]
        elif kind == "cancelled":
            raise Cancelled()
        elif kind == "error":
            raise ChildJobError(message[1], message[2])


def _ended_without_result(proc: subprocess.Popen) -> Any:
    code = proc.wait()
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit status {code}"
    raise ChildJobError(f"The job's process ended unexpectedly ({how}); nothing was saved.")


def _send_cancel(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.write(b"c")
        proc.stdin.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole group (grandchildren included), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if proc.stdin and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass


class _MessageReader:
    def __init__(self, fd: int):
        self._fd, self._buffer, self.closed = fd, bytearray(), False

    def next_message(self, timeout: float):
        message = self._pop()
        if message is not None or self.closed:
            return message
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if ready:
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                self.closed = True
            self._buffer.extend(chunk)
        return self._pop()

    def _pop(self):
        if len(self._buffer) < _HEADER.size:
            return None
        (size,) = _HEADER.unpack_from(self._buffer)
        if len(self._buffer) < _HEADER.size + size:
            return None
        payload = bytes(self._buffer[_HEADER.size:_HEADER.size + size])
        del self._buffer[:_HEADER.size + size]
        return pickle.loads(payload)


# -- child side -----------------------------------------------------------------------------
class _ChildChannel:
    def __init__(self, fd: int):
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()
        self.cancel_requested = threading.Event()

    def send(self, *message) -> None:
        payload = pickle.dumps(message)
        with self._lock:
            self._out.write(_HEADER.pack(len(payload)) + payload)

    def watch_stdin(self) -> None:
        """A cancel byte sets the flag; EOF means the app is gone, so the whole group goes."""
        while True:
            data = sys.stdin.buffer.read(1)
            if not data:
                os.killpg(0, signal.SIGKILL)
            self.cancel_requested.set()


def _resolve(target: str) -> Callable:
    module_name, qualname = target.split(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child_main() -> None:
    spec = pickle.load(sys.stdin.buffer)
    for entry in reversed(spec["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        os.nice(10)   # heavy work yields the CPU to the UI
    except OSError:
        pass
    channel = _ChildChannel(spec["fd"])
    threading.Thread(target=channel.watch_stdin, daemon=True).start()
    try:
        fn = _resolve(spec["target"])
        kwargs = dict(spec["kwargs"])
        if "scratch" in inspect.signature(fn).parameters:
            kwargs["scratch"] = Path(spec["scratch"])
        result = drive(fn(*spec["args"], **kwargs), channel.cancel_requested.is_set,
                       lambda p: channel.send("progress", p))
    except Cancelled:
        channel.send("cancelled")
    except BaseException as exc:  # noqa: BLE001 - reported to the supervisor, not swallowed
        import traceback
        channel.send("error", str(exc).strip() or type(exc).__name__, traceback.format_exc())
    else:
        channel.send("result", result)


if __name__ == "__main__":
    _child_main()
