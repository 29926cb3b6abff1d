"""The seam between the front (`_core.py`) and what runs the tasks.

A backend starts and ends the workers, turns what it reads (results, deaths,
what a worker runs now) into events for the scheduler (`procqueue/_scheduler/`)
and carries out the instructions it returns, holding the core's lock for the
scheduler calls. The local backend (`procqueue/_local/`) runs worker
processes on this machine; another (Dask) reuses the scheduler unchanged.

Which side of the seam keeps the accounting: the scheduler's, in the parent.
Every attempt's outcome, every retry decision and every counter of `stats()`
is the scheduler's; a backend only reports what happened (this batch's items
0-2 succeeded and 3 raised; that worker died while its marker pointed at item
4). The local backend's collector process forwards outcomes without judging
them, so killing it loses no decision and no count, and a backend whose
transport is different (Dask's scheduler) needs no collector at all. What the
collector counts itself (attempts forwarded, records a FileOutput wrote) is
transport, shown as its own row in `stats()`, never the books.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from procqueue._scheduler.sizing import Sizing


class WorkerRow(NamedTuple):
    """One worker position as `stats()` shows it (before CPU and memory readings)."""

    pid: int
    tasks_done: int
    state: str  # "idle" | "running" | "recycling" | "stopping" | "dead"
    seat: int
    recycled: int
    task_id: int | None
    cpu: float | None = None  # percent, when the backend reads it itself (else psutil, by pid)
    rss: int | None = None  # bytes, likewise
    deaths: int = 0


class Backend(Protocol):
    """What the core asks of a backend."""

    seats: int  # worker positions: the scheduler's seats
    sizing: Sizing  # its batch sizes and prefetch

    def start(self) -> None:
        """Start the workers; raise `PoolStartError` (leaving nothing running) if they cannot."""

    def wake(self) -> None:
        """Look at the scheduler again soon. Safe from any thread, with the core's lock
        held or not, even in a finalizer: it takes no lock."""

    def may_join(self) -> bool:
        """Whether the calling thread may wait for the backend to end (not its own threads)."""

    def join(self) -> None:
        """Wait until every worker has ended and the books are settled (after shutdown)."""

    def kill_all(self) -> None:
        """Kill every worker now (the pool broke or was terminated)."""

    def recycle(self, seat: int, pid: int) -> None:
        """Worker `pid` in `seat` is past max_worker_memory: let it finish what it holds and replace it."""

    def pids(self) -> list[int]:
        """Processes the monitor samples (core's lock held)."""

    def worker_rows(self) -> list[WorkerRow]:
        """One row per worker position (core's lock held)."""

    def helper(self) -> tuple[int, int] | None:
        """The backend's own helper process and what it forwarded (the collector), if any (lock held)."""
