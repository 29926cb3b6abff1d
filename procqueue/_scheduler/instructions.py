"""What the scheduler tells a backend to do, and why a worker was killed.

A backend calls the `Scheduler` with an event and carries out, in order, the
instructions it returns: it never decides on its own what runs where, what is
retried or whom a crash is charged to.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

from procqueue._scheduler.tasks import Batch, Run


class KillReason(enum.Enum):
    """Why a worker was killed; all but TIMEOUT are not its task's fault."""

    TIMEOUT = "timeout"  # its task ran past its timeout: charged as a TaskTimeout
    STALLED = "stalled"  # it held work and started none of it: the work runs elsewhere
    COLLECTOR = "collector"  # its collector died with its socket (local backend)
    SHUTDOWN = "shutdown"  # the pool ended


class Send(NamedTuple):
    """Pickle `batch` and send it to the worker in seat `batch.seat`."""

    batch: Batch


class Retire(NamedTuple):
    """The worker in `seat` finishes what it holds, then exits (its task limit)."""

    seat: int


class Kill(NamedTuple):
    """Kill the worker in `seat` now."""

    seat: int
    reason: KillReason


class Start(NamedTuple):
    """Start a worker in `seat` (a dead one's replacement)."""

    seat: int


class Resolve(NamedTuple):
    """Items `j .. j + hi - lo - 1` of `run` succeeded; their values are
    `values[lo:hi]`, still pickled. `meta` is (attempt, pid, durations, offset)."""

    run: Run
    j: int
    lo: int
    hi: int
    values: Any
    meta: tuple[int, int, Any, int]


class Fail(NamedTuple):
    """Item `j` of `run` ended without a value: `error` is the exception or a
    maker of it (built in the thread that asks). `final` is False only for a
    cancellation that a map's reader sees as CancelledError."""

    run: Run
    j: int
    error: Any
    attempts: int
    pid: int | None
    final: bool = True


class Break(NamedTuple):
    """The pool cannot go on: everything outstanding fails with `error`."""

    error: BaseException


class Notify:
    """Room freed in the queue, or a map's reader may pull more input: wake who waits."""

    __slots__ = ()


NOTIFY = Notify()

Instruction = Send | Retire | Kill | Start | Resolve | Fail | Break | Notify
