"""Maps whose batches are cut straight from their input, never through the heap.

A map over a list, tuple or range (or an iterator's buffered items) skips the
pending heap: whenever nothing in the heap outranks it, its next batch is cut
from the sequence, so tiny tasks travel in batches of tens of thousands, not
`capacity`. Each map keeps a window of results its reader has not taken, so an
abandoned or slow reader stops its map (and only its map).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from procqueue._protocol.relay import Forwarded
from procqueue._scheduler import sizing
from procqueue._scheduler.instructions import NOTIFY
from procqueue._scheduler.rate import Bucket
from procqueue._scheduler.states import TaskState as S
from procqueue._scheduler.tables import Tables
from procqueue._scheduler.tasks import Handler, Run


class Stream(Protocol):
    """The reader's side of a map, as far as feeding goes."""

    @property
    def cancelled(self) -> bool:
        """Abandoned: cut nothing more."""

    @property
    def outstanding(self) -> int:
        """Tasks fed and not yet handed to the reader."""


class Feed(Protocol):
    """A map the scheduler cuts batches from (the front's `_map.Feeder`)."""

    seq: Sequence[Any]  # its input so far (all of it for a list, tuple or range)
    pos: int  # items before this were cut
    input_done: bool  # nothing more will be appended to `seq`
    exhausted: bool  # set here: the scheduler is done with it
    error: BaseException | None  # raised to its reader after the results: why its input stopped
    managed: bool  # `seq` is the whole input (a list, tuple or range)
    pulls: bool  # its reader pulls more input as batches are cut (an iterator's map)
    size: int | None  # chunksize, or None for automatic
    limit: int  # the least window of unread results
    order: int  # its place in line among equal priorities
    priority: int
    timeout: float | None  # its tasks' timeout
    handler: Handler
    bucket: Bucket | None  # its rate limit, if any

    @property
    def stream(self) -> Stream:
        """Its reader's side."""

    def make_run(self, items: list[Any] | Forwarded, first_id: int) -> Run:
        """The run of `items` (task ids from `first_id`), with a chunk to receive them."""

    def clip(self, n: int) -> int:
        """How many of the next `n` items one run may take (a pipeline's forwarded
        values are cut within the body they came in)."""

    def take(self, n: int) -> list[Any] | Forwarded:
        """The next `n` items (at most `clip(n)`); `pos` moves past them."""


class Feeds:
    """The maps being fed, most urgent first."""

    def __init__(self, t: Tables) -> None:
        self.t = t
        self.feeds: list[Feed] = []

    def add(self, feed: Feed, order: int) -> None:
        feed.order = order
        self.feeds.append(feed)
        self.feeds.sort(key=lambda f: (-f.priority, f.order))

    def next_feed(self, broken: bool, closed: bool, now: float = 0.0) -> Feed | None:
        """The map to cut the next batch from, if it outranks the heap. Maps that are
        done (read to the end, abandoned) leave the list here; a map whose rate has no
        token is passed over until it has (`queue.feed_due`)."""
        feeds = self.feeds
        self.t.queue.hold_throttled(now)  # a held-back run on top does not outrank a map
        i = 0
        while i < len(feeds):
            f = feeds[i]
            end = f.pos >= len(f.seq)
            if end and not f.input_done and not f.stream.cancelled and not broken:
                i += 1  # its reader has not pulled more input yet
                continue
            if f.stream.cancelled or broken or end:
                f.exhausted = True
                feeds.pop(i)
                self.t.out.append(NOTIFY)  # its reader may be waiting for the end
                continue
            heap = self.t.queue.heap
            if heap and heap[0][:2] <= (-f.priority, f.order):
                # Something more urgent or older waits in the heap; at a tie, the map's own
                # retries and requeues, which its reader may be waiting for.
                return None
            if self.window_left(f, self.batch_size(f), closed) <= 0:
                i += 1  # its reader is not reading (parked, or slow): the next map may go
                continue
            if f.bucket is not None and f.bucket.available(now) < 1 and not broken:
                q, due = self.t.queue, f.bucket.due(now)
                q.throttles += q.feed_due is None  # once a round, not once per worker asking
                q.feed_due = due if q.feed_due is None else min(q.feed_due, due)
                i += 1
                continue
            return f
        return None

    def window_left(self, f: Feed, batch: int, closed: bool) -> int:
        """How many more of a map's items may be cut before its reader takes some."""
        if closed:  # after shutdown no one may be reading yet: run it all, as Executor.map
            return len(f.seq) - f.pos
        window = max(f.limit, 2 * self.t.policy.workers * batch)
        return window - f.stream.outstanding

    def batch_size(self, f: Feed) -> int:
        """Items per batch cut from a map's input."""
        sz = self.t.policy.sizing
        timed = f.timeout is not None
        if timed and not sz.marks_items:
            return 1
        if f.size:
            return f.size
        workers = self.t.policy.workers
        if f.managed:
            return sz.direct_size(f.handler, len(f.seq), len(f.seq) - f.pos, workers, timed)
        unknown = sizing.MAX_DIRECT_BATCH * 4 * workers  # an iterator's length: no tail to plan for
        return sz.direct_size(f.handler, unknown, unknown, workers, timed)

    def want(self, f: Feed) -> int:
        """How many items an iterator map's reader should pull now: `capacity` or a
        batch per worker waiting in the buffer, whichever is more, within the window
        of unread results."""
        n = self.batch_size(f)
        workers = self.t.policy.workers
        buffered = len(f.seq) - f.pos
        window = max(f.limit, 2 * workers * n)
        target = max(self.t.policy.capacity, n * workers)
        return max(0, min(target - buffered, window - f.stream.outstanding - buffered))

    def cut(self, f: Feed, limit: int | None, ids: Callable[[int], int], closed: bool, now: float = 0.0) -> Run | None:
        """The next batch's run, cut from the map's input: at most `limit` items
        (the worker's task limit), task ids from `ids(n)`. None when the map's window is full."""
        n = self.batch_size(f)
        n = min(n, self.window_left(f, n, closed), len(f.seq) - f.pos)
        if limit is not None:
            n = min(n, limit)
        n = f.clip(n)
        if f.bucket is not None:
            n = min(n, f.bucket.available(now))
        if n <= 0:
            return None
        if f.bucket is not None:
            f.bucket.spend(n)
        items = f.take(n)  # slicing a list, tuple or range runs no user code
        run = f.make_run(items, ids(n))
        run.seq = f.order  # retries and requeues keep the map's place in line
        run.pos = n
        self.t.books.submitted += n
        self.t.moves(run, 0, n, S.PENDING)
        return run
