"""How much work goes in one batch, and how much a worker may hold.

Why a worker holds at most two batches, the second only while it holds under
~40 ms of estimated work: a batch sent to a worker can no longer be reordered
(nor taken by a worker that frees up sooner), so the prefetch is the only place
where a newly submitted urgent task can be overtaken. Batch sizes aim at ~20 ms
of work (auto chunksize), so an urgent task waits about two batches at most. Not
smaller for longer tasks: a batch costs ~0.5 ms of CPU across parent, collector
and worker, which on two cores took 8 % of 1 ms tasks' throughput at 5 ms.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from procqueue._scheduler.tasks import Batch, Handler, Run

TARGET_BATCH_NS = 20_000_000  # auto chunksize aims at batches of about 20 ms of tiny tasks,
LONG_TASK_NS = 100_000  # ... and for tasks longer than this (their batch overhead is already
LONG_BATCH_NS = 20_000_000  # ... under 1 %) at 20 ms too (a backend may set it apart: Dask)
MAX_BATCH = 4096
MIN_DIRECT_NS = 1_000_000  # ... nor smaller than this much work, when it can be avoided
MAX_DIRECT_BATCH = 65536  # cut from a sequence: not bounded by the heap's capacity (the marker allows 2**20)
PREFETCH_NS = 40_000_000  # a worker gets a second batch while it holds less than this much estimated work
MAX_HELD = 2  # ... and never a third: the rest stays with the parent, for whichever worker frees first
FAST_ITEM_NS = 50_000  # tasks shorter than this run unmarked in a tight loop (no timeout)


@dataclass(frozen=True)
class Sizing:
    """A backend's batch sizes and prefetch: the local backend's round trip costs
    tens of microseconds, a cluster's milliseconds, so a cluster wants longer
    batches; a backend that cannot see which item of a batch runs (`marks_items`
    False) gets timed tasks one per batch, so a timeout is a batch's; and a
    worker holds no more batches than the backend can tell apart (`max_held`)."""

    target_ns: int = TARGET_BATCH_NS
    long_ns: int = LONG_BATCH_NS
    max_held: int = MAX_HELD
    prefetch_ns: int = PREFETCH_NS
    marks_items: bool = True
    min_ns: int = MIN_DIRECT_NS  # a batch cut from a sequence holds at least this much work

    def per_batch(self, est_ns: float) -> int:
        """Items in a batch of a handler whose items take `est_ns` each."""
        per = max(est_ns, 1.0)
        return int((self.target_ns if per < LONG_TASK_NS else self.long_ns) / per)

    def size_for(self, run: Run) -> int:
        """Items of a batch taken from the heap, for this run's handler."""
        if run.timeout is not None and not self.marks_items:
            return 1
        if run.chunksize is not None:
            return run.chunksize
        est = run.handler.est_ns
        if est is None:
            return 1  # measure first: a long task must not be batched blindly
        # Batches of ~20 ms bound the tail imbalance to about one batch.
        return max(1, min(self.per_batch(est), MAX_BATCH))

    def heap_size(self, run: Run, share: tuple[int, int] | None) -> int:
        """Items of a batch taken from the heap: `size_for`, but when the tasks outstanding
        (`share`: waiting or out with a worker, and the workers taking work) are fewer than
        a full batch for every batch the workers may hold, as closed-loop submits are (each
        result brings the next task), they are spread over those batches: every worker has
        work, and a second batch to run while the first's results travel. Not below `min_ns`
        of work."""
        size = self.size_for(run)
        est = run.handler.est_ns
        if share is None or run.chunksize is not None or est is None or size <= 1:
            return size
        outstanding, workers = share
        spread = -(-outstanding // (self.max_held * max(workers, 1)))
        return max(1, min(size, max(spread, int(self.min_ns / max(est, 1.0)))))

    def direct_size(self, handler: Handler, total: int, left: int, workers: int, timed: bool = False) -> int:
        """A batch cut straight from a sequence of `total` items, `left` of them not
        cut yet: ~20 ms of work, but at least four batches per worker, and
        shrinking toward the end (half of what is left per worker), so the tail
        stays even; not below `min_ns` of work."""
        est = handler.est_ns
        if est is None or (timed and not self.marks_items):
            return 1
        spread = min(-(-total // (4 * workers)), -(-left // (2 * workers)))
        spread = max(spread, int(self.min_ns / max(est, 1.0)))
        return max(1, min(self.per_batch(est), spread, MAX_DIRECT_BATCH))

    def may_hold_more(self, held: Iterable[Batch], est: float | None) -> bool:
        """The prefetch rule: a worker gets another batch (whose items cost `est`
        each, None when unmeasured) only while what it holds is under `prefetch_ns`
        of estimated work, and never more than `max_held`."""
        held = list(held)
        if not held:
            return True
        if est is None or len(held) >= self.max_held:
            return False
        queued = 0.0
        for b in held:
            e = b.head.handler.est_ns
            if e is None:
                return False
            queued += (b.count - b.done) * e
        return queued < self.prefetch_ns


LOCAL = Sizing()


def per_batch(est_ns: float) -> int:
    return LOCAL.per_batch(est_ns)


def size_for(run: Run) -> int:
    return LOCAL.size_for(run)


def direct_size(handler: Handler, total: int, left: int, workers: int) -> int:
    return LOCAL.direct_size(handler, total, left, workers)


def may_hold_more(held: Iterable[Batch], est: float | None) -> bool:
    return LOCAL.may_hold_more(held, est)


def careful(run: Run) -> bool:
    """Whether a batch of this run marks every item (for timeouts and crash
    attribution); tiny tasks without a timeout run unmarked, in a tight loop."""
    est = run.handler.est_ns
    return run.careful or run.timeout is not None or est is None or est > FAST_ITEM_NS
