"""The lazy, bounded map: how `Pool.map` feeds its input and hands results back.

A list, tuple or range is cut into batches by the scheduler itself (slicing
one runs no user code), straight to the workers; any other iterable is pulled
by the reading thread into a buffer the scheduler cuts from, so a slow or
blocking generator never stalls the backend. Results come back chunk by chunk
(`_results.Chunk`), unpickled in the reading thread. Leaving the loop early
(or dropping the iterator) cancels what was not started.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

from procqueue._callbacks import on_internal_thread
from procqueue._protocol import messages as m
from procqueue._protocol.relay import Forwarded
from procqueue._results import Chunk, Stream
from procqueue._scheduler.rate import Bucket
from procqueue._scheduler.tasks import Handler, Run

if TYPE_CHECKING:
    from procqueue._core import Core
    from procqueue._monitor.view import LiveView

WINDOW = 4  # a map keeps at most WINDOW * capacity tasks fed and not yet consumed


class RunOptions(Protocol):
    """The per-call options a map's tasks carry (`procqueue.Options`)."""

    priority: int
    retries: int
    timeout: float | None
    bucket: Bucket | None


class Feeder:
    """Pulls a map's input into the pool as room frees, and hands results back.

    A list, tuple or range is cut into batches by the manager thread itself
    (slicing one runs no user code), straight to the workers; any other
    iterable is pulled by the consuming thread into the heap, so a slow or
    blocking generator never stalls the manager. Chunk bookkeeping is shared
    with the scheduler: touch it under the pool's lock. With `blocks` its
    pushed input may hold values still pickled (a pipeline's, `Blocks`).
    """

    def __init__(
        self,
        core: Core,
        opts: RunOptions,
        handler: Handler,
        source: Iterable[Any],
        call: m.Call,
        size: int | None,
        ordered: bool,
        return_exceptions: bool = False,
        blocks: bool = False,
    ) -> None:
        self.opts = opts
        self.return_exceptions = return_exceptions
        self.core = core
        self.priority = opts.priority
        self.timeout = opts.timeout
        self.bucket = opts.bucket
        self.handler = handler
        self.call = call
        self.size = size
        self.ordered = ordered
        self.stream = Stream(ordered)
        self.window: deque[Chunk] = deque()  # chunks in input order (ordered maps)
        self.fed = 0  # chunks fed
        self.consumed = 0  # chunks handed to the consumer
        self.exhausted = False  # every input item was cut into a run
        self.error: BaseException | None = None
        self.limit = WINDOW * core.cfg.capacity
        self.managed = type(source) in (list, tuple, range)
        self.pushed = isinstance(source, Pushed)  # its items come through `push` (an async iterable's)
        self.pulls = not self.managed and not self.pushed  # its reader pulls input as batches are cut
        # The manager cuts batches from seq[pos:]: the whole sequence, or for other
        # input a buffer the consumer's thread refills from the iterator.
        self.seq: Any = source if self.managed else Blocks() if blocks else []
        self.source: Iterator[Any] = iter(()) if self.managed else iter(source)
        self.pos = 0
        self.cut = 0  # items cut into runs so far
        self.input_done = self.managed  # nothing more will be added to seq
        self.order = 0  # arrival order among equal priorities

    def clip(self, n: int) -> int:
        """At most `n` of the next items in one run: forwarded ones within their body (lock held)."""
        return self.seq.clip(self.pos, n) if type(self.seq) is Blocks else n

    def take(self, n: int) -> list[Any] | Forwarded:
        """The next `n` items, cut into a run (lock held)."""
        seq = self.seq
        items = seq.take(self.pos, n) if type(seq) is Blocks else list(seq[self.pos : self.pos + n])
        self.pos += n
        return items

    def make_run(self, items: list[Any] | Forwarded, first_id: int) -> Run:
        """A chunk of the map and the run that fills it (caller holds the pool's lock)."""
        chunk = Chunk(self.stream, len(items), first_id)
        chunk.start, self.cut = self.cut, self.cut + len(items)
        self.stream.outstanding += len(items)
        if self.ordered:
            self.window.append(chunk)
        self.fed += 1
        opts = self.opts
        return Run(
            self.handler, items, self.call, chunk, first_id, opts.priority,
            retries=opts.retries, timeout=opts.timeout, chunksize=self.size, bucket=self.bucket,
            solo=type(items) is Forwarded,  # one body to a batch
        )  # fmt: skip

    def start(self) -> None:
        self.core.add_feed(self)
        self.feed()

    def push(self, items: list[Any] | Forwarded, done: bool, error: BaseException | None = None) -> bool:
        """Pushed input (`Pushed`): add `items` to the buffer the manager cuts from, from any
        thread; `done` (with the input's `error`, if it failed) ends the input. False once the
        map no longer takes input (shut down, abandoned). `Forwarded` items only where the
        buffer is `Blocks`."""
        core = self.core
        with core.lock:
            if self.input_done or self.stream.cancelled:
                return False
            if self.pos:
                del self.seq[: self.pos]
                self.pos = 0
            self.seq.extend(items)
            if done:
                self.input_done = True
                self.error = self.error or error
            core.wake()
        return True

    def want_now(self) -> int:
        """How many items pushed input should bring now (0: wait for the reader)."""
        with self.core.lock:
            return 0 if self.input_done else self.core.feed_want(self)

    def feed(self) -> None:
        """Iterator input: refill the buffer the manager cuts from, in the consumer's
        thread (user code never runs in the manager), while the window has room."""
        core = self.core
        while not self.input_done and not self.pushed:
            with core.lock:
                want = core.feed_want(self)
            if want <= 0:
                return
            try:
                items = list(itertools.islice(self.source, want))
            except Exception as exc:  # the input itself failed: yield what came before, then raise
                self.error, items = exc, []
            with core.lock:
                if self.input_done:  # the pool was shut down meanwhile: these never run
                    return
                if len(items) < want:
                    self.input_done = True
                if self.pos:
                    del self.seq[: self.pos]
                    self.pos = 0
                self.seq.extend(items)
                core.wake()

    def _ready(self) -> bool:
        """Something to do for the consumer (called under the pool's lock)."""
        if self.window and self.window[0].done if self.ordered else self.stream.finished:
            return True
        if self.finished:
            return True
        return not self.input_done and not self.pushed and self.core.feed_want(self) > 0

    def results(self, deadline: float | None, progress: tuple[int | None, str, list[LiveView]] | None) -> Iterator[Any]:
        """The map's results: chunk by chunk in Python, item by item in C."""
        chunks = self._chunks(deadline, progress)
        # Weakly: the pool holds this feeder, and a strong reference back to the generator
        # would keep a dropped map alive (never finalized, never cancelled) until shutdown.
        self._generator = weakref.ref(chunks)
        results = cast(MapIterator, MapIterator.from_iterable(chunks))
        results.chunks = chunks
        results.stream = self.stream
        results.feeder = self
        return results

    def _chunks(
        self, deadline: float | None, progress: tuple[int | None, str, list[LiveView]] | None
    ) -> Generator[Iterable[Any], None, None]:
        core = self.core
        bar = None
        if progress is not None:  # the bar starts with the iteration, not with the call to map()
            from procqueue._monitor.view import MapProgress

            total, title, views = progress
            bar = MapProgress(total, title, views[-1] if views else None)
        last = 0  # items of the chunk handed out before: consumed once the next one is asked for
        try:
            while True:
                if bar is not None and last:
                    bar.advance(last)
                    last = 0
                if not self.managed:
                    self.feed()
                with core.lock:
                    chunk = self.take_done()
                    finished = self.finished
                if chunk is not None:
                    chunk.materialize()  # values unpickled here, in the consumer's thread
                    last = chunk.size
                    # After a failed task the map ends (as Executor.map's does): the
                    # chunk's values are handed out up to it, then this generator closes.
                    if chunk.errors is None:
                        yield chunk.values
                    elif self.return_exceptions:
                        yield _with_errors(chunk)
                    else:
                        yield _until_error(chunk, self._stop)
                    continue
                if finished:
                    if self.error is not None:
                        raise self.error
                    return
                core.wait_until(self._ready, deadline)
        finally:
            # This may run in a finalizer, on any thread (the manager's included) at any
            # moment: no lock here (plain reads of flags), and the bar's closing, which
            # runs rich's code, goes to the callback runner when on one of the pool's threads.
            if bar is not None:
                if on_internal_thread():
                    core.runner.post(bar.close)
                else:
                    bar.close()
            if not self.exhausted or self.consumed < self.fed:
                core.abandon(self.stream)

    def take_done(self) -> Chunk | None:
        """The next finished chunk for the reader, if any (lock held)."""
        chunk = self._next_done()
        if chunk is not None:
            self.consumed += 1
            self.stream.outstanding -= chunk.size
            # The window moved: the manager may cut more, from the list or from
            # what the buffer already holds (feed() wakes it only when it adds).
            self.core.wake()
        return chunk

    @property
    def finished(self) -> bool:
        """Every chunk was cut and handed to the reader (lock held)."""
        return self.exhausted and self.consumed >= self.fed

    def _stop(self) -> None:
        """End the map (its results generator), as after a failed task."""
        gen = self._generator()
        if gen is not None:
            gen.close()

    def _next_done(self) -> Chunk | None:
        if self.ordered:
            window = self.window
            return window.popleft() if window and window[0].done else None
        finished = self.stream.finished
        return finished.popleft() if finished else None


class Blocks:
    """The buffer of a map whose pushed input may hold `Forwarded` items (a pipeline's
    stage after the first): lists and forwarded runs in the order they came. The
    manager cuts from `pos` (`Feeder.clip`, `Feeder.take`); the pusher drops what
    was cut (`del buffer[:pos]`)."""

    __slots__ = ("parts", "skip", "total")

    def __init__(self) -> None:
        self.parts: deque[list[Any] | Forwarded] = deque()
        self.skip = 0  # items of parts[0] already dropped
        self.total = 0  # items held (those dropped not counted)

    def __len__(self) -> int:
        return self.total

    def extend(self, items: list[Any] | Forwarded) -> None:
        if not len(items):
            return
        parts = self.parts
        last = parts[-1] if parts else None
        if isinstance(items, Forwarded):
            parts.append(items)
        elif isinstance(last, list):
            last.extend(items)
        else:
            parts.append(list(items))  # its own: the pusher's list is not ours to extend
        self.total += len(items)

    def __delitem__(self, key: slice) -> None:
        """Drop the first `key.stop` items (only this form)."""
        n = key.stop
        if key.start is not None or n is None or n < 0:
            raise ValueError("Blocks drops only a prefix: del buffer[:n]")
        self.total -= n
        while n:
            left = len(self.parts[0]) - self.skip
            if n < left:
                self.skip += n
                return
            self.parts.popleft()
            self.skip = 0
            n -= left

    def _at(self, pos: int) -> tuple[int, int]:
        """The part holding item `pos`, and where in it."""
        pos += self.skip
        for k, part in enumerate(self.parts):
            if pos < len(part):
                return k, pos
            pos -= len(part)
        raise IndexError("past the end of the buffer")

    def clip(self, pos: int, n: int) -> int:
        """At most `n` from `pos` in one run: within a list, or across forwarded runs in a row."""
        k, at = self._at(pos)
        parts = self.parts
        got = len(parts[k]) - at
        if type(parts[k]) is Forwarded:
            for nxt in itertools.islice(parts, k + 1, None):
                if got >= n or type(nxt) is not Forwarded:
                    break
                got += len(nxt)
        return min(n, got)

    def take(self, pos: int, n: int) -> list[Any] | Forwarded:
        k, at = self._at(pos)
        parts = self.parts
        first = parts[k][at : at + n]
        if len(first) == n:
            return first
        if not isinstance(first, Forwarded):
            raise IndexError("a cut across two parts of the buffer; clip it first")
        out = first
        for nxt in itertools.islice(parts, k + 1, None):
            if not isinstance(nxt, Forwarded):
                raise IndexError("a cut across two parts of the buffer; clip it first")
            out = out + nxt[: n - len(out)]
            if len(out) == n:
                return out
        raise IndexError("past the end of the buffer")


class Pushed(Iterable[Any]):
    """A map's input that another thread pushes in (`Feeder.push`): the items of an
    async iterable, which `amap` brings over from the event loop as they come."""

    def __iter__(self) -> Iterator[Any]:
        return iter(())


class MapIterator(itertools.chain):  # type: ignore[type-arg]
    """What `map` returns: items come out at C speed; `close()` ends the map early
    (tasks not started are cancelled), as closing a generator would."""

    chunks: Generator[Iterable[Any], None, None]
    stream: Stream  # its results' stream (to abandon the map from another thread)
    feeder: Feeder  # where pushed input goes (`Pushed`)

    def close(self) -> None:
        self.chunks.close()


def _with_errors(chunk: Chunk) -> list[Any]:
    """A chunk's values with each failed task's error in its place."""
    values = list(chunk.values)
    assert chunk.errors is not None
    for i, exc in chunk.errors.items():
        values[i] = exc
    return values


def _until_error(chunk: Chunk, stop: Callable[[], None]) -> Iterator[Any]:
    """A chunk's values up to its first failed task, whose error is raised there after `stop()`."""
    errors = chunk.errors
    assert errors is not None
    for i, value in enumerate(chunk.values):
        if i in errors:
            stop()
            raise errors[i]
        yield value
