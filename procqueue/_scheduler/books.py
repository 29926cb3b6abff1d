"""The scheduler's tables: the books (what `stats()` counts), the seats (its
view of each worker position) and the dead workers it has not settled yet."""

from __future__ import annotations

from dataclasses import dataclass, field

from procqueue._scheduler.instructions import KillReason
from procqueue._scheduler.tasks import Batch


@dataclass
class Books:
    """The pool's counters; at rest `submitted == completed + failed + dropped + cancelled`."""

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
    started: float | None = None  # the first submit (the backend's clock)
    stopped: float | None = None  # the pool's end


@dataclass(eq=False)
class Seat:
    """One worker position as the scheduler sees it; a replacement worker takes
    over the seat of a dead one."""

    index: int
    pid: int = -1
    open: bool = False  # a worker is there
    retiring: bool = False  # it takes no more work (task limit, memory, shutdown)
    batches: dict[int, Batch] = field(default_factory=dict)  # held, in dispatch order
    tasks_sent: int = 0  # to this worker
    tasks_done: int = 0  # attempts finished in this seat, its predecessors' included
    productive: bool = False  # this worker has reported at least one outcome
    recycled: int = 0  # workers of this seat replaced for a limit
    deaths: int = 0  # workers of this seat that died unasked (a crash, a signal from outside, os._exit)
    idle_since: float | None = None  # holding batches, seen running none of them since

    @property
    def takes_work(self) -> bool:
        return self.open and not self.retiring


@dataclass
class Death:
    """A worker ended. `running` is `(batch_id, index)` of the item its marker
    pointed at (index LOADING while it unpickled the batch, UNMARKED inside a
    batch of tiny tasks), None between items; `reason` when we killed it."""

    seat: int
    pid: int
    exitcode: int | None
    running: tuple[int, int] | None
    reason: KillReason | None = None
    fault_text: str = ""


@dataclass
class Lost:
    """A dead worker whose leftovers are not settled yet (the backend first reads
    what it sent before dying, then reports `worker_gone`)."""

    seat: int
    batches: list[Batch]
    running: tuple[int, int] | None  # (batch_id, index) of a marked item: the culprit if charged
    exitcode: int | None
    fault_text: str
    unmarked: bool  # it died inside an unmarked (fast) batch: requeue its items as careful
    charge: bool  # False when it was killed for a reason not its task's
    timed_out: bool
