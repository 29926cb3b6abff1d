"""Where outcomes land in the parent: futures for `submit`, chunks for `map`.

The manager thread settles these while holding the pool's lock; anything that
runs user code (a future's callbacks) is deferred to after the lock is
released, through the `later` list each call receives.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from . import _messages as m
from ._errors import SerializationError, TaskFailed, TaskTimeout, WorkerCrashed, describe_exitcode
from ._serialization import loads

Later = list[Callable[[], Any]]


def run_all(later: Later) -> None:
    """Run what was deferred while the lock was held (future callbacks are user code)."""
    for fn in later:
        fn()


class Future(concurrent.futures.Future):  # type: ignore[type-arg]
    """A `concurrent.futures.Future` that also tells how the task went.

    Beyond the standard API: `task_id`; once done, `attempts` (how many times
    the task ran), `worker_pid` (of the last attempt) and `duration_ms` (of the
    last attempt's handler call).
    """

    def __init__(self, task_id: int = -1) -> None:
        super().__init__()
        self.task_id = task_id
        self.attempts = 0
        self.worker_pid: int | None = None
        self.duration_ms: float | None = None
        self._claimed = False


class FutureSink:
    """The one task of a `submit`."""

    __slots__ = ("future",)

    def __init__(self, future: Future) -> None:
        self.future = future

    def claim(self) -> bool:
        """Called as the task is dispatched; False if it was cancelled meanwhile."""
        fut = self.future
        if fut._claimed:
            return True
        fut._claimed = True
        return fut.set_running_or_notify_cancel()

    def cancel(self) -> bool:
        """Cancel a task that never ran; False if it is past that."""
        return self.future.cancel() if not self.future._claimed else False

    def ok(
        self, index: int, values: list[Any] | None, lo: int, hi: int, meta: tuple[int, int, Any, int], later: Later
    ) -> None:
        fut = self.future
        fut.attempts, fut.worker_pid, durations, offset = meta
        fut.duration_ms = durations[offset] / 1e6 if durations else None
        later.append(partial(fut.set_result, None if values is None else values[lo]))

    def fail(self, index: int, exc: BaseException, attempts: int, pid: int | None, later: Later) -> None:
        fut = self.future
        fut.attempts, fut.worker_pid = attempts, pid
        if not fut._claimed:  # failed before it ever ran (did not pickle)
            fut._claimed = True
            fut.set_running_or_notify_cancel()
        later.append(partial(fut.set_exception, exc))


class Stream:
    """The state of one `map` / `imap_unordered` call, shared by its chunks."""

    __slots__ = ("cancelled", "finished", "ordered", "outstanding")

    def __init__(self, ordered: bool = True) -> None:
        self.ordered = ordered
        self.finished: deque[Chunk] = deque()  # completed chunks, for unordered maps
        self.cancelled = False
        self.outstanding = 0  # tasks fed and not yet handed to the consumer


class Chunk:
    """Consecutive items of a map; values land by index."""

    __slots__ = ("done", "errors", "remaining", "stream", "values")

    def __init__(self, stream: Stream, size: int) -> None:
        self.stream = stream
        self.values: list[Any] = [None] * size
        self.errors: dict[int, BaseException] | None = None
        self.remaining = size
        self.done = False

    def claim(self) -> bool:
        return not self.stream.cancelled

    def cancel(self) -> bool:
        return True

    def _settled(self, n: int) -> None:
        self.remaining -= n
        if self.remaining == 0:
            self.done = True
            if not self.stream.ordered:
                self.stream.finished.append(self)

    def ok(
        self, index: int, values: list[Any] | None, lo: int, hi: int, meta: tuple[int, int, Any, int], later: Later
    ) -> None:
        if values is None:  # the collector wrote them to its sink: nothing comes back
            pass
        elif index == 0 and lo == 0 and hi == len(values) == len(self.values):
            self.values = values  # the whole chunk in one batch: no copy
        else:
            self.values[index : index + hi - lo] = values[lo:hi]
        self._settled(hi - lo)

    def fail(self, index: int, exc: BaseException, attempts: int, pid: int | None, later: Later) -> None:
        if self.errors is None:
            self.errors = {}
        self.errors[index] = exc
        self._settled(1)


Sink = FutureSink | Chunk


def remote_error(info: m.ErrorInfo, task_id: int, attempts: int, pid: int) -> BaseException:
    """Rebuild what a worker reported for one failed attempt as the exception to raise."""
    fault = info.fault
    if fault in (m.Fault.RAISED, m.Fault.REJECTED):
        exc: BaseException | None = None
        if info.blob is not None:
            try:
                exc = loads(info.blob)
            except Exception:
                exc = None
        note = " (the exception itself could not be sent back: it does not pickle or unpickle)" if exc is None else ""
        failed = TaskFailed(
            f"task {task_id} raised {info.type_name}: {info.message} "
            f"(attempt {attempts}, worker pid {pid}){note}\n\nRemote traceback:\n{info.traceback}",
            task_id=task_id,
            attempts=attempts,
            exception=exc,
            remote_traceback=info.traceback,
        )
        if exc is None:
            return failed
        exc.__cause__ = failed
        return exc
    stage, advice = {
        m.Fault.RESULT_PICKLE: ("result", "return a value plain pickle or cloudpickle can handle"),
        m.Fault.ARGS_UNPICKLE: ("argument", "make sure the worker can import what the arguments refer to"),
        m.Fault.HANDLER_UNPICKLE: ("handler", "make sure the worker can import the handler's module"),
    }[m.Fault(fault)]
    return SerializationError(
        f"task {task_id}: {info.message} (in worker pid {pid}); {advice}",
        stage=stage,
        what=info.type_name,
        task_id=task_id,
    )


def crash_error(
    fault: int, task_id: int, attempts: int, pid: int, exitcode: int | None, timeout: float | None, fault_text: str
) -> BaseException:
    """The error for an attempt that ended with its worker: a crash or a timeout."""
    if fault == m.Fault.TIMED_OUT:
        return TaskTimeout(
            f"task {task_id} ran past its timeout of {timeout} s (attempt {attempts}); its worker pid {pid} was killed",
            task_id=task_id,
            attempts=attempts,
            timeout=timeout,
            pid=pid,
        )
    sig = -exitcode if exitcode is not None and exitcode < 0 else None
    text = (
        f"worker pid {pid} died with {describe_exitcode(exitcode)} while running task {task_id} "
        f"(attempt {attempts}). A signal from outside, a crash in C code (segfault), "
        f"os._exit or running out of memory does this; a retry budget (retries=) lets the task run again."
    )
    if fault_text.strip():
        text += f"\n\nfaulthandler in the worker wrote:\n{fault_text.strip()}"
    return WorkerCrashed(
        text, task_id=task_id, attempts=attempts, pid=pid, exitcode=exitcode, signal=sig, fault_traceback=fault_text
    )
