"""The compute process: one persistent child that holds loaded models and runs inference.

The GUI process never imports torch or ONNX Runtime; this child does. It is spawned once, on
the first request, and reused, so a model is loaded once per session. Large arrays (the
volume's voxels, label maps, probabilities) cross in shared memory, not through the pipe:
any numpy array over ``SHARE_MIN_BYTES`` inside a request or result dataclass travels as a
:class:`SharedArray` reference. Requests are served one at a time; a heavy-lane job of the
job manager drives each one (``ComputeClient.run``), so its supervision happens on a pool
thread. If the child dies, the running job fails with a message and the next request starts
a fresh child.

This module is Qt-free: the child imports it.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import multiprocessing as mp
import os
import threading
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy as np

from app.core.progress import Cancelled, Progress

log = logging.getLogger(__name__)
SHARE_MIN_BYTES = 1 << 20


class ComputeError(RuntimeError):
    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


# -- arrays through shared memory ------------------------------------------------------------
@dataclass(frozen=True)
class SharedArray:
    name: str
    shape: tuple[int, ...]
    dtype: str


def to_shared(array: np.ndarray, owned: list) -> SharedArray:
    block = shared_memory.SharedMemory(create=True, size=max(1, array.nbytes))
    np.ndarray(array.shape, array.dtype, buffer=block.buf)[...] = array
    owned.append(block)
    return SharedArray(block.name, tuple(array.shape), array.dtype.str)


def from_shared(ref: SharedArray, copy: bool) -> tuple[np.ndarray, shared_memory.SharedMemory]:
    # The spawned child shares the app's resource tracker, whose register is a set: attaching
    # adds nothing, and the one unlink (by whoever receives the block) removes the entry.
    block = shared_memory.SharedMemory(name=ref.name)
    view = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=block.buf)
    return (view.copy() if copy else view), block


def export_arrays(value: Any, owned: list) -> Any:
    """Swap large arrays (also inside dataclasses, lists, tuples, dicts) for shared refs."""
    if isinstance(value, np.ndarray):
        return to_shared(value, owned) if value.nbytes >= SHARE_MIN_BYTES else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: export_arrays(getattr(value, f.name), owned)
                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, (list, tuple)):
        return type(value)(export_arrays(v, owned) for v in value)
    if isinstance(value, dict):
        return {k: export_arrays(v, owned) for k, v in value.items()}
    return value


def import_arrays(value: Any, attached: list, copy: bool) -> Any:
    if isinstance(value, SharedArray):
        array, block = from_shared(value, copy)
        attached.append(block)
        return array
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: import_arrays(getattr(value, f.name), attached, copy)
                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, (list, tuple)):
        return type(value)(import_arrays(v, attached, copy) for v in value)
    if isinstance(value, dict):
        return {k: import_arrays(v, attached, copy) for k, v in value.items()}
    return value


def _release(blocks: list, unlink: bool) -> None:
    for block in blocks:
        try:
            block.close()
        except BufferError:   # a view is still alive somewhere; the OS frees it at exit
            pass
        if unlink:
            try:
                block.unlink()
            except FileNotFoundError:
                pass
    blocks.clear()


# -- the child -------------------------------------------------------------------------------
class ModelCache:
    """Loaded runners by (model path, device, threads, backend): a model is loaded once."""

    def __init__(self):
        self._runners: dict[tuple, Any] = {}

    def runner(self, model: str, device: str = "cpu", threads: int | None = None,
               backend: str | None = None, trust: bool = False):
        key = (model, device, threads, backend)
        if key not in self._runners:
            from app.core.inference import make_runner
            from app.core.models import open_model
            self._runners[key] = make_runner(open_model(model, trust=trust), device=device,
                                             threads=threads, backend=backend)
        return self._runners[key]


def run_model(cache: ModelCache, volume, model: str, device: str = "cpu", threads: int | None = None,
              backend: str | None = None, lesions=None):
    """Task: findings of one model on one volume (a generator, like every long operation)."""
    runner = cache.runner(model, device, threads, backend)
    findings = yield from runner.run(volume, lesions=lesions)
    return findings


def providers_task(cache: ModelCache):
    import onnxruntime as ort
    return list(ort.get_available_providers())


def _resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _child_main(conn) -> None:
    try:
        os.nice(5)
    except OSError:
        pass
    cache = ModelCache()
    cancel = threading.Event()
    requests: list = []
    ready = threading.Condition()

    def listen():
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                os._exit(0)   # the app is gone
            with ready:
                if message[0] == "cancel":
                    cancel.set()
                else:
                    requests.append(message)
                    ready.notify()

    threading.Thread(target=listen, daemon=True).start()
    while True:
        with ready:
            while not requests:
                ready.wait()
            request = requests.pop(0)
        cancel.clear()
        _serve(conn, cache, request, cancel)


def _serve(conn, cache: ModelCache, request, cancel: threading.Event) -> None:
    _, request_id, target, args, kwargs = request
    attached, owned = [], []
    try:
        args = import_arrays(args, attached, copy=False)
        kwargs = import_arrays(kwargs, attached, copy=False)
        result = _drive(_resolve(target)(cache, *args, **kwargs), cancel,
                        lambda p: conn.send(("progress", request_id, p)))
        # The requester unlinks result blocks once it has copied them.
        conn.send(("result", request_id, export_arrays(result, owned)))
    except Cancelled:
        conn.send(("cancelled", request_id))
    except BaseException as exc:  # noqa: BLE001 - reported to the requester
        conn.send(("error", request_id, str(exc).strip() or type(exc).__name__, traceback.format_exc()))
    finally:
        _release(attached, unlink=False)
        _release(owned, unlink=False)


def _drive(gen_or_value, cancel: threading.Event, report) -> Any:
    from app.core.progress import drive
    return drive(gen_or_value, cancel.is_set, report)


# -- the GUI side ----------------------------------------------------------------------------
class ComputeClient:
    """Owns the compute process; ``run`` is a job body for the job manager's heavy lane."""

    def __init__(self):
        self._process: mp.process.BaseProcess | None = None
        self._conn = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()   # one request at a time on the pipe

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self._discard()
        context = mp.get_context("spawn")
        parent_end, child_end = context.Pipe()
        env_before = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"   # inherited by the spawned child
        try:
            process = context.Process(target=_child_main, args=(child_end,), daemon=True,
                                      name="medcompress-compute")
            process.start()
        finally:
            if env_before is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = env_before
        child_end.close()
        self._process, self._conn = process, parent_end

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        self._process, self._conn = None, None

    def run(self, target: Callable | str, *args, **kwargs):
        """Generator: send a task, relay its progress, return its result (arrays copied out)."""
        name = target if isinstance(target, str) else f"{target.__module__}:{target.__name__}"
        with self._lock:
            self._ensure_started()
            request_id = next(self._ids)
            owned: list = []
            try:
                self._conn.send(("run", request_id, name, export_arrays(args, owned),
                                 export_arrays(kwargs, owned)))
                result = yield from self._await(request_id)
            finally:
                _release(owned, unlink=True)
            return result

    def _await(self, request_id: int):
        finished = False
        try:
            while True:
                message = self._receive()
                if message is None:
                    yield Progress(None, "")
                    continue
                kind = message[0]
                if kind == "progress":
                    yield message[2]
                    continue
                finished = True
                if kind == "result":
                    attached: list = []
                    result = import_arrays(message[2], attached, copy=True)
                    _release(attached, unlink=True)
                    return result
                if kind == "cancelled":
                    raise Cancelled()
                raise ComputeError(message[2], message[3])
        finally:
            if not finished:
                self._cancel_and_drain(request_id)

    def _receive(self):
        try:
            if self._conn.poll(0.05):
                return self._conn.recv()
        except (EOFError, OSError):
            pass
        if not self._process.is_alive():
            code = self._process.exitcode
            self._discard()
            raise ComputeError(f"The compute process stopped unexpectedly (exit code {code}); "
                               "the next run starts a fresh one.")
        return None

    def _cancel_and_drain(self, request_id: int) -> None:
        """The job was cancelled (or failed here): stop the child's work and wait for its answer."""
        if self._conn is None:
            return
        try:
            self._conn.send(("cancel", request_id))
            while self._process.is_alive():
                if self._conn.poll(0.1):
                    message = self._conn.recv()
                    if message[0] != "progress":
                        if message[0] == "result":
                            _release_result_blocks(message[2])
                        return
        except (EOFError, OSError, BrokenPipeError):
            self._discard()

    def kill(self) -> None:
        """Kill the child (tests, or a hung model); the next request starts a fresh one."""
        if self._process is not None:
            self._process.kill()

    def close(self) -> None:
        self._discard()


def _release_result_blocks(result: Any) -> None:
    attached: list = []
    import_arrays(result, attached, copy=False)
    _release(attached, unlink=True)
