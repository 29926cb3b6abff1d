"""`TaskQueue`: the seed model (a handler, tasks with ids, results), a thin layer over `Pool`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from procqueue._pool import Future, Pool


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

    def submit(self, task: Task) -> Future:
        """Queue a task; its `Result` comes out of `results()` or `drain()`."""
        fut = self.pool.options(priority=task.priority, retries=task.retries).submit(self.handler, task.payload)
        with self._lock:
            key = self._order
            self._order += 1
            self._waiting[key] = fut
        fut.add_done_callback(lambda _: self._done.put(self._result(task, fut, key)))
        return fut

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
