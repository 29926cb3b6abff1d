"""Fakes that drive the pure scheduler (`procqueue/_scheduler/`) with events, no processes.

`FakeReceiver` stands for a future or a map's chunk (the front's `Receiver`),
`FakeFeed` for a map cut straight from its input (`Feed`), and `Front` plays the
pool's front: it applies `Resolve`/`Fail` to the receivers, breaks the pool on
`Break` and counts every outcome by task id, so a task settled twice is seen.
"""

from __future__ import annotations

import random
from array import array
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from procqueue._protocol import messages as m
from procqueue._protocol.relay import Forwarded
from procqueue._scheduler import instructions as ins
from procqueue._scheduler.rate import Bucket
from procqueue._scheduler.scheduler import Scheduler
from procqueue._scheduler.sizing import Sizing
from procqueue._scheduler.tables import Policy
from procqueue._scheduler.tasks import Batch, Handler, Run

PID0 = 1000  # the first worker's pid; seat i starts with PID0 + i


class FakeStream:
    """The reader's side of a map (`feeds.Stream`)."""

    def __init__(self) -> None:
        self.cancelled = False
        self.outstanding = 0


class FakeReceiver:
    """A future (`partial=False`: cancelled whole, before it is claimed) or a map's
    chunk (`partial=True`: cancelled with its stream), recording what it is told."""

    def __init__(self, *, partial: bool = False, stream: FakeStream | None = None) -> None:
        self.partial = partial
        self.timed_each = not partial
        self.stream = stream if stream is not None else FakeStream()
        self.cancelled = False  # a future's cancel() succeeded
        self.claimed = False
        self.claims = 0
        self.oks: list[tuple[int, int, int, tuple[int, int, Any, int]]] = []  # (index, lo, hi, meta)
        self.fails: list[tuple[int, Any, int, int | None]] = []  # (index, error, attempts, pid)

    # --- the Receiver protocol ------------------------------------------------------------

    def claim(self) -> bool:
        self.claims += 1
        if self.partial:
            return not self.stream.cancelled
        if self.claimed:
            return True
        if self.cancelled:
            return False
        self.claimed = True
        return True

    def cancel(self) -> bool:
        if self.partial:
            return True
        if self.claimed:
            return False
        self.cancelled = True
        return True

    def still_read(self) -> bool:
        return not self.stream.cancelled if self.partial else True

    def ok(self, index: int, values: Any, lo: int, hi: int, meta: tuple[int, int, Any, int], later: list[Any]) -> None:
        self.oks.append((index, lo, hi, meta))

    def fail(self, index: int, error: Any, attempts: int, pid: int | None, later: list[Any]) -> None:
        self.fails.append((index, error, attempts, pid))
        if not self.partial:
            self.claimed = True  # a future failed before it ran (dropped, would not pickle) is done: no cancel()

    # --- what a user does -----------------------------------------------------------------

    def user_cancel(self) -> bool:
        """Future.cancel(): only before it was claimed."""
        return self.cancel()


class FakeFeed:
    """A map whose batches the scheduler cuts from `seq` (`feeds.Feed`)."""

    def __init__(
        self,
        handler: Handler,
        seq: Sequence[Any],
        *,
        managed: bool = True,
        priority: int = 0,
        size: int | None = None,
        limit: int = 8,
        retries: int = 0,
        timeout: float | None = None,
        bucket: Bucket | None = None,
    ) -> None:
        self.handler = handler
        self.bucket = bucket
        self.seq: Any = seq if managed else list(seq)
        self.pos = 0
        self.input_done = managed
        self.exhausted = False
        self.error: BaseException | None = None
        self.managed = managed
        self.pulls = not managed
        self.size = size
        self.limit = limit
        self.order = 0
        self.priority = priority
        self.retries = retries
        self.timeout = timeout
        self._stream = FakeStream()
        self.runs: list[Run] = []

    @property
    def stream(self) -> FakeStream:
        return self._stream

    def clip(self, n: int) -> int:
        return n

    def take(self, n: int) -> list[Any]:
        items = list(self.seq[self.pos : self.pos + n])
        self.pos += n
        return items

    def make_run(self, items: list[Any] | Forwarded, first_id: int) -> Run:
        chunk = FakeReceiver(partial=True, stream=self._stream)
        self._stream.outstanding += len(items)
        run = Run(
            self.handler, items, m.Call.ONE, chunk, first_id, self.priority,
            retries=self.retries, timeout=self.timeout, chunksize=self.size, bucket=self.bucket,
        )  # fmt: skip
        self.runs.append(run)
        return run


# The sizing the unit tests were written with (batches of ~5 ms for tasks over 100 us):
# they test how batch sizes follow the measured cost and the prefetch rule, not the constant.
FIVE_MS = Sizing(long_ns=5_000_000)
# For tests of what happens inside one batch: a few measured tasks stay one batch (no batch is
# cut below 20 ms of work, so a short queue is not spread over the batches workers may hold).
WHOLE = Sizing(min_ns=20_000_000)


def make_scheduler(workers: int = 2, *, start: bool = True, seed: int = 0, **policy: Any) -> Scheduler:
    """A validating scheduler; with `start`, every seat has a worker (pid PID0 + seat)."""
    s = Scheduler(Policy(workers=workers, **policy), validate=True, rng=random.Random(seed))
    if start:
        for seat in range(workers):
            s.worker_started(seat, PID0 + seat)
    return s


def make_run(
    s: Scheduler,
    handler: Handler,
    items: list[Any],
    *,
    receiver: FakeReceiver | None = None,
    priority: int = 0,
    retries: int = 0,
    timeout: float | None = None,
    chunksize: int | None = None,
    bucket: Bucket | None = None,
) -> Run:
    """A run with fresh task ids (a submit's when it has one item, else a map chunk's)."""
    if receiver is None:
        receiver = FakeReceiver(partial=len(items) > 1)
    return Run(
        handler, items, m.Call.ONE, receiver, s.new_ids(len(items)), priority,
        retries=retries, timeout=timeout, chunksize=chunksize, bucket=bucket,
    )  # fmt: skip


def durations(ns: Iterable[int]) -> bytes:
    return array("q", list(ns)).tobytes()


def error(index: int, fault: m.Fault = m.Fault.RAISED) -> m.ErrorInfo:
    return m.ErrorInfo(index, fault, None, "ValueError", "boom", "Traceback: boom")


def result(
    batch: Batch,
    start: int,
    count: int,
    pid: int,
    *,
    errors: Iterable[m.ErrorInfo] = (),
    ns: int = 1_000_000,
    total: bool = False,
) -> m.BatchResult:
    """What the collector forwards for items `start .. start+count-1` of `batch`,
    each taking `ns` (or one total, as an unmarked batch reports)."""
    d = durations([ns * count]) if total else durations([ns] * count)
    return m.BatchResult(batch.batch_id, start, count, pid, batch.head.attempt, tuple(errors), d)


def ids_of(batch: Batch) -> list[int]:
    """The task ids a batch holds, in order."""
    return [r.first_id + j for r, s, n in batch.segments for j in range(s, s + n)]


def brief(todo: Iterable[ins.Instruction]) -> list[tuple[Any, ...]]:
    """Instructions as plain tuples, to compare exactly (batches and runs by task id)."""
    out: list[tuple[Any, ...]] = []
    for i in todo:
        match i:
            case ins.Send(batch=batch):
                out.append(("send", batch.seat, ids_of(batch)))
            case ins.Resolve(run=run, j=j, lo=lo, hi=hi):
                out.append(("resolve", list(range(run.first_id + j, run.first_id + j + hi - lo))))
            case ins.Fail(run=run, j=j, attempts=attempts, final=final):
                out.append(("fail", run.first_id + j, attempts) if final else ("cancel", run.first_id + j))
            case ins.Retire(seat=seat):
                out.append(("retire", seat))
            case ins.Kill(seat=seat, reason=reason):
                out.append(("kill", seat, reason))
            case ins.Start(seat=seat):
                out.append(("start", seat))
            case ins.Break(error=err):
                out.append(("break", type(err).__name__))
            case ins.Notify():
                out.append(("notify",))
            case _:
                raise TypeError(i)
    return out


def sends(todo: Iterable[ins.Instruction]) -> list[Batch]:
    return [i.batch for i in todo if isinstance(i, ins.Send)]


def fails(todo: Iterable[ins.Instruction]) -> list[ins.Fail]:
    return [i for i in todo if isinstance(i, ins.Fail)]


def error_of(fail: ins.Fail) -> BaseException:
    """The exception a Fail carries (built, as the front builds it, when it is a maker)."""
    err = fail.error
    return err if isinstance(err, BaseException) else err()


class Front:
    """The pool's front: settles receivers, breaks the pool on `Break`, and counts
    every outcome each task id gets (`outcomes[task_id]`: "done", "failed", "cancelled")."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.outcomes: defaultdict[int, list[str]] = defaultdict(list)

    def apply(self, todo: Iterable[ins.Instruction]) -> list[ins.Instruction]:
        """What is the backend's to do (Send, Retire, Kill, Start, Break) is returned."""
        rest: list[ins.Instruction] = []
        for i in todo:
            match i:
                case ins.Resolve(run=run, j=j, lo=lo, hi=hi, values=values, meta=meta):
                    for k in range(hi - lo):
                        self.outcomes[run.first_id + j + k].append("done")
                    run.receiver.ok(run.base + j, values, lo, hi, meta, [])
                case ins.Fail(run=run, j=j, error=err, attempts=attempts, pid=pid, final=final):
                    self.outcomes[run.first_id + j].append("failed" if final else "cancelled")
                    run.receiver.fail(run.base + j, err, attempts, pid, [])
                case ins.Break(error=err):
                    rest += self.apply(self.s.break_pool(err))
                    rest.append(i)
                case ins.Notify():
                    pass
                case _:
                    rest.append(i)
        return rest
