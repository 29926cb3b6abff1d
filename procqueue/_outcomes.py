"""The parent's side of outcomes: a batch's results, a dead worker's leftovers,
a broken pool's remainder, each settled into futures and map chunks.

A mixin of `Engine` (wiring and diagram: `_engine.py`); every method here runs
on the manager thread with the pool's lock held, and leaves user callbacks in
`later` to run after it is released.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import CancelledError
from functools import partial
from typing import TYPE_CHECKING, Any

from . import _collector
from . import _messages as m
from ._dispatcher import Batch, Dispatcher, Run
from ._errors import SerializationError
from ._messages import TaskState as S
from ._results import Chunk, Later, crash_error, remote_error
from ._serialization import loads_body

if TYPE_CHECKING:
    from ._engine import _Counts, _Lost
    from ._supervisor import Supervisor


class Outcomes:
    """Settling outcomes (mixed into `Engine`, which owns these attributes)."""

    cv: threading.Condition
    batches: dict[int, Batch]
    lost: dict[int, _Lost]
    counts: _Counts
    dispatcher: Dispatcher
    supervisor: Supervisor
    ledger: m.Ledger | None
    _barren_deaths: int
    # Called (item, error, attempts) for each task that failed for good, on the manager
    # thread with the lock held: `procqueue run` turns it into an error record.
    on_final_failure: Callable[[Any, BaseException, int], None] | None = None

    # validate mode: follow each task through the state machine
    def _moves(self, run: Run, start: int, count: int, to: S) -> None:
        if self.ledger is not None:
            for j in range(start, start + count):
                self.ledger.move(run.first_id + j, to)

    def _on_cancel(self, run: Run, start: int, count: int, later: Later | None = None) -> None:
        self.counts.cancelled += count
        self._moves(run, start, count, S.CANCELLED)
        if type(run.sink) is Chunk and not run.sink.stream.cancelled:
            # Cancelled by shutdown(cancel_futures=True) while someone may still read the
            # map: its place raises CancelledError, as a cancelled future's would.
            for j in range(start, start + count):
                run.sink.fail(run.base + j, CancelledError(), run.attempt, None, [])

    def _reject(self, run: Run, j: int, exc: BaseException, later: Later) -> None:
        """A task that failed before reaching a worker (it would not pickle)."""
        self.counts.rejected += 1
        self._moves(run, j, 1, S.FAILED)
        if self.on_final_failure is not None:
            self.on_final_failure(run.items[j], exc, 0)
        run.sink.fail(run.base + j, exc, 0, None, later)

    def _on_batch_result(self, msg: m.BatchResult, body: memoryview, later: Later) -> None:
        values: list[Any] | None = None  # an empty body: the collector's sink took the values
        unpickle_error: BaseException | None = None
        try:
            if len(body):
                values = loads_body(body)
        except Exception as exc:
            values, unpickle_error = [None] * msg.count, exc
        durations = array("q", msg.durations)
        with self.cv:
            batch = self.batches.get(msg.batch_id)
            if batch is None:
                return
            head = batch.head
            total = sum(durations)
            head.handler.measured(total, max(msg.count, 1))
            if len(durations) != msg.count and any(type(r.sink) is not Chunk for r, _, _ in batch.segments):
                durations = array("q", [total // max(msg.count, 1)]) * msg.count  # futures report their own
            slot = self.supervisor.slots[batch.slot]
            if slot.pid == msg.pid:
                slot.productive = True
            self._barren_deaths = 0
            failed = {e.index: (e, d) for e, d in zip(msg.errors, msg.decisions, strict=True)}
            lo, hi = msg.start, msg.start + msg.count
            for run, j, a, b in batch.locate(lo, hi):
                if not failed and unpickle_error is None:
                    self._moves(run, j, b - a, S.DONE)
                    run.sink.ok(run.base + j, values, a - lo, b - lo, (run.attempt, msg.pid, durations, a - lo), later)
                    continue
                for k in range(a, b):
                    jj = j + k - a
                    if k in failed:
                        info, decision = failed[k]
                        self._settle_failure(
                            run,
                            jj,
                            info.fault,
                            decision,
                            later,
                            partial(remote_error, info, run.first_id + jj, run.attempt, msg.pid),
                            msg.pid,
                        )
                    elif unpickle_error is not None:
                        self.counts.unloadable += 1
                        self._settle_failure(
                            run,
                            jj,
                            m.Fault.RESULT_PICKLE,
                            -1.0,
                            later,
                            partial(_parent_unpickle_error, unpickle_error, run.first_id + jj),
                            msg.pid,
                        )
                    else:
                        self._moves(run, jj, 1, S.DONE)
                        run.sink.ok(
                            run.base + jj, values, k - lo, k - lo + 1, (run.attempt, msg.pid, durations, k - lo), later
                        )
            self.counts.in_flight -= msg.count
            batch.done = hi
            if batch.done >= batch.count:
                self._finish_batch(batch)
            self.cv.notify_all()

    def _settle_failure(
        self, run: Run, j: int, fault: int, decision: float | None, later: Later,
        make_error: Callable[[], BaseException], pid: int | None,
    ) -> None:  # fmt: skip
        """One failed attempt of item `j` of `run`, as the collector judged it."""
        if fault in (m.Fault.CRASHED, m.Fault.TIMED_OUT):
            self._moves(run, j, 1, S.CRASHED if fault == m.Fault.CRASHED else S.TIMED_OUT)
        if decision is not None and decision == _collector.REQUEUE:
            # Alone first (so it cannot fail its neighbours), then by value.
            self._moves(run, j, 1, S.PENDING)
            alone = run.solo or len(run.items) == 1
            self.dispatcher.push(run.single(j, run.attempt, solo=True, by_value=alone), fresh=False)
        elif decision is not None and decision >= 0:
            self._moves(run, j, 1, S.RETRYING)
            self.dispatcher.push_delayed(run.single(j, run.attempt + 1), time.monotonic() + decision)
        else:
            self._moves(run, j, 1, S.FAILED)
            exc = make_error()
            if self.on_final_failure is not None:
                self.on_final_failure(run.items[j], exc, run.attempt)
            run.sink.fail(run.base + j, exc, run.attempt, pid, later)

    def _finish_batch(self, batch: Batch) -> None:
        self.batches.pop(batch.batch_id, None)
        slot = self.supervisor.slots[batch.slot]
        slot.batches.pop(batch.batch_id, None)

    def _on_worker_gone(self, msg: m.WorkerGone, later: Later) -> None:
        lost = self.lost.pop(msg.pid, None)
        if lost is None:
            return
        for batch in lost.batches:
            if batch.batch_id not in self.batches:
                continue
            for k in range(batch.done, batch.count):
                run, j = batch.item(k)
                if lost.running == (batch.batch_id, k) and msg.decision is not None:
                    error = partial(
                        crash_error,
                        msg.fault,
                        run.first_id + j,
                        run.attempt,
                        msg.pid,
                        msg.exitcode,
                        run.timeout,
                        lost.fault_text,
                    )
                    self._settle_failure(run, j, msg.fault, msg.decision, later, error, msg.pid)
                else:  # it never ran (or its outcome was lost with the worker): again, uncharged
                    self._moves(run, j, 1, S.PENDING)
                    self.dispatcher.push(run.single(j, run.attempt, careful=lost.unmarked), fresh=False)
            self.counts.in_flight -= batch.count - batch.done
            self.batches.pop(batch.batch_id, None)

    def _fail_outstanding(self, exc: BaseException, later: Later) -> None:
        d = self.dispatcher
        runs = [e[-1] for e in d.heap] + [e[-1] for e in d.delayed]
        for run in runs:
            if not run.sink.claim():
                self._on_cancel(run, run.pos, len(run.items) - run.pos)
                continue
            for j in range(run.pos, len(run.items)):
                self.counts.rejected += 1
                if self.ledger is not None:
                    self.ledger.move(run.first_id + j, S.FAILED)
                run.sink.fail(run.base + j, exc, run.attempt, None, later)
        d.heap.clear()
        d.delayed.clear()
        d.pending = d.waiting = 0
        for batch in list(self.batches.values()):
            for k in range(batch.done, batch.count):
                run, j = batch.item(k)
                self.counts.rejected += 1
                if self.ledger is not None:
                    self.ledger.move(run.first_id + j, S.FAILED)
                run.sink.fail(run.base + j, exc, run.attempt, None, later)
            self.counts.in_flight -= batch.count - batch.done
        self.batches.clear()
        for slot in self.supervisor.slots:
            slot.batches = {}
        self.lost.clear()


def _parent_unpickle_error(exc: BaseException, task_id: int) -> BaseException:
    return SerializationError(
        f"task {task_id}: its result could not be unpickled in the parent: {type(exc).__name__}: {exc}; "
        "make sure the parent can import what the result refers to",
        stage="result",
        what=type(exc).__name__,
        task_id=task_id,
    )
