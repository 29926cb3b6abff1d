"""The one exception hierarchy of procqueue.

::

    ProcQueueError
    ├── QueueFull           (backpressure "error", or "block" past its timeout)
    ├── Dropped             (backpressure "drop": the task was not queued)
    ├── PoolClosed          (also RuntimeError: submit after shutdown)
    ├── TaskFailed          (the handler raised; set as __cause__ of the re-raised error)
    ├── WorkerCrashed       (the worker died running the task: exit code or signal)
    ├── TaskTimeout         (the task ran past its timeout; not a TimeoutError, see below)
    ├── SerializationError  (also pickle.PicklingError: something did not pickle)
    ├── PoolBroken          (also concurrent.futures.BrokenExecutor)
    │   └── InitializerFailed
    └── PoolStartError      (Pool() could not start its processes: what to fix is in the message)

Every error carries its fields as attributes and pickles with them.
"""

from __future__ import annotations

import pickle
import signal as _signal
from concurrent.futures import BrokenExecutor
from typing import Any


class ProcQueueError(Exception):
    """Base class of every error procqueue raises."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self._fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[ProcQueueError], message: str, fields: dict[str, Any]) -> ProcQueueError:
    err = cls.__new__(cls)
    ProcQueueError.__init__(err, message, **fields)
    return err


class QueueFull(ProcQueueError):
    """The pending heap is at `capacity` and backpressure said not to wait (longer)."""


class Dropped(ProcQueueError):
    """The task was not queued: the heap was full and backpressure is "drop"."""


class PoolClosed(ProcQueueError, RuntimeError):
    """The pool was shut down; it accepts no more tasks."""


class TaskFailed(ProcQueueError):
    """The handler raised. Fields: `task_id`, `attempts`, `exception`, `remote_traceback`.

    `future.result()` re-raises the handler's own exception, with this as its
    `__cause__`, so the remote traceback shows in the printed traceback. When the
    exception itself could not cross the process boundary, this is raised
    instead and `exception` is None.
    """

    task_id: int
    attempts: int
    exception: BaseException | None
    remote_traceback: str
    type_name: str | None = None  # the handler's exception type, `module.Qualname`
    remote_message: str | None = None  # its str(), as the worker read it


class StageFailed(ProcQueueError):
    """Where in a `Pipeline` an item failed: in the `__cause__` chain of its error.
    Fields: `stage` (its index, from 0), `function` (the stage's name), `item`
    (the item's index in the input)."""

    stage: int
    function: str
    item: int


class WorkerCrashed(ProcQueueError):
    """The worker process died while running the task.

    Fields: `task_id`, `attempts`, `pid`, `exitcode`, `signal` (a signal number
    or None), `fault_traceback` (what faulthandler wrote, if anything).
    """

    task_id: int
    attempts: int
    pid: int
    exitcode: int | None
    signal: int | None
    fault_traceback: str


class TaskTimeout(ProcQueueError):
    """The task ran past its timeout; its worker was killed. Fields: `task_id`,
    `attempts`, `timeout`, `pid`.

    Deliberately not a `TimeoutError`: `future.result(timeout=...)` raises
    that when the *wait* times out, and polling loops catch it to wait again.
    """

    task_id: int
    attempts: int
    timeout: float
    pid: int


class SerializationError(ProcQueueError, pickle.PicklingError):
    """Something did not pickle or unpickle. Fields: `stage` ("argument",
    "handler", "initializer", "result" or "exception"), `what` (which argument, for example)
    and `task_id`."""

    stage: str
    what: str
    task_id: int | None


class PoolBroken(ProcQueueError, BrokenExecutor):
    """The pool cannot run tasks any more (its collector died, for example)."""


class InitializerFailed(PoolBroken):
    """The worker initializer raised; its traceback is in `remote_traceback`."""

    remote_traceback: str


class PoolStartError(ProcQueueError):
    """`Pool()` could not start its processes (out of file descriptors, no shared
    memory, a start method that fails); nothing it made is left open. The
    message says what to fix; `__cause__` is the original error."""


def describe_exitcode(exitcode: int | None) -> str:
    """Decode a process exit code as `SIGSEGV(-11)` or `exit code 3`."""
    if exitcode is None:
        return "an unknown exit status"
    if exitcode < 0:
        try:
            name = _signal.Signals(-exitcode).name
        except ValueError:
            name = "signal"
        return f"{name}({exitcode})"
    return f"exit code {exitcode}"
