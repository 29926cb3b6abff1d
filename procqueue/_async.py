"""The pool awaited: `await pool.arun(...)`, `async for y in pool.amap(...)`,
`async with pq.Pool()`. Nothing here blocks the event loop, and nothing polls:
room in the queue, a task's outcome and a map's next results arrive by callback
(`loop.call_soon_threadsafe`). A map runs on a thread of its own, as the lazy
sync `map` does in its consumer's thread, and hands its results to the loop a
chunk at a time (at most two chunks ahead of the consumer)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from procqueue._errors import QueueFull
from procqueue._map import Pushed
from procqueue._results import Later, MakeError, Values, error_of, run_all, value_of

if TYPE_CHECKING:
    from procqueue._core import Core
    from procqueue._map import Feeder, MapIterator
    from procqueue._scheduler.tasks import Run

AHEAD = 2  # chunks of results a map's thread may hold for the loop before it waits


def awaited(task_id: int) -> Awaited:
    """The receiver of an `arun`'s task, with its waiter on the running loop."""
    loop = asyncio.get_running_loop()
    return Awaited(task_id, _inbox_of(loop), loop.create_future())


async def arun(core: Core, receiver: Awaited, run: Run | None, block_timeout: float | None) -> Any:
    """Queue `run` (None: its task failed already) and await its outcome: the waits for
    room (under "block") and for the outcome are suspensions, never blocking the loop."""
    if run is not None and not (core.cfg.backpressure == "block" and core.try_enqueue(run)):
        await enqueue(core, run, block_timeout)
    try:
        return await receiver.waiter
    except asyncio.CancelledError:
        # A task that has not started never runs; a running one runs to its end
        # and its outcome is dropped.
        with core.lock:
            receiver.withdraw()
        raise


class Awaited:
    """The one task of an `arun` (a `Receiver`, `procqueue/_scheduler/tasks.py`): no
    concurrent future and no done-callback. Once settled it goes straight to its loop's
    inbox from the thread that settled it (the manager's, after the pool's lock:
    `_Inbox.put` runs no user code), and its value is unpickled on the loop's thread.
    `claim` and every cancel run under the pool's lock: a task runs or is cancelled."""

    __slots__ = ("_cancelled", "_claimed", "_outcome", "inbox", "task_id", "waiter")
    partial = False  # cancelled whole or not at all
    timed_each = False  # nobody reads its duration: tiny tasks may run unmarked

    def __init__(self, task_id: int, inbox: _Inbox, waiter: asyncio.Future[Any]) -> None:
        self.task_id = task_id
        self.inbox = inbox
        self.waiter = waiter
        self._claimed = False
        self._cancelled = False
        self._outcome: tuple[bool, Any, int] | None = None  # (ok, values or error maker, index)

    def claim(self) -> bool:
        if self._cancelled:
            return False
        self._claimed = True
        return True

    def withdraw(self) -> bool:
        """The awaiting coroutine was cancelled: the task is, if it has not started (lock held)."""
        if self._claimed or self._cancelled:
            return False
        self._cancelled = True
        return True

    def cancel(self) -> bool:
        """Cancelled by the pool (a shutdown with cancel_futures): the waiter is too."""
        if not self.withdraw():
            return False
        self.inbox.put(self)
        return True

    def still_read(self) -> bool:
        return True

    def ok(
        self, index: int, values: Values | None, lo: int, hi: int, meta: tuple[int, int, Any, int], later: Later
    ) -> None:
        self._outcome = (True, values, lo)
        self.inbox.stage(self, later)

    def fail(self, index: int, make: BaseException | MakeError, attempts: int, pid: int | None, later: Later) -> None:
        self._claimed = True  # it may have failed before it ever ran (it did not pickle)
        self._outcome = (False, make, 0)
        self.inbox.stage(self, later)

    def settle(self) -> None:
        """Hand the outcome to the waiter (on the loop's thread): the value is unpickled here."""
        waiter = self.waiter
        if waiter.done():  # the coroutine was cancelled meanwhile
            return
        outcome = self._outcome
        if outcome is None:
            waiter.cancel()
            return
        ok, what, lo = outcome
        value: Any = None
        if not ok:
            ok, value = error_of(what)
        elif what is not None:  # None: nothing comes back (a FileOutput took it)
            ok, value = value_of(what, lo, self.task_id)
        if ok:
            waiter.set_result(value)
        elif isinstance(value, StopIteration):  # which a coroutine may not raise
            waiter.set_exception(RuntimeError(f"the task raised StopIteration: {value!r}"))
        else:
            waiter.set_exception(value)


class _Inbox:
    """Outcomes for one event loop: tasks settled on the pool's threads are handed over
    in bulk, one wake-up of the loop (`call_soon_threadsafe`) per bunch, not per task."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)  # weakly: the inboxes are keyed by their loop, weakly too
        self.lock = threading.Lock()
        self.items: list[Awaited] = []
        self.scheduled = False

    def put(self, item: Awaited) -> None:
        """From any thread."""
        later: Later = []
        self.stage(item, later)
        run_all(later)

    def stage(self, item: Awaited, later: Later) -> None:
        """From any thread, the pool's lock held or not: `item` joins the inbox now, and
        the loop is woken after the lock (through `later`), once for all that joins
        before it drains (a batch's outcomes: one lock round each, one wake-up)."""
        with self.lock:
            self.items.append(item)
            if self.scheduled:
                return
            self.scheduled = True
        later.append(self.wake)

    def wake(self) -> None:
        loop = self.loop()
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self.drain)
        except RuntimeError:  # the loop is closed: nobody awaits these any more
            with self.lock:
                self.items.clear()
                self.scheduled = False

    def drain(self) -> None:
        with self.lock:
            items, self.items = self.items, []
            self.scheduled = False
        for item in items:
            item.settle()


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


_last: _Inbox | None = None  # the inbox asked for last: most programs have one loop


def _inbox_of(loop: asyncio.AbstractEventLoop) -> _Inbox:
    global _last
    inbox = _last
    if inbox is not None and inbox.loop() is loop:
        return inbox
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.setdefault(loop, _Inbox(loop))
    _last = inbox
    return inbox


async def enqueue(core: Core, run: Run, block_timeout: float | None) -> None:
    """Queue `run` under the pool's backpressure; "block" waits here without blocking the loop."""
    loop = asyncio.get_running_loop()
    mode = core.cfg.backpressure
    if mode != "block":
        later: Later = []
        core.enqueue(run, mode, None, later)
        run_all(later)
        return
    deadline = None if block_timeout is None else loop.time() + block_timeout
    capacity = core.cfg.capacity
    waited_since: float | None = None  # the first time it found no room
    try:
        while True:
            room = asyncio.Event()

            def wake(room: asyncio.Event = room) -> None:
                loop.call_soon_threadsafe(room.set)

            with core.lock:
                core.flow.waiters.add(wake)
            try:
                if core.try_enqueue(run):
                    return
                if waited_since is None:
                    waited_since = loop.time()
                left = None if deadline is None else deadline - loop.time()
                try:
                    if left is not None and left <= 0:
                        raise asyncio.TimeoutError
                    await asyncio.wait_for(room.wait(), left)
                except asyncio.TimeoutError:
                    raise QueueFull(
                        f"the pending queue stayed full ({capacity} tasks) for {block_timeout} s", capacity=capacity
                    ) from None
            finally:
                with core.lock:
                    core.flow.waiters.discard(wake)
    finally:
        if waited_since is not None:
            with core.lock:
                core.flow.blocked += loop.time() - waited_since


class AsyncMap:
    """What `amap` returns: iterate it with `async for`. Leaving early (`break`, an
    error, `aclose()`, or dropping it) cancels the tasks that have not started."""

    def __init__(
        self, core: Core, start: Callable[[Iterable[Any]], MapIterator], items: Iterable[Any] | AsyncIterable[Any]
    ) -> None:
        # The map's thread holds only the bridge, never this object: dropping it (a `break`
        # out of `async for`) reaches __del__ at once, which lets the map go.
        self._bridge = _Bridge(core, start, items)

    def __aiter__(self) -> AsyncMap:
        return self

    async def __anext__(self) -> Any:
        return await self._bridge.next()

    async def aclose(self) -> None:
        """Leave the map: tasks not started are cancelled."""
        self._bridge.close()

    def __del__(self) -> None:
        bridge = getattr(self, "_bridge", None)
        if bridge is not None:
            bridge.close()


class _Bridge:
    """An `AsyncMap`'s state, shared by the loop (the consumer) and the map's thread."""

    def __init__(
        self, core: Core, start: Callable[[Iterable[Any]], MapIterator], items: Iterable[Any] | AsyncIterable[Any]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._core = core
        self._start = start  # the sync map over a source: run on the map's thread
        # An async input is read on the loop by a task of ours and pushed into the map as
        # its window has room; a plain iterable is read by the map's thread, as `map` does.
        self._ait: AsyncIterator[Any] | None = aiter(items) if isinstance(items, AsyncIterable) else None
        self._source: Iterable[Any] = Pushed() if self._ait is not None else items  # type: ignore[assignment]
        self._room = asyncio.Event()  # the map's window moved: the producer may push more
        self._producer: asyncio.Task[None] | None = None
        self._cv = threading.Condition()
        self._ready: deque[tuple[list[Any], BaseException | None]] = deque()
        self._items: deque[Any] = deque()
        self._error: BaseException | None = None
        self._ended = False  # the thread has handed over everything
        self._closed = False  # the consumer left
        self._waiter: asyncio.Future[None] | None = None
        self._stream: Any = None
        threading.Thread(target=self._serve, name="procqueue-amap", daemon=True).start()

    # --- the loop's side ----------------------------------------------------------------------

    async def next(self) -> Any:
        while True:
            if self._items:
                return self._items.popleft()
            if self._error is not None:
                error, self._error = self._error, None
                self._ended = True
                self.close()
                raise error
            if self._ended and not self._ready:
                raise StopAsyncIteration
            await self._next_chunk()

    async def _next_chunk(self) -> None:
        with self._cv:
            if self._ready:
                values, error = self._ready.popleft()
                self._items.extend(values)
                self._error = error
                self._cv.notify_all()
                return
            if self._ended:
                return
            waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.close()
            raise

    def close(self) -> None:
        """The consumer left: cancel what did not start (from any thread, a finalizer too)."""
        if self._closed:
            return
        self._closed = True
        stream = self._stream
        if stream is not None and not self._ended:
            self._core.abandon(stream)  # lock-free: safe from a finalizer
        if self._cv.acquire(blocking=False):  # a finalizer may run while this thread holds it
            try:
                self._cv.notify_all()
            finally:
                self._cv.release()
        self._on_loop(self._stop_producer)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(fn)

    # --- the producer of an async input, a task on the loop -----------------------------------

    def _start_producer(self, feeder: Feeder) -> None:
        if not self._closed and self._ait is not None:
            self._producer = self._loop.create_task(self._produce(feeder, self._ait))

    def _stop_producer(self) -> None:
        if self._producer is not None:
            self._producer.cancel()

    async def _produce(self, feeder: Feeder, items: AsyncIterator[Any]) -> None:
        """Read the async input as the map's window has room, one item at a time, so a
        slow source is never held back and a fast one crosses as fast as the map takes it."""
        try:
            while True:
                if feeder.want_now() <= 0:
                    self._room.clear()
                    if feeder.want_now() <= 0:
                        await self._room.wait()
                    continue
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    feeder.push([], True)
                    return
                if not feeder.push([item], False):
                    return
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the input failed: what came before runs, then this is raised
            feeder.push([], True, exc)
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                with contextlib.suppress(BaseException):
                    await close()

    # --- the map's own thread -----------------------------------------------------------------

    def _serve(self) -> None:
        chunks = None
        try:
            results = self._start(self._source)
            chunks = results.chunks
            self._stream = results.stream
            if self._closed:
                self._core.abandon(self._stream)
            if self._ait is not None:
                feeder = results.feeder
                self._on_loop(lambda: self._start_producer(feeder))
            for chunk in chunks:
                values: list[Any] = []
                try:
                    values.extend(chunk)
                except BaseException as exc:  # a failed task, raised at its place
                    self._hand_over(values, exc)
                    return
                if not self._hand_over(values, None):
                    return
        except BaseException as exc:  # the input failed, the pool broke or closed
            self._hand_over([], exc)
        finally:
            if chunks is not None:
                chunks.close()  # what is not finished is cancelled (this thread owns the generator)
            if self._ait is not None:
                self._on_loop(self._stop_producer)
            with self._cv:
                self._ended = True
                self._wake_consumer()

    def _hand_over(self, values: list[Any], error: BaseException | None) -> bool:
        """Give the loop a chunk; False once the consumer has left."""
        with self._cv:
            while len(self._ready) >= AHEAD and not self._closed:
                self._cv.wait(0.5)  # the notify of a close from a finalizer may be skipped
            if self._closed:
                return False
            self._ready.append((values, error))
            self._wake_consumer()
        if self._ait is not None:
            self._on_loop(self._room.set)  # the window moved: more input may come
        return error is None

    def _wake_consumer(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                self._loop.call_soon_threadsafe(wake_waiter, waiter)


def wake_waiter(waiter: asyncio.Future[None]) -> None:
    """Set a waiter that nothing else settles (on its loop's thread)."""
    if not waiter.done():
        waiter.set_result(None)
