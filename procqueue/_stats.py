"""What `Pool.stats()` returns: the pool's counters and one row per worker."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# submitted, completed, failed, retried, dropped, cancelled, crashed, timed_out, attempts, pending, waiting, in_flight
Counts = tuple[int, int, int, int, int, int, int, int, int, int, int, int]


@dataclass(frozen=True)
class WorkerStats:
    """One worker process (or the collector) as last sampled.

    - `pid`: its process id; -1 while the slot has no process;
    - `cpu_percent`: CPU used since the previous sample, in percent of one
      core (0.0 on the first sample of a new process);
    - `rss`: resident memory in bytes (0 until a new process is first sampled);
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
      inside a batch of tiny tasks (they are not marked one by one);
    - `deaths`: how many workers of this slot died without the pool asking (a
      crash, a signal from outside such as the OOM killer's, `os._exit`),
      counted even when no task was charged for it (a batch of tiny tasks
      runs again, marked); timeouts are in `Stats.timed_out`.
    """

    pid: int
    cpu_percent: float
    rss: int
    tasks_done: int
    state: str
    slot: int = 0
    recycled: int = 0
    task_id: int | None = None
    deaths: int = 0


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
    - `elapsed`: seconds from the first submit to now (to the end, once the
      pool has shut down); `timestamp`: when this snapshot was taken
      (`time.time()`);
    - `blocked`: seconds submitters spent waiting for room under backpressure
      "block" (`submit`, `arun`, `asubmit`), summed over all of them;
    - `throttled`: dispatches held back by a rate limit (`rate=`).

    Readings, as of the latest sample (every `Monitor.interval`):

    - `throughput`: tasks completed or failed per second over the last
      `Monitor.window` seconds; `throughput_ewma`: the same rate,
      exponentially weighted with `window` as its time constant (smoother;
      what the ETA uses). Before the first sample, and with no sampler, both
      are the mean since the first submit;
    - `workers`: one `WorkerStats` per worker slot, in slot order;
    - `collector`: the collector process (None when no sampler runs).

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
    blocked: float = 0.0
    throttled: int = 0

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
        import json  # here: `import procqueue` and a pool's start do without it

        return json.dumps(self.as_dict(), separators=(",", ":"))
