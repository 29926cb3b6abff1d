"""When a worker must be killed: its task ran past its timeout, or it holds
work and started none of it (frozen by SIGSTOP, say), for longer than that
work's timeout or `STALL_LIMIT` without one. The backend reads what each
worker runs; this decides."""

from __future__ import annotations

from procqueue._protocol.layout import LOADING
from procqueue._scheduler.books import Seat
from procqueue._scheduler.instructions import KillReason

POLL_UNSTARTED = 0.05  # a timed task its worker has not started yet: look again this soon
STALL_LIMIT = 60.0  # seconds a worker may hold untimed work without starting any of it
STALL_MIN = 1.0  # ... and timed work: its timeout, but at least this


def limit_in(seat: Seat, running: tuple[int, int, float] | None, now: float, clock: float) -> float | None:
    """Seconds until the worker in `seat` passes a limit (0: now), None when none
    applies. `running` is `(batch_id, index, started)` of the item it is in,
    `started` on the clock that reads `clock` now; `now` is the monotonic clock."""
    timeouts = [b.head.timeout for b in seat.batches.values() if b.head.timeout is not None]
    if running is None:
        if not seat.batches:
            return None
        if seat.idle_since is None:
            seat.idle_since = now
        limit = max(STALL_MIN, min(timeouts)) if timeouts else STALL_LIMIT
        left = max(0.0, seat.idle_since + limit - now)
        return min(left, POLL_UNSTARTED) if timeouts else left  # soon to see a timed task start
    seat.idle_since = None
    if not timeouts:
        return None
    batch_id, index, started = running
    batch = seat.batches.get(batch_id)
    if batch is None or batch.head.timeout is None:
        return POLL_UNSTARTED
    limit = batch.head.timeout
    if index == LOADING:
        limit *= max(1, batch.loads)  # it unpickles whole bodies it was sent: each value its timeout
    return max(0.0, started + limit - clock)


def verdict(running: tuple[int, int, float] | None) -> KillReason:
    """Why a worker past its limit is killed: its task's timeout, or a stall."""
    return KillReason.TIMEOUT if running is not None else KillReason.STALLED
