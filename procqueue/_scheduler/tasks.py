"""What the scheduler moves: handlers (with their measured cost), runs of
consecutive tasks, and the batches cut from them for one worker.

A `Run` is the unit of the pending queue (a `map` of a million items costs one
entry per chunk, not per item); a `Batch` is what one worker is handed. Where
a run's outcomes go (a future, a map's chunk) is the front's `Receiver`; the
scheduler only asks it the questions of the `Receiver` protocol below.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from procqueue._errors import SerializationError
from procqueue._protocol import messages as m
from procqueue._protocol.pickling import _text, describe, dumps_callable, safe_repr
from procqueue._protocol.relay import Forwarded
from procqueue._scheduler.rate import Bucket

EWMA = 0.3  # per batch, how much older measurements of a handler fade
HANDLER_REGISTRY = 256


class Receiver(Protocol):
    """Where a run's outcomes go; the front implements it (`procqueue/_results.py`)."""

    #: A map's chunk (its tasks may be cancelled one by one; a cancelled one still has a
    #: place that raises CancelledError), not a future (cancelled whole or not at all).
    partial: bool
    #: Its tasks are timed one by one (a future reports its own duration).
    timed_each: bool

    def claim(self) -> bool:
        """About to run: False if it was cancelled (then it must not run)."""

    def cancel(self) -> bool:
        """Cancel what has not started; False if it cannot be."""

    def still_read(self) -> bool:
        """Someone may still read its outcomes (a map not abandoned)."""

    def ok(self, index: int, values: Any, lo: int, hi: int, meta: tuple[int, int, Any, int], later: list[Any]) -> None:
        """Tasks `index ..` succeeded: their values are `values[lo:hi]`."""

    def fail(self, index: int, error: Any, attempts: int, pid: int | None, later: list[Any]) -> None:
        """Task `index` failed for good (or was cancelled) with `error`."""


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

    Item `j` is task `first_id + j` and lands at index `base + j` of `receiver`.
    """

    handler: Handler
    items: list[Any] | Forwarded  # Forwarded: another pool's values, still pickled (a pipeline's)
    call: m.Call
    receiver: Receiver
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
    bucket: Bucket | None = None  # its rate limit (`procqueue/_scheduler/rate.py`), if any

    def key(self) -> tuple[int, int, int, int, float | None, bool, bool]:
        return (self.handler.id, self.call, self.attempt, self.retries, self.timeout, self.careful, self.packed)

    def part(self, j: int, n: int, careful: bool = False, solo: bool = False) -> Run:
        """Items `j .. j+n-1` again, uncharged (a dead worker held them): same ids, receiver
        slots and place in line, batched as the rest of the run is (`solo`: never with others)."""
        return Run(
            self.handler, self.items[j : j + n], self.call, self.receiver, self.first_id + j, self.priority,
            self.seq, self.attempt, self.retries, self.timeout, self.chunksize, self.base + j, 0, solo or self.solo,
            careful or self.careful, self.by_value, self.packed, self.bucket,
        )  # fmt: skip

    def single(self, j: int, attempt: int, solo: bool = False, careful: bool = False, by_value: bool = False) -> Run:
        """Item `j` alone, as a retry or a requeue keeps it: same task id, receiver slot and place in line."""
        return Run(
            self.handler, self.items[j : j + 1], self.call, self.receiver, self.first_id + j, self.priority,
            self.seq, attempt, self.retries, self.timeout, 1, self.base + j, 0, solo, careful or self.careful,
            by_value or self.by_value, self.packed, self.bucket,
        )  # fmt: skip


@dataclass(eq=False)
class Batch:
    """What one worker was sent: `segments` of runs, `count` items in all."""

    batch_id: int
    segments: list[tuple[Run, int, int]]  # (run, first item, how many)
    count: int
    seat: int = -1  # the worker position it went to
    done: int = 0  # items reported so far (workers report in order)
    sent: bool = False  # the backend has sent it (booked batches go out in order, after the booking)
    loads: int = 0  # forwarded values its worker unpickles before it starts (relay.py), as sent

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
