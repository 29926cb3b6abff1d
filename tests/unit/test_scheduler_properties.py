"""Random interleavings of the scheduler's events (issue 11), no processes.

A hypothesis state machine plays the front (submits, maps, cancellations,
shutdown, break) and the backend (workers that hold the batches they were sent
and report a prefix of them, with random faults; deaths at random points for
random reasons, their leftovers settled later; limit checks), applying every
instruction the scheduler returns. After each step the books must add up; at
the end everything is drained and every task must have exactly one outcome.
The scheduler runs with `validate=True`, so an illegal move raises
`InvalidTransition` on the spot: any such failure is a finding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sched_fakes import FakeFeed, FakeReceiver, Front, error, result

from procqueue import Dropped, InitializerFailed, PoolBroken
from procqueue._protocol import layout
from procqueue._protocol import messages as m
from procqueue._scheduler import instructions as ins
from procqueue._scheduler.books import Death
from procqueue._scheduler.instructions import KillReason
from procqueue._scheduler.scheduler import Scheduler
from procqueue._scheduler.states import TaskState as S
from procqueue._scheduler.tables import Policy
from procqueue._scheduler.tasks import Batch, Run

FAULTS = [m.Fault.RAISED, m.Fault.REJECTED, m.Fault.RESULT_PICKLE, m.Fault.HANDLER_UNPICKLE, m.Fault.ARGS_UNPICKLE]
EXITS = [-9, -11, 1, 0, layout.EXIT_ORPHANED, layout.EXIT_INIT_FAILED, layout.EXIT_UNGUARDED_MAIN]
REASONS = [None, None, KillReason.TIMEOUT, KillReason.STALLED, KillReason.COLLECTOR, KillReason.SHUTDOWN]
DRAIN_ROUNDS = 2000
RARELY = st.sampled_from([False, False, False, True])
QUIET_STEPS = 15  # no shutdown nor break before this many steps: most of the interest comes before them


@dataclass
class Worker:
    """A worker process as the backend sees it: the batches it was sent, in order."""

    seat: int
    pid: int
    held: list[Batch] = field(default_factory=list)  # sent before any Stop: it runs them, in order
    stopping: bool = False  # told to Stop (its task limit, a retire): exits once it ran what came before


@dataclass
class Dead:
    """A dead worker whose leftovers the collector has not settled yet."""

    seat: int
    pid: int
    held: list[Batch]
    running: tuple[int, int] | None
    reported_running: bool = False


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s: Scheduler
        self.front: Front
        self.now = 0.0
        self.next_pid = 100
        self.workers: dict[int, Worker] = {}  # by seat
        self.dead: list[Dead] = []
        self.to_start: set[int] = set()
        self.runs: list[Run] = []  # every run handed to the scheduler (a feed's runs: `feed.runs`)
        self.feeds: list[FakeFeed] = []
        self.sources: dict[int, list[int]] = {}  # an iterator feed's input not read yet, by id(feed)
        self.futures: list[FakeReceiver] = []
        self.streams: list[object] = []
        self.handlers: list = []  # type: ignore[type-arg]
        self.steps = 0

    # --- set-up ---------------------------------------------------------------------------------

    @initialize(
        workers=st.integers(1, 3),
        capacity=st.sampled_from([4, 16, 64]),
        cap=st.sampled_from([None, None, 2, 5]),
        seed=st.integers(0, 2**16),
        backoff=st.sampled_from([0.1, 1.0]),
    )
    def setup(self, workers: int, capacity: int, cap: int | None, seed: int, backoff: float) -> None:
        policy = Policy(
            workers=workers, capacity=capacity, backoff=backoff, backoff_max=4 * backoff, max_tasks_per_worker=cap
        )
        self.s = Scheduler(policy, validate=True, rng=random.Random(seed))
        self.front = Front(self.s)
        self.handlers = [self.s.handlers.get(f) for f in (len, abs, repr)]
        for seat in range(workers):
            self.start(seat)

    def start(self, seat: int) -> None:
        assert seat not in self.workers, f"Start for seat {seat}, which has a live worker"
        self.next_pid += 1
        self.s.worker_started(seat, self.next_pid)
        self.workers[seat] = Worker(seat, self.next_pid)

    @property
    def accepting(self) -> bool:
        return not self.s.closed and self.s.broken is None

    # --- carrying out what the scheduler says (the backend) ----------------------------------------

    def carry_out(self, todo: list[ins.Instruction], data: st.DataObject | None = None) -> None:
        rest = self.front.apply(todo)
        for i in rest:
            match i:
                case ins.Send(batch=batch):
                    self.send(batch, data)
                case ins.Retire(seat=seat):
                    w = self.workers.get(seat)
                    assert w is not None, f"Retire for seat {seat}, which has no worker"
                    w.stopping = True
                    self.exit_if_done(w)
                case ins.Kill(seat=seat, reason=reason):
                    assert seat in self.workers, f"Kill for seat {seat}, which has no worker"
                    self.die(seat, -9, reason, self.marker(seat))
                case ins.Start(seat=seat):
                    self.to_start.add(seat)
                case ins.Break():
                    for seat in list(self.workers):  # the backend kills every worker
                        self.die(seat, -9, None, self.marker(seat))
                case _:
                    raise AssertionError(f"unexpected instruction {i!r}")

    def send(self, batch: Batch, data: st.DataObject | None) -> None:
        s = self.s
        if not s.holds(batch):
            return  # settled meanwhile
        w = self.workers.get(batch.seat)
        assert w is not None, f"a batch sent to seat {batch.seat}, which has no worker"
        if data is not None and data.draw(st.integers(0, 19), label="unsendable?") == 0:
            items = [(r, j) for r, st_, n in batch.segments for j in range(st_, st_ + n)]
            bad = data.draw(st.lists(st.sampled_from(items), min_size=1, unique=True), label="unsendable")
            self.carry_out(s.unsendable(batch, [(r, j, ValueError("no pickle")) for r, j in bad]))
            return
        # A batch written after the worker's Stop would never run (the worker exits at Stop).
        assert not w.stopping, f"batch {batch.batch_id} was sent to seat {batch.seat} after its Stop"
        w.held.append(batch)
        self.carry_out(s.sent(batch))

    def marker(self, seat: int) -> tuple[int, int] | None:
        """What the dying worker's marker says: in the next unreported item of its first batch."""
        w = self.workers[seat]
        head = self.head(w)
        return None if head is None else (head.batch_id, head.done)

    def head(self, w: Worker | Dead) -> Batch | None:
        while w.held and (self.s.batches.get(w.held[0].batch_id) is not w.held[0] or w.held[0].done >= w.held[0].count):
            w.held.pop(0)
        return w.held[0] if w.held else None

    def exit_if_done(self, w: Worker) -> None:
        if w.stopping and self.head(w) is None and self.workers.get(w.seat) is w:
            self.die(w.seat, 0, None, None)

    def die(self, seat: int, exitcode: int, reason: KillReason | None, running: tuple[int, int] | None) -> None:
        w = self.workers.pop(seat)
        self.dead.append(Dead(seat, w.pid, list(w.held), running))  # what it may still report
        self.carry_out(self.s.worker_died(Death(seat, w.pid, exitcode, running, reason)))
        if exitcode == layout.EXIT_INIT_FAILED and self.s.broken is None:
            # The collector reports InitFailed: the front breaks the pool.
            self.carry_out([ins.Break(InitializerFailed("the initializer raised"))])

    def report_items(self, w: Worker | Dead, k: int, faults: list[m.Fault | None], total: bool) -> bool:
        """The worker reports the next `k` items of its first batch (the i-th failing with
        `faults[i]`, if any); False if it has none to report."""
        head = self.head(w)
        if head is None:
            return False
        k = min(k, head.count - head.done)
        if isinstance(w, Dead) and w.running is not None and w.running[0] == head.batch_id:
            if w.running[1] == layout.LOADING:
                return False  # it died before running any of it
            if w.running[1] >= 0:
                k = min(k, w.running[1] + 1 - head.done)  # nothing after the item it died in
                if k <= 0:
                    return False
                w.reported_running = w.reported_running or head.done + k > w.running[1]
        start = head.done
        errors = [error(start + i, f) for i, f in enumerate(faults[:k]) if f is not None]
        msg = result(head, start, k, w.pid, errors=errors, ns=1_000 * (1 + len(errors)), total=total)
        self.carry_out(self.s.batch_done(msg, None, self.now))
        return True

    # --- the front's events ----------------------------------------------------------------------

    @precondition(lambda self: self.accepting)
    @rule(
        n=st.integers(1, 6),
        priority=st.integers(0, 2),
        retries=st.integers(0, 2),
        timeout=st.sampled_from([None, None, 0.5]),
        handler=st.integers(0, 2),
        how=st.sampled_from(["submit", "submit", "map", "reject"]),
        chunk=st.integers(1, 4),
        drop=st.booleans(),
    )
    def submit(
        self, n: int, priority: int, retries: int, timeout: float | None, handler: int, how: str, chunk: int, drop: bool
    ) -> None:
        s = self.s
        h = self.handlers[handler]
        if how == "map":
            stream = FakeReceiver(partial=True).stream
            self.streams.append(stream)
            sizes = [min(chunk, n - i) for i in range(0, n, chunk)]
            receivers = [FakeReceiver(partial=True, stream=stream) for _ in sizes]
        else:
            sizes = [1] * n
            receivers = [FakeReceiver() for _ in sizes]
            self.futures += receivers
        chunksize = chunk if how == "map" else None
        runs = [
            Run(
                h,
                list(range(size)),
                m.Call.ONE,
                receiver,
                s.new_ids(size),
                priority,
                retries=retries,
                timeout=timeout,
                chunksize=chunksize,
            )
            for size, receiver in zip(sizes, receivers)
        ]
        for run in runs:
            if how == "reject":
                self.runs.append(run)
                self.front.apply(s.reject(run, ValueError("would not pickle"), self.now))
            elif s.room() >= len(run.items):
                self.runs.append(run)
                s.accept(run, self.now)
            elif drop:
                self.runs.append(run)
                self.front.apply(s.drop(run, Dropped("full"), self.now))
            # else: QueueFull is raised to the caller; nothing was handed over

    @precondition(lambda self: self.accepting)
    @rule(
        n=st.integers(1, 30),
        managed=st.booleans(),
        priority=st.integers(0, 2),
        size=st.sampled_from([None, None, 1, 3]),
        limit=st.integers(1, 8),
        retries=st.integers(0, 1),
        handler=st.integers(0, 2),
    )
    def add_feed(
        self, n: int, managed: bool, priority: int, size: int | None, limit: int, retries: int, handler: int
    ) -> None:
        feed = FakeFeed(
            self.handlers[handler], list(range(n)) if managed else [], managed=managed, priority=priority, size=size,
            limit=limit, retries=retries,
        )  # fmt: skip
        if not managed:
            self.sources[id(feed)] = list(range(n))
        self.feeds.append(feed)
        self.streams.append(feed.stream)
        self.s.add_feed(feed)

    def open_inputs(self) -> list[FakeFeed]:
        return [f for f in self.feeds if not f.managed and not f.input_done]

    @precondition(lambda self: self.open_inputs())
    @rule(data=st.data())
    def pull_input(self, data: st.DataObject) -> None:
        """An iterator map's reader pulls what the scheduler wants into the buffer."""
        f = data.draw(st.sampled_from(self.open_inputs()), label="feed")
        want = self.s.feeds.want(f)
        if want <= 0:
            return
        source = self.sources[id(f)]
        items, self.sources[id(f)] = source[:want], source[want:]
        if len(items) < want:
            f.input_done = True
        if f.pos:
            del f.seq[: f.pos]
            f.pos = 0
        f.seq.extend(items)

    @precondition(lambda self: self.feeds)
    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        """A map's reader takes the results that are in (its window moves)."""
        f = data.draw(st.sampled_from(self.feeds), label="feed")
        outcomes = self.front.outcomes
        f.stream.outstanding = sum(
            len(r.items) for r in f.runs if not all(outcomes.get(r.first_id + j) for j in range(len(r.items)))
        )  # the chunks not complete yet

    @precondition(lambda self: self.futures)
    @rule(data=st.data())
    def cancel_future(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.futures), label="future").user_cancel()

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def abandon_map(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.streams), label="stream").cancelled = True  # type: ignore[attr-defined]

    @precondition(lambda self: not self.s.closed and self.steps >= QUIET_STEPS)
    @rule(cancel=st.booleans(), now=RARELY)
    def shutdown_now(self, cancel: bool, now: bool) -> None:
        if now:
            self.shutdown(cancel)

    def shutdown(self, cancel: bool) -> None:
        """The front's `Core.shutdown`: no more submissions; with cancel_futures, what waits is cancelled."""
        s = self.s
        s.closed = True
        if cancel:
            self.carry_out(s.cancel_pending())
            for f in s.feeds.feeds:
                f.exhausted, f.input_done = True, True
            s.feeds.feeds.clear()
        for f in s.feeds.feeds:
            if not f.managed:
                f.input_done = True

    @precondition(lambda self: self.steps >= QUIET_STEPS and self.s.broken is None)
    @rule(now=RARELY)
    def break_pool(self, now: bool) -> None:
        if now:
            self.carry_out([ins.Break(PoolBroken("broken by the test"))])

    # --- the backend's events ----------------------------------------------------------------------

    @rule(dt=st.sampled_from([0.0, 0.01, 0.1, 0.3]), data=st.data())
    def dispatch(self, dt: float, data: st.DataObject) -> None:
        self.now += dt
        self.carry_out(self.s.dispatch(self.now), data)

    @rule(
        data=st.data(),
        dt=st.sampled_from([0.0, 0.05, 0.2]),
        ks=st.lists(st.integers(0, 4), min_size=3, max_size=3),
        faults=st.lists(st.sampled_from([None, None, *FAULTS]), min_size=4, max_size=4),
    )
    def tick(self, data: st.DataObject, dt: float, ks: list[int], faults: list[m.Fault | None]) -> None:
        """A turn of the manager's loop: dispatch, then each busy worker reports some items."""
        self.now += dt
        self.carry_out(self.s.dispatch(self.now), data)
        for k, w in zip(ks, self.busy()):
            if k and self.workers.get(w.seat) is w:
                self.report_items(w, k, faults, False)
                self.exit_if_done(w)

    @precondition(lambda self: self.to_start)
    @rule()
    def spawn_and_dispatch(self) -> None:
        self.spawn()
        self.carry_out(self.s.dispatch(self.now))

    def spawn(self) -> None:
        """The backend starts the workers it was told to (not once the pool is broken or stopping)."""
        for seat in sorted(self.to_start):
            self.to_start.discard(seat)
            if self.s.broken is None and not self.s.stopping and seat not in self.workers:
                self.start(seat)

    def busy(self) -> list[Worker]:
        return [w for w in self.workers.values() if self.head(w) is not None]

    @precondition(lambda self: self.busy())
    @rule(
        data=st.data(),
        k=st.integers(1, 5),
        faults=st.lists(st.sampled_from([None, None, *FAULTS]), min_size=5, max_size=5),
        total=st.booleans(),
        everyone=st.booleans(),
    )
    def worker_reports(
        self, data: st.DataObject, k: int, faults: list[m.Fault | None], total: bool, everyone: bool
    ) -> None:
        """A worker (or every busy one) reports the next items of its first batch, some failing."""
        busy = self.busy() if everyone else [data.draw(st.sampled_from(self.busy()), label="worker")]
        for w in busy:
            if self.workers.get(w.seat) is w:
                self.report_items(w, k, faults, total)
                self.exit_if_done(w)
        self.carry_out(self.s.dispatch(self.now), data)  # the manager's loop dispatches after each read

    @precondition(lambda self: self.busy())
    @rule(data=st.data(), exitcode=st.sampled_from([-11, -9, 1]))
    def crash_in_an_item(self, data: st.DataObject, exitcode: int) -> None:
        """A task kills its worker (a segfault, os._exit): the task is charged."""
        w = data.draw(st.sampled_from(self.busy()), label="worker")
        self.die(w.seat, exitcode, None, self.marker(w.seat))

    @precondition(lambda self: self.workers)
    @rule(
        data=st.data(),
        exitcode=st.sampled_from(EXITS),
        reason=st.sampled_from(REASONS),
        where=st.sampled_from(["marker", "marker", "none", "loading", "unmarked"]),
        now=RARELY,
    )
    def die_now(self, data: st.DataObject, exitcode: int, reason: KillReason | None, where: str, now: bool) -> None:
        """A worker ends, for any reason, anywhere (EXIT_INIT_FAILED, EXIT_UNGUARDED_MAIN among them)."""
        if not now:
            return
        seat = data.draw(st.sampled_from(sorted(self.workers)), label="seat")
        running = self.marker(seat)
        if running is not None and where != "marker":
            running = (
                None if where == "none" else (running[0], layout.LOADING if where == "loading" else layout.UNMARKED)
            )
        self.die(seat, exitcode, reason, running)

    @precondition(lambda self: self.dead)
    @rule(data=st.data(), k=st.integers(1, 5), total=st.booleans())
    def late_report(self, data: st.DataObject, k: int, total: bool) -> None:
        """The collector forwards what a dead worker sent before it died."""
        d = data.draw(st.sampled_from(self.dead), label="dead")
        self.report_items(d, k, [None] * 5, total)

    @precondition(lambda self: self.dead)
    @rule(data=st.data(), reported=st.booleans())
    def gone(self, data: st.DataObject, reported: bool) -> None:
        d = data.draw(st.sampled_from(self.dead), label="dead")
        self.dead.remove(d)
        self.carry_out(self.s.worker_gone(d.pid, reported, self.now))
        self.carry_out(self.s.dispatch(self.now), data)

    @precondition(lambda self: self.s.batches)
    @rule(data=st.data(), dt=st.sampled_from([0.0, 0.2, 1.0, 0.0, 0.2, 1.0, 70.0]))
    def check_limits(self, data: st.DataObject, dt: float) -> None:
        self.now += dt
        readings: dict[int, tuple[int, int, float] | None] = {}
        for seat, w in self.workers.items():
            head = self.head(w)
            if head is not None and data.draw(st.booleans(), label=f"seat {seat} in an item"):
                age = data.draw(st.sampled_from([0.0, 0.3, 2.0]), label="age")
                readings[seat] = (head.batch_id, head.done, self.now - age)
        kills, nearest = self.s.check_limits(lambda seat: readings.get(seat), self.now, self.now)
        assert nearest is None or nearest >= 0
        self.carry_out(list(kills))

    @precondition(lambda self: self.workers)
    @rule(data=st.data(), recycle=st.booleans(), now=RARELY)
    def retire(self, data: st.DataObject, recycle: bool, now: bool) -> None:
        """The worker is told to Stop (over its memory limit: recycle)."""
        if not now:
            return
        seat = data.draw(st.sampled_from(sorted(self.workers)), label="seat")
        if self.s.retire(seat, recycle=recycle):
            self.carry_out([ins.Retire(seat)])

    # --- what must hold after every step -----------------------------------------------------------

    @invariant()
    def books_add_up(self) -> None:
        self.steps += 1
        s = self.s
        b, q = s.books, s.queue
        assert b.submitted == b.completed + b.failed + b.dropped + b.cancelled + b.in_flight + q.pending + q.waiting, (
            b, q.pending, q.waiting,
        )  # fmt: skip
        assert b.in_flight == sum(x.count - x.done for x in s.batches.values()), b
        assert q.pending == sum(len(e[-1].items) - e[-1].pos for e in q.heap)
        assert q.waiting == len(q.delayed)
        assert s.ledger is not None
        assert len(s.ledger.live) == b.in_flight + q.pending + q.waiting
        assert s.ledger.accepted == b.submitted
        twice = {t: o for t, o in self.front.outcomes.items() if len(o) > 1}
        assert not twice, f"tasks settled more than once: {twice}"

    # --- the end: drain, then everything has exactly one outcome ---------------------------------------

    def teardown(self) -> None:
        if not hasattr(self, "s"):
            return
        s = self.s
        if not s.closed:
            self.shutdown(cancel=False)  # maps run to the end, as Executor.map after shutdown
        for _ in range(DRAIN_ROUNDS):
            for d in list(self.dead):
                self.dead.remove(d)
                self.carry_out(s.worker_gone(d.pid, False, self.now))
            self.spawn()
            if (s.idle() or s.broken is not None) and not s.stopping:
                s.stopping = True  # the backend's advance_phase: Stop to every worker
                for seat in list(self.workers):
                    if s.retire(seat, recycle=False):
                        self.carry_out([ins.Retire(seat)])
            due = s.next_due()
            if due is not None and not s.queue.heap:
                self.now = max(self.now, due)
            self.carry_out(s.dispatch(self.now))
            for f in self.feeds:
                if not f.managed and not f.input_done:
                    self.pull_input_of(f)
                f.stream.outstanding = 0  # the readers read everything
            for w in list(self.workers.values()):
                while self.head(w) is not None and self.workers.get(w.seat) is w:
                    self.report_items(w, 10**6, [], False)
                self.exit_if_done(w)
            if s.stopping and not self.workers and not self.dead:
                break
            if not (self.workers or self.dead or self.to_start or s.broken or s.idle()):
                raise AssertionError("work is left and no worker will come to run it")
        else:
            raise AssertionError(f"the scheduler did not drain: books {s.books}, idle {s.idle()}")
        self.check_the_end()

    def pull_input_of(self, f: FakeFeed) -> None:
        source = self.sources[id(f)]
        f.seq.extend(source)
        self.sources[id(f)] = []
        f.input_done = True

    def check_the_end(self) -> None:
        s = self.s
        b = s.books
        assert b.submitted == b.completed + b.failed + b.dropped + b.cancelled, b
        assert b.in_flight == 0 and s.queue.pending == 0 and s.queue.waiting == 0, b
        assert not s.batches and not s.lost_pids()
        assert s.ledger is not None
        s.ledger.check_books()
        assert s.idle()
        outcomes = self.front.outcomes
        runs = self.runs + [r for f in self.feeds for r in f.runs]
        known = {r.first_id + j for r in runs for j in range(len(r.items))}
        assert set(outcomes) <= known, f"outcomes for tasks never submitted: {set(outcomes) - known}"
        assert len(known) == b.submitted, (len(known), b)
        for run in runs:
            receiver = run.receiver
            assert isinstance(receiver, FakeReceiver)
            for j in range(len(run.items)):
                tid = run.first_id + j
                final = s.ledger.state_of(tid)
                got = outcomes.get(tid, [])
                if final is S.DONE:
                    assert got == ["done"], (tid, final, got)
                elif final in (S.FAILED, S.DROPPED):
                    assert got == ["failed"], (tid, final, got)
                elif final is S.CANCELLED:
                    if receiver.partial:  # a map's reader sees CancelledError, or went away
                        assert got == ["cancelled"] or receiver.stream.cancelled, (tid, got)
                    else:  # a future: cancelled by the front, never settled by the scheduler
                        assert got == [] and receiver.cancelled and not receiver.claimed, (tid, got)
                else:
                    raise AssertionError(f"task {tid} ended {final}")
            if not receiver.partial:
                settled = len(receiver.oks) + len(receiver.fails)
                assert settled == (0 if receiver.cancelled else 1), (run.first_id, receiver.oks, receiver.fails)


SchedulerMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestScheduler = SchedulerMachine.TestCase
