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
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil

from . import _collector as c

if TYPE_CHECKING:
    from ._engine import Engine

log = logging.getLogger("procqueue")


@dataclass(frozen=True)
class WorkerStats:
    """One worker process (or the collector) as last sampled.

    - `pid`: its process id; -1 while the slot has no process;
    - `cpu_percent`: CPU used since the previous sample, in percent of one
      core (0.0 on the first sample of a new process);
    - `rss`: resident memory in bytes;
    - `tasks_done`: attempts finished in this slot, its predecessors'
      included (for the collector: attempts it accounted);
    - `state`: "idle"; "running" a task; "recycling" (it passed
      `max_tasks_per_worker` or `max_worker_memory`: it finishes what it holds,
      then a fresh worker takes the slot); "stopping" (the pool is shutting
      down); "dead" (no process right now: between a death and its
      replacement, or after shutdown);
    - `slot`: its position, 0 to workers-1 (-1 for the collector); a
      replacement worker takes over its predecessor's slot;
    - `recycled`: how many workers of this slot were replaced for a limit;
    - `task_id`: the task it runs (`Future.task_id`); None between tasks and
      inside a batch of tiny tasks (they are not marked one by one).
    """

    pid: int
    cpu_percent: float
    rss: int
    tasks_done: int
    state: str
    slot: int = 0
    recycled: int = 0
    task_id: int | None = None


@dataclass(frozen=True)
class Stats:
    """A snapshot of a pool. At rest, `submitted == completed + failed + dropped + cancelled`.

    Counters, fresh at every `Pool.stats()` call:

    - `submitted`: tasks accepted (tasks, not attempts);
    - `completed` / `failed`: tasks that ended with a value / an error;
    - `retried`: attempts that failed and were scheduled again;
    - `crashed` / `timed_out`: attempts that ended with their worker's death /
      past their timeout;
    - `dropped` / `cancelled`: tasks that never ran (backpressure "drop" /
      `cancel()` or `shutdown(cancel_futures=True)`);
    - `attempts`: attempts the collector accounted (each run of a task);
    - `pending`: the queue depth, tasks waiting in the heap; `retrying`: tasks
      waiting out a backoff; `in_flight`: tasks handed to workers and not yet
      ended;
    - `elapsed`: seconds since the first submit; `timestamp`: when this
      snapshot was taken (`time.time()`).

    Readings, as of the latest sample (every `Monitor.interval`):

    - `throughput`: tasks ended per second over the last `Monitor.window`
      seconds; `throughput_ewma`: the same rate, exponentially weighted with
      `window` as its time constant (smoother; what the ETA uses). Until the
      monitor has two samples, and with the monitor off, both are the mean
      since the first submit;
    - `workers`: one `WorkerStats` per worker slot, in slot order;
    - `collector`: the collector process (None with the monitor off).

    `as_dict()` and `to_json()` give the same as plain data.
    """

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    dropped: int = 0
    cancelled: int = 0
    crashed: int = 0
    timed_out: int = 0
    attempts: int = 0
    pending: int = 0
    retrying: int = 0
    in_flight: int = 0
    throughput: float = 0.0
    throughput_ewma: float = 0.0
    elapsed: float = 0.0
    timestamp: float = 0.0
    workers: list[WorkerStats] = field(default_factory=list)
    collector: WorkerStats | None = None

    @property
    def ended(self) -> int:
        """Tasks with their final outcome: completed, failed, dropped or cancelled."""
        return self.completed + self.failed + self.dropped + self.cancelled

    @property
    def balanced(self) -> bool:
        """True when every accepted task has exactly one final outcome."""
        return self.submitted == self.ended

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (workers as dicts), ready for `json.dumps`."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """One JSON line (no newline)."""
        return json.dumps(self.as_dict(), separators=(",", ":"))


@dataclass(frozen=True)
class Monitor:
    """How a pool watches itself: `Pool(monitor=pq.Monitor(...))`.

    - `interval`: seconds between samples (default 1.0);
    - `log`: a file path; one JSON line (`Stats.to_json()`) is appended per sample;
    - `prometheus_port`: serve Prometheus metrics at
      `http://{prometheus_host}:{port}/metrics` (0 picks a free port; see
      `Pool.prometheus_address`); needs `pip install 'procqueue[prometheus]'`;
    - `prometheus_host`: the address to listen on (default loopback only);
    - `on_sample`: called with each `Stats` from the monitor thread; keep it
      quick; an exception it raises is logged (logger "procqueue") and sampling
      goes on;
    - `window`: seconds over which `Stats.throughput` is measured, and the
      time constant of `Stats.throughput_ewma` (default 10.0).

    `Pool(monitor=True)` (the default) is `Monitor()`; `monitor=0.5` is
    `Monitor(interval=0.5)`; `monitor=False` turns the sampler off (it still
    runs, with no sinks, when `max_worker_memory` is set).
    """

    interval: float = 1.0
    log: str | Path | None = None
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    on_sample: Callable[[Stats], object] | None = None
    window: float = 10.0

    def __post_init__(self) -> None:
        if not (self.interval > 0 and math.isfinite(self.interval)):
            raise ValueError(f"Monitor interval must be a positive number of seconds, got {self.interval!r}")
        if not self.window > 0:
            raise ValueError(f"Monitor window must be > 0 seconds, got {self.window!r}")
        if self.prometheus_port is not None and not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port must be 0..65535, got {self.prometheus_port!r}")
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


class Readings:
    """psutil handles by pid, so `cpu_percent` measures since the previous reading."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self.lock = threading.Lock()

    def read(self, pids: list[int]) -> dict[int, tuple[float, int]]:
        """`{pid: (cpu_percent, rss)}`; zeros for a process that is gone."""
        out: dict[int, tuple[float, int]] = {}
        with self.lock:
            procs = self._procs
            for pid in pids:
                try:
                    proc = procs.get(pid)
                    if proc is None:
                        proc = procs[pid] = psutil.Process(pid)
                    with proc.oneshot():
                        out[pid] = (proc.cpu_percent(None), proc.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):  # noqa: PERF203
                    procs.pop(pid, None)
                    out[pid] = (0.0, 0)
            for gone in procs.keys() - out.keys():
                del procs[gone]
        return out


def snapshot(engine: Engine, readings: dict[int, tuple[float, int]] | None, rates: tuple[float, float] | None) -> Stats:
    """The pool's books and the collector's shared counters, read under the pool's
    lock; then the per-process readings given (or psutil now, when None)."""
    counts_in = engine.collector_counts
    sup = engine.supervisor
    with engine.lock:
        books = engine.counts
        elapsed = time.monotonic() - books.started if books.started is not None else 0.0
        rows = []
        for slot in sup.slots:
            task_id = engine.task_running(slot) if slot.batches else None
            if slot.process is None:
                state = "dead"
            elif slot.retiring:
                state = "recycling" if engine.phase == "running" and not engine.closed else "stopping"
            else:
                state = "running" if slot.batches else "idle"
            rows.append((slot.pid, counts_in[c.SLOTS + slot.index], state, slot.index, slot.recycled, task_id))
        completed = counts_in[c.COMPLETED] - books.unloadable
        failed = counts_in[c.FAILED] + books.rejected + books.unloadable
        ended = completed + failed + books.dropped + books.cancelled
        head = (
            books.submitted, completed, failed, counts_in[c.RETRIED], books.dropped, books.cancelled,
            counts_in[c.CRASHED], counts_in[c.TIMED_OUT], counts_in[c.ATTEMPTS], engine.dispatcher.pending,
            engine.dispatcher.waiting, books.in_flight,
        )  # fmt: skip
        collector_pid = engine.collector.pid if engine.phase != "done" else None
    if rates is None:
        mean = ended / elapsed if elapsed > 0 else 0.0
        rates = (mean, mean)
    if readings is None:
        readings = engine.sampler.readings.read([r[0] for r in rows if r[0] > 0])
    workers = []
    for pid, done, state, index, recycled, task_id in rows:
        cpu, rss = readings.get(pid, (0.0, 0))
        workers.append(WorkerStats(pid, cpu, rss, done, state, index, recycled, task_id))
    collector = None
    if collector_pid is not None and collector_pid in readings:
        cpu, rss = readings[collector_pid]
        collector = WorkerStats(collector_pid, cpu, rss, counts_in[c.ATTEMPTS], "running", -1)
    return Stats(*head, *rates, elapsed, time.time(), workers, collector)


class Sampler:
    """The monitor thread of one pool: samples, rates, memory recycling and sinks.

    Built before the pool starts any process (a bad log path or a busy port
    fails fast), started once the workers are up, stopped by the engine after
    they are gone (one last sample, so a log ends with the final counts).
    """

    def __init__(self, monitor: Monitor | None, max_memory: int | None) -> None:
        self.monitor = monitor
        self.max_memory = max_memory
        self.readings = Readings()
        self.latest: dict[int, tuple[float, int]] = {}
        self.rates: tuple[float, float] | None = None  # None until two samples: the mean since the first submit
        self.thread: threading.Thread | None = None
        self.prometheus_address: tuple[str, int] | None = None
        self._engine: Engine | None = None
        self._history: deque[tuple[float, int]] = deque()
        self._ewma: float | None = None
        self._stop = threading.Event()
        self._log: IO[str] | None = None
        self._server: Any = None
        if monitor is not None and monitor.log is not None:
            try:
                self._log = open(monitor.log, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
            except OSError as exc:
                raise ValueError(f"Monitor log {str(monitor.log)!r} cannot be opened for appending: {exc}") from exc
        if monitor is not None and monitor.prometheus_port is not None:
            from ._prometheus import serve

            try:
                self._server, self.prometheus_address = serve(self, monitor.prometheus_host, monitor.prometheus_port)
            except BaseException:
                self._close_sinks()
                raise

    @property
    def started(self) -> bool:
        return self._engine is not None

    @property
    def active(self) -> bool:
        """A thread samples (monitor on, or a memory limit to enforce)."""
        return self.monitor is not None or self.max_memory is not None

    def start(self, engine: Engine) -> None:
        self._engine = engine
        if self.active:
            self.latest = self.readings.read(engine.pids())  # primes cpu_percent for the first sample
            self.thread = threading.Thread(target=self._run, name="procqueue-monitor", daemon=True)
            self.thread.start()

    def stats(self) -> Stats:
        """`Pool.stats()`: fresh counters with the latest sample's readings and rates."""
        assert self._engine is not None
        if self.thread is None:
            return snapshot(self._engine, None, None)
        return snapshot(self._engine, self.latest, self.rates)

    def stop(self) -> None:
        """One last sample, then end the thread and close the sinks (the engine calls this)."""
        self._stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        self._close_sinks()

    def _run(self) -> None:
        interval = self.monitor.interval if self.monitor is not None else 1.0
        while not self._stop.wait(interval):
            self._sample()
        self._sample()

    def _sample(self) -> None:
        engine = self._engine
        assert engine is not None
        try:
            self.latest = self.readings.read(engine.pids())
            stats = snapshot(engine, self.latest, None)
            self.rates = self._rates(stats)
            if self.rates is not None:
                stats = dataclasses.replace(stats, throughput=self.rates[0], throughput_ewma=self.rates[1])
            if self.max_memory is not None:
                for w in stats.workers:
                    if w.rss > self.max_memory and w.state in ("idle", "running"):
                        engine.recycle(w.slot, w.pid)
            if self.monitor is not None:
                self._emit(stats)
        except Exception:
            log.exception("procqueue: the monitor failed to take a sample; it will try again")

    def _rates(self, stats: Stats) -> tuple[float, float] | None:
        """Recent-window and exponentially weighted rates of ended tasks, per second."""
        window = self.monitor.window if self.monitor is not None else 10.0
        now, ended = time.monotonic(), stats.ended
        started = now - stats.elapsed
        hist = self._history
        if not hist or stats.submitted == 0:
            hist.clear()
            hist.append((now, ended))
            return None
        t_last, e_last = hist[-1]
        hist.append((now, ended))
        while len(hist) > 2 and hist[1][0] <= now - window:
            hist.popleft()
        t0, e0 = hist[0]
        t0 = max(t0, started)
        recent = (ended - e0) / (now - t0) if now > t0 else 0.0
        t_last = max(t_last, started)
        if now > t_last:
            instant = (ended - e_last) / (now - t_last)
            if self._ewma is None:
                self._ewma = instant
            else:
                self._ewma += (1 - math.exp(-(now - t_last) / window)) * (instant - self._ewma)
        return recent, self._ewma or 0.0

    def _emit(self, stats: Stats) -> None:
        assert self.monitor is not None
        if self._log is not None:
            try:
                self._log.write(stats.to_json() + "\n")
                self._log.flush()
            except (OSError, ValueError):
                log.exception("procqueue: cannot write the monitor log %s; it is closed", self.monitor.log)
                self._log = None
        if self.monitor.on_sample is not None:
            try:
                self.monitor.on_sample(stats)
            except Exception:
                log.exception("procqueue: Monitor.on_sample raised; sampling goes on")

    def _close_sinks(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
