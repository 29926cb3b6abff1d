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
from procqueue._scheduler.rate import Bucket
from procqueue._scheduler.sizing import LOCAL, Sizing
from procqueue._scheduler.tasks import Run


@dataclass
class PendingQueue:
    """The pending heap (bounded by `capacity`), ordered by (priority, arrival),
    and the retries waiting out their backoff."""

    capacity: int
    heap: list[tuple[int, int, int, int, Run]] = field(default_factory=list)
    delayed: list[tuple[float, int, Run]] = field(default_factory=list)
    # Runs held back by their rate (`rate.py`), per bucket, until it has tokens: still pending
    # (they keep their capacity and their place in line), holding no worker. At each token
    # only as many rejoin the heap as there are tokens.
    throttled: dict[int, tuple[Bucket, list[tuple[int, int, int, int, Run]]]] = field(default_factory=dict)
    throttled_due: dict[int, float] = field(default_factory=dict)  # per bucket: when to look again
    feed_due: float | None = None  # when a map held back by its rate may go (`feeds.py`), this round
    throttles: int = 0  # times a dispatch was held back by a rate (Stats.throttled)
    pending: int = 0  # tasks in the heap (and throttled): the queue depth `capacity` bounds
    waiting: int = 0  # tasks waiting out a backoff
    ledger: states.Ledger | None = None  # validate mode
    sizing: Sizing = LOCAL
    seq: Iterator[int] = field(default_factory=itertools.count)
    pushes: Iterator[int] = field(default_factory=itertools.count)

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
        self.waiting += len(run.items)  # one task, but a forwarded batch retries whole

    def next_due(self) -> float | None:
        dues = [*self.throttled_due.values(), *([self.delayed[0][0]] if self.delayed else [])]
        if self.feed_due is not None:
            dues.append(self.feed_due)
        return min(dues) if dues else None

    def promote(self, now: float) -> None:
        """Retries whose backoff is over rejoin the heap at their priority and place,
        and so do runs whose rate has a token again."""
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            run = heapq.heappop(delayed)[2]
            self.waiting -= len(run.items)
            if self.ledger is not None:
                for task_id in range(run.first_id, run.first_id + len(run.items)):
                    self.ledger.move(task_id, states.TaskState.PENDING)
            self.push(run, fresh=False)
        self.feed_due = None  # set again by this round's look at the maps
        for key, due in list(self.throttled_due.items()):
            if due > now:
                continue
            bucket, held = self.throttled[key]
            n = min(bucket.available(now), len(held))
            for _ in range(n):  # the most urgent first, as they were: pending all along
                heapq.heappush(self.heap, heapq.heappop(held))
            if held:
                self.throttled_due[key] = bucket.due(now) if n == 0 else now + 1 / bucket.per_s
            else:
                del self.throttled[key], self.throttled_due[key]

    def hold_throttled(self, now: float) -> None:
        """Runs on top of the heap whose rate has no token leave it until their bucket has
        one, so what is allowed to run (a map, a lower priority) goes meanwhile."""
        heap = self.heap
        while heap and (bucket := heap[0][-1].bucket) is not None and bucket.available(now) < 1:
            entry = heapq.heappop(heap)
            key = id(bucket)
            if key not in self.throttled:
                self.throttled[key] = (bucket, [])
                self.throttled_due[key] = bucket.due(now)
            heapq.heappush(self.throttled[key][1], entry)
            self.throttles += 1

    def unthrottle(self) -> None:
        """Every held-back run back on the heap (a shutdown or a break settles them there)."""
        for _, held in self.throttled.values():
            for entry in held:
                heapq.heappush(self.heap, entry)
        self.throttled.clear()
        self.throttled_due.clear()

    def take(
        self,
        limit: int | None,
        on_cancel: Callable[[Run, int, int], None],
        now: float = 0.0,
        share: tuple[int, int] | None = None,
    ) -> list[tuple[Run, int, int]]:
        """Cut the next batch off the top of the heap: at most `limit` items; with `share`
        (tasks outstanding, workers taking work) a short queue is spread (`heap_size`).

        Runs whose receiver was cancelled are dropped here (`on_cancel`); runs whose
        rate has no token are held back (`throttled`), and the next one is looked at.
        Runs of the same handler, options and rate merge into one batch, so many
        `submit`s travel together.
        """
        heap = self.heap
        segments: list[tuple[Run, int, int]] = []
        want = 0
        key = None
        while heap:
            if not segments:
                self.hold_throttled(now)
                if not heap:
                    break
            run = heap[0][-1]
            bucket = run.bucket
            if segments and bucket is not segments[0][0].bucket:
                break
            tokens = None if bucket is None else bucket.available(now)
            if tokens is not None and tokens < 1:
                break
            if not run.receiver.claim():
                heapq.heappop(heap)
                n = len(run.items) - run.pos
                self.pending -= n
                on_cancel(run, run.pos, n)
                continue
            if not segments:
                want = self.sizing.heap_size(run, share)
                if limit is not None:
                    want = min(want, limit)
                key = run.key()
            elif run.solo or segments[0][0].solo or run.key() != key:
                break
            n = min(want, len(run.items) - run.pos)
            if bucket is not None and tokens is not None:
                n = min(n, tokens)
                bucket.spend(n)
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
        self.unthrottle()
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
