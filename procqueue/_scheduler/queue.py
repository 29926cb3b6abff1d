"""The pending queue: the heap of runs waiting for a worker, bounded by
`capacity`, and the retries waiting out their backoff.

The heap orders *runs* (consecutive tasks of one call with one priority), so a
`map` of a million items costs one heap entry per chunk, not per item.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from procqueue._scheduler import states
from procqueue._scheduler.sizing import LOCAL, Sizing
from procqueue._scheduler.tasks import Run


@dataclass
class PendingQueue:
    """The pending heap (bounded by `capacity`), ordered by (priority, arrival),
    and the retries waiting out their backoff."""

    capacity: int
    heap: list[tuple[int, int, int, int, Run]] = field(default_factory=list)
    delayed: list[tuple[float, int, Run]] = field(default_factory=list)
    pending: int = 0  # tasks in the heap: the queue depth `capacity` bounds
    waiting: int = 0  # tasks waiting out a backoff
    ledger: states.Ledger | None = None  # validate mode
    sizing: Sizing = LOCAL
    seq: Iterator[int] = field(default_factory=itertools.count)
    pushes: Iterator[int] = field(default_factory=itertools.count)
    batch_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def room(self) -> int:
        return self.capacity - self.pending

    def push(self, run: Run, *, fresh: bool = True) -> None:
        if fresh:
            run.seq = next(self.seq)
        # Ties on (priority, arrival) are split by task id (the items of one run,
        # requeued one by one, share their run's place in line), then by push order.
        heapq.heappush(self.heap, (-run.priority, run.seq, run.first_id + run.pos, next(self.pushes), run))
        self.pending += len(run.items) - run.pos

    def push_delayed(self, run: Run, due: float) -> None:
        heapq.heappush(self.delayed, (due, next(self.seq), run))
        self.waiting += 1

    def next_due(self) -> float | None:
        return self.delayed[0][0] if self.delayed else None

    def promote(self, now: float) -> None:
        """Retries whose backoff is over rejoin the heap at their priority and place."""
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            run = heapq.heappop(delayed)[2]
            self.waiting -= 1
            if self.ledger is not None:
                self.ledger.move(run.first_id, states.TaskState.PENDING)
            self.push(run, fresh=False)

    def take(self, limit: int | None, on_cancel: Callable[[Run, int, int], None]) -> list[tuple[Run, int, int]]:
        """Cut the next batch off the top of the heap: at most `limit` items.

        Runs whose receiver was cancelled are dropped here (`on_cancel`). Runs of
        the same handler and options merge into one batch, so many `submit`s
        travel together.
        """
        heap = self.heap
        segments: list[tuple[Run, int, int]] = []
        want = 0
        key = None
        while heap:
            run = heap[0][-1]
            if not run.receiver.claim():
                heapq.heappop(heap)
                n = len(run.items) - run.pos
                self.pending -= n
                on_cancel(run, run.pos, n)
                continue
            if not segments:
                want = self.sizing.size_for(run)
                if limit is not None:
                    want = min(want, limit)
                key = run.key()
            elif run.solo or segments[0][0].solo or run.key() != key:
                break
            n = min(want, len(run.items) - run.pos)
            segments.append((run, run.pos, n))
            run.pos += n
            self.pending -= n
            want -= n
            if run.pos == len(run.items):
                heapq.heappop(heap)
            if want <= 0:
                break
        return segments

    def cancel_all(self, on_cancel: Callable[[Run, int, int], None]) -> None:
        """shutdown(cancel_futures=True): cancel every task not yet run."""
        keep: list[tuple[int, int, int, int, Run]] = []
        for entry in self.heap:
            run = entry[-1]
            # First attempts only: a retry belongs to a future already running. A map
            # chunk partly handed out loses the rest; a future is cancelled whole or not at all.
            if run.attempt == 1 and (run.pos == 0 or run.receiver.partial) and run.receiver.cancel():
                n = len(run.items) - run.pos
                self.pending -= n
                on_cancel(run, run.pos, n)
            else:
                keep.append(entry)
        heapq.heapify(keep)
        self.heap = keep
