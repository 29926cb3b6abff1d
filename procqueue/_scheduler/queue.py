"""The parent's dispatcher: the pending heap, retries waiting out their backoff,
and the cutting of batches for workers.

Pure bookkeeping, no processes: `_pool.py` calls it under the pool's lock and
sends what it returns. The heap orders *runs* (consecutive tasks of one call
with one priority), so a `map` of a million items costs one heap entry per
chunk, not per item.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from procqueue._errors import SerializationError
from procqueue._protocol import messages as m
from procqueue._protocol.pickling import (
    _text,
    describe,
    dumps,
    dumps_body,
    dumps_callable,
    name_bad_argument,
    safe_repr,
)
from procqueue._results import Chunk, Sink
from procqueue._scheduler import states

TARGET_BATCH_NS = 20_000_000  # auto chunksize aims at batches of about 20 ms of tiny tasks,
LONG_TASK_NS = 100_000  # ... and for tasks longer than this (their batch overhead is already
LONG_BATCH_NS = 5_000_000  # ... under 1 %) at 5 ms: fewer tasks stuck behind a slow one
MAX_BATCH = 4096
MIN_DIRECT_NS = 1_000_000  # ... nor smaller than this much work, when it can be avoided
MAX_DIRECT_BATCH = 65536  # cut from a sequence: not bounded by the heap's capacity (the marker allows 2**20)
EWMA = 0.3  # per batch, how much older measurements of a handler fade
HANDLER_REGISTRY = 256


@dataclass(eq=False)
class Handler:
    """One distinct handler object, its wire form and its measured cost per item."""

    fn: Callable[..., Any]
    id: int
    blob: bytes | None = None
    error: SerializationError | None = None
    est_ns: float | None = None
    _ns: float = 0.0
    _n: float = 0.0

    def wire(self) -> bytes:
        """The cloudpickled handler, made once; raises SerializationError if it will not pickle."""
        if self.blob is None and self.error is None:
            try:
                self.blob = dumps_callable(self.fn)
            except BaseException as exc:  # a __reduce__ may raise anything, SystemExit too: the handler's failure
                name = safe_repr(self.fn)
                self.error = SerializationError(
                    f"the handler {name} ({describe(self.fn)}) could not be pickled: {type(exc).__name__}: "
                    f"{_text(exc)}; pass a module-level function, or a callable whose state pickles",
                    stage="handler",
                    what=name,
                    task_id=None,
                )
                self.error.__cause__ = exc
        if self.error is not None:
            raise self.error
        assert self.blob is not None
        return self.blob

    def measured(self, total_ns: int, count: int) -> None:
        # Weighted by items, so the tail's batches of a few items (dominated by
        # fixed costs) do not drag the estimate of a handler of big batches.
        self._ns = (1 - EWMA) * self._ns + total_ns
        self._n = (1 - EWMA) * self._n + count
        self.est_ns = self._ns / self._n


class Handlers:
    """Handler objects by identity, newest kept (strong references, so ids stay unique)."""

    def __init__(self) -> None:
        self._by_fn: OrderedDict[int, Handler] = OrderedDict()
        self._ids = itertools.count(1)

    def get(self, fn: Callable[..., Any]) -> Handler:
        key = id(fn)
        h = self._by_fn.get(key)
        if h is not None and h.fn is fn:
            self._by_fn.move_to_end(key)
            return h
        h = Handler(fn, next(self._ids))
        self._by_fn[key] = h
        if len(self._by_fn) > HANDLER_REGISTRY:
            self._by_fn.popitem(last=False)
        return h


@dataclass(eq=False)
class Run:
    """Consecutive tasks of one call: same handler, options and priority.

    Item `j` is task `first_id + j` and lands at index `base + j` of `sink`.
    """

    handler: Handler
    items: list[Any]
    call: m.Call
    sink: Sink
    first_id: int
    priority: int = 0
    seq: int = 0
    attempt: int = 1
    retries: int = 0
    timeout: float | None = None
    chunksize: int | None = None
    base: int = 0
    pos: int = 0  # items before this were dispatched
    solo: bool = False  # never merge with other runs (its batch once failed to unpickle)
    careful: bool = False  # mark every item: a worker died in an unmarked batch holding it
    by_value: bool = False  # pickle the items with cloudpickle: by reference they did not unpickle
    packed: bool = False  # each item is already pickled (a submit's, in its caller's thread)

    def key(self) -> tuple[int, int, int, int, float | None, bool, bool]:
        return (self.handler.id, self.call, self.attempt, self.retries, self.timeout, self.careful, self.packed)

    def part(self, j: int, n: int, careful: bool = False) -> Run:
        """Items `j .. j+n-1` again, uncharged (a dead worker held them): same ids, sink
        slots and place in line, batched as the rest of the run is."""
        return Run(
            self.handler, self.items[j : j + n], self.call, self.sink, self.first_id + j, self.priority,
            self.seq, self.attempt, self.retries, self.timeout, self.chunksize, self.base + j, 0, self.solo,
            careful or self.careful, self.by_value, self.packed,
        )  # fmt: skip

    def single(self, j: int, attempt: int, solo: bool = False, careful: bool = False, by_value: bool = False) -> Run:
        """Item `j` alone, as a retry or a requeue keeps it: same task id, sink slot and place in line."""
        return Run(
            self.handler, [self.items[j]], self.call, self.sink, self.first_id + j, self.priority,
            self.seq, attempt, self.retries, self.timeout, 1, self.base + j, 0, solo, careful or self.careful,
            by_value or self.by_value, self.packed,
        )  # fmt: skip


@dataclass(eq=False)
class Batch:
    """What one worker was sent: `segments` of runs, `count` items in all."""

    batch_id: int
    segments: list[tuple[Run, int, int]]  # (run, first item, how many)
    count: int
    slot: int = -1
    done: int = 0  # items reported so far (workers report in order)

    @property
    def head(self) -> Run:
        return self.segments[0][0]

    def locate(self, lo: int, hi: int) -> Iterator[tuple[Run, int, int, int]]:
        """For batch items `lo..hi-1`: `(run, first item in run, lo', hi')` per segment touched."""
        offset = 0
        for run, start, count in self.segments:
            a, b = max(lo, offset), min(hi, offset + count)
            if a < b:
                yield run, start + a - offset, a, b
            offset += count
            if offset >= hi:
                return

    def item(self, index: int) -> tuple[Run, int]:
        for run, j, _, _ in self.locate(index, index + 1):
            return run, j
        raise IndexError(index)


@dataclass
class Dispatcher:
    """The pending heap (bounded by `capacity`) and the delayed retries."""

    capacity: int
    heap: list[tuple[int, int, int, int, Run]] = field(default_factory=list)
    delayed: list[tuple[float, int, Run]] = field(default_factory=list)
    pending: int = 0  # tasks in the heap: the queue depth `capacity` bounds
    waiting: int = 0  # tasks waiting out a backoff
    ledger: states.Ledger | None = None  # validate mode
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

    def size_for(self, run: Run) -> int:
        if run.chunksize is not None:
            return run.chunksize
        est = run.handler.est_ns
        if est is None:
            return 1  # measure first: a long task must not be batched blindly
        # Batches of ~20 ms (5 ms) bound the tail imbalance to about one batch.
        return max(1, min(per_batch(est), MAX_BATCH))

    def direct_size(self, handler: Handler, total: int, left: int, workers: int) -> int:
        """A batch cut straight from a sequence of `total` items, `left` of them not
        cut yet: ~20 ms (5 ms) of work, but at least four batches per worker, and
        shrinking toward the end (half of what is left per worker), so the tail
        stays even; not below MIN_DIRECT_NS of work."""
        est = handler.est_ns
        if est is None:
            return 1
        spread = min(-(-total // (4 * workers)), -(-left // (2 * workers)))
        spread = max(spread, int(MIN_DIRECT_NS / max(est, 1.0)))
        return max(1, min(per_batch(est), spread, MAX_DIRECT_BATCH))

    def take(self, limit: int | None, on_cancel: Callable[[Run, int, int], None]) -> list[tuple[Run, int, int]]:
        """Cut the next batch off the top of the heap: at most `limit` items.

        Runs whose sink was cancelled are dropped here (`on_cancel`). Runs of
        the same handler and options merge into one batch, so many `submit`s
        travel together.
        """
        heap = self.heap
        segments: list[tuple[Run, int, int]] = []
        want = 0
        key = None
        while heap:
            run = heap[0][-1]
            if not run.sink.claim():
                heapq.heappop(heap)
                n = len(run.items) - run.pos
                self.pending -= n
                on_cancel(run, run.pos, n)
                continue
            if not segments:
                want = self.size_for(run)
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
            if run.attempt == 1 and (run.pos == 0 or type(run.sink) is Chunk) and run.sink.cancel():
                n = len(run.items) - run.pos
                self.pending -= n
                on_cancel(run, run.pos, n)
            else:
                keep.append(entry)
        heapq.heapify(keep)
        self.heap = keep


def per_batch(est_ns: float) -> int:
    """Items in a batch of a handler whose items take `est_ns` each."""
    per = max(est_ns, 1.0)
    return int((TARGET_BATCH_NS if per < LONG_TASK_NS else LONG_BATCH_NS) / per)


def encode_items(
    segments: list[tuple[Run, int, int]], reject: Callable[[Run, int, BaseException], None]
) -> tuple[list[bytes | memoryview], list[tuple[Run, int, int]]]:
    """Pickle a batch's items in one go; on failure find each item that does not
    pickle, fail it alone (naming the argument) and send the rest."""
    if len(segments) == 1 and segments[0][1] == 0 and segments[0][2] == len(segments[0][0].items):
        items = segments[0][0].items  # a whole run: no copy
    else:
        items = []
        for run, start, count in segments:
            items.extend(run.items[start : start + count])
    try:
        return dumps_body(items, segments[0][0].by_value), segments
    except BaseException:  # a __reduce__ may raise anything: find the items that do not pickle
        pass
    kept: list[tuple[Run, int, int]] = []
    good: list[Any] = []
    for run, start, count in segments:
        run_start = None
        for j in range(start, start + count):
            item = run.items[j]
            try:
                dumps(item)
            except BaseException:
                reject(run, j, argument_error(run.first_id + j, run.call, item))
                if run_start is not None:
                    kept.append((run, run_start, j - run_start))
                    run_start = None
                continue
            good.append(item)
            if run_start is None:
                run_start = j
        if run_start is not None:
            kept.append((run, run_start, start + count - run_start))
    return (dumps_body(good) if good else []), kept


def argument_error(task_id: int, call: m.Call, item: Any) -> SerializationError:
    """The error of a task whose arguments do not pickle, naming the one that does not."""
    args, kwargs = _call_args(call, item)
    what, exc = name_bad_argument(args, kwargs)
    err = SerializationError(
        f"task {task_id}: {what} could not be pickled"
        + (f": {type(exc).__name__}: {_text(exc)}" if exc else "")
        + "; pass something picklable (or build it inside the handler)",
        stage="argument",
        what=what,
        task_id=task_id,
    )
    err.__cause__ = exc
    return err


def _call_args(call: m.Call, item: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if call is m.Call.ONE:
        return (item,), {}
    if call is m.Call.STAR:
        return tuple(item), {}
    return tuple(item[0]), dict(item[1])
