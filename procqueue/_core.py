"""The pool's front half, the same whatever runs the tasks: the scheduler
behind the pool's lock, backpressure, maps' feeding, settling futures and map
chunks, shutdown. `Pool` (`_pool.py`) and the lazy map (`_map.py`) talk to
this; it talks to a backend (`_backend.py`) that runs attempts and reports
what happened.

Threads: user threads submit and wait here (on the condition, for room or
for results); the backend's thread calls the scheduler and `apply` under the
same lock. Nothing here runs user code under the lock: values and errors stay
pickled until the thread that asks for them (`_results.py`), and a future's
done-callbacks go to the callback runner (`_callbacks.py`).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError

from procqueue._backend import Backend, WorkerRow
from procqueue._callbacks import Runner, deferring, mark_internal
from procqueue._errors import Dropped, PoolBroken, PoolClosed, ProcQueueError, QueueFull
from procqueue._flow import Flow
from procqueue._monitor.sampler import Sampler
from procqueue._results import Later, Stream, run_all
from procqueue._scheduler import instructions as ins
from procqueue._scheduler.feeds import Feed
from procqueue._scheduler.scheduler import Scheduler
from procqueue._scheduler.states import InvalidTransition
from procqueue._scheduler.tables import Policy
from procqueue._scheduler.tasks import Batch, Run
from procqueue._settings import Config
from procqueue._stats import Counts, Stats

_live: weakref.WeakSet[Core] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    # Runs before multiprocessing's own exit hook (atexit is last-in first-out),
    # which would otherwise join our workers forever. Like ProcessPoolExecutor,
    # exit waits for submitted work; Ctrl-C during that wait ends it at once.
    for core in list(_live):
        try:
            core.shutdown(wait=True, cancel=False)
        except KeyboardInterrupt:  # noqa: PERF203 - runs once per pool, at exit
            core.terminate()


class Core:
    """A running pool's shared state: the scheduler, the lock, the backend."""

    def __init__(self, cfg: Config, make_backend: Callable[[Core], Backend]) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.runner = Runner()
        self.flow = Flow(cfg.on_pressure, cfg.low_water, cfg.capacity, self.runner)  # room, pressure, blocked
        self.books_error: BaseException | None = None  # validate mode: what the ledger caught
        self.sampler = Sampler(cfg.monitor, cfg.max_worker_memory)  # a bad log path, a busy port fail first
        try:
            self.backend = make_backend(self)  # the initializer pickles; a cluster is reached
            policy = Policy(
                self.backend.seats, cfg.capacity, cfg.backoff, cfg.backoff_max, cfg.max_tasks_per_worker,
                self.backend.sizing,
            )  # fmt: skip
            self.scheduler = Scheduler(policy, validate=os.environ.get("PROCQUEUE_VALIDATE") == "1")
            self.backend.start()
        except BaseException:
            self.sampler.stop()
            raise
        self.sampler.start(self)
        _live.add(self)

    # --- submitting ----------------------------------------------------------------------

    def check_open(self) -> None:
        s = self.scheduler
        if s.broken is not None:
            raise s.broken
        if s.closed:
            raise PoolClosed("cannot submit to a pool that was shut down; create a new Pool")

    def check_writable(self) -> None:
        """A FileOutput still takes records: the pool is neither broken nor ended."""
        s = self.scheduler
        if s.broken is not None:
            raise s.broken
        if s.books.stopped is not None:
            raise PoolClosed("the pool has ended: its output takes no more records")

    def wake(self) -> None:
        """Have the backend look at the scheduler again (from any thread, lock held or not)."""
        self.backend.wake()

    def enqueue(self, run: Run, mode: str, block_timeout: float | None, later: Later) -> None:
        """Accept a run into the queue, applying backpressure when it does not fit."""
        n = len(run.items)
        s = self.scheduler
        with self.cv:
            self.check_open()
            if s.room() < n:
                if mode == "error":
                    raise QueueFull(
                        f"the pending queue is full ({self.cfg.capacity} tasks); wait, raise capacity, "
                        'or use backpressure="block"',
                        capacity=self.cfg.capacity,
                    )
                if mode == "drop":
                    err = Dropped(
                        f"task {run.first_id} was dropped: the pending queue was full ({self.cfg.capacity} tasks)",
                        task_id=run.first_id,
                    )
                    self.apply(s.drop(run, err, time.monotonic()), later)
                    return
                began = time.monotonic()
                deadline = None if block_timeout is None else began + block_timeout
                try:
                    while not self._fits(n):
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise QueueFull(
                                f"the pending queue stayed full ({self.cfg.capacity} tasks) for {block_timeout} s",
                                capacity=self.cfg.capacity,
                            )
                        self.cv.wait(left)
                        self.check_open()
                finally:
                    self.flow.blocked += time.monotonic() - began
            s.accept(run, time.monotonic())
            self.flow.check(s.queue.pending)
            if s.wants_work():  # else the end of a batch brings the next dispatch round
                self.wake()

    def _fits(self, n: int) -> bool:
        """Whether `n` tasks may join the queue now: room, or an empty queue (a run larger
        than `capacity` waits for it to drain, not forever). Lock held."""
        s = self.scheduler
        return s.room() >= n or s.queue.pending == 0

    def try_enqueue(self, run: Run) -> bool:
        """Accept a run if it fits now (as "block" would let it in); False when it does not."""
        with self.lock:  # the condition's own lock, without its Python-level wrapper (once per arun)
            self.check_open()
            s = self.scheduler
            if not self._fits(len(run.items)):
                return False
            s.accept(run, time.monotonic())
            self.flow.check(s.queue.pending)
            if s.wants_work():  # else the end of a batch brings the next dispatch round
                self.wake()
            return True

    def reject_new(self, run: Run, exc: BaseException, later: Later) -> None:
        """A submitted task that failed before it was queued (it would not pickle)."""
        with self.cv:
            self.check_open()
            self.apply(self.scheduler.reject(run, exc, time.monotonic()), later)

    def unsendable(self, batch: Batch, rejected: list[tuple[Run, int, BaseException]], later: Later) -> None:
        """Items of a booked batch would not pickle: they fail, the rest go back to the heap
        and the backend looks again (lock held)."""
        self.apply(self.scheduler.unsendable(batch, rejected), later)
        self.wake()

    def add_feed(self, feed: Feed) -> None:
        """A map whose batches the scheduler cuts from its input as room frees."""
        with self.lock:
            self.check_open()
            self.scheduler.add_feed(feed)
            self.wake()

    def feed_want(self, feed: Feed) -> int:
        """How many items an iterator map's reader should pull now (lock held)."""
        return self.scheduler.feeds.want(feed)

    def feed_span(self, feed: Feed) -> int:
        """Items a map needs in hand to keep every worker busy: a batch running and one
        ready per worker (lock held)."""
        feeds = self.scheduler.feeds
        return 2 * feeds.t.policy.workers * feeds.batch_size(feed)

    def wait_until(self, ready: Callable[[], bool], deadline: float | None) -> None:
        """Sleep until `ready()` (checked under the lock) or the deadline (TimeoutError)."""
        with self.cv:
            while not ready():
                if self.scheduler.broken is not None:
                    raise self.scheduler.broken
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("map: the next result was not ready within the timeout")
                self.cv.wait(left)

    def abandon(self, stream: Stream) -> None:
        """The reader of a map went away: cancel what did not start.

        Takes no lock: it may run in a generator's finalizer, which the cyclic
        garbage collector can call on any thread, the backend's included, while
        the pool's lock is held. Setting a flag and waking the backend (a write
        to a pipe) is safe there; the scheduler does the rest."""
        stream.cancelled = True
        self.backend.wake()

    # --- carrying out what the scheduler decided -------------------------------------------

    def apply(self, todo: Iterable[ins.Instruction], later: Later) -> list[ins.Instruction]:
        """Settle futures and maps, wake waiters, fail everything on a break (lock
        held); returns what is the backend's to do (send, retire, kill, start)."""
        rest: list[ins.Instruction] = []
        notify = False
        for i in todo:
            match i:
                case ins.Resolve(run=run, j=j, lo=lo, hi=hi, values=values, meta=meta):
                    run.receiver.ok(run.base + j, values, lo, hi, meta, later)
                case ins.Fail(run=run, j=j, error=error, attempts=attempts, pid=pid):
                    run.receiver.fail(run.base + j, error, attempts, pid, later)
                case ins.Notify():
                    notify = True
                case ins.Break(error=error):
                    rest += self.apply(self.scheduler.break_pool(error), later)
                    rest.append(i)
                case _:
                    rest.append(i)
        if notify:
            self.cv.notify_all()
            self.flow.wake(later)
        self.flow.check(self.scheduler.queue.pending)
        return rest

    # --- ending ---------------------------------------------------------------------------

    def shutdown(self, wait: bool, cancel: bool) -> None:
        later: Later = []
        s = self.scheduler
        with deferring(), self.cv:
            s.closed = True
            feeds = s.feeds.feeds
            if cancel:
                self.apply(s.cancel_pending(), later)
                for f in feeds:  # the rest of their input is not read
                    f.exhausted, f.input_done = True, True
                    f.error = f.error or CancelledError("the pool was shut down with cancel_futures=True")
                feeds.clear()
            for f in feeds:
                if not f.managed and not f.input_done:  # what was read still runs; then this
                    f.input_done = True
                    f.error = f.error or PoolClosed(
                        "the pool was shut down before this map's input was read to the end; "
                        "iterate the results inside the `with` block, or pass a list"
                    )
            self.cv.notify_all()
            self.flow.wake(later)
            self.wake()
        run_all(later)
        if wait and self.backend.may_join():
            self.backend.join()
            self.runner.join()  # callbacks of the last futures, as ProcessPoolExecutor's shutdown waits for them
            if self.books_error is not None:
                raise self.books_error

    def terminate(self) -> None:
        """End now: kill the workers, fail what is outstanding (Ctrl-C, fatal errors)."""
        self.break_pool(PoolClosed("the pool was terminated before this task finished"))
        if self.backend.may_join():
            self.backend.join()

    def break_pool(self, error: ProcQueueError) -> None:
        """The pool cannot go on (from any thread): fail everything outstanding, stop the workers."""
        later: Later = []
        with self.cv:
            self.apply([ins.Break(error)], later)
            self.cv.notify_all()
            self.flow.wake(later)
        self.backend.kill_all()
        run_all(later)

    def may_wait_for(self, thread: threading.Thread) -> bool:
        """Whether the calling thread may join a backend's `thread`: not that thread itself,
        nor the monitor's (the backend ends by stopping the monitor), and only once started."""
        me = threading.current_thread()
        return me is not thread and me is not self.sampler.thread and thread.ident is not None

    def run_backend(self, serve: Callable[[], None], close: Callable[[], None], what: str) -> None:
        """The body of a backend's thread: `serve` until the pool ends, then `close`. A
        failure there is a bug in procqueue: the pool fails loudly and leaves nothing running."""
        mark_internal()  # futures settled on this thread hand their callbacks to the runner
        try:
            serve()
        except BaseException as exc:
            self.books_error = exc
            self.break_pool(PoolBroken(f"procqueue's {what} failed: {type(exc).__name__}: {exc}"))
            raise
        finally:
            close()

    def finished(self) -> None:
        """The backend has ended every process: check the books, stop the monitor."""
        ledger = self.scheduler.ledger
        if ledger is not None and self.scheduler.broken is None:
            try:
                ledger.check_books()
            except InvalidTransition as exc:
                self.books_error = exc
        with self.cv:
            self.scheduler.books.stopped = time.monotonic()
            self.cv.notify_all()
        self.runner.close()
        self.sampler.stop()
        _live.discard(self)

    # --- what the monitor reads -------------------------------------------------------------

    def stats(self) -> Stats:
        return self.sampler.stats()

    @property
    def blocked(self) -> float:
        return self.flow.blocked

    @property
    def throttled(self) -> int:
        return self.scheduler.queue.throttles

    def pids(self) -> list[int]:
        """Processes to sample: the workers, and the backend's helpers (the collector)."""
        with self.lock:
            return self.backend.pids()

    def rows(self) -> tuple[Counts, float, list[WorkerRow], tuple[int, int] | None]:
        """The books, seconds since the first submit, one row per worker and the
        backend's helper process `(pid, forwarded)`, read together under the lock."""
        with self.lock:
            s = self.scheduler
            b = s.books
            end = time.monotonic() if b.stopped is None else b.stopped
            elapsed = end - b.started if b.started is not None else 0.0
            head: Counts = (
                b.submitted, b.completed, b.failed, b.retried, b.dropped, b.cancelled, b.crashed, b.timed_out,
                b.attempts, s.queue.pending, s.queue.waiting, b.in_flight,
            )  # fmt: skip
            return head, elapsed, self.backend.worker_rows(), self.backend.helper()

    def recycle(self, seat: int, pid: int) -> None:
        """The monitor saw worker `pid` past max_worker_memory: the backend retires it."""
        self.backend.recycle(seat, pid)
