"""The engine: wires the parent's dispatcher, the workers and the collector.

::

    parent process                          worker processes (N)         collector process
    ──────────────                          ────────────────────         ─────────────────
    submit()/map() ──► Dispatcher heap       loop: recv RunBatch,
      (priority, arrival), bounded by          run handler per item,     reads every worker's socket
      `capacity`; backpressure                 write marker per item,    (token first, then frames);
                                               send BatchDone ─────────► forwards each outcome as bytes,
    manager thread (one selector loop):        (own socket pair each) ─► never unpickled; counts what
      dispatch ── own pipe per worker ──►                                it forwarded; with a sink
      (~40 ms of work queued per worker,                                 (procqueue run): values to the
       so priority holds at dispatch)                                    output file, in order (`_sink.py`)
                                                                               │
      results ◄──── BatchResult + the worker's value bytes, WorkerGone ◄───────┘
      judge each failed attempt (`_retry.py`: retry after backoff, final, requeue), keep the books
      deaths (pidfds): a dead worker ──► WorkerLost ──► collector reads what it left ──► charge or not
      deadlines: task timeouts (kill), stalled workers (kill, requeue), retry backoffs, respawns
      futures and map chunks settled, their values still pickled; callbacks to the runner thread
      the collector's death: another collector, fresh workers, in-flight work again (uncharged)

Actors, what they read, write and own:

- user threads: push runs into the heap under the lock (`enqueue`), wait on
  the condition for room (backpressure "block") or for map chunks; unpickle
  the values and errors they read (`_results.py`), so user code in a result
  costs only the thread that reads it.
- manager thread: owns the selector, the dispatcher (`_dispatcher.py`), the
  supervisor (`_supervisor.py`: processes, timeouts, stalls), every write to
  a task pipe, the outbox to the collector and every read of the results
  pipe (`_collector_link.py`), the books and every retry decision
  (`_outcomes.py`). It sleeps in one `select()` whose timeout is the nearest
  deadline, never a fixed tick, and runs no user code: done-callbacks go to
  the callback runner (`_callbacks.py`).
- workers (`_worker.py`): each reads only its own pipe and writes only its
  own socket, so a worker killed mid-write tears nothing another process
  reads from, and no lock is shared: there is no shared queue to poison
  (the failure mode of `multiprocessing.Queue`, pebble issue 163).
- collector (`_collector.py`): forwards; decides nothing, so killing it
  loses no decision and no count.

No process listens: every channel is a pipe or a socket pair made here and
handed down; a worker's socket reaches the collector as a descriptor over
the links socket. See README's Security section for the threat model.

A map over a list, tuple or range skips the heap: the manager cuts its
batches straight from the sequence whenever nothing in the heap outranks it,
so tiny tasks travel in batches of tens of thousands, not `capacity`.

Why a worker holds at most two batches, the second only while it holds under
~40 ms of estimated work: a batch on a pipe can no longer be reordered (nor
taken by a worker that frees up sooner), so the prefetch is the only place
where a newly submitted urgent task can be overtaken. Batch sizes aim at
~20 ms of work for tiny tasks and ~5 ms for tasks over 100 µs (auto
chunksize), so an urgent task waits about two batches at most.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import random
import secrets
import selectors
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from functools import partial
from typing import Any

from procqueue._callbacks import Runner, deferring, mark_internal
from procqueue._errors import (
    Dropped,
    InitializerFailed,
    PoolBroken,
    PoolClosed,
    PoolStartError,
    ProcQueueError,
    QueueFull,
    SerializationError,
    describe_exitcode,
)
from procqueue._local.collector_link import CollectorLink
from procqueue._local.outcomes import Outcomes, has_futures
from procqueue._local.supervisor import Slot, Supervisor
from procqueue._monitor.sampler import Sampler, Stats
from procqueue._output import OutputStatus
from procqueue._protocol import framing, layout
from procqueue._protocol import messages as m
from procqueue._protocol.pickling import dumps_callable
from procqueue._results import Later, Stream, run_all
from procqueue._scheduler import states
from procqueue._scheduler.queue import MAX_DIRECT_BATCH, Batch, Dispatcher, Handlers, Run, encode_items
from procqueue._scheduler.states import TaskState as S
from procqueue._settings import Config

FAST_ITEM_NS = 50_000  # tasks shorter than this run unmarked in a tight loop (no timeout)
STOP_GRACE = 5.0  # seconds an idle worker gets to exit after Stop
MAX_BARREN_DEATHS = 5  # workers in a row that die before any outcome: the pool is broken
PREFETCH_NS = 40_000_000  # a worker gets a second batch while it holds less than this much estimated work
MAX_HELD = 2  # ... and never a third: the rest stays with the parent, for whichever worker frees first
COLLECTOR_RESTARTS = 5  # collector deaths in a row with nothing forwarded between them: the pool is broken
COLLECTOR_SILENCE = 2.0  # seconds without a result, while work is out, before we look whether it is stopped

log = logging.getLogger("procqueue")


@dataclass
class _Lost:
    """A dead worker whose WorkerGone the collector has not answered yet."""

    slot: Slot
    batches: list[Batch]
    running: tuple[int, int] | None  # (batch_id, index): index may be LOADING
    exitcode: int | None
    fault_text: str
    unmarked: bool = False  # it died inside an unmarked (fast) batch: requeue its items as careful
    charge: bool = True  # False when we killed it for a reason not its task's (stalled, collector gone)


@dataclass
class _Counts:
    """The pool's books (the manager writes them under the lock; `stats()` reads them)."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0  # for good, including in the parent (did not pickle)
    retried: int = 0
    dropped: int = 0
    cancelled: int = 0
    crashed: int = 0  # attempts
    timed_out: int = 0  # attempts
    attempts: int = 0
    in_flight: int = 0
    started: float | None = None  # the first submit
    stopped: float | None = None  # the pool's end


_live: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _shutdown_at_exit() -> None:
    # Runs before multiprocessing's own exit hook (atexit is last-in first-out),
    # which would otherwise join our workers forever. Like ProcessPoolExecutor,
    # exit waits for submitted work; Ctrl-C during that wait ends it at once.
    for engine in list(_live):
        try:
            engine.shutdown(wait=True, cancel=False)
        except KeyboardInterrupt:  # noqa: PERF203 - runs once per pool, at exit
            engine.terminate()


class Engine(Outcomes):
    """The running pool behind `Pool`: processes, manager thread, books."""

    def __init__(self, cfg: Config) -> None:
        _refuse_in_bootstrapping_child(cfg.start_method)
        self.cfg = cfg
        # What can fail on bad input fails before any process or thread starts.
        init = _pickle_initializer(cfg)
        self.sampler = Sampler(cfg.monitor, cfg.max_worker_memory)  # a bad log path or a busy port
        try:
            self._start(cfg, init)
        except BaseException as exc:
            self._abort_start()
            if isinstance(exc, OSError | EOFError):  # EOFError: the fork server could not take our descriptors
                raise PoolStartError(_start_advice(exc)) from exc
            raise
        _live.add(self)

    def _start(self, cfg: Config, init: bytes | None) -> None:
        self._recycle: list[tuple[int, int]] = []  # (slot, pid) past max_worker_memory, from the sampler
        self.ctx = multiprocessing.get_context(cfg.start_method)
        if cfg.start_method == "forkserver":
            _preload_in_forkserver()
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.runner = Runner()
        self.rng = random.Random()
        self.dispatcher = Dispatcher(cfg.capacity)
        self.handlers = Handlers()
        self._next_id = 1
        self.feeders: list[Any] = []  # maps over sequences, fed by the manager thread
        self.batches: dict[int, Batch] = {}
        self.lost: dict[int, _Lost] = {}
        self.counts = _Counts()
        self.ledger = states.Ledger() if os.environ.get("PROCQUEUE_VALIDATE") == "1" else None
        self.dispatcher.ledger = self.ledger
        self.closed = False  # no more submits
        self.broken: ProcQueueError | None = None
        self.phase = "running"  # -> "stopping" -> "draining" -> "done"
        self.books_error: BaseException | None = None  # validate mode: what the ledger caught
        self._woken = False
        self._barren_deaths = 0
        self._collector_deaths = 0  # in a row, with nothing forwarded between them
        self._heard = self._asked = time.monotonic()  # the collector's last result; the last look at it
        self._stop_deadline = float("inf")
        self.sink_error: m.SinkFailed | None = None
        self._wake_r = self._wake_w = -1
        self.sel = selectors.DefaultSelector()

        token = secrets.token_bytes(framing.TOKEN_SIZE)
        self._counters: Any = self.ctx.RawArray("q", layout.COUNTERS)  # type: ignore[attr-defined]
        self.collector_counts = memoryview(self._counters).cast("B").cast("q")
        self.collector = CollectorLink(self.ctx, token, self._counters, _frame_limit(), cfg.sink)
        self.supervisor = Supervisor(self.ctx, cfg.workers, token, init)
        self.collector.start(self.supervisor.pdeathsig_safe())
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._watch_collector()
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        for slot in self.supervisor.slots:
            self._spawn(slot, raising=True)
        self.thread = threading.Thread(target=self._main, name="procqueue-manager", daemon=True)
        self.supervisor.manager = self.thread
        self.thread.start()
        self.sampler.start(self)

    def _watch_collector(self) -> None:
        assert self.collector.results is not None
        self.sel.register(self.collector.results, selectors.EVENT_READ, "results")
        self.sel.register(self.collector.sentinel, selectors.EVENT_READ, ("collector", self.collector.generation))
        self._out_fd: int | None = None  # registered for writing while the outbox waits

    def _abort_start(self) -> None:
        """Start-up failed part way: end and close whatever did start."""
        supervisor: Supervisor | None = getattr(self, "supervisor", None)
        if supervisor is not None:
            for slot in supervisor.slots:
                if slot.alive:
                    supervisor.kill(slot)
                    supervisor.reap(slot)
        collector: CollectorLink | None = getattr(self, "collector", None)
        if collector is not None:
            collector.close(kill=True)
        for fd in (getattr(self, "_wake_r", -1), getattr(self, "_wake_w", -1)):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        sel = getattr(self, "sel", None)
        if sel is not None:
            sel.close()
        self.sampler.stop()

    # --- called from user threads ----------------------------------------------------

    def wake(self) -> None:
        """Make the manager look again (call with the lock held)."""
        # _wake_w is -1 once closed: a late wake (a finalizer) must not write to a
        # descriptor number that now belongs to someone else.
        if not self._woken and self._wake_w >= 0:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"!")

    def reserve_ids_locked(self, n: int) -> int:
        first = self._next_id
        self._next_id += n
        return first

    def add_feeder(self, feeder: Any) -> None:
        """A map over a sequence: the manager feeds it as room frees."""
        with self.lock:
            self.check_open()
            feeder.order = next(self.dispatcher.seq)  # its place in line among equal priorities
            self.feeders.append(feeder)
            self.feeders.sort(key=lambda f: (-f.opts.priority, f.order))
            self.wake()

    def send_control(self, msg: object) -> None:
        """A message to the collector, from any thread; never blocks (see `_collector_link.py`)."""
        self.collector.send(msg)
        if self.collector.outbox:  # the pipe is full: the manager writes the rest when it drains
            with contextlib.suppress(OSError):
                if self._wake_w >= 0:
                    os.write(self._wake_w, b"!")

    def sink_records(self, records: list[tuple[int, int, bytes]]) -> None:
        """Records for the collector to write to its sink (`_sink.py`), from any thread."""
        if records:
            self.send_control(m.SinkRecords(records))

    def output_status(self) -> OutputStatus:
        """How the collector's writing of a `FileOutput` goes (any thread)."""
        failed = self.sink_error
        return OutputStatus(
            int(self.collector_counts[layout.WRITTEN]),
            None if failed is None else failed.message,
            failed is not None and failed.broken_pipe,
        )

    def check_open(self) -> None:
        if self.broken is not None:
            raise self.broken
        if self.closed:
            raise PoolClosed("cannot submit to a pool that was shut down; create a new Pool")

    def enqueue(self, run: Run, mode: str, block_timeout: float | None, later: Later) -> None:
        """Accept a run into the heap, applying backpressure when it does not fit."""
        n = len(run.items)
        with self.cv:
            self.check_open()
            if self.dispatcher.room() < n:
                if mode == "error":
                    raise QueueFull(
                        f"the pending queue is full ({self.cfg.capacity} tasks); wait, raise capacity, "
                        'or use backpressure="block"',
                        capacity=self.cfg.capacity,
                    )
                if mode == "drop":
                    self._account_new(run, n)
                    self.counts.dropped += n
                    self._moves(run, 0, n, S.DROPPED)
                    err = Dropped(
                        f"task {run.first_id} was dropped: the pending queue was full ({self.cfg.capacity} tasks)",
                        task_id=run.first_id,
                    )
                    for j in range(n):
                        run.sink.fail(run.base + j, err, 0, None, later)
                    self.cv.notify_all()
                    return
                deadline = None if block_timeout is None else time.monotonic() + block_timeout
                while self.dispatcher.room() < n and self.dispatcher.pending > 0:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise QueueFull(
                            f"the pending queue stayed full ({self.cfg.capacity} tasks) for {block_timeout} s",
                            capacity=self.cfg.capacity,
                        )
                    self.cv.wait(left)
                    self.check_open()
            self._accept(run)
            self.wake()

    def reject_new(self, run: Run, exc: BaseException, later: Later) -> None:
        """A submitted task that failed before it was queued (it would not pickle)."""
        with self.cv:
            self.check_open()
            self._account_new(run, len(run.items))
            self._moves(run, 0, len(run.items), S.PENDING)
            for j in range(len(run.items)):
                self._reject(run, j, exc, later)

    def _accept(self, run: Run) -> None:
        n = len(run.items)
        self._account_new(run, n)
        self._moves(run, 0, n, S.PENDING)
        self.dispatcher.push(run)

    def _account_new(self, run: Run, n: int) -> None:
        self.counts.submitted += n
        if self.counts.started is None:
            self.counts.started = time.monotonic()

    def _next_feeder(self) -> Any:
        """The map to cut the next batch from, if it outranks the heap (lock held)."""
        feeders = self.feeders
        i = 0
        while i < len(feeders):
            f = feeders[i]
            if f.pos >= len(f.seq) and not f.input_done and not f.stream.cancelled and self.broken is None:
                i += 1  # its consumer has not pulled more input yet
                continue
            if f.stream.cancelled or self.broken is not None or f.pos >= len(f.seq):
                f.exhausted = True
                feeders.pop(i)
                self.cv.notify_all()
                continue
            heap = self.dispatcher.heap
            if heap and heap[0][:2] <= (-f.opts.priority, f.order):
                # Something more urgent or older waits in the heap; at a tie, the map's own
                # retries and requeues, which its consumer may be waiting for.
                return None
            if self._window_left(f, self.feeder_batch(f)) <= 0:
                i += 1  # its consumer is not reading (parked, or slow): the next map may go
                continue
            return f
        return None

    def _window_left(self, f: Any, batch: int) -> int:
        """How many more of a map's items may be cut before its consumer reads some (lock held)."""
        if self.closed:  # after shutdown no one may be reading yet: run it all, as Executor.map
            return int(len(f.seq) - f.pos)
        window = max(f.limit, 2 * len(self.supervisor.slots) * batch)
        return int(window - f.stream.outstanding)

    def feeder_batch(self, f: Any) -> int:
        """Items per batch cut from a map's input (lock held)."""
        if f.size:
            return int(f.size)
        workers = len(self.supervisor.slots)
        if f.managed:
            return self.dispatcher.direct_size(f.handler, len(f.seq), len(f.seq) - f.pos, workers)
        unknown = MAX_DIRECT_BATCH * 4 * workers  # an iterator's length: no tail to plan for
        return self.dispatcher.direct_size(f.handler, unknown, unknown, workers)

    def feeder_want(self, f: Any) -> int:
        """How many items an iterator map's consumer should pull now: `capacity` or a
        batch per worker waiting in the buffer, whichever is more, within the window
        of unconsumed results (lock held)."""
        n = self.feeder_batch(f)
        workers = len(self.supervisor.slots)
        buffered: int = len(f.seq) - f.pos
        window: int = max(f.limit, 2 * workers * n)
        target = max(self.cfg.capacity, n * workers)
        return max(0, min(target - buffered, window - int(f.stream.outstanding) - buffered))

    def wait_until(self, ready: Callable[[], bool], deadline: float | None) -> None:
        """Sleep until `ready()` (checked under the lock) or the deadline (TimeoutError)."""
        with self.cv:
            while not ready():
                if self.broken is not None:
                    raise self.broken
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("map: the next result was not ready within the timeout")
                self.cv.wait(left)

    def abandon(self, stream: Stream) -> None:
        """The consumer of a map went away: cancel what did not start.

        Takes no lock: it may run in a generator's finalizer, which the cyclic
        garbage collector can call on any thread, the manager's included, while
        the engine lock is held. Setting two flags and writing to the wake-up
        pipe is safe there; the manager does the rest."""
        stream.cancelled = True
        fd = self._wake_w
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, b"!")

    def shutdown(self, wait: bool, cancel: bool) -> None:
        later: Later = []
        with deferring(), self.cv:
            self.closed = True
            if cancel:
                self.dispatcher.cancel_all(self._on_cancel)
                for f in self.feeders:  # the rest of their input is not read
                    f.exhausted, f.input_done = True, True
                    f.error = CancelledError("the pool was shut down with cancel_futures=True")
                self.feeders.clear()
            for f in self.feeders:
                if not f.managed and not f.input_done:  # what was read still runs; then this
                    f.input_done = True
                    f.error = PoolClosed(
                        "the pool was shut down before this map's input was read to the end; "
                        "iterate the results inside the `with` block, or pass a list"
                    )
            self.cv.notify_all()
            self.wake()
        run_all(later)
        if wait and self._may_join():
            self.thread.join()
            self.runner.join()  # callbacks of the last futures, as ProcessPoolExecutor's shutdown waits for them
            if self.books_error is not None:
                raise self.books_error

    def terminate(self) -> None:
        """End now: kill the workers, fail what is outstanding (Ctrl-C, fatal errors)."""
        self._break(PoolClosed("the pool was terminated before this task finished"))
        with self.lock:
            self.wake()
        if self._may_join():
            self.thread.join()

    def _may_join(self) -> bool:
        """The manager ends by stopping the monitor: neither thread may wait for it."""
        return threading.current_thread() not in (self.thread, self.sampler.thread)

    def stats(self) -> Stats:
        return self.sampler.stats()

    # --- called from the monitor thread ------------------------------------------------

    def pids(self) -> list[int]:
        """Worker and collector pids to sample."""
        with self.lock:
            pids = [s.pid for s in self.supervisor.slots if s.pid > 0]
            if self.phase != "done" and self.collector.pid > 0:
                pids.append(self.collector.pid)
        return pids

    def task_running(self, slot: Slot) -> int | None:
        """The task id a worker's marker points at (lock held); None between tasks or in an unmarked batch."""
        now = self.supervisor.running(slot)
        if now is None or now[1] < 0:
            return None
        batch = self.batches.get(now[0])
        if batch is None or batch.slot != slot.index:
            return None
        for run, j, _, _ in batch.locate(now[1], now[1] + 1):
            return run.first_id + j
        return None

    def recycle(self, index: int, pid: int) -> None:
        """The sampler saw worker `pid` past max_worker_memory: the manager retires it."""
        with self.lock:
            self._recycle.append((index, pid))
            self.wake()

    # --- the manager thread --------------------------------------------------------------

    def _main(self) -> None:
        mark_internal()  # futures settled here hand their callbacks to the runner
        try:
            self._serve()
        except BaseException as exc:  # a bug in procqueue: fail loudly, leave nothing running
            self.books_error = exc
            self._break(PoolBroken(f"procqueue's manager thread failed: {type(exc).__name__}: {exc}"))
            for slot in self.supervisor.slots:
                self.supervisor.kill(slot)
            raise
        finally:
            self._close()

    def _serve(self) -> None:
        sel = self.sel
        while self.phase != "done":
            later: Later = []
            with self.lock:
                self._woken = False
                if self._recycle:
                    self._retire_over_memory()
                now = time.monotonic()
                self._respawn_due(now)
                self.dispatcher.promote(now)
                before = self.dispatcher.pending
                reserved = self._dispatch(later)
                if self.dispatcher.pending < before:
                    self.cv.notify_all()  # room freed: wake blocked submitters and map feeders
            run_all(later)
            self._send_reserved(reserved)
            with self.lock:
                self._advance_phase()
            if self.phase == "done":
                break
            self._watch_outbox()
            for key, _mask in sel.select(self._timeout()):
                what = key.data
                if what == "results":
                    self._on_results()
                elif what == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif what == "out":
                    self.collector.flush()
                elif what[0] == "collector":
                    if what[1] == self.collector.generation:
                        self._on_collector_died()
                else:
                    kind, slot, generation = what
                    if generation != slot.generation:
                        pass  # stale: that worker died earlier in this same batch of events
                    elif kind == "dead":
                        self._on_dead(slot)
                    elif not self.supervisor.flush(slot):
                        sel.unregister(slot.fd)
            self.supervisor.enforce_timeouts()
            self._check_collector()

    def _watch_outbox(self) -> None:
        """Wait for room in the collector's pipe while the outbox holds something."""
        fd = self.collector.waiting_fd()
        if fd == self._out_fd:
            return
        if self._out_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self._out_fd)
        self._out_fd = fd
        if fd is not None:
            self.sel.register(fd, selectors.EVENT_WRITE, "out")

    def _check_collector(self) -> None:
        """A collector stopped from outside (SIGSTOP) forwards nothing and never dies: while
        work is out and it has been silent a while, ask the kernel; if it is stopped, kill it
        (it is restarted like a killed one)."""
        now = time.monotonic()
        if not self.batches or now - self._heard < COLLECTOR_SILENCE or now - self._asked < COLLECTOR_SILENCE:
            return
        self._asked = now
        import psutil

        with contextlib.suppress(psutil.Error):
            if psutil.Process(self.collector.pid).status() == psutil.STATUS_STOPPED:
                log.warning("procqueue: the collector (pid %d) is stopped; killing it", self.collector.pid)
                os.kill(self.collector.pid, signal.SIGKILL)

    def _timeout(self) -> float | None:
        due = self.dispatcher.next_due()
        if self.batches:  # the collector's silence is checked this often while work is out
            due = (
                min(due, time.monotonic() + COLLECTOR_SILENCE)
                if due is not None
                else time.monotonic() + COLLECTOR_SILENCE
            )
        if self.phase == "stopping" and self._stop_deadline != float("inf"):
            due = self._stop_deadline if due is None else min(due, self._stop_deadline)
        nxt = None if due is None else max(0.0, due - time.monotonic())
        t = self.supervisor.next_deadline()
        return t if nxt is None else nxt if t is None else min(nxt, t)

    def _retire_over_memory(self) -> None:
        for index, pid in self._recycle:
            slot = self.supervisor.slots[index]
            if slot.pid == pid and slot.alive and not slot.retiring and self.phase == "running":
                self._retire(slot)
        self._recycle.clear()

    def _retire(self, slot: Slot) -> None:
        """Let the worker finish what it holds, then exit; a fresh one takes its slot."""
        slot.retiring = True
        slot.recycled += 1
        self._send(slot, framing.frame_parts(m.Stop()))

    def _send(self, slot: Slot, parts: list[bytes | memoryview]) -> None:
        if self.supervisor.send(slot, parts):
            with contextlib.suppress(KeyError):
                self.sel.register(slot.fd, selectors.EVENT_WRITE, ("write", slot, slot.generation))

    def _spawn(self, slot: Slot, raising: bool = False) -> None:
        """Start a worker in `slot`. A failure (out of descriptors, say) is tried
        again with backoff, or, at the pool's start (`raising`), raised."""
        try:
            theirs = self.supervisor.spawn(slot)
        except OSError as exc:
            if raising:
                raise
            delay = self.supervisor.spawn_failed(slot)
            log.warning("procqueue: could not start worker %d (%s); trying again in %.2f s", slot.index, exc, delay)
            return
        slot.collector_generation = self.collector.generation
        self.collector.link(slot.index, slot.pid, theirs)
        self.sel.register(slot.death_fd, selectors.EVENT_READ, ("dead", slot, slot.generation))

    def _respawn_due(self, now: float) -> None:
        for slot in self.supervisor.slots:
            if slot.respawn_at is not None and slot.respawn_at <= now and not slot.alive:
                if self.phase == "running" and self.broken is None:
                    self._spawn(slot)
                else:
                    slot.respawn_at = None

    # --- dispatch ---------------------------------------------------------------------

    def _dispatch(self, later: Later) -> list[Batch]:
        """Decide what each worker gets next (lock held); the batches are sent by
        `_send_reserved`, after the lock is released."""
        reserved: list[Batch] = []
        if self.phase != "running" or self.broken is not None:
            return reserved
        slots = self.supervisor.slots
        heap = self.dispatcher.heap
        progress = True
        while progress:  # round robin, one batch per slot per round
            progress = False
            for slot in slots:
                if not slot.alive or slot.retiring or self._task_limit(slot) == 0:
                    continue
                f = self._next_feeder() if self.feeders else None
                batch = None
                if f is not None and self._has_room(slot, f.handler.est_ns):
                    batch = self._cut_from_sequence(f, slot)
                if batch is None and heap and self._has_room(slot, heap[0][-1].handler.est_ns):
                    batch = self._take_from_heap(slot, later)
                if batch is not None:
                    reserved.append(batch)
                    progress = True
        return reserved

    def _has_room(self, slot: Slot, est: float | None) -> bool:
        """The prefetch rule: a worker gets a second batch only while what it holds
        (`est` is the next batch's cost per item, None when unmeasured) is under
        ~PREFETCH_NS of estimated work; never a third."""
        if not slot.batches:
            return True
        if est is None or len(slot.batches) >= MAX_HELD:
            return False
        queued = 0.0
        for b in slot.batches.values():
            e = b.head.handler.est_ns
            if e is None:
                return False
            queued += (b.count - b.done) * e
        return queued < PREFETCH_NS

    def _task_limit(self, slot: Slot) -> int | None:
        cap = self.cfg.max_tasks_per_worker
        return None if cap is None else cap - slot.tasks_sent

    def _take_from_heap(self, slot: Slot, later: Later) -> Batch | None:
        segments = self.dispatcher.take(self._task_limit(slot), lambda r, s, n: self._on_cancel(r, s, n, later))
        return self._reserve(slot, segments) if segments else None

    def _cut_from_sequence(self, f: Any, slot: Slot) -> Batch | None:
        """A batch cut straight from a map's list, tuple or range: it never waits in
        the heap, so `capacity` does not cap its size. None when the map's window
        of unconsumed results is full."""
        left = len(f.seq) - f.pos
        n = self.feeder_batch(f)
        n = min(n, self._window_left(f, n))
        limit = self._task_limit(slot)
        n = min(n, left, n if limit is None else limit)
        if n <= 0:
            return None
        items = list(f.seq[f.pos : f.pos + n])  # slicing a list, tuple or range runs no user code
        f.pos += n
        run = f.make_run(items, self.reserve_ids_locked(n))
        run.seq = f.order  # retries and requeues keep the map's place in line
        self._account_new(run, n)
        self._moves(run, 0, n, S.PENDING)
        run.pos = n
        if not f.managed:
            self.cv.notify_all()  # its consumer may pull more input
        return self._reserve(slot, [(run, 0, n)])

    def _reserve(self, slot: Slot, segments: list[tuple[Run, int, int]]) -> Batch:
        """Book a batch to a worker (lock held): it counts as held from now on."""
        count = sum(n for _, _, n in segments)
        batch = Batch(next(self.dispatcher.batch_ids), segments, count, slot.index)
        for r, s, n in segments:
            self._moves(r, s, n, S.DISPATCHED)
        self.batches[batch.batch_id] = batch
        slot.batches[batch.batch_id] = batch
        slot.tasks_sent += count
        self.counts.in_flight += count
        if len(slot.batches) == 1:
            slot.idle_since = None  # its stall clock starts when it is first seen idle holding this
        return batch

    def _send_reserved(self, reserved: list[Batch]) -> None:
        """Pickle and send the batches `_dispatch` booked. Pickling runs user code
        (`__reduce__`, `__getstate__`), so it happens without the lock; an item that
        does not pickle fails alone, naming the argument, and its batch goes back."""
        later: Later = []
        for batch in reserved:
            run = batch.head
            rejected: list[tuple[Run, int, BaseException]] = []
            payload: list[bytes | memoryview] = []
            try:
                blob = run.handler.wire()
                payload, _ = encode_items(batch.segments, partial(_collect, rejected))
            except BaseException as exc:  # a handler that will not pickle (or a bug): its tasks fail, not the pool
                blob, err = b"", exc if isinstance(exc, ProcQueueError) else _encode_failure(exc)
                rejected = [(r, j, err) for r, s, n in batch.segments for j in range(s, s + n)]
            with self.cv:
                slot = self.supervisor.slots[batch.slot]
                if self.batches.get(batch.batch_id) is not batch or slot.batches.get(batch.batch_id) is not batch:
                    continue  # settled meanwhile (the pool broke, the worker died)
                if rejected:
                    self._unreserve(batch, rejected, later)
                    continue
                est = run.handler.est_ns
                careful = run.careful or run.timeout is not None or est is None or est > FAST_ITEM_NS
                msg = m.RunBatch(
                    batch.batch_id, batch.count, run.handler.id, None if slot.knows(run.handler.id) else blob,
                    run.call, run.attempt, run.retries, careful, run.by_value, run.packed, has_futures(batch.segments),
                )  # fmt: skip
                self._send(slot, framing.frame_parts(msg, payload))
                cap = self.cfg.max_tasks_per_worker
                if cap is not None and slot.tasks_sent >= cap and not slot.retiring:
                    self._retire(slot)
        run_all(later)

    def _unreserve(self, batch: Batch, rejected: list[tuple[Run, int, BaseException]], later: Later) -> None:
        """Some of a booked batch's items would not pickle: they fail; the rest go back to the heap."""
        self._finish_batch(batch)
        slot = self.supervisor.slots[batch.slot]
        slot.tasks_sent -= batch.count
        self.counts.in_flight -= batch.count
        bad = {(id(r), j) for r, j, _ in rejected}
        for r, j, exc in rejected:
            self._reject(r, j, exc, later)
        again = [(r, j) for r, s, n in batch.segments for j in range(s, s + n) if (id(r), j) not in bad]
        for r, j in again:
            self._moves(r, j, 1, S.PENDING)
        self._requeue(again, careful=False)
        self.cv.notify_all()

    # --- outcomes ---------------------------------------------------------------------

    def _on_results(self) -> None:
        frames, ended = self.collector.read()
        later: Later = []
        for frame in frames:
            try:
                msg, body = framing.decode(frame)
            except Exception as exc:  # only the collector writes here: a bug, not an attack
                log.error("procqueue: a message from the collector did not decode: %r", exc)
                continue
            match msg:
                case m.BatchResult():
                    self._collector_deaths = 0
                    self._heard = time.monotonic()
                    self._on_batch_result(msg, body, later)
                case m.WorkerGone():
                    with self.cv:
                        self._on_worker_gone(msg, later)
                        self.cv.notify_all()
                case m.InitFailed():
                    self._break(
                        InitializerFailed(
                            f"the worker initializer raised in worker pid {msg.pid}; no task can run. "
                            f"Fix the initializer.\n\nRemote traceback:\n{msg.traceback}",
                            remote_traceback=msg.traceback,
                        )
                    )
                case m.SinkFailed():
                    self.sink_error = msg
                    self._break(PoolBroken(f"the collector could not write the output: {msg.message}"))
                case m.CollectorDone():
                    with self.lock:
                        self.phase = "done"
                case _:
                    raise TypeError(f"parent got an unknown message {msg!r}")
        run_all(later)
        if ended and self.collector.reader.error is not None and self.phase != "done":
            log.error("procqueue: the collector's stream is corrupt (%s); restarting it", self.collector.reader.error)
            with contextlib.suppress(OSError, ValueError):
                self.collector.process.kill()

    # --- worker deaths ------------------------------------------------------------------

    def _on_dead(self, slot: Slot) -> None:
        self.sel.unregister(slot.death_fd)
        with contextlib.suppress(KeyError, ValueError):  # registered only while bytes wait for it
            self.sel.unregister(slot.fd)
        with self.lock:
            running = self.supervisor.running(slot)
            reason = slot.kill_reason
            batches = list(slot.batches.values())
            pid, tasks_sent = slot.pid, slot.tasks_sent
            ours = slot.collector_generation == self.collector.generation  # its socket went to this collector
        exitcode, fault_text = self.supervisor.reap(slot)
        at: tuple[int, int] | None = None
        if running is not None:
            batch_id, index, _ = running
            batch = self.batches.get(batch_id)
            if batch is not None and batch.slot == slot.index and index != layout.UNMARKED:
                at = (batch_id, index)
        with self.lock:
            unmarked = running is not None and running[1] == layout.UNMARKED
            # A worker we killed for being stalled, or because its collector died, is not its task's fault.
            # Exit 4: it lost its collector (killed), which is not its task's fault either.
            charge = reason not in ("stalled", "collector") and exitcode != layout.EXIT_ORPHANED
            self.lost[pid] = _Lost(slot, batches, at, exitcode, fault_text, unmarked, charge)
            slot.batches = {}
            init_failed = exitcode == layout.EXIT_INIT_FAILED and tasks_sent == 0
            # Dying outside any task, before any outcome, is the worker's own fault (imports,
            # start-up); a task that kills its worker is charged to the task instead.
            # SIGKILL is someone else's doing (a user, the OOM killer), not a failure to start.
            barren = exitcode not in (0, -signal.SIGKILL) and running is None
            barren = barren and not slot.productive and not slot.retiring and reason is None
            self._barren_deaths = self._barren_deaths + 1 if barren else 0
            unguarded = exitcode == layout.EXIT_UNGUARDED_MAIN and not slot.productive
            if (
                not unguarded
                and self.phase == "running"
                and self.broken is None
                and not init_failed
                and self._barren_deaths < MAX_BARREN_DEATHS
            ):
                self._spawn(slot)
        if unguarded and self.broken is None:
            self._break(PoolBroken(f"a worker process re-ran the main script and reached Pool(): {UNGUARDED}"))
        if self._barren_deaths >= MAX_BARREN_DEATHS and self.broken is None:
            self._break(
                PoolBroken(
                    f"{self._barren_deaths} workers in a row died before finishing any task "
                    f"(the last, pid {pid}, with {describe_exitcode(exitcode)}); the pool stopped respawning them. "
                    f"{_start_hint()}{_fault_note(fault_text)}"
                )
            )
        running_msg = None if at is None else m.Running(*at)
        if ours:
            self.send_control(m.WorkerLost(slot.index, pid, exitcode, reason == "timeout", running_msg))
        else:  # its collector is gone, and with it whatever the worker had sent: settle it here
            later: Later = []
            with self.cv:
                self._on_worker_gone(m.WorkerGone(slot.index, pid, exitcode, reason == "timeout", False), later)
                self.cv.notify_all()
            run_all(later)

    def _on_collector_died(self) -> None:
        """The collector ended without being asked (killed from outside, the OOM killer):
        start another. What it had forwarded is settled; what it had not is lost with
        it and runs again, uncharged: the books are the parent's, so nothing is counted
        twice. Its workers' sockets died with it, so they are replaced too."""
        old = self.collector
        self.sel.unregister(old.sentinel)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(old.results)  # type: ignore[arg-type]
        self._on_results()  # what it wrote before dying
        if self._out_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self._out_fd)
            self._out_fd = None
        if old.process is not None:
            old.process.join(1.0)  # its exit code, not None: the sentinel fires before it is reaped
        exitcode = old.process.exitcode if old.process is not None else None
        if exitcode == layout.EXIT_UNGUARDED_MAIN:
            self._break(
                PoolBroken(f"the pool's collector process re-ran the main script and reached Pool(): {UNGUARDED}")
            )
            with self.lock:
                self.phase = "done"
            return
        if self.phase in ("draining", "done"):
            with self.lock:
                self.phase = "done"  # every worker had ended and been settled
            return
        old.close(kill=True)
        self._collector_deaths += 1
        why = f"the collector process (pid {old.pid}) died ({describe_exitcode(exitcode)})"
        if self.cfg.sink is not None:
            # Records it held for the output are lost with it; `procqueue run --resume` redoes exactly those.
            self._break(PoolBroken(f"{why}; the output is complete up to what it wrote: run again with --resume"))
            with self.lock:
                self.phase = "done"
            return
        if self._collector_deaths > COLLECTOR_RESTARTS:
            self._break(PoolBroken(f"{why}, {self._collector_deaths} times in a row; the pool stopped restarting it"))
            with self.lock:
                self.phase = "done"
            return
        log.warning("procqueue: %s; starting another, and fresh workers", why)
        later: Later = []
        with self.cv:
            for pid in list(self.lost):  # workers whose WorkerGone it never answered
                lost = self.lost[pid]
                self._on_worker_gone(m.WorkerGone(lost.slot.index, pid, lost.exitcode, False, False), later)
            for slot in self.supervisor.slots:
                if slot.alive:
                    self.supervisor.kill(slot, "collector")
            self.cv.notify_all()
        run_all(later)
        try:
            self.collector.start(self.supervisor.pdeathsig_safe())
        except OSError as exc:
            self._break(PoolBroken(f"{why}, and another could not be started: {exc}"))
            with self.lock:
                self.phase = "done"
            return
        self._watch_collector()

    def _break(self, exc: ProcQueueError) -> None:
        """The pool cannot go on: fail everything outstanding with `exc`."""
        later: Later = []
        with self.cv:
            if self.broken is None:
                self.broken = exc
            self.closed = True
            self._fail_outstanding(self.broken, later)
            self.cv.notify_all()
        for slot in self.supervisor.slots:
            self.supervisor.kill(slot)
        run_all(later)

    # --- shutting down ------------------------------------------------------------------

    def _advance_phase(self) -> None:
        d = self.dispatcher
        idle = not d.heap and not d.delayed and not self.batches and not self.lost and not self.feeders
        if self.phase == "running" and self.closed and (idle or self.broken is not None):
            self.phase = "stopping"
            self._stop_deadline = time.monotonic() + STOP_GRACE
            for slot in self.supervisor.slots:
                if slot.alive and not slot.retiring:
                    slot.retiring = True
                    self._send(slot, framing.frame_parts(m.Stop()))
        if self.phase == "stopping" and time.monotonic() > self._stop_deadline:
            # Idle workers exit within milliseconds of Stop; one that does not is killed.
            stuck = [(s.index, s.pid) for s in self.supervisor.slots if s.alive]
            warnings.warn(
                f"procqueue: workers {stuck} did not exit within {STOP_GRACE} s of being stopped; killing them "
                f"(lost={list(self.lost)}, batches={list(self.batches)})",
                RuntimeWarning,
                stacklevel=1,
            )
            for slot in self.supervisor.slots:
                self.supervisor.kill(slot)
            self._stop_deadline = float("inf")
        if self.phase == "stopping" and not any(s.alive for s in self.supervisor.slots) and not self.lost:
            self.phase = "draining"
            self.send_control(m.Shutdown())

    def _close(self) -> None:
        for slot in self.supervisor.slots:
            if slot.alive:
                self.supervisor.kill(slot)
                self.supervisor.reap(slot)
        self.collector.close(kill=False)
        with self.lock:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        self.sel.close()
        if self.ledger is not None and self.broken is None:
            try:
                self.ledger.check_books()
            except states.InvalidTransition as exc:
                self.books_error = exc
        with self.cv:
            self.phase = "done"
            self.counts.stopped = time.monotonic()
            self.cv.notify_all()
        self.runner.close()
        self.sampler.stop()
        _live.discard(self)


def _preload_in_forkserver() -> None:
    """Have the fork server import the worker and collector once, so each new
    process starts from a copy instead of importing procqueue afresh (takes
    effect when the server starts; what is preloaded already stays)."""
    from multiprocessing import forkserver

    # Not '__main__': on 3.11 it is never run there anyway, and where it is (3.13.x+)
    # a script fed on stdin would fail in the server, an unguarded one start a pool there.
    now = getattr(forkserver._forkserver, "_preload_modules", None)
    have = [m for m in now or [] if m != "__main__"]
    want = have + [m for m in ("procqueue._local.worker", "procqueue._local.collector") if m not in have]
    if want != now:
        forkserver.set_forkserver_preload(want)


def _pickle_initializer(cfg: Config) -> bytes | None:
    if cfg.initializer is None:
        return None
    try:
        return dumps_callable((cfg.initializer, cfg.initargs))
    except Exception as exc:
        raise SerializationError(
            f"the initializer {getattr(cfg.initializer, '__qualname__', repr(cfg.initializer))} or its initargs "
            f"could not be pickled: {type(exc).__name__}: {exc}; pass a module-level function and picklable initargs",
            stage="initializer",
            what=repr(cfg.initializer),
            task_id=None,
        ) from exc


UNGUARDED = (
    "with the spawn and forkserver start methods every process of the pool imports the main script again "
    "(as __mp_main__), so its module-level code runs in each of them. Put the code that creates and uses "
    'the Pool under `if __name__ == "__main__":` (or in a function called from there)'
)


def _refuse_in_bootstrapping_child(method: str) -> None:
    """A child of a pool re-running an unguarded main script reached Pool(): say so
    and exit with a code the parent turns into the same advice."""
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    sys.stderr.write(
        f"procqueue: a child process (pid {os.getpid()}) reached Pool() while importing the main script: {UNGUARDED}\n"
    )
    sys.stderr.flush()
    os._exit(layout.EXIT_UNGUARDED_MAIN)


def _encode_failure(exc: BaseException) -> SerializationError:
    err = SerializationError(
        f"a batch could not be pickled: {type(exc).__name__}; pass picklable arguments",
        stage="argument",
        what=type(exc).__name__,
        task_id=None,
    )
    err.__cause__ = exc
    return err


def _collect(into: list[tuple[Run, int, BaseException]], run: Run, j: int, exc: BaseException) -> None:
    into.append((run, j, exc))


def _frame_limit() -> int:
    """No frame between the pool's processes can be larger than the machine's memory."""
    import psutil

    try:
        return int(psutil.virtual_memory().total)
    except (OSError, RuntimeError):
        return 1 << 40


def _start_hint() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hint = "Check the worker's imports and initializer."
    if path:
        hint += (
            f" If {os.path.basename(path)} creates the pool at module level, put that code under "
            '`if __name__ == "__main__":` (each worker imports the script again).'
        )
    return hint


def _start_advice(exc: OSError | EOFError) -> str:
    """What to do when Pool() could not start its processes."""
    import errno

    what = f"{type(exc).__name__}: {exc}"
    code = getattr(exc, "errno", None)
    if code in (errno.EMFILE, errno.ENFILE) or isinstance(exc, EOFError):
        fix = "the process is out of file descriptors: close some, or raise the limit (ulimit -n)"
    elif code in (errno.EROFS, errno.ENOSPC, errno.EACCES) or "/dev/shm" in str(exc):
        fix = "shared memory is unavailable: mount a writable /dev/shm (in Docker: --shm-size=256m)"
    elif code in (errno.EAGAIN, errno.ENOMEM):
        fix = "the system would not start another process (ulimit -u, memory): free some, or use fewer workers"
    else:
        fix = "see the cause below"
    return f"the pool could not start its processes ({what}); {fix}. Nothing was left running."


def _fault_note(text: str) -> str:
    return f"\n\nfaulthandler in the worker wrote:\n{text.strip()}" if text.strip() else ""
