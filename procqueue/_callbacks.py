"""Where user code that the pool's own threads would otherwise run goes instead.

The manager thread moves every message of the pool; if it ran a future's
done-callback (which may block, submit into a full pool or raise
`SystemExit`), one bad callback would stall or break the pool. So a future
settled by the manager hands its callbacks to a `Runner`: threads of its own
that run them in order. A callback stuck for longer than `STUCK` seconds gets
company: the next callbacks start on a fresh thread (up to `MAX_THREADS`), so
a blocked callback costs its own task only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("procqueue")

STUCK = 0.5  # seconds a callback may run before the next ones get a thread of their own
MAX_THREADS = 16
IDLE_EXIT = 2.0  # seconds an extra thread waits for work before it ends

_internal = threading.local()


def mark_internal() -> None:
    """Called first thing by the pool's own threads (manager, sampler)."""
    _internal.on = True


def on_internal_thread() -> bool:
    """On one of the pool's own threads, or inside `deferring()`: hand user code to a runner."""
    return bool(getattr(_internal, "on", False) or getattr(_internal, "deferring", 0))


@contextlib.contextmanager
def deferring() -> Iterator[None]:
    """While the engine lock is held on a user's thread (cancelling futures at
    shutdown), callbacks go to the runner instead of running under the lock."""
    _internal.deferring = getattr(_internal, "deferring", 0) + 1
    try:
        yield
    finally:
        _internal.deferring -= 1


class Runner:
    """Threads that run user callbacks handed over by the pool's own threads.

    The first thread takes callbacks in order as they come. While every thread
    is busy, a post starts one more (up to `MAX_THREADS`), which takes a
    callback only once it has waited `STUCK` seconds: quick callbacks keep their
    order on one thread, and one that blocks holds up the others for `STUCK`
    at most. A thread that finds nothing to do for `IDLE_EXIT` seconds ends."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._queue: deque[tuple[float, Callable[[], Any]]] = deque()  # (posted at, callback)
        self._threads: list[threading.Thread] = []
        self._busy: set[threading.Thread] = set()
        self._closing = False
        self._reported = False

    def post(self, fn: Callable[[], Any]) -> None:
        """Run `fn` soon, on a runner thread (never blocks)."""
        with self._cv:
            self._queue.append((time.monotonic(), fn))
            self._ensure_standby()
            self._cv.notify_all()

    def _ensure_standby(self) -> None:
        """While callbacks wait and every thread is busy, one more thread stands by (lock held)."""
        if self._queue and len(self._busy) >= len(self._threads) and len(self._threads) < MAX_THREADS:
            thread = threading.Thread(target=self._serve, name="procqueue-callbacks", daemon=True)
            self._threads.append(thread)
            thread.start()

    def close(self) -> None:
        """Threads end once the queue is empty."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the threads to finish what was posted (not from one of them)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        for thread in list(self._threads):
            if thread is not me:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _next(self, me: threading.Thread) -> Callable[[], Any] | None:
        """The next callback for this thread, or None when it should end (lock held)."""
        idle_since = time.monotonic()
        while True:
            now = time.monotonic()
            if self._queue:
                first = self._threads and me is self._threads[0]
                wait = 0.0 if first else self._queue[0][0] + STUCK - now
                if wait <= 0:
                    self._busy.add(me)
                    fn = self._queue.popleft()[1]
                    self._ensure_standby()  # in case this one blocks with others still waiting
                    return fn
            elif self._closing or (me is not self._threads[0] and now - idle_since >= IDLE_EXIT):
                return None
            else:
                wait = IDLE_EXIT if me is not self._threads[0] else 60.0
            self._cv.wait(wait)

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cv:
                fn = self._next(me)
                if fn is None:
                    self._threads.remove(me)
                    self._cv.notify_all()  # another may now be the first
                    return
            try:
                fn()
            except BaseException as exc:  # the callback's own failure; the pool goes on
                self._report(exc)
            finally:
                with self._cv:
                    self._busy.discard(me)

    def _report(self, exc: BaseException) -> None:
        # Logged as concurrent.futures does for a raising callback; the first with its traceback.
        if not self._reported:
            self._reported = True
            log.error("procqueue: a done-callback raised %s", type(exc).__name__, exc_info=exc)
        else:
            log.error("procqueue: a done-callback raised %s", type(exc).__name__)
