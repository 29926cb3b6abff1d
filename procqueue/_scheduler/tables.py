"""The state the scheduler's parts share, and the settings they decide by."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from procqueue._scheduler import states
from procqueue._scheduler.books import Books, Lost, Seat
from procqueue._scheduler.instructions import Instruction
from procqueue._scheduler.queue import PendingQueue
from procqueue._scheduler.sizing import LOCAL, Sizing
from procqueue._scheduler.tasks import Batch, Run


@dataclass(frozen=True)
class Policy:
    """The pool's settings the scheduler decides by."""

    workers: int
    capacity: int = 1024
    backoff: float = 0.1
    backoff_max: float = 30.0
    max_tasks_per_worker: int | None = None
    sizing: Sizing = LOCAL  # the backend's batch sizes and prefetch


@dataclass(eq=False)
class Tables:
    """Everything the scheduler owns; its parts read and write these."""

    policy: Policy
    queue: PendingQueue
    books: Books = field(default_factory=Books)
    seats: list[Seat] = field(default_factory=list)
    batches: dict[int, Batch] = field(default_factory=dict)  # out with a worker, by id
    lost: dict[int, Lost] = field(default_factory=dict)  # dead workers not settled yet, by pid
    ledger: states.Ledger | None = None  # validate mode: every task's moves are checked
    rng: random.Random = field(default_factory=random.Random)
    out: list[Instruction] = field(default_factory=list)  # instructions of the event being handled
    barren: int = 0  # workers in a row that died before any outcome

    def moves(self, run: Run, start: int, count: int, to: states.TaskState) -> None:
        """Validate mode: follow tasks `start .. start+count-1` of `run` to `to`."""
        if self.ledger is not None:
            for j in range(start, start + count):
                self.ledger.move(run.first_id + j, to)

    def finish_batch(self, batch: Batch) -> None:
        """A batch is fully accounted for: no worker holds it any more."""
        self.batches.pop(batch.batch_id, None)
        if 0 <= batch.seat < len(self.seats):
            self.seats[batch.seat].batches.pop(batch.batch_id, None)

    def share(self, taking: int | None = None) -> tuple[int, int]:
        """Tasks outstanding (waiting or out with a worker), and the workers taking work."""
        if taking is None:
            taking = sum(1 for s in self.seats if s.takes_work)
        return self.queue.pending + self.books.in_flight, taking

    def gathering(self, taking: int | None = None) -> bool:
        """Whether what waits is less than a full batch (`Sizing.heap_size`) of the run on
        top: a busy worker then gets no further batch yet, so that submits arriving one by
        one travel together; an idle worker takes what there is. Not for a run with an
        explicit chunksize, nor one with a rate (it goes a token at a time)."""
        top = self.queue.heap[0][-1]
        if top.chunksize is not None or top.bucket is not None:
            return False
        return self.queue.pending < self.policy.sizing.heap_size(top, self.share(taking))

    def wants_work(self) -> bool:
        """After a submit: whether the backend should look at the queue now. Yes when a
        worker that takes work holds nothing, or when one with room for another batch
        would get a full one. Otherwise submits gather in the queue until the end of a
        batch (or a start, a death) brings the next round: a wake-up for each of a stream
        of single submits (closed-loop `arun`s, each result bringing the next call) would
        cut them into batches of one or two. Once per submit: kept cheap."""
        held = self.policy.sizing.max_held
        taking, room = 0, False
        for seat in self.seats:
            if seat.open and not seat.retiring:  # takes_work
                n = len(seat.batches)
                if n == 0:
                    return True
                taking += 1
                room = room or n < held
        if not taking or not self.queue.heap:
            return True
        return room and not self.gathering(taking)
