"""The scheduler: every decision of the pool, and no I/O.

Events come in as method calls (a task submitted, a batch finished, a worker
died, its leftovers read, a backoff over, a shutdown); what to do comes out as
a list of instructions (`instructions.py`: send this batch to that worker,
retire or kill that worker, start one, settle these tasks, the pool is
broken). It owns the task states (`states.py`, checked move by move where
validation is on), the pending queue, batch sizing and the prefetch rule,
retries and backoff, crash attribution and the books. It has no threads, no
processes and no clock: the caller passes the time and holds the pool's lock.

A backend (the local one: `procqueue/_local/`) turns what it reads into these
events and carries the instructions out; the front (`procqueue/_core.py`)
feeds it submissions and applies the settling instructions to futures and maps.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from procqueue._protocol import messages as m
from procqueue._scheduler import deaths, limits, states
from procqueue._scheduler.books import Books, Death, Seat
from procqueue._scheduler.feeds import Feed, Feeds
from procqueue._scheduler.instructions import NOTIFY, Fail, Instruction, Kill, Retire, Send
from procqueue._scheduler.queue import PendingQueue
from procqueue._scheduler.settle import Settlement
from procqueue._scheduler.states import TaskState as S
from procqueue._scheduler.tables import Policy, Tables
from procqueue._scheduler.tasks import Batch, Handlers, Run


class Scheduler:
    """Decides what runs where, what is retried, and whom a crash is charged to."""

    def __init__(self, policy: Policy, *, validate: bool = False, rng: random.Random | None = None) -> None:
        self.t = Tables(
            policy, PendingQueue(policy.capacity, sizing=policy.sizing), seats=[Seat(i) for i in range(policy.workers)],
            ledger=states.Ledger() if validate else None, rng=rng or random.Random(),
        )  # fmt: skip
        self.t.queue.ledger = self.t.ledger
        self.settlement = Settlement(self.t)
        self.feeds = Feeds(self.t)
        self.handlers = Handlers()
        self.closed = False  # no more submissions (shutdown)
        self.broken: BaseException | None = None
        self.stopping = False  # the workers are being stopped: dispatch nothing, start none
        self._next_id = 1
        self._batch_ids = itertools.count(1)

    # --- what it owns, for the backend and `stats()` -------------------------------------

    @property
    def books(self) -> Books:
        return self.t.books

    @property
    def queue(self) -> PendingQueue:
        return self.t.queue

    @property
    def seats(self) -> list[Seat]:
        return self.t.seats

    @property
    def batches(self) -> dict[int, Batch]:
        return self.t.batches

    @property
    def ledger(self) -> states.Ledger | None:
        return self.t.ledger

    def room(self) -> int:
        """Tasks the pending queue takes before it is full."""
        return self.t.queue.room()

    def idle(self) -> bool:
        """Nothing queued, out with a worker, waiting out a backoff or still to be fed."""
        t = self.t
        return not (t.queue.heap or t.queue.delayed or t.queue.throttled or t.batches or t.lost or self.feeds.feeds)

    def wants_work(self) -> bool:
        """After a submit: whether the backend should look at the queue now (`Tables.wants_work`)."""
        return self.t.wants_work()

    def next_due(self) -> float | None:
        """When the earliest backoff ends, or a held-back rate has a token again."""
        return self.t.queue.next_due()

    def _take(self) -> list[Instruction]:
        out, self.t.out = self.t.out, []
        return out

    # --- events from the front ----------------------------------------------------------

    def new_ids(self, n: int) -> int:
        """Reserve `n` task ids; returns the first."""
        first = self._next_id
        self._next_id += n
        return first

    def _account(self, run: Run, n: int, now: float) -> None:
        self.t.books.submitted += n
        if self.t.books.started is None:
            self.t.books.started = now

    def accept(self, run: Run, now: float) -> None:
        """A run was submitted and fits: it waits in the queue."""
        n = len(run.items)
        self._account(run, n, now)
        self.t.moves(run, 0, n, S.PENDING)
        self.t.queue.push(run)

    def drop(self, run: Run, error: BaseException, now: float) -> list[Instruction]:
        """A run was submitted into a full queue with backpressure "drop"."""
        n = len(run.items)
        self._account(run, n, now)
        self.t.books.dropped += n
        self.t.moves(run, 0, n, S.DROPPED)
        out: list[Instruction] = [Fail(run, j, error, 0, None) for j in range(n)]
        out.append(NOTIFY)
        return out

    def reject(self, run: Run, error: BaseException, now: float) -> list[Instruction]:
        """A run was submitted whose tasks failed before they were queued (would not pickle)."""
        n = len(run.items)
        self._account(run, n, now)
        self.t.moves(run, 0, n, S.PENDING)
        for j in range(n):
            self.settlement.rejected(run, j, error)
        return self._take()

    def add_feed(self, feed: Feed) -> None:
        """A map whose batches are cut from its input (`feeds.py`)."""
        self.feeds.add(feed, next(self.t.queue.seq))

    def cancel_pending(self) -> list[Instruction]:
        """shutdown(cancel_futures=True): every task not dispatched is cancelled."""
        self.t.queue.cancel_all(self.settlement.cancelled)
        self.t.out.append(NOTIFY)
        return self._take()

    def break_pool(self, error: BaseException) -> list[Instruction]:
        """The pool cannot go on: everything outstanding fails with `error`."""
        if self.broken is None:
            self.broken = error
        self.closed = True
        self.settlement.fail_all(self.broken)
        for f in self.feeds.feeds:  # nothing more is cut from them; items never cut end their reader with the error
            if f.error is None and not (f.input_done and f.pos >= len(f.seq)):
                f.error = self.broken
            f.exhausted = True
        self.feeds.feeds.clear()
        return self._take()

    # --- events from the backend --------------------------------------------------------

    def worker_started(self, seat: int, pid: int) -> None:
        s = self.t.seats[seat]
        s.pid, s.open, s.retiring, s.productive = pid, True, False, False
        s.batches, s.tasks_sent, s.idle_since = {}, 0, None

    def retire(self, seat: int, *, recycle: bool) -> bool:
        """The worker in `seat` takes no more work (True if it did until now); `recycle`:
        for a limit (memory), so a fresh one takes its place."""
        s = self.t.seats[seat]
        if not s.open or s.retiring:
            return False
        s.retiring = True
        s.recycled += recycle
        return True

    def dispatch(self, now: float) -> list[Instruction]:
        """Backoffs that are over rejoin the queue; then each worker with room gets a
        batch, round robin, one per worker per round."""
        t = self.t
        t.queue.promote(now)
        if self.stopping or self.broken is not None:
            return self._take()
        before = t.queue.pending
        progress = True
        while progress:
            progress = False
            for seat in t.seats:
                limit = self._task_limit(seat)
                if not seat.takes_work or limit == 0:
                    continue
                batch = self._next_batch(seat, limit, now)
                if batch is not None:
                    t.out.append(Send(batch))
                    progress = True
        if t.queue.pending < before:
            t.out.append(NOTIFY)
        return self._take()

    def _next_batch(self, seat: Seat, limit: int | None, now: float) -> Batch | None:
        t = self.t
        f = self.feeds.next_feed(self.broken is not None, self.closed, now) if self.feeds.feeds else None
        if f is not None:
            if not self.t.policy.sizing.may_hold_more(seat.batches.values(), f.handler.est_ns):
                return None  # it outranks the queue: nothing less urgent is prefetched ahead of it
            run = self.feeds.cut(f, limit, self.new_ids, self.closed, now)
            if run is not None:
                self._account(run, 0, now)
                if f.pulls:
                    t.out.append(NOTIFY)  # its reader may pull more input
                return self._reserve(seat, [(run, 0, len(run.items))])
        heap = t.queue.heap
        if heap and self.t.policy.sizing.may_hold_more(seat.batches.values(), heap[0][-1].handler.est_ns):
            if seat.batches and t.gathering():
                return None  # a busy worker's next batch waits until a full one has gathered
            segments = t.queue.take(limit, self.settlement.cancelled, now, t.share())
            if segments:
                return self._reserve(seat, segments)
        return None

    def _task_limit(self, seat: Seat) -> int | None:
        cap = self.t.policy.max_tasks_per_worker
        return None if cap is None else cap - seat.tasks_sent

    def _reserve(self, seat: Seat, segments: list[tuple[Run, int, int]]) -> Batch:
        """Book a batch to a worker: it counts as held from now on."""
        count = sum(n for _, _, n in segments)
        batch = Batch(next(self._batch_ids), segments, count, seat.index)
        for r, s, n in segments:
            self.t.moves(r, s, n, S.DISPATCHED)
        self.t.batches[batch.batch_id] = batch
        seat.batches[batch.batch_id] = batch
        seat.tasks_sent += count
        self.t.books.in_flight += count
        if len(seat.batches) == 1:
            seat.idle_since = None  # its stall clock starts when it is first seen idle holding this
        return batch

    def holds(self, batch: Batch) -> bool:
        """Whether `batch` is still booked to its worker (not settled meanwhile)."""
        seat = self.t.seats[batch.seat]
        return self.t.batches.get(batch.batch_id) is batch and seat.batches.get(batch.batch_id) is batch

    def sent(self, batch: Batch) -> list[Instruction]:
        """`batch` went out; a worker that reached its task limit retires once the last
        batch booked to it is out (Stop must follow every batch it is to run)."""
        batch.sent = True
        return self._retire_at_limit(self.t.seats[batch.seat])

    def _retire_at_limit(self, seat: Seat) -> list[Instruction]:
        cap = self.t.policy.max_tasks_per_worker
        if cap is None or seat.tasks_sent < cap or not all(b.sent for b in seat.batches.values()):
            return []
        return [Retire(seat.index)] if self.retire(seat.index, recycle=True) else []

    def unsendable(self, batch: Batch, rejected: list[tuple[Run, int, BaseException]]) -> list[Instruction]:
        """Some of a booked batch's items would not pickle (`rejected`): they fail, the rest go back."""
        self.settlement.unsendable(batch, rejected)
        return self._take() + self._retire_at_limit(self.t.seats[batch.seat])

    def batch_done(self, msg: m.BatchResult, values: object, now: float) -> list[Instruction]:
        """A worker reported outcomes of a batch (`values` still pickled)."""
        self.t.barren = 0
        self.settlement.batch_done(msg, values, now)
        return self._take()

    def values_unloadable(self, n: int) -> None:
        """`n` values did not unpickle where they were read: they count as failed."""
        self.t.books.completed -= n
        self.t.books.failed += n

    def worker_died(self, death: Death) -> list[Instruction]:
        """A worker ended; what it held is settled by `worker_gone`."""
        accepting = not self.stopping and self.broken is None
        deaths.worker_died(self.t, death, accepting)
        return self._take()

    def worker_gone(self, pid: int, reported: bool, now: float) -> list[Instruction]:
        """Everything the dead worker `pid` sent has been handled; `reported`: the
        outcome of the item it was running was among it."""
        lost = self.t.lost.pop(pid, None)
        if lost is not None:
            self.settlement.worker_gone(lost, pid, reported, now)
        return self._take()

    def lost_running(self, pid: int) -> tuple[int, int] | None:
        """The marked item a dead worker was in (`(batch_id, index)`), if its death is
        charged to one: the backend asks whether that item's outcome arrived."""
        lost = self.t.lost.get(pid)
        return None if lost is None else lost.running

    def lost_pids(self) -> list[int]:
        """Dead workers whose leftovers are not settled yet."""
        return list(self.t.lost)

    def check_limits(
        self, reading: Callable[[int], tuple[int, int, float] | None], now: float, clock: float
    ) -> tuple[list[Kill], float | None]:
        """Workers past a limit (`limits.py`), and the seconds until the next one may be.
        `reading(seat)` is what that worker runs now, None between items."""
        kills: list[Kill] = []
        nearest: float | None = None
        for seat in self.t.seats:
            if not seat.batches or not seat.open:
                continue
            running = reading(seat.index)
            left = limits.limit_in(seat, running, now, clock)
            if left is None:
                continue
            if left <= 0:
                seat.open = False  # no more work, nor a second kill: its death is on the way
                kills.append(Kill(seat.index, limits.verdict(running)))
            else:
                nearest = left if nearest is None else min(nearest, left)
        return kills, nearest

    def task_at(self, seat: int, running: tuple[int, int] | None) -> int | None:
        """The task id a worker's marker points at; None between tasks or in an unmarked batch."""
        if running is None or running[1] < 0:
            return None
        batch = self.t.batches.get(running[0])
        if batch is None or batch.seat != seat:
            return None
        for run, j, _, _ in batch.locate(running[1], running[1] + 1):
            return run.first_id + j
        return None
