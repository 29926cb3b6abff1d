"""The parent's side of outcomes: a batch's results, a dead worker's leftovers,
a broken pool's remainder, each judged (retry or final, `_retry.py`), counted
and settled into futures and map chunks.

A mixin of `Engine` (wiring and diagram: `_engine.py`); every method here runs
on the manager thread with the pool's lock held. Nothing here runs user code:
values and exceptions stay pickled for the thread that asks for them
(`_results.py`), and what must happen after the lock is released goes to `later`.
"""

from __future__ import annotations

import random
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import CancelledError
from functools import partial
from typing import TYPE_CHECKING, Any

from procqueue._protocol import layout
from procqueue._protocol import messages as m
from procqueue._results import Chunk, FutureSink, Later, MakeError, Values, crash_error, remote_error
from procqueue._scheduler import states
from procqueue._scheduler.queue import Batch, Dispatcher, Run
from procqueue._scheduler.retry import Final, Requeue, Retry, decide
from procqueue._scheduler.states import TaskState as S

if TYPE_CHECKING:
    from procqueue._local.engine import _Counts, _Lost
    from procqueue._local.supervisor import Supervisor
    from procqueue._settings import Config


class Outcomes:
    """Settling outcomes (mixed into `Engine`, which owns these attributes)."""

    cfg: Config
    cv: threading.Condition
    batches: dict[int, Batch]
    lost: dict[int, _Lost]
    counts: _Counts
    dispatcher: Dispatcher
    supervisor: Supervisor
    ledger: states.Ledger | None
    rng: random.Random
    _barren_deaths: int
    # Called (item, error, attempts) for each task that failed for good, on the manager
    # thread with the lock held: `procqueue run` turns it into an error record. The
    # error is never unpickled for it: a handler's exception comes as a `TaskFailed`
    # whose `type_name` names it.
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
        self.counts.failed += 1
        self._moves(run, j, 1, S.FAILED)
        if self.on_final_failure is not None:
            self.on_final_failure(run.items[j], exc, 0)
        run.sink.fail(run.base + j, exc, 0, None, later)

    def _on_batch_result(self, msg: m.BatchResult, body: memoryview, later: Later) -> None:
        values = Values(body, self._unloadable) if len(body) else None  # empty: the collector's sink took them
        durations = array("q", msg.durations)
        counts = self.counts
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
                slot.idle_since = None
            slot.tasks_done += msg.count
            if slot.pid == msg.pid and any(e.fault == m.Fault.HANDLER_UNPICKLE for e in msg.errors):
                slot.known.pop(head.handler.id, None)  # it does not hold it: send the bytes again next time
            self._barren_deaths = 0
            counts.attempts += msg.count
            counts.completed += msg.count - len(msg.errors)
            failed = {e.index: e for e in msg.errors}
            lo, hi = msg.start, msg.start + msg.count
            for run, j, a, b in batch.locate(lo, hi):
                if not failed:
                    self._moves(run, j, b - a, S.DONE)
                    run.sink.ok(run.base + j, values, a - lo, b - lo, (run.attempt, msg.pid, durations, a - lo), later)
                    continue
                for k in range(a, b):
                    jj = j + k - a
                    info = failed.get(k)
                    if info is not None:
                        make = partial(remote_error, info, run.first_id + jj, run.attempt, msg.pid)
                        self._settle_failure(run, jj, info.fault, batch.count, later, make, msg.pid, info)
                    else:
                        self._moves(run, jj, 1, S.DONE)
                        run.sink.ok(
                            run.base + jj, values, k - lo, k - lo + 1, (run.attempt, msg.pid, durations, k - lo), later
                        )
            counts.in_flight -= msg.count
            batch.done = hi
            if batch.done >= batch.count:
                self._finish_batch(batch)
            self.cv.notify_all()

    def _settle_failure(
        self, run: Run, j: int, fault: m.Fault, count: int, later: Later, make_error: MakeError, pid: int | None,
        info: m.ErrorInfo | None = None,
    ) -> None:  # fmt: skip
        """One failed attempt of item `j` of `run` (in a batch of `count`): judge it, count it, settle it."""
        counts = self.counts
        cfg = self.cfg
        if fault in (m.Fault.CRASHED, m.Fault.TIMED_OUT):
            self._moves(run, j, 1, S.CRASHED if fault == m.Fault.CRASHED else S.TIMED_OUT)
        decision = decide(fault, run.attempt, run.retries, count, run.by_value, cfg.backoff, cfg.backoff_max, self.rng)
        match decision:
            case Requeue():
                self._moves(run, j, 1, S.PENDING)
                alone = run.solo or len(run.items) == 1
                self.dispatcher.push(run.single(j, run.attempt, solo=True, by_value=alone), fresh=False)
            case Retry(delay=delay):
                counts.retried += 1
                self._moves(run, j, 1, S.RETRYING)
                self.dispatcher.push_delayed(run.single(j, run.attempt + 1), time.monotonic() + delay)
            case Final():
                counts.failed += 1
                self._moves(run, j, 1, S.FAILED)
                if self.on_final_failure is not None:
                    # Its exception is not unpickled here (user code): a TaskFailed names its type.
                    flat = (
                        make_error()
                        if info is None
                        else remote_error(info, run.first_id + j, run.attempt, pid or -1, False)
                    )
                    self.on_final_failure(run.items[j], flat, run.attempt)
                run.sink.fail(run.base + j, make_error, run.attempt, pid, later)
            case _:
                raise TypeError(f"unknown retry decision {decision!r}")

    def _unloadable(self, n: int) -> None:
        """n values did not unpickle where they were read (a user's thread): they failed."""
        with self.cv:
            self.counts.completed -= n
            self.counts.failed += n

    def _finish_batch(self, batch: Batch) -> None:
        self.batches.pop(batch.batch_id, None)
        slot = self.supervisor.slots[batch.slot]
        slot.batches.pop(batch.batch_id, None)

    def _on_worker_gone(self, msg: m.WorkerGone, later: Later) -> None:
        lost = self.lost.pop(msg.pid, None)
        if lost is None:
            return
        counts = self.counts
        fault = m.Fault.TIMED_OUT if msg.timed_out else m.Fault.CRASHED
        charged = lost.running is not None and not msg.reported and lost.charge
        for batch in lost.batches:
            if batch.batch_id not in self.batches:
                continue
            again: list[tuple[Run, int]] = []
            loading = (
                lost.running is not None and lost.running[0] == batch.batch_id and lost.running[1] == layout.LOADING
            )
            for k in range(batch.done, batch.count):
                run, j = batch.item(k)
                culprit = charged and lost.running == (batch.batch_id, k)
                if loading and charged and batch.count - batch.done == 1:
                    culprit = True  # it died unpickling a batch of one: that task is the poison
                if culprit:
                    if fault == m.Fault.CRASHED:
                        counts.crashed += 1
                    else:
                        counts.timed_out += 1
                    counts.attempts += 1
                    error = partial(
                        crash_error, fault, run.first_id + j, run.attempt, msg.pid, msg.exitcode, run.timeout,
                        lost.fault_text,
                    )  # fmt: skip
                    self._settle_failure(run, j, fault, 1, later, error, msg.pid)
                else:  # it never ran (or its outcome was lost with the worker): again, uncharged
                    self._moves(run, j, 1, S.PENDING)
                    if loading and charged:  # died unpickling a batch of several: each alone, to find the one
                        self.dispatcher.push(run.single(j, run.attempt, solo=True, careful=True), fresh=False)
                    else:
                        again.append((run, j))
            self._requeue(again, careful=lost.unmarked)
            counts.in_flight -= batch.count - batch.done
            self.batches.pop(batch.batch_id, None)

    def _requeue(self, items: list[tuple[Run, int]], careful: bool) -> None:
        """Put items back in the heap as runs of consecutive items (not one by one: a
        dead worker may have held a batch of tens of thousands of tiny tasks)."""
        k = 0
        while k < len(items):
            run, j = items[k]
            n = 1
            while k + n < len(items) and items[k + n] == (run, j + n):
                n += 1
            self.dispatcher.push(run.part(j, n, careful=careful), fresh=False)
            k += n

    def _fail_outstanding(self, exc: BaseException, later: Later) -> None:
        d = self.dispatcher
        runs = [e[-1] for e in d.heap] + [e[-1] for e in d.delayed]
        for run in runs:
            if not run.sink.claim():
                self._on_cancel(run, run.pos, len(run.items) - run.pos)
                continue
            for j in range(run.pos, len(run.items)):
                self.counts.failed += 1
                if self.ledger is not None:
                    self.ledger.move(run.first_id + j, S.FAILED)
                run.sink.fail(run.base + j, exc, run.attempt, None, later)
        d.heap.clear()
        d.delayed.clear()
        d.pending = d.waiting = 0
        for batch in list(self.batches.values()):
            for k in range(batch.done, batch.count):
                run, j = batch.item(k)
                self.counts.failed += 1
                if self.ledger is not None:
                    self.ledger.move(run.first_id + j, S.FAILED)
                run.sink.fail(run.base + j, exc, run.attempt, None, later)
            self.counts.in_flight -= batch.count - batch.done
        self.batches.clear()
        for slot in self.supervisor.slots:
            slot.batches = {}
        self.lost.clear()


def has_futures(segments: list[tuple[Run, int, int]]) -> bool:
    """A batch holding a `submit`'s task is timed item by item: its future reports its own duration."""
    return any(type(run.sink) is FutureSink for run, _, _ in segments)
