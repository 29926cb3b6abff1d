"""Settling outcomes: a batch's results, a dead worker's leftovers, a broken
pool's remainder; each failed attempt judged (`retry.py`: retry after backoff,
final, or requeue uncharged) and counted.

Part of the `Scheduler` (`scheduler.py`); nothing here runs user code: values
and exceptions stay pickled, and the instructions it emits (`Resolve`, `Fail`)
carry them to the front, which unpickles them in the thread that asks.
"""

from __future__ import annotations

from array import array
from concurrent.futures import CancelledError
from functools import partial
from typing import Any

from procqueue._protocol import layout
from procqueue._protocol import messages as m
from procqueue._protocol.failures import crash_error, remote_error
from procqueue._protocol.relay import Forwarded
from procqueue._scheduler.books import Lost
from procqueue._scheduler.instructions import NOTIFY, Fail, Resolve
from procqueue._scheduler.retry import Decision, Final, Requeue, Retry, decide
from procqueue._scheduler.states import TaskState as S
from procqueue._scheduler.tables import Tables
from procqueue._scheduler.tasks import Batch, Run

BISECT_ALONE = 8  # suspects of a batch that died this few or fewer run one by one


class Settlement:
    """Turns reported outcomes into books, retries and `Resolve`/`Fail` instructions."""

    def __init__(self, t: Tables) -> None:
        self.t = t

    def batch_done(self, msg: m.BatchResult, values: Any, now: float) -> None:
        """Items `msg.start ..` of a batch finished (values still pickled, or None
        when a FileOutput took them)."""
        t = self.t
        batch = t.batches.get(msg.batch_id)
        if batch is None:
            return  # settled already (the pool broke meanwhile)
        books = t.books
        durations = array("q", msg.durations)
        head = batch.head
        total = sum(durations)
        head.handler.measured(total, max(msg.count, 1))
        if len(durations) != msg.count and any(r.receiver.timed_each for r, _, _ in batch.segments):
            durations = array("q", [total // max(msg.count, 1)]) * msg.count
        seat = t.seats[batch.seat]
        if seat.pid == msg.pid:
            seat.productive = True
            seat.idle_since = None
        seat.tasks_done += msg.count
        books.attempts += msg.count
        books.completed += msg.count - len(msg.errors)
        failed = {e.index: e for e in msg.errors}
        lo, hi = msg.start, msg.start + msg.count
        out = t.out
        for run, j, a, b in batch.locate(lo, hi):
            if not failed:
                t.moves(run, j, b - a, S.DONE)
                out.append(Resolve(run, j, a - lo, b - lo, values, (run.attempt, msg.pid, durations, a - lo)))
                continue
            for k in range(a, b):
                jj = j + k - a
                info = failed.get(k)
                if info is None:
                    t.moves(run, jj, 1, S.DONE)
                    out.append(Resolve(run, jj, k - lo, k - lo + 1, values, (run.attempt, msg.pid, durations, k - lo)))
                else:
                    make = partial(remote_error, info, run.first_id + jj, run.attempt, msg.pid)
                    self.failed_attempt(run, jj, info.fault, batch.count, make, msg.pid, now)
        books.in_flight -= msg.count
        batch.done = hi
        if batch.done >= batch.count:
            t.finish_batch(batch)
        out.append(NOTIFY)

    def failed_attempt(
        self, run: Run, j: int, fault: m.Fault, count: int, make_error: Any, pid: int | None, now: float
    ) -> None:
        """One failed attempt of item `j` of `run` (in a batch of `count`): judge it, count it, settle it."""
        t = self.t
        if fault in (m.Fault.CRASHED, m.Fault.TIMED_OUT):
            t.moves(run, j, 1, S.CRASHED if fault == m.Fault.CRASHED else S.TIMED_OUT)
        p = t.policy
        decision: Decision = Final()
        # Forwarded values that did not unpickle (relay.py): the same bytes would fail the same way
        if not (fault == m.Fault.ARGS_UNPICKLE and isinstance(run.items, Forwarded)):
            decision = decide(fault, run.attempt, run.retries, count, run.by_value, p.backoff, p.backoff_max, t.rng)
        match decision:
            case Requeue():
                t.moves(run, j, 1, S.PENDING)
                alone = run.solo or len(run.items) == 1
                t.queue.push(run.single(j, run.attempt, solo=True, by_value=alone), fresh=False)
            case Retry(delay=delay):
                t.books.retried += 1
                t.moves(run, j, 1, S.RETRYING)
                t.queue.push_delayed(run.single(j, run.attempt + 1), now + delay)
            case Final():
                t.books.failed += 1
                t.moves(run, j, 1, S.FAILED)
                t.out.append(Fail(run, j, make_error, run.attempt, pid))

    def rejected(self, run: Run, j: int, exc: BaseException) -> None:
        """A task that failed before reaching a worker (it would not pickle)."""
        self.t.books.failed += 1
        self.t.moves(run, j, 1, S.FAILED)
        self.t.out.append(Fail(run, j, exc, 0, None))

    def cancelled(self, run: Run, start: int, count: int) -> None:
        """Tasks that will not run: counted; a map still read sees CancelledError in their places."""
        self.t.books.cancelled += count
        self.t.moves(run, start, count, S.CANCELLED)
        if run.receiver.partial and run.receiver.still_read():
            for j in range(start, start + count):
                self.t.out.append(Fail(run, j, CancelledError(), run.attempt, None, final=False))

    def worker_gone(self, lost: Lost, pid: int, reported: bool, now: float) -> None:
        """Everything the dead worker sent is settled: charge the task it was running
        (unless its outcome arrived, or it was not its fault); the rest runs again, uncharged."""
        t = self.t
        fault = m.Fault.TIMED_OUT if lost.timed_out else m.Fault.CRASHED
        charged = lost.running is not None and not reported and lost.charge
        for batch in lost.batches:
            if batch.batch_id not in t.batches:
                continue
            again: list[tuple[Run, int]] = []
            suspects: list[tuple[Run, int]] = []  # it died loading (or, on Dask, running) these: one is the poison
            loading = charged and lost.running is not None and lost.running == (batch.batch_id, layout.LOADING)
            if loading and isinstance(batch.head.items, Forwarded):
                self.lost_loading(batch, fault, pid, lost, now)
                continue
            for k in range(batch.done, batch.count):
                run, j = batch.item(k)
                culprit = charged and lost.running == (batch.batch_id, k)
                if loading and batch.count - batch.done == 1:
                    culprit = True  # it died in a batch of one: that task is the poison
                if culprit:
                    if fault == m.Fault.CRASHED:
                        t.books.crashed += 1
                    else:
                        t.books.timed_out += 1
                    t.books.attempts += 1
                    error = partial(
                        crash_error, fault, run.first_id + j, run.attempt, pid, lost.exitcode, run.timeout,
                        lost.fault_text,
                    )  # fmt: skip
                    self.failed_attempt(run, j, fault, 1, error, pid, now)
                else:  # it never ran (or its outcome was lost with the worker): again, uncharged
                    t.moves(run, j, 1, S.PENDING)
                    (suspects if loading else again).append((run, j))
            self.requeue(again, careful=lost.unmarked)
            self.bisect(suspects)
            t.books.in_flight -= batch.count - batch.done
            t.batches.pop(batch.batch_id, None)
        t.out.append(NOTIFY)

    def lost_loading(self, batch: Batch, fault: m.Fault, pid: int, lost: Lost, now: float) -> None:
        """Its worker died unpickling a batch of forwarded values (`relay.py`). The values of
        one body load together, whichever are picked, so halves or single items of it would
        load (and die on) the same bytes again. Several bodies run again apart, uncharged; one
        runs again once, uncharged (the death may not be its: a SIGKILL, the OOM killer); a
        body that kills its loader a second time is charged one attempt, retried or failed whole."""
        t = self.t
        run, start, _ = batch.segments[0]  # forwarded runs go alone
        j, n = start + batch.done, batch.count - batch.done
        t.books.in_flight -= n
        t.batches.pop(batch.batch_id, None)
        items = run.items
        assert isinstance(items, Forwarded)
        spans = items[j : j + n].spans()
        if len(spans) > 1 or not run.careful:
            t.moves(run, j, n, S.PENDING)
            for size in spans if len(spans) > 1 else [n]:
                t.queue.push(run.part(j, size, careful=True, solo=True), fresh=False)
                j += size
            return
        if fault == m.Fault.CRASHED:
            t.books.crashed += n
        else:
            t.books.timed_out += n
        t.books.attempts += n
        t.moves(run, j, n, S.CRASHED if fault == m.Fault.CRASHED else S.TIMED_OUT)
        p = t.policy
        match decide(fault, run.attempt, run.retries, n, run.by_value, p.backoff, p.backoff_max, t.rng):
            case Retry(delay=delay):
                t.books.retried += n
                t.moves(run, j, n, S.RETRYING)
                again = run.part(j, n)
                again.attempt = run.attempt + 1
                t.queue.push_delayed(again, now + delay)
            case _:
                t.books.failed += n
                t.moves(run, j, n, S.FAILED)
                for jj in range(j, j + n):
                    error = partial(
                        crash_error, fault, run.first_id + jj, run.attempt, pid, lost.exitcode, run.timeout,
                        lost.fault_text, True,
                    )  # fmt: skip
                    t.out.append(Fail(run, jj, error, run.attempt, pid))

    def bisect(self, suspects: list[tuple[Run, int]]) -> None:
        """A batch of several died with no item to blame: run it again in two halves,
        each apart from other work, until the one that kills its worker runs alone (and
        is charged); a few suspects run alone at once. Uncharged until then."""
        if len(suspects) <= BISECT_ALONE:
            for run, j in suspects:
                self.t.queue.push(run.single(j, run.attempt, solo=True, careful=True), fresh=False)
            return
        half = len(suspects) // 2
        self.requeue(suspects[:half], careful=True, solo=True)
        self.requeue(suspects[half:], careful=True, solo=True)

    def requeue(self, items: list[tuple[Run, int]], careful: bool, solo: bool = False) -> None:
        """Put items back in the heap as runs of consecutive items (not one by one: a
        dead worker may have held a batch of tens of thousands of tiny tasks)."""
        k = 0
        while k < len(items):
            run, j = items[k]
            n = 1
            while k + n < len(items) and items[k + n] == (run, j + n):
                n += 1
            self.t.queue.push(run.part(j, n, careful=careful, solo=solo), fresh=False)
            k += n

    def unsendable(self, batch: Batch, rejected: list[tuple[Run, int, BaseException]]) -> None:
        """Some of a booked batch's items would not pickle: they fail; the rest go back to the heap."""
        t = self.t
        t.finish_batch(batch)
        t.seats[batch.seat].tasks_sent -= batch.count
        t.books.in_flight -= batch.count
        bad = {(id(r), j) for r, j, _ in rejected}
        for r, j, exc in rejected:
            self.rejected(r, j, exc)
        again = [(r, j) for r, s, n in batch.segments for j in range(s, s + n) if (id(r), j) not in bad]
        for r, j in again:
            t.moves(r, j, 1, S.PENDING)
        self.requeue(again, careful=False)
        t.out.append(NOTIFY)

    def fail_all(self, exc: BaseException) -> None:
        """The pool broke: every task not settled fails with `exc` (or, cancelled before it ran, is cancelled)."""
        t = self.t
        q = t.queue
        q.unthrottle()
        for run in [e[-1] for e in q.heap] + [e[-1] for e in q.delayed]:
            if not run.receiver.claim():
                self.cancelled(run, run.pos, len(run.items) - run.pos)
                continue
            for j in range(run.pos, len(run.items)):
                self._fail_now(run, j, exc)
        q.heap.clear()
        q.delayed.clear()
        q.pending = q.waiting = 0
        for batch in list(t.batches.values()):
            for k in range(batch.done, batch.count):
                run, j = batch.item(k)
                self._fail_now(run, j, exc)
            t.books.in_flight -= batch.count - batch.done
        t.batches.clear()
        for seat in t.seats:
            seat.batches = {}
        t.lost.clear()
        t.out.append(NOTIFY)

    def _fail_now(self, run: Run, j: int, exc: BaseException) -> None:
        self.t.books.failed += 1
        self.t.moves(run, j, 1, S.FAILED)
        self.t.out.append(Fail(run, j, exc, run.attempt, None))
