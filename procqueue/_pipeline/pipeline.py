"""`Pipeline`: stages of worker processes with bounded room between them."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Generator, Iterable
from concurrent.futures import CancelledError
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, cast

from procqueue._errors import PoolClosed
from procqueue._pipeline.flow import Flow
from procqueue._pipeline.stage import Stage

if TYPE_CHECKING:
    from procqueue._monitor.sampler import Monitor
    from procqueue._monitor.stages import StagesView
    from procqueue._pool import Pool
    from procqueue._stats import Stats


class Pipeline:
    """Stages run one after another on every item, each in its own worker processes::

        with pq.Pipeline(pq.Stage(decode, workers=2), pq.Stage(score, workers=4, retries=2),
                         pq.Stage(write, workers=1), capacity=64) as pipe:
            for out in pipe.map(paths):
                ...

    `capacity` bounds the items waiting between two stages (a `Stage` may set
    its own) and the finished ones waiting for your loop: a slow stage makes
    the ones before it wait, back to the input, so memory stays bounded
    however long the input is. An item that fails at a stage (its retries
    spent, its worker crashed, its timeout passed) ends there, with a
    `StageFailed` in its error's cause chain naming the stage; every other
    item goes on. `start_method`, `monitor`, `backend`, `address`, `client`
    and `security` are passed to every stage's `procqueue.Pool`.
    """

    def __init__(
        self,
        *stages: Stage,
        capacity: int = 1024,
        start_method: str | None = None,
        monitor: bool | float | Monitor = True,
        backend: str = "local",
        address: str | None = None,
        client: Any = None,
        security: Any = None,
    ) -> None:
        if not stages:
            raise ValueError("a Pipeline needs at least one pq.Stage")
        for i, stage in enumerate(stages):
            if not isinstance(stage, Stage):
                raise TypeError(
                    f"Pipeline takes pq.Stage objects; argument {i} is a {type(stage).__name__}: "
                    "wrap a function as pq.Stage(fn)"
                )
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        from procqueue._pool import Pool

        self.stages = list(stages)
        self.capacity = capacity
        self._flows: weakref.WeakSet[Flow] = weakref.WeakSet()
        self._pools: list[Pool] = []
        self._ended: str | None = None  # how it ended: shut down or terminated
        # Values go stage to stage still pickled: local workers' bodies (a Dask worker's are not forwarded)
        self._relay = backend == "local"
        try:
            for s in stages:
                pool = Pool(
                    s.workers, s.capacity or capacity, max_retries=s.retries, backoff=s.backoff,
                    backoff_max=s.backoff_max, task_timeout=s.timeout, max_tasks_per_worker=s.max_tasks_per_worker,
                    max_worker_memory=s.max_worker_memory, initializer=s.initializer, initargs=s.initargs,
                    start_method=start_method, monitor=monitor, backend=backend, address=address, client=client,
                    security=security, rate=s.rate,
                )  # fmt: skip
                self._pools.append(pool)
        except BaseException:
            self.terminate()
            raise

    @property
    def pools(self) -> list[Pool]:
        """The stages' pools, in order (one `procqueue.Pool` each)."""
        return list(self._pools)

    def map(self, items: Iterable[Any], *, ordered: bool = True, return_exceptions: bool = False) -> PipelineIterator:
        """Every item through every stage, lazily: the input is read only as the
        first stage has room. Results come in input order, or as they leave the
        last stage with `ordered=False`. An item that failed raises its error at
        its place (the handler's own exception type, a `StageFailed` naming the
        stage in its cause chain) and ends the map, or with
        `return_exceptions=True` takes its place as a value and the map goes on.
        Leaving the loop early cancels what had not started."""
        if self._ended is not None:
            raise PoolClosed(f"this pipeline was {self._ended}; create a new Pipeline")
        source = iter(items)  # not iterable: TypeError here, in the caller's thread
        stages = [(s, p, s.capacity or self.capacity) for s, p in zip(self.stages, self._pools, strict=True)]
        flow = Flow(stages, self.capacity, ordered, return_exceptions, relay=self._relay)
        self._flows.add(flow)
        flow.start(source)
        pieces = flow.pieces()
        results = cast(PipelineIterator, PipelineIterator.from_iterable(pieces))
        results.pieces = pieces
        results.flow = flow
        # Dropped, even before its first item (a generator never started runs no `finally`): the map ends.
        weakref.finalize(results, flow.close)
        return results

    def stats(self) -> list[Stats]:
        """One `procqueue.Stats` per stage, in order."""
        return [p.stats() for p in self._pools]

    def depths(self) -> list[int]:
        """Items each stage holds now (waiting or running), over the maps in progress."""
        out = [0] * len(self._pools)
        for flow in list(self._flows):
            if flow.closed:  # ended (its iterator may still be referenced): it holds nothing
                continue
            for lane in flow.lanes:
                out[lane.index] += lane.held
        return out

    def live(
        self, total: int | None = None, *, file: IO[str] | None = None, interval: float | None = None
    ) -> StagesView:
        """A live view of the pipeline while the `with` block runs: one row per stage
        with the items it holds, in flight, done, failed, its throughput and workers,
        so the slowest stage shows at a glance (see `procqueue.LiveView` for `file`
        and `interval`)."""
        from procqueue._monitor.stages import StagesView

        return StagesView([s.name for s in self.stages], self.stats, self.depths, total, file, interval)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """End every stage: maps in progress end (their unread items are cancelled with
        `cancel_futures`); with `wait`, return once every process exited."""
        self._ended = self._ended or "shut down"
        why = CancelledError("the pipeline was shut down with cancel_futures=True") if cancel_futures else None
        for flow in list(self._flows):  # maps not read to the end end here, their readers told
            flow.close(why or PoolClosed("the pipeline was shut down while this map was being read"))
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=cancel_futures)
        if wait:
            for pool in self._pools:
                pool.shutdown(wait=True)
            for flow in list(self._flows):
                flow.join()

    def terminate(self) -> None:
        """Kill every stage's workers now."""
        self._ended = self._ended or "terminated"
        for flow in list(self._flows):
            flow.close(PoolClosed("the pipeline was terminated"))
        for pool in self._pools:
            pool.terminate()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if exc_type is not None and not issubclass(exc_type, Exception):
            self.terminate()
        else:
            self.shutdown(wait=True)  # maps not read to the end are released
        return False


class PipelineIterator(itertools.chain):  # type: ignore[type-arg]
    """What `Pipeline.map` returns: results at C speed; `close()` ends the map early
    (items not started are cancelled at every stage)."""

    pieces: Generator[Iterable[Any], None, None]
    flow: Flow

    def close(self) -> None:
        self.pieces.close()
        self.flow.close()  # also before the first item, when the generator never started
