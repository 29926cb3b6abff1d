"""The local backend's wiring: the processes, their channels and the manager's
selector, started and ended here, and what the monitor reads of them. The
diagram is in `procqueue/_local/__init__.py`; the manager thread's loop is
`manager.py`; the face the core sees is `backend.py`."""

from __future__ import annotations

import contextlib
import enum
import multiprocessing
import os
import selectors
import sys
from typing import TYPE_CHECKING, Any

from procqueue._backend import WorkerRow
from procqueue._errors import PoolStartError, SerializationError
from procqueue._local import fork_server, shm
from procqueue._local.collector_link import CollectorLink
from procqueue._local.supervisor import Slot, Supervisor
from procqueue._output import OutputStatus
from procqueue._protocol import framing, layout
from procqueue._protocol import messages as m
from procqueue._protocol.pickling import dumps_callable
from procqueue._scheduler.deaths import UNGUARDED

if TYPE_CHECKING:
    from procqueue._core import Core


class Phase(enum.Enum):
    """The manager's life: it stops workers once the pool is closed and idle, then
    waits for the collector to drain."""

    RUNNING = "running"
    STOPPING = "stopping"  # Stop sent to every worker
    DRAINING = "draining"  # every worker ended; Shutdown sent to the collector
    DONE = "done"


class Tag(enum.Enum):
    """What a descriptor in the manager's selector is."""

    RESULTS = "results"  # the collector's results pipe
    WAKE = "wake"  # the wake-up pipe
    OUTBOX = "outbox"  # the collector's control pipe has room again
    COLLECTOR = "collector"  # the collector's sentinel (with its generation)
    DEAD = "dead"  # a worker's pidfd (with its slot and generation)
    WRITABLE = "writable"  # a worker's task pipe has room again (with its slot and generation)


class Wiring:
    """Worker processes on this machine, a collector, and the manager's selector."""

    def __init__(self, core: Core) -> None:
        refuse_in_bootstrapping_child(core.cfg.start_method)
        self.core = core
        self.cfg = cfg = core.cfg
        self.init = pickle_initializer(cfg.initializer, cfg.initargs)  # before any process starts
        self.ctx = multiprocessing.get_context(cfg.start_method)
        self.phase = Phase.RUNNING
        self.recycle_due: list[tuple[int, int]] = []  # (seat, pid) past max_worker_memory, from the monitor
        self.output_error: m.OutputFailed | None = None
        self.wake_r = self.wake_w = -1
        self.woken = False
        self.sel = selectors.DefaultSelector()

    def start(self) -> None:
        try:
            self._start()
        except BaseException as exc:
            self._abort_start()
            if isinstance(exc, OSError | EOFError):  # EOFError: the fork server could not take our descriptors
                raise PoolStartError(start_advice(exc)) from exc
            raise

    def _start(self) -> None:
        cfg = self.cfg
        if cfg.start_method == "forkserver":
            start_forkserver(cfg.max_worker_memory)
        token = os.urandom(framing.TOKEN_SIZE)  # what secrets.token_bytes returns, without loading hmac and OpenSSL
        self._counters: Any = self.ctx.RawArray("q", layout.COUNTERS)  # type: ignore[attr-defined]
        self.collector_counts = memoryview(self._counters).cast("B").cast("q")
        self.collector = CollectorLink(self.ctx, token, self._counters, frame_limit(), cfg.output)
        self.supervisor = Supervisor(
            self.ctx, cfg.workers, token, self.init, shm.supported(), post_results=cfg.output is None
        )
        self.collector.start(self.supervisor.pdeathsig_safe())
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.watch_collector()
        self.sel.register(self.wake_r, selectors.EVENT_READ, (Tag.WAKE, None, 0))
        for slot in self.supervisor.slots:
            self.spawn(slot, raising=True)

    def _abort_start(self) -> None:
        """Start-up failed part way: end and close whatever did start."""
        supervisor: Supervisor | None = getattr(self, "supervisor", None)
        if supervisor is not None:
            for slot in supervisor.slots:
                if slot.alive:
                    supervisor.kill(slot)
                    supervisor.reap(slot)
            supervisor.close_sides()
        collector: CollectorLink | None = getattr(self, "collector", None)
        if collector is not None:
            collector.close(kill=True)
        self.close_wake()
        self.sel.close()

    def watch_collector(self) -> None:
        assert self.collector.results is not None
        self.sel.register(self.collector.results, selectors.EVENT_READ, (Tag.RESULTS, None, 0))
        self.sel.register(
            self.collector.sentinel, selectors.EVENT_READ, (Tag.COLLECTOR, None, self.collector.generation)
        )
        self.out_fd: int | None = None  # registered for writing while the outbox waits

    def spawn(self, slot: Slot, raising: bool = False) -> None:
        """Start a worker in `slot`. A failure (out of descriptors, say) is tried
        again with backoff, or, at the pool's start (`raising`), raised."""
        try:
            theirs = self.supervisor.spawn(slot)
        except OSError as exc:
            if raising:
                raise
            delay = self.supervisor.spawn_failed(slot)
            import logging

            logging.getLogger("procqueue").warning(
                "procqueue: could not start worker %d (%s); trying again in %.2f s", slot.index, exc, delay
            )
            return
        slot.collector_generation = self.collector.generation
        self.collector.link(slot.index, slot.pid, theirs)
        self.core.scheduler.worker_started(slot.index, slot.pid)
        self.sel.register(slot.death_fd, selectors.EVENT_READ, (Tag.DEAD, slot, slot.generation))

    def close_wake(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.wake_r = self.wake_w = -1

    # --- what the core and the monitor ask ------------------------------------------------------

    def wake(self) -> None:
        # wake_w is -1 once closed: a late wake (a finalizer) must not write to a
        # descriptor number that now belongs to someone else.
        fd = self.wake_w
        if not self.woken and fd >= 0:
            self.woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(fd, b"!")

    def kill_all(self) -> None:
        for slot in self.supervisor.slots:
            self.supervisor.kill(slot)
        with contextlib.suppress(OSError):
            if self.wake_w >= 0:
                os.write(self.wake_w, b"!")

    def recycle(self, seat: int, pid: int) -> None:
        with self.core.lock:
            self.recycle_due.append((seat, pid))
            self.wake()

    def pids(self) -> list[int]:
        pids = [s.pid for s in self.supervisor.slots if s.pid > 0]
        if self.phase is not Phase.DONE and self.collector.pid > 0:
            pids.append(self.collector.pid)
        return pids

    def worker_rows(self) -> list[WorkerRow]:
        s = self.core.scheduler
        rows = []
        for slot in self.supervisor.slots:
            seat = s.seats[slot.index]
            task_id = None
            if seat.batches:
                now = self.supervisor.running(slot)
                task_id = s.task_at(slot.index, None if now is None else (now[0], now[1]))
            if slot.process is None:
                state = "dead"
            elif seat.retiring:
                state = "recycling" if self.phase is Phase.RUNNING and not s.closed else "stopping"
            else:
                state = "running" if seat.batches else "idle"
            rows.append(
                WorkerRow(slot.pid, seat.tasks_done, state, slot.index, seat.recycled, task_id, deaths=seat.deaths)
            )
        return rows

    def helper(self) -> tuple[int, int] | None:
        if self.phase is Phase.DONE or self.collector.pid <= 0:
            return None
        return self.collector.pid, int(self.collector_counts[layout.FORWARDED])

    # --- FileOutput ------------------------------------------------------------------------

    def send_control(self, msg: object) -> None:
        """A message to the collector, from any thread; never blocks (see `collector_link.py`)."""
        self.collector.send(msg)
        if self.collector.outbox:  # the pipe is full: the manager writes the rest when it drains
            with contextlib.suppress(OSError):
                if self.wake_w >= 0:
                    os.write(self.wake_w, b"!")

    def write_output(self, records: list[tuple[int, int, bytes]]) -> None:
        """Records for the collector to write to the FileOutput, from any thread."""
        if records:
            self.send_control(m.OutputRecords(records))

    def output_status(self) -> OutputStatus:
        failed = self.output_error
        written = int(self.collector_counts[layout.WRITTEN])
        return OutputStatus(
            written, None if failed is None else failed.message, failed is not None and failed.broken_pipe
        )


# What the children need, loaded once in the fork server: their own modules, what
# unpickling their arguments loads (ctypes arrays), and the rest of the package, which
# `import procqueue` no longer brings (without it each pool's start took ~10 ms more).
PRELOAD = ("procqueue._local.worker", "procqueue._local.collector", "multiprocessing.sharedctypes", "procqueue._pool")
# An exec'd server loads cloudpickle too, for the handlers that travel by value (a forked
# server has it when the parent had pickled one by value before its first pool).
SERVER_PRELOAD = (*PRELOAD, "cloudpickle")


def start_forkserver(max_worker_memory: int | None) -> fork_server.Outcome:
    """Fork the fork server from this process where that is safe (`fork_server.py`);
    else have multiprocessing's exec'd server preload the package."""
    limit = fork_server.FORK_MAX_RSS
    if max_worker_memory is not None:  # the snapshot counts in each worker's RSS
        limit = min(limit, max_worker_memory // 2)
    outcome = fork_server.start(PRELOAD, limit)
    if outcome is not fork_server.Outcome.FORKED:
        preload_in_forkserver()
        if outcome is not fork_server.Outcome.RUNNING:
            import logging

            logging.getLogger("procqueue").debug("procqueue: the fork server is exec'd (%s)", outcome.value)
    return outcome


def preload_in_forkserver() -> None:
    """Have the fork server import the worker and collector once, so each new
    process starts from a copy instead of importing procqueue afresh (takes
    effect when the server starts; what is preloaded already stays)."""
    from multiprocessing import forkserver

    # Not '__main__': on 3.11 it is never run there anyway, and where it is (3.13.x+)
    # a script fed on stdin would fail in the server, an unguarded one start a pool there.
    now = getattr(forkserver._forkserver, "_preload_modules", None)
    have = [name for name in now or [] if name != "__main__"]
    want = have + [name for name in SERVER_PRELOAD if name not in have]
    if want != now:
        forkserver.set_forkserver_preload(want)


def pickle_initializer(initializer: Any, initargs: tuple[Any, ...]) -> bytes | None:
    if initializer is None:
        return None
    try:
        return dumps_callable((initializer, initargs))
    except Exception as exc:
        raise SerializationError(
            f"the initializer {getattr(initializer, '__qualname__', repr(initializer))} or its initargs "
            f"could not be pickled: {type(exc).__name__}: {exc}; pass a module-level function and picklable initargs",
            stage="initializer",
            what=repr(initializer),
            task_id=None,
        ) from exc


def refuse_in_bootstrapping_child(method: str) -> None:
    """A child of a pool re-running an unguarded main script reached Pool(): say so
    and exit with a code the parent turns into the same advice."""
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    sys.stderr.write(
        f"procqueue: a child process (pid {os.getpid()}) reached Pool() while importing the main script: {UNGUARDED}\n"
    )
    sys.stderr.flush()
    os._exit(layout.EXIT_UNGUARDED_MAIN)


def frame_limit() -> int:
    """No frame between the pool's processes can be larger than the machine's memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 1 << 40


def start_advice(exc: OSError | EOFError) -> str:
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
