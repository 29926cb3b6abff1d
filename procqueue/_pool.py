"""`Pool` and `Options`: the public face (the front half is `_core.py`; the
processes and the diagram: `procqueue/_local/__init__.py`)."""

from __future__ import annotations

import concurrent.futures
import math
import os
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from functools import partial
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar, cast

from procqueue._core import Core
from procqueue._errors import ProcQueueError
from procqueue._file_writer import OutputSpec
from procqueue._local.backend import LocalBackend
from procqueue._map import Feeder, MapIterator
from procqueue._monitor.sampler import Monitor
from procqueue._output import FileOutput, OutputHandle
from procqueue._protocol import messages as m
from procqueue._protocol.arguments import argument_error
from procqueue._protocol.pickling import pickle_arguments
from procqueue._results import Chunk, FutureReceiver, Later, Stream, run_all
from procqueue._results import Future as Future
from procqueue._scheduler.rate import Bucket, parse_rate
from procqueue._scheduler.tasks import Receiver, Run
from procqueue._settings import BACKPRESSURE, Config, default_start_method, default_workers
from procqueue._stats import Stats

if TYPE_CHECKING:
    from procqueue._monitor.view import LiveView

T = TypeVar("T")
_PLAIN = frozenset({int, float, bool, type(None)})
_SHORT = frozenset({str, bytes})


def _plain(args: tuple[Any, ...]) -> bool:
    """Arguments of builtin types only (strings and bytes short): pickling them runs no
    user code and takes no time, so they are pickled with their batch, not one by one."""
    for a in args:
        t = type(a)
        if t not in _PLAIN and not (t in _SHORT and len(a) <= 1024):
            return False
    return True


R = TypeVar("R", bound=Receiver)
Chunksize = int | Literal["auto"] | None


class Options:
    """Per-call options over a pool: `pool.options(priority=9, retries=2, timeout=5.0)`.

    It has `submit`, `map` and `imap_unordered` like the pool, and `options`
    to refine further. `priority`: larger runs first (default 0); `retries`:
    the retry budget (default the pool's `max_retries`); `timeout`: seconds
    before a running task's worker is killed (default the pool's
    `task_timeout`); `block_timeout`: how long `submit` may wait for room
    under backpressure "block" before raising `QueueFull`; `rate`: at most this
    many of these tasks start per unit of time (`"100/s"`, `"20/m"`, `"500/h"`,
    or a number per second), shared by every call at the same rate (default
    the pool's `rate`).
    """

    def __init__(
        self,
        pool: Pool,
        priority: int = 0,
        retries: int | None = None,
        timeout: float | None = None,
        block_timeout: float | None = None,
        rate: str | float | None = None,
    ) -> None:
        if retries is not None and retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        lifted = timeout is not None and math.isinf(timeout)
        if lifted:
            timeout = None  # options(timeout=math.inf) lifts a pool's task_timeout for these calls
        self._pool = pool
        self.priority = int(priority)
        self.retries = pool._cfg.max_retries if retries is None else int(retries)
        self.timeout = pool._cfg.task_timeout if timeout is None and not lifted else timeout
        self.block_timeout = pool._cfg.block_timeout if block_timeout is None else block_timeout
        self.rate = rate
        self.bucket = pool._bucket if rate is None else pool._bucket_for(rate)

    def options(
        self,
        priority: int | None = None,
        retries: int | None = None,
        timeout: float | None = None,
        block_timeout: float | None = None,
        rate: str | float | None = None,
    ) -> Options:
        """These options with the ones given changed."""
        return Options(
            self._pool,
            self.priority if priority is None else priority,
            self.retries if retries is None else retries,
            self.timeout if timeout is None else timeout,
            self.block_timeout if block_timeout is None else block_timeout,
            self.rate if rate is None else rate,
        )

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule `fn(*args, **kwargs)`; returns a `procqueue.Future`."""
        fut, run = self._prepare(fn, args, kwargs)
        if run is not None:
            later: Later = []
            self._pool._core.enqueue(run, self._pool._cfg.backpressure, self.block_timeout, later)
            run_all(later)
        return fut

    async def arun(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`await` the value of `fn(*args, **kwargs)` run in the pool (see `Pool.arun`)."""
        from procqueue._async import arun, awaited

        receiver, run = self._prepare_run(fn, args, kwargs, awaited)
        return await arun(self._pool._core, receiver, run, self.block_timeout)  # type: ignore[no-any-return]

    def amap(
        self,
        fn: Callable[..., T],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        chunksize: Chunksize = "auto",
    ) -> AsyncIterator[T]:
        """`async for y in ...`: the lazy, bounded map of `fn` over `items` (see `Pool.amap`)."""
        from procqueue._async import AsyncMap

        def start(source: Iterable[Any]) -> MapIterator:
            it = self.map(fn, source, chunksize=chunksize, ordered=ordered, return_exceptions=return_exceptions)
            return cast(MapIterator, it)

        return AsyncMap(self._pool._core, start, items)

    def _prepare(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Future, Run | None]:
        """A submit's future and its run (see `_prepare_run`)."""
        runner = self._pool._core.runner
        receiver, run = self._prepare_run(fn, args, kwargs, lambda task_id: FutureReceiver(Future(task_id, runner)))
        return receiver.future, run

    def _prepare_run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], receiver: Callable[[int], R]
    ) -> tuple[R, Run | None]:
        """A submit's receiver (made for its task id) and its run, pickled here in the caller's
        thread; the run is None when the task failed already (its arguments or handler would
        not pickle)."""
        pool = self._pool
        core = pool._core
        core.check_open()
        with core.lock:  # one lock round per submit: the handler and the task id
            handler = core.scheduler.handlers.get(fn)
            task_id = core.scheduler.new_ids(1)
        rec = receiver(task_id)
        item: Any = (args, kwargs) if kwargs else args
        call = m.Call.FULL if kwargs else m.Call.STAR
        run = Run(
            handler,
            [item],
            call,
            rec,
            task_id,
            self.priority,
            retries=self.retries,
            timeout=self.timeout,
            bucket=self.bucket,
        )
        later: Later = []
        # Pickled here, in the caller's thread: a __reduce__ that blocks or raises costs this call only.
        try:
            handler.wire()
            if not (kwargs or _plain(args)):  # plain values run no code of the user's when pickled
                run.items = [pickle_arguments(item)]  # with their batch, at C speed
                run.packed = True
        except ProcQueueError as exc:  # the handler would not pickle
            core.reject_new(run, exc, later)
        except KeyboardInterrupt:  # Ctrl-C while pickling is the user's, not the task's
            raise
        except BaseException:  # a __reduce__ may raise anything, SystemExit too: this task's failure
            core.reject_new(run, argument_error(task_id, call, item), later)
        else:
            return rec, run
        run_all(later)
        return rec, None

    def _submit_items(self, fn: Callable[..., Any], items: list[Any]) -> Chunk:
        """`fn(item)` for each item, as one entry of the heap at these options'
        priority; the returned chunk is `done` when all have ended (`procqueue run`)."""
        pool = self._pool
        core = pool._core
        core.check_open()
        with core.lock:
            handler = core.scheduler.handlers.get(fn)
            first_id = core.scheduler.new_ids(len(items))
        chunk = Chunk(Stream(), len(items), first_id)
        run = Run(
            handler, items, m.Call.ONE, chunk, first_id, self.priority, retries=self.retries, timeout=self.timeout,
            bucket=self.bucket,
        )  # fmt: skip
        later: Later = []
        core.enqueue(run, pool._cfg.backpressure, self.block_timeout, later)
        run_all(later)
        return chunk

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: Chunksize = "auto",
        ordered: bool = True,
        progress: bool = False,
        return_exceptions: bool = False,
    ) -> Iterator[T]:
        """Lazy, bounded `map`: results in input order (or as completed with
        `ordered=False`).

        Up to `capacity` tasks start at once; more are pulled from the input
        only as results are consumed, so a generator of any length runs in
        bounded memory. `chunksize="auto"` sizes batches from measured task
        durations. `timeout` (seconds from this call) raises `TimeoutError`
        from the iterator if a result is late. If a task failed, its error is
        raised at its place in the iteration and ends it; with
        `return_exceptions=True` the error takes the task's place as a value
        and the map goes on. `progress=True` shows a progress
        bar of the results handed out (on stderr; plain lines when it is not a
        terminal), counting to the input's length when it has one.
        """
        if chunksize == "auto" or chunksize is None:
            size: int | None = None
        elif isinstance(chunksize, int) and chunksize >= 1:
            size = chunksize
        else:
            raise ValueError(f"chunksize must be an int >= 1 or 'auto', got {chunksize!r}")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        core = self._pool._core
        core.check_open()
        with core.lock:
            handler = core.scheduler.handlers.get(fn)
        source: Iterable[Any]
        if len(iterables) == 1:
            source, call = iterables[0], m.Call.ONE
        else:
            source, call = zip(*iterables), m.Call.STAR  # noqa: B905 - map() stops at the shortest
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        if progress:
            lengths = [len(it) for it in iterables if hasattr(it, "__len__")]  # type: ignore[arg-type]
            bar = (min(lengths) if len(lengths) == len(iterables) else None, _name(fn), self._pool._views)
        feeder = Feeder(core, self, handler, source, call, size, ordered, return_exceptions)
        feeder.start()  # start now, as Executor.map does, up to the queue's capacity
        return feeder.results(deadline, bar)

    def imap_unordered(
        self, fn: Callable[..., T], iterable: Iterable[Any], chunksize: Chunksize = "auto"
    ) -> Iterator[T]:
        """`map(fn, iterable, ordered=False)`: results as they complete."""
        return self.map(fn, iterable, chunksize=chunksize, ordered=False)


class Pool(concurrent.futures.Executor):
    """A crash-proof, bounded, prioritised process pool.

    A drop-in for `concurrent.futures.ProcessPoolExecutor`::

        import procqueue as pq

        with pq.Pool() as pool:
            squares = list(pool.map(square, range(1_000_000)))
            job = pool.options(priority=9, retries=2).submit(fetch, url)

    A worker that dies (segfault, SIGKILL, `os._exit`) or hangs past
    `task_timeout` costs its task one attempt, never the pool; failed
    attempts are retried up to `max_retries` with exponential backoff
    (`backoff * 2**(k-1)` +-25 %, capped at `backoff_max`). At most `capacity`
    tasks wait in the queue; when it is full `backpressure` says whether
    `submit` blocks, drops the task (its future fails with `Dropped`) or
    raises `QueueFull`. Workers are recycled after `max_tasks_per_worker`
    tasks or past `max_worker_memory` bytes of RSS (as the monitor samples
    it). The default start method is forkserver (spawn where there is none),
    safe with threads. `monitor` (keyword only) sets how the pool samples
    itself: True (every second, the default), an interval in seconds, a
    `procqueue.Monitor` with sinks, or False for off. `output` (keyword only,
    a `procqueue.FileOutput`) has the collector write the tasks' values to a
    file instead of returning them (what `procqueue run` does). `backend`
    (keyword only) says what runs the tasks: "local", processes on this
    machine, or "dask": a Dask distributed cluster, either a `LocalCluster` of
    `workers` processes on 127.0.0.1 that the pool starts and closes (with a
    dashboard if `dashboard`), or the one at `address`, or the one of a
    `client` you hold (never closed by the pool); `security` is a
    `distributed.security.Security` for TLS. `on_pressure` (keyword only) is
    called with "full" when the pending queue reaches `capacity` and with
    "drained" when it falls back under `low_water` (a share of `capacity`,
    default 0.7), on a callback thread of the pool, never on the thread that
    moves its messages: a producer's cue to pause and resume. `rate`
    (keyword only) caps how many tasks start per unit of time: `"100/s"`,
    `"20/m"`, `"500/h"` or a number per second, a token bucket at dispatch (a
    second's worth may start at once after a pause); a task held back holds no
    worker, and priorities hold among the tasks allowed to run.
    """

    def __init__(
        self,
        workers: int | None = None,
        capacity: int = 1024,
        backpressure: str = "block",
        max_retries: int = 0,
        backoff: float = 0.1,
        backoff_max: float = 30.0,
        task_timeout: float | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        start_method: str | None = None,
        *,
        block_timeout: float | None = None,
        monitor: bool | float | Monitor = True,
        output: FileOutput | None = None,
        backend: str = "local",
        address: str | None = None,
        client: Any = None,
        security: Any = None,
        dashboard: bool = False,
        on_pressure: Callable[[str], Any] | None = None,
        low_water: float = 0.7,
        rate: str | float | None = None,
    ) -> None:
        if backend not in ("local", "dask"):
            raise ValueError(f"unknown backend {backend!r}; procqueue has 'local' and 'dask'")
        if backend == "local" and (address is not None or client is not None or security is not None):
            raise ValueError('address=, client= and security= are for backend="dask"')
        if backend == "dask":
            for name, value in (("max_tasks_per_worker", max_tasks_per_worker),
                                ("max_worker_memory", max_worker_memory)):  # fmt: skip
                if value is not None:
                    raise ValueError(
                        f'{name}= is not available with backend="dask": a Dask worker\'s limits are its '
                        "nanny's (memory_limit, lifetime)"
                    )
        workers = default_workers() if workers is None else workers
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        if backpressure not in BACKPRESSURE:
            raise ValueError(f"backpressure must be one of 'block', 'drop', 'error'; got {backpressure!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        if backoff < 0 or backoff_max < 0:
            raise ValueError("backoff and backoff_max must be >= 0 seconds")
        if task_timeout is not None and math.isinf(task_timeout):
            task_timeout = None
        if task_timeout is not None and not task_timeout > 0:  # NaN too
            raise ValueError(f"task_timeout must be > 0 seconds, got {task_timeout!r}")
        if max_tasks_per_worker is not None and max_tasks_per_worker < 1:
            raise ValueError(f"max_tasks_per_worker must be >= 1, got {max_tasks_per_worker!r}")
        if max_worker_memory is not None and max_worker_memory < 1:
            raise ValueError(f"max_worker_memory must be > 0 bytes, got {max_worker_memory!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be callable")
        if on_pressure is not None and not callable(on_pressure):
            raise TypeError("on_pressure must be callable (it is called with 'full' or 'drained')")
        if not 0 < low_water <= 1:  # NaN too
            raise ValueError(f"low_water must be a share of capacity in (0, 1], got {low_water!r}")
        self._buckets: dict[float, Bucket] = {}  # one per rate: calls at the same rate share it
        self._bucket: Bucket | None = None if rate is None else self._bucket_for(rate)
        method = start_method or default_start_method()
        import multiprocessing

        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method {method!r} is not available here; use one of {multiprocessing.get_all_start_methods()}"
            )
        self._cfg = Config(
            workers, capacity, backpressure, max_retries, backoff, backoff_max, task_timeout,
            max_tasks_per_worker, max_worker_memory, initializer, tuple(initargs), method, block_timeout,
            Monitor.of(monitor), _output_spec(output), on_pressure, float(low_water),
        )  # fmt: skip
        if backend == "dask":
            from procqueue._dask.cluster import import_distributed

            import_distributed()  # without it: an ImportError that names the install command
            from procqueue._dask.backend import DaskBackend

            make: Any = partial(DaskBackend, address=address, client=client, security=security, dashboard=dashboard)
        else:
            make = LocalBackend
        try:
            self._core = Core(self._cfg, make)
        finally:
            if backend == "local" and self._cfg.output is not None and self._cfg.output.stream is not None:
                self._cfg.output.stream.close()  # the collector holds its own copy
        self.output: OutputHandle | None = None
        """With `output=FileOutput(...)`: write records of the parent's own, read how writing goes."""
        if output is not None:
            ends: Any = self._core.backend  # both backends write a FileOutput
            self.output = OutputHandle(ends.write_output, ends.output_status, self._core.check_writable)
        self._views: list[LiveView] = []  # live views open on this pool, innermost last
        self._default = Options(self)
        # A pool dropped without shutdown still ends its processes (no orphans).
        weakref.finalize(self, self._core.shutdown, False, False)

    def _bucket_for(self, rate: str | float) -> Bucket:
        per_s = parse_rate(rate)
        assert per_s is not None
        return self._buckets.setdefault(per_s, Bucket(per_s))

    @property
    def workers(self) -> int:
        """Number of worker processes (with backend="dask", of worker threads in the cluster)."""
        return self._core.backend.seats

    def options(
        self,
        priority: int = 0,
        retries: int | None = None,
        timeout: float | None = None,
        block_timeout: float | None = None,
        rate: str | float | None = None,
    ) -> Options:
        """A view of this pool with per-call options (see `Options`)."""
        return Options(self, priority, retries, timeout, block_timeout, rate)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future:  # type: ignore[override]
        """Schedule `fn(*args, **kwargs)`; returns a `procqueue.Future` (a
        `concurrent.futures.Future`). Raises `PoolClosed` after shutdown."""
        return self._default.submit(fn, *args, **kwargs)

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: Chunksize = "auto",
        ordered: bool = True,
        progress: bool = False,
        return_exceptions: bool = False,
    ) -> Iterator[T]:
        """Lazy, bounded, ordered map (see `Options.map`)."""
        return self._default.map(
            fn, *iterables, timeout=timeout, chunksize=chunksize, ordered=ordered, progress=progress,
            return_exceptions=return_exceptions,
        )  # fmt: skip

    def imap_unordered(
        self, fn: Callable[..., T], iterable: Iterable[Any], chunksize: Chunksize = "auto"
    ) -> Iterator[T]:
        """Results as they complete."""
        return self._default.imap_unordered(fn, iterable, chunksize=chunksize)

    async def arun(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`await pool.arun(fn, *args, **kwargs)`: the value of the call, run in the pool.

        Under backpressure "block" it first waits for room in the queue, suspended (the
        event loop runs on); "drop" and "error" act as for `submit`. The handler's
        exception is raised as from `Future.result()`. Cancelling the awaiting
        coroutine cancels a task that has not started; a running one runs to its end
        and its outcome is dropped (it counts as completed or failed, not cancelled).
        """
        from procqueue._async import arun, awaited

        opts = self._default  # as `opts.arun`, one coroutine fewer on each call's way
        receiver, run = opts._prepare_run(fn, args, kwargs, awaited)
        return await arun(self._core, receiver, run, opts.block_timeout)  # type: ignore[no-any-return]

    def amap(
        self,
        fn: Callable[..., T],
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        chunksize: Chunksize = "auto",
    ) -> AsyncIterator[T]:
        """`async for y in pool.amap(fn, items)`: `map` for async code. Lazy and bounded
        as `map` is; `items` may be an iterable or an async iterable (pulled only as the
        window has room). Call it inside a coroutine; the map runs on a thread of its own
        and its results reach the loop a chunk at a time. Leaving the loop early
        (`break`, an error) cancels the tasks not started."""
        return self._default.amap(fn, items, ordered=ordered, return_exceptions=return_exceptions, chunksize=chunksize)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        """As `__exit__`, on a thread of its own: the event loop runs on meanwhile."""
        import asyncio

        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)
        return False

    def stats(self) -> Stats:
        """A snapshot of the pool (see `Stats` for every field): counters read now,
        per-process readings and rates from the monitor's latest sample. Cheap
        (no process is asked anything) and safe from any thread."""
        return self._core.stats()

    def live(
        self,
        total: int | None = None,
        *,
        file: IO[str] | None = None,
        interval: float | None = None,
        title: str = "procqueue",
    ) -> LiveView:
        """A live view of this pool while the `with` block runs (see `LiveView`)::

            with pool.live(total=len(items)):
                results = list(pool.map(work, items))

        It redraws in place on a terminal (on `file`, default stderr) and
        writes plain lines otherwise.
        """
        from procqueue._monitor.view import LiveView

        return LiveView(self.stats, self._views, total, file, interval, title)

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """`(host, port)` where `Monitor(prometheus_port=...)` serves `/metrics`; None without one."""
        return self._core.sampler.prometheus_address

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with `wait`, return once every accepted task
        ended and every process exited. `cancel_futures` cancels tasks that
        have not started."""
        self._core.shutdown(wait, cancel_futures)

    def terminate(self) -> None:
        """Kill the workers now; tasks not finished fail with `PoolClosed`."""
        self._core.terminate()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.terminate()  # Ctrl-C or SystemExit: end promptly
        else:
            self.shutdown(wait=True)  # as ProcessPoolExecutor: queued work still runs
        return False


def _output_spec(output: FileOutput | None) -> OutputSpec | None:
    if output is None:
        return None
    if not isinstance(output, FileOutput):
        raise TypeError(f"output must be a procqueue.FileOutput, not {type(output).__name__}")
    stream = None
    if output.fd is not None:
        from multiprocessing import connection

        stream = connection.Connection(os.dup(output.fd), readable=False)  # reaches the collector so
    return OutputSpec(output.path, output.errors, output.ordered, stream)


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__
