"""`Stage`: one step of a `Pipeline`, with the options of the pool that runs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal


class Stage:
    """One step of a `procqueue.Pipeline`: `fn(item)` for every item that reaches it,
    in worker processes of its own.

    `workers` (default: the usable CPUs), `retries` (the retry budget of each
    item at this stage), `timeout` (seconds before a running item's worker is
    killed), `initializer`/`initargs`, `max_tasks_per_worker`,
    `max_worker_memory`, `rate` (`"100/s"`, `"20/m"`, a number per second),
    `backoff`/`backoff_max` mean what they mean for `procqueue.Pool`.
    `capacity` bounds the items waiting at this stage (default: the
    pipeline's); `chunksize` is the batch size (default chosen from measured
    durations); `name` is how errors and the live view call it (default the
    function's name).
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        workers: int | None = None,
        *,
        retries: int = 0,
        timeout: float | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | None = None,
        rate: str | float | None = None,
        capacity: int | None = None,
        chunksize: int | Literal["auto"] = "auto",
        backoff: float = 0.1,
        backoff_max: float = 30.0,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"Stage needs a callable, got {type(fn).__name__}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"a stage's capacity must be an int >= 1, got {capacity!r}")
        if chunksize != "auto" and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be an int >= 1 or 'auto', got {chunksize!r}")
        self.fn = fn
        self.workers = workers
        self.retries = retries
        self.timeout = timeout
        self.initializer = initializer
        self.initargs = initargs
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_worker_memory = max_worker_memory
        self.rate = rate
        self.capacity = capacity
        self.chunksize = chunksize
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    def __repr__(self) -> str:
        return f"Stage({self.name}, workers={self.workers})"
