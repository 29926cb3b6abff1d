"""The monitor: a sampler thread in the parent that reads psutil and the shared
counters every `interval`, and what `Pool.stats()` returns.

A sample never asks a worker or the collector anything: it reads the pool's
books under the lock, the collector's counters from shared memory, the
workers' markers (which task each one runs), and psutil for CPU and RSS. The
sampler is the one source of RSS readings: `max_worker_memory` recycling acts
on them. Sinks (a JSON Lines log, a Prometheus endpoint, `on_sample`) get each
sample from the sampler thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

from procqueue._backend import WorkerRow
from procqueue._stats import Counts, Stats, WorkerStats

if TYPE_CHECKING:
    import psutil


class Source(Protocol):
    """What the sampler reads: the pool's core (`procqueue/_core.py`)."""

    def pids(self) -> list[int]: ...

    def rows(self) -> tuple[Counts, float, list[WorkerRow], tuple[int, int] | None]: ...

    def recycle(self, seat: int, pid: int) -> None: ...

    @property
    def blocked(self) -> float: ...

    @property
    def throttled(self) -> int: ...


log = logging.getLogger("procqueue")


@dataclass(frozen=True)
class Monitor:
    """How a pool watches itself: `Pool(monitor=pq.Monitor(...))`.

    - `interval`: seconds between samples (default 1.0, at least 0.01);
    - `log`: a file path; one JSON line (`Stats.to_json()`) is appended per sample;
    - `prometheus_port`: serve Prometheus metrics at
      `http://{prometheus_host}:{port}/metrics` while the pool runs (0 picks a
      free port; see `Pool.prometheus_address`); needs
      `pip install 'procqueue[prometheus]'`;
    - `prometheus_host`: the address to listen on (default loopback only);
    - `on_sample`: called with each `Stats` in a thread of its own, so a slow
      sink never delays sampling or memory recycling; when it is slower than
      the interval it gets the latest sample and skips the ones in between.
      An exception it raises is logged (logger "procqueue") and sampling goes
      on. It must not hold a reference to the pool: a thread would then keep
      the pool alive, and only `shutdown()` (or the interpreter's exit) ends it;
    - `window`: seconds over which `Stats.throughput` is measured, and the
      time constant of `Stats.throughput_ewma` (default 10.0).

    `Pool(monitor=True)` (the default) is `Monitor()`; `monitor=0.5` is
    `Monitor(interval=0.5)`; `monitor=False` (or None) has no sinks and no
    sampler thread, unless `max_worker_memory` needs one to read RSS.
    """

    interval: float = 1.0
    log: str | os.PathLike[str] | None = None
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    on_sample: Callable[[Stats], object] | None = None
    window: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not (MIN_INTERVAL <= self.interval < math.inf):
            raise ValueError(
                f"Monitor interval must be a number of seconds >= {MIN_INTERVAL}, got {self.interval!r} "
                "(monitor=False turns the monitor off)"
            )
        if isinstance(self.window, bool) or not (0 < self.window < math.inf):
            raise ValueError(f"Monitor window must be a finite number of seconds > 0, got {self.window!r}")
        port = self.prometheus_port
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535):
            raise ValueError(f"prometheus_port must be an int in 0..65535 (0: any free port), got {port!r}")
        if self.log is not None and not isinstance(self.log, str | os.PathLike):
            raise TypeError(f"Monitor log must be a file path, got {self.log!r}")
        if self.on_sample is not None and not callable(self.on_sample):
            raise TypeError("on_sample must be callable")

    @staticmethod
    def of(value: bool | float | Monitor | None) -> Monitor | None:
        """The `monitor=` argument of `Pool` as a Monitor (None: off)."""
        if value is None or value is False:
            return None
        if value is True:
            return Monitor()
        if isinstance(value, Monitor):
            return value
        if isinstance(value, int | float):
            return Monitor(interval=float(value))
        raise TypeError(f"monitor must be True, False, an interval in seconds or a procqueue.Monitor, got {value!r}")


MIN_INTERVAL = 0.01
BASE_DELAY = 0.1  # seconds after the start when the sampler takes its first readings (at most interval / 2)
ON_DEMAND_SPAN = 0.5  # with no sampler, cpu_percent is measured over at least this many seconds


class Readings:
    """CPU and RSS per pid. CPU percent is measured from one reading to the next,
    but over at least `min_span` seconds, so callers from several threads share
    one measurement instead of splitting it into meaningless slivers."""

    def __init__(self, min_span: float = 0.0) -> None:
        self.min_span = min_span
        self._procs: dict[int, tuple[psutil.Process, float, float, float]] = {}  # proc, since, cpu s then, last %
        self._lock = threading.Lock()

    def read(self, pids: list[int], forget_others: bool = True) -> dict[int, tuple[float, int]]:
        """`{pid: (cpu_percent, rss)}`; zeros for a process that is gone."""
        out: dict[int, tuple[float, int]] = {}
        if not pids:  # a pool that is gone: nothing to read, and no psutil to load for it
            if forget_others:
                with self._lock:
                    self._procs.clear()
            return out
        import psutil  # here, on the sampler's thread: ~12 ms that a pool's start does without

        with self._lock:
            procs = self._procs
            for pid in pids:
                try:
                    now = time.monotonic()
                    entry = procs.get(pid)
                    proc = psutil.Process(pid) if entry is None else entry[0]
                    with proc.oneshot():
                        t = proc.cpu_times()
                        rss = proc.memory_info().rss
                    cpu_s = t.user + t.system
                    if entry is None:
                        procs[pid] = (proc, now, cpu_s, 0.0)
                        pct = 0.0
                    elif now - entry[1] >= self.min_span and now > entry[1]:
                        pct = max(0.0, 100 * (cpu_s - entry[2]) / (now - entry[1]))
                        procs[pid] = (proc, now, cpu_s, pct)
                    else:
                        pct = entry[3]
                    out[pid] = (pct, rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):  # noqa: PERF203
                    procs.pop(pid, None)
                    out[pid] = (0.0, 0)
            if forget_others:
                for gone in procs.keys() - out.keys():
                    del procs[gone]
        return out


def snapshot(
    source: Source, reader: Readings, readings: dict[int, tuple[float, int]] | None, rates: tuple[float, float] | None
) -> Stats:
    """The pool's books and its workers, read together under the pool's lock;
    then the per-process readings given (or `reader`'s psutil readings now, when None)."""
    head, elapsed, rows, helper = source.rows()
    completed, failed = head[1], head[2]
    if rates is None:
        mean = (completed + failed) / elapsed if elapsed > 0 else 0.0
        rates = (mean, mean)
    if readings is None:
        readings = reader.read([r.pid for r in rows if r.pid > 0], forget_others=False)
    workers = []
    for row in rows:
        cpu, rss = readings.get(row.pid, (0.0, 0)) if row.cpu is None else (row.cpu, row.rss or 0)
        workers.append(
            WorkerStats(row.pid, cpu, rss, row.tasks_done, row.state, row.seat, row.recycled, row.task_id, row.deaths)
        )
    collector = None
    if helper is not None and helper[0] in readings:
        cpu, rss = readings[helper[0]]
        collector = WorkerStats(helper[0], cpu, rss, helper[1], "running", -1)
    return Stats(*head, *rates, elapsed, time.time(), workers, collector, source.blocked, source.throttled)


class Rates:
    """Tasks completed or failed per second: over a recent window, and as an
    exponentially weighted average (bias-corrected, so the first samples are
    not dragged toward zero)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._history: deque[tuple[float, int]] = deque()
        self._raw = 0.0  # the weighted sum, and the weight it carries so far
        self._weight = 0.0

    def update(self, stats: Stats) -> tuple[float, float] | None:
        if stats.submitted == 0:
            return None
        now, ran = time.monotonic(), stats.completed + stats.failed
        hist = self._history
        if not hist:
            hist.append((now - stats.elapsed, 0))  # the first submit: nothing had run
        t_last, ran_last = hist[-1]
        hist.append((now, ran))
        while len(hist) > 2 and hist[1][0] <= now - self.window:
            hist.popleft()
        t0, ran0 = hist[0]
        recent = (ran - ran0) / (now - t0) if now > t0 else 0.0
        if now > t_last:
            keep = math.exp(-(now - t_last) / self.window)
            self._raw = keep * self._raw + (1 - keep) * (ran - ran_last) / (now - t_last)
            self._weight = keep * self._weight + (1 - keep)
        return recent, self._raw / self._weight if self._weight else recent


class Sampler:
    """The monitor of one pool: the sampler thread (readings, rates, memory
    recycling, the log) and, for `on_sample`, a sink thread of its own.

    Built before the pool starts any process (a bad log path or a busy port
    fails fast), started once the workers are up, stopped by the pool after
    they are gone (one last sample, so a log ends with the final counts).
    """

    def __init__(self, monitor: Monitor | None, max_memory: int | None) -> None:
        self.monitor = monitor
        self.max_memory = max_memory
        self.active = monitor is not None or max_memory is not None  # a thread samples
        self.interval = monitor.interval if monitor is not None else 1.0
        self.readings = Readings(0.0 if self.active else ON_DEMAND_SPAN)
        self.latest: dict[int, tuple[float, int]] = {}
        self._based = threading.Event()  # the sampler thread has taken its first readings
        self.rates: tuple[float, float] | None = None  # None until the first sample after a submit
        self.thread: threading.Thread | None = None
        self.sink_thread: threading.Thread | None = None
        self.prometheus_address: tuple[str, int] | None = None
        self._source: Source | None = None
        self._rates = Rates(monitor.window if monitor is not None else 10.0)
        self._stop = threading.Event()
        self._log: IO[str] | None = None
        self._server: Any = None
        self._outbox: list[Stats] = []  # the newest sample not yet given to on_sample
        self._outbox_cv = threading.Condition()
        self._sink_errors = 0
        if monitor is None:
            return
        if monitor.log is not None:
            try:
                self._log = open(monitor.log, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"the monitor log {os.fspath(monitor.log)!r} cannot be opened for appending: {exc.strerror}",
                ) from exc
        if monitor.prometheus_port is not None:
            from procqueue._monitor.prometheus import serve

            try:
                self._server, self.prometheus_address = serve(self, monitor.prometheus_host, monitor.prometheus_port)
            except BaseException:
                self.stop()
                raise

    @property
    def started(self) -> bool:
        return self._source is not None

    def start(self, source: Source) -> None:
        self._source = source
        if not self.active:
            return
        self.thread = threading.Thread(target=self._run, name="procqueue-monitor", daemon=True)
        self.thread.start()
        if self.monitor is not None and self.monitor.on_sample is not None:
            self.sink_thread = threading.Thread(target=self._sink, name="procqueue-monitor-sink", daemon=True)
            self.sink_thread.start()

    def stats(self) -> Stats:
        """`Pool.stats()`: fresh counters with the latest sample's readings and rates."""
        assert self._source is not None
        if self.thread is None:
            return snapshot(self._source, self.readings, None, None)
        if not self._based.is_set():  # the sampler has no readings yet: what it would read, now
            return snapshot(self._source, self.readings, self.readings.read(self._source.pids(), False), self.rates)
        return snapshot(self._source, self.readings, self.latest, self.rates)

    def stop(self) -> None:
        """One last sample, then end the threads and close the sinks (the pool calls this)."""
        self._stop.set()
        me = threading.current_thread()
        if self.thread is not None and self.thread is not me:
            self.thread.join()
        if self.sink_thread is not None:
            with self._outbox_cv:
                self._outbox_cv.notify_all()
            if self.sink_thread is not me:
                self.sink_thread.join(max(5.0, 2 * self.interval))
                if self.sink_thread.is_alive():
                    log.warning("procqueue: Monitor.on_sample is still running at shutdown; not waiting for it")
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _run(self) -> None:
        source = self._source
        assert source is not None
        # The base of the first sample's CPU figures, taken a moment after the start: loading
        # psutil (~12 ms) while a cold pool reaches its first result would only delay it.
        if not self._stop.wait(min(BASE_DELAY, self.interval / 2)):
            try:
                self.latest = self.readings.read(source.pids())
            except Exception:
                log.exception("procqueue: the monitor failed to take its first readings; it will try again")
        self._based.set()
        while not self._stop.wait(self.interval):
            self._sample()
        self._sample()

    def _sample(self) -> None:
        source = self._source
        assert source is not None
        try:
            self.latest = self.readings.read(source.pids())
            stats = snapshot(source, self.readings, self.latest, None)
            rates = self._rates.update(stats)
            if rates is not None:
                self.rates = rates
                stats = dataclasses.replace(stats, throughput=rates[0], throughput_ewma=rates[1])
            if self.max_memory is not None:
                for w in stats.workers:
                    if w.rss > self.max_memory and w.state in ("idle", "running"):
                        source.recycle(w.slot, w.pid)
            if self._log is not None:
                self._write_log(stats)
            if self.sink_thread is not None:
                with self._outbox_cv:
                    self._outbox[:] = [stats]
                    self._outbox_cv.notify()
        except Exception:
            log.exception("procqueue: the monitor failed to take a sample; it will try again")

    def _write_log(self, stats: Stats) -> None:
        assert self._log is not None and self.monitor is not None
        try:
            self._log.write(stats.to_json() + "\n")
            self._log.flush()
        except (OSError, ValueError):
            log.exception("procqueue: cannot write the monitor log %s; no more lines go to it", self.monitor.log)
            self._log = None

    def _sink(self) -> None:
        assert self.monitor is not None and self.monitor.on_sample is not None
        on_sample = self.monitor.on_sample
        while True:
            with self._outbox_cv:
                while not self._outbox and not (self._stop.is_set() and not self.thread_alive()):
                    self._outbox_cv.wait(self.interval)
                if not self._outbox:
                    return
                stats = self._outbox.pop()
            try:
                on_sample(stats)
            except Exception:
                self._sink_errors += 1
                if self._sink_errors == 1 or self._sink_errors % 100 == 0:
                    log.exception(
                        "procqueue: Monitor.on_sample raised (%d times so far); sampling goes on", self._sink_errors
                    )

    def thread_alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()
