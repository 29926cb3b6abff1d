"""What `Pool.stats()` returns, and the psutil readings behind it."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from . import _collector as c

if TYPE_CHECKING:
    from ._engine import Engine


@dataclass(frozen=True)
class WorkerStats:
    """One worker process as last seen.

    `state` is "starting", "idle", "busy", "retiring" or "dead"; `rss` is in
    bytes; `tasks_done` counts attempts this worker slot finished (its
    predecessors included); `recycled` how often the slot's worker was replaced
    on purpose (task or memory limit).
    """

    pid: int
    cpu_percent: float
    rss: int
    tasks_done: int
    state: str
    slot: int = 0
    recycled: int = 0


@dataclass(frozen=True)
class Stats:
    """A snapshot of a pool. At rest, `submitted == completed + failed + dropped + cancelled`.

    - `submitted`: tasks accepted (not attempts);
    - `completed` / `failed`: tasks that ended with a value / an error;
    - `retried`: attempts that failed and were scheduled again;
    - `crashed` / `timed_out`: attempts that ended with their worker;
    - `dropped` / `cancelled`: tasks that never ran;
    - `pending`: queue depth (tasks in the heap); `retrying`: tasks waiting
      out a backoff; `in_flight`: tasks handed to workers;
    - `throughput`: tasks ended per second since the first submit;
    - `workers`: one `WorkerStats` per worker slot.
    """

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    dropped: int = 0
    cancelled: int = 0
    crashed: int = 0
    timed_out: int = 0
    pending: int = 0
    retrying: int = 0
    in_flight: int = 0
    throughput: float = 0.0
    elapsed: float = 0.0
    workers: list[WorkerStats] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        """True when every accepted task has exactly one final outcome."""
        return self.submitted == self.completed + self.failed + self.dropped + self.cancelled

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (workers as dicts), ready for `json.dumps`."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(self.as_dict(), separators=(",", ":"))


def read_process(pid: int) -> tuple[float, int]:
    """`(cpu_percent since the last call, rss)` of a process; zeros if it is gone."""
    try:
        proc = _procs.get(pid)
        if proc is None:
            proc = _procs[pid] = psutil.Process(pid)
        with proc.oneshot():
            return proc.cpu_percent(None), proc.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        _procs.pop(pid, None)
        return 0.0, 0


_procs: dict[int, psutil.Process] = {}


def snapshot(engine: Engine) -> Stats:
    """`Pool.stats()`: the parent's books and the collector's shared counters,
    read under the pool's lock (no message to any process), then psutil per worker."""
    counts_in = engine.collector_counts
    with engine.lock:
        books = engine.counts
        elapsed = time.monotonic() - books.started if books.started is not None else 0.0
        rows = []
        for slot in engine.supervisor.slots:
            if slot.process is None:
                state = "dead"
            elif slot.retiring:
                state = "retiring"
            else:
                state = "busy" if slot.batches else "idle"
            rows.append((slot.pid, counts_in[c.SLOTS + slot.index], state, slot.index, slot.recycled))
        completed = counts_in[c.COMPLETED] - books.unloadable
        failed = counts_in[c.FAILED] + books.rejected + books.unloadable
        ended = completed + failed + books.dropped + books.cancelled
        head = (
            books.submitted, completed, failed, counts_in[c.RETRIED], books.dropped, books.cancelled,
            counts_in[c.CRASHED], counts_in[c.TIMED_OUT], engine.dispatcher.pending, engine.dispatcher.waiting,
            books.in_flight, ended / elapsed if elapsed > 0 else 0.0, elapsed,
        )  # fmt: skip
    workers = []
    for pid, done, state, index, recycled in rows:
        cpu, rss = read_process(pid) if pid > 0 else (0.0, 0)
        workers.append(WorkerStats(pid, cpu, rss, done, state, index, recycled))
    return Stats(*head, workers=workers)
