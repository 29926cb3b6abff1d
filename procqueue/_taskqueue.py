"""`TaskQueue`: the seed model (a handler, tasks with ids, results), a thin layer over `Pool`."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from procqueue._pool import Future, Pool

if TYPE_CHECKING:
    import asyncio  # loaded where it is used: it costs ~10 ms, which sync users need not pay


@dataclass(frozen=True)
class Task:
    """One unit of work for a `TaskQueue`: the handler is called as `handler(payload)`.

    `priority`: larger runs first; `retries`: this task's retry budget (None:
    the queue's `max_retries`).
    """

    id: Any
    payload: Any
    priority: int = 0
    retries: int | None = None


@dataclass(frozen=True)
class Result:
    """The outcome of one `Task`: `value`, or `error` (the exception) with `value` None."""

    task_id: Any
    value: Any
    error: BaseException | None
    attempts: int
    duration_ms: float | None
    worker_pid: int | None

    @property
    def ok(self) -> bool:
        return self.error is None


class TaskQueue:
    """A handler, a queue of `Task`s and their `Result`s::

        with pq.TaskQueue(handler, workers=4, max_retries=2) as q:
            for i, line in enumerate(lines):
                q.submit(pq.Task(i, line))
            for result in q.drain():
                ...

    `results()` yields results as tasks complete; `drain()` waits for every
    submitted task and returns the results not yet handed out, in submission
    order, failures included.
    """

    def __init__(
        self,
        handler: Callable[[Any], Any],
        workers: int | None = None,
        capacity: int = 1024,
        max_retries: int = 0,
        backpressure: str = "block",
        **pool_options: Any,
    ) -> None:
        self.handler = handler
        self.pool = Pool(
            workers=workers, capacity=capacity, max_retries=max_retries, backpressure=backpressure, **pool_options
        )
        self._done: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: dict[int, Future] = {}  # submitted, not yet handed out (by submission order)
        self._order = 0
        self._waiters: list[asyncio.Future[None]] = []  # `aresults()` consumers waiting for a result

    def submit(self, task: Task) -> Future:
        """Queue a task; its `Result` comes out of `results()` or `drain()`."""
        fut = self.pool.options(priority=task.priority, retries=task.retries).submit(self.handler, task.payload)
        self._track(task, fut)
        return fut

    async def asubmit(self, task: Task) -> Future:
        """`submit` from async code: under backpressure "block" it waits for room
        suspended, never blocking the event loop; "drop" and "error" act as `submit`."""
        from procqueue._async import enqueue

        opts = self.pool.options(priority=task.priority, retries=task.retries)
        fut, run = opts._prepare(self.handler, (task.payload,), {})
        if run is not None:
            await enqueue(self.pool._core, run, opts.block_timeout)
        self._track(task, fut)
        return fut

    def _track(self, task: Task, fut: Future) -> None:
        with self._lock:
            key = self._order
            self._order += 1
            self._waiting[key] = fut
        fut.add_done_callback(lambda _: self._deliver(self._result(task, fut, key)))

    def _deliver(self, result: Result) -> None:
        self._done.put(result)
        with self._lock:
            waiters, self._waiters = self._waiters, []
        if not waiters:
            return
        from procqueue._async import wake_waiter

        for waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
                waiter.get_loop().call_soon_threadsafe(wake_waiter, waiter)

    @staticmethod
    def _result(task: Task, fut: Future, key: int) -> Result:
        error = None if fut.cancelled() else fut.exception()
        value = None if error is not None or fut.cancelled() else fut.result()
        result = Result(task.id, value, error, fut.attempts, fut.duration_ms, fut.worker_pid)
        object.__setattr__(result, "_key", key)
        return result

    def results(self) -> Iterator[Result]:
        """Results as tasks complete, until every task submitted so far has one."""
        while True:
            with self._lock:
                if not self._waiting:
                    return
            result = self._done.get()
            with self._lock:
                if self._waiting.pop(result._key, None) is None:  # type: ignore[attr-defined]
                    continue
            yield result

    def drain(self) -> list[Result]:
        """Wait for every submitted task; one `Result` per task not yet handed out."""
        got = list(self.results())
        got.sort(key=lambda r: r._key)  # type: ignore[attr-defined]
        return got

    async def aresults(self) -> AsyncIterator[Result]:
        """`results()` for async code: each result as its task completes, by callback
        (the loop is never blocked, nothing polls)."""
        import asyncio

        while True:
            with self._lock:
                if not self._waiting:
                    return
                try:
                    result = self._done.get_nowait()
                except queue.Empty:
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)  # every consumer is woken; one takes the result
                    result = None
            if result is None:
                await waiter
                continue
            with self._lock:
                if self._waiting.pop(result._key, None) is None:  # type: ignore[attr-defined]
                    continue
            yield result

    async def adrain(self) -> list[Result]:
        """`drain()` for async code: every submitted task's `Result`, in submission order."""
        got = [r async for r in self.aresults()]
        got.sort(key=lambda r: r._key)  # type: ignore[attr-defined]
        return got

    def stats(self) -> Any:
        """The pool's `Stats`."""
        return self.pool.stats()

    def close(self) -> None:
        """Wait for the tasks, then end the processes."""
        self.pool.shutdown(wait=True)

    def __enter__(self) -> TaskQueue:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        return self.pool.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> TaskQueue:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        """As `__exit__`, on a thread of its own: the event loop runs on meanwhile."""
        return await self.pool.__aexit__(exc_type, exc, tb)
