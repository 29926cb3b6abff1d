"""One adapter per pool. Each runs with its own defaults when `chunksize` is None,
or with the chunk/batch size given. A peer whose package is missing is skipped.

The Dask peers (procqueue's Dask backend, raw `client.submit`, `client.map`) run
only the workload that names them (`dask`): each starts a LocalCluster of its own."""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import importlib.metadata
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any


class Peer:
    """A pool as the bench drives it."""

    name = ""
    package: str | None = None  # the distribution to import and report the version of
    install = "pip install 'procqueue[bench]'"  # what installs it
    general = True  # runs every workload that does not name its peers (False: only those that do)
    per_item = False  # one scheduler task per item (raw Dask): it gets fewer tiny tasks

    def available(self) -> bool:
        if self.package is None:
            return True
        try:
            importlib.import_module(self.package)
        except ImportError:
            return False
        return True

    def version(self) -> str:
        if self.package is None:
            return ""
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    def start(self, workers: int, **options: Any) -> None:
        self.workers = workers

    def stop(self) -> None:
        pass

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return list(self.imap(fn, items, chunksize))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        """A future-like object with `result()`; None when the peer has no such API."""
        return None

    # The async workload: started, called and stopped inside the event loop.
    async def astart(self, workers: int) -> None:
        self.start(workers)

    async def acall(self, fn: Callable[[Any], Any], x: Any) -> Any:
        raise NotImplementedError(f"{self.name} has no async call")

    async def astop(self) -> None:
        self.stop()


class Serial(Peer):
    name = "serial"

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return list(map(fn, items))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return map(fn, items)


class Procqueue(Peer):
    name = "procqueue"
    package = "procqueue"

    def start(self, workers: int, **options: Any) -> None:
        import procqueue as pq

        self.pool = pq.Pool(workers=workers, **options)

    def stop(self) -> None:
        self.pool.shutdown()

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return self.pool.map(fn, items, chunksize=chunksize or "auto")

    async def acall(self, fn: Callable[[Any], Any], x: Any) -> Any:
        return await self.pool.arun(fn, x)

    async def astop(self) -> None:
        await self.pool.__aexit__(None, None, None)

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return self.pool.options(priority=priority).submit(fn, *args)


class Executor(Peer):
    name = "ProcessPoolExecutor"

    def start(self, workers: int, **options: Any) -> None:
        self.pool = cf.ProcessPoolExecutor(workers)

    def stop(self) -> None:
        self.pool.shutdown()

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return self.pool.map(fn, items, chunksize=chunksize or 1)

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return self.pool.submit(fn, *args)

    async def acall(self, fn: Callable[[Any], Any], x: Any) -> Any:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, x)


class MpPool(Peer):
    name = "multiprocessing.Pool"

    def start(self, workers: int, **options: Any) -> None:
        self.pool = mp.Pool(workers)

    def stop(self) -> None:
        self.pool.close()
        self.pool.join()

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return self.pool.map(fn, items, chunksize)

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return self.pool.imap(fn, items, chunksize or 1)

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return _future_like(self.pool.apply_async(fn, args))


class Loky(Peer):
    name = "loky"
    package = "loky"

    def start(self, workers: int, **options: Any) -> None:
        from loky import get_reusable_executor

        self.pool = get_reusable_executor(max_workers=workers)

    def stop(self) -> None:
        self.pool.shutdown(wait=True)

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return self.pool.map(fn, items, chunksize=chunksize or 1)  # type: ignore[no-any-return]

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return self.pool.submit(fn, *args)


class Mpire(Peer):
    name = "mpire"
    package = "mpire"

    def start(self, workers: int, **options: Any) -> None:
        from mpire.pool import WorkerPool

        self.pool = WorkerPool(n_jobs=workers, keep_alive=True)

    def stop(self) -> None:
        self.pool.terminate()

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return self.pool.map(fn, items, chunk_size=chunksize, concatenate_numpy_output=False)  # type: ignore[no-any-return]

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return self.pool.imap(fn, items, chunk_size=chunksize)  # type: ignore[no-any-return]

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return _future_like(self.pool.apply_async(fn, args))


class Joblib(Peer):
    name = "joblib"
    package = "joblib"

    def start(self, workers: int, **options: Any) -> None:
        self.workers = workers

    def _parallel(self, chunksize: int | None) -> Any:
        from joblib import Parallel

        return Parallel(n_jobs=self.workers, batch_size=chunksize or "auto", return_as="generator")

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        from joblib import delayed

        return self._parallel(chunksize)(delayed(fn)(x) for x in items)  # type: ignore[no-any-return]


class Pebble(Peer):
    name = "pebble"
    package = "pebble"

    def start(self, workers: int, **options: Any) -> None:
        from pebble import ProcessPool

        self.pool = ProcessPool(max_workers=workers)

    def stop(self) -> None:
        self.pool.close()  # type: ignore[no-untyped-call]
        self.pool.join()

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return iter(self.pool.map(fn, items, chunksize=chunksize or 1).result())

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return self.pool.schedule(fn, args)


def _future_like(result: Any) -> Any:
    """An AsyncResult (multiprocessing, mpire) with the `result()` of a future."""
    result.result = result.get
    return result


class Limit(Peer):
    """The reference for tiny tasks: fork one process per worker, each maps its
    share of the list and pickles the results back. No pool, no accounting."""

    name = "limit (bare fork)"

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        share = -(-len(items) // self.workers)
        children = []
        for k in range(self.workers):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: map, send, leave without any cleanup
                os.close(r)
                data = pickle.dumps(list(map(fn, items[k * share : (k + 1) * share])), pickle.HIGHEST_PROTOCOL)
                with os.fdopen(w, "wb") as out:
                    out.write(data)
                os._exit(0)
            os.close(w)
            children.append((pid, r))
        results = []
        for pid, r in children:
            with os.fdopen(r, "rb") as inp:
                results.append(pickle.loads(inp.read()))
            os.waitpid(pid, 0)
        return list(itertools.chain.from_iterable(results))


class DaskCluster(Peer):
    """A LocalCluster on loopback, a worker process of one thread per pool worker, and
    a client of it: `start` times them (`cluster_start`), `stop` closes both."""

    package = "distributed"
    install = "pip install 'procqueue[dask]'"
    general = False

    def start(self, workers: int, **options: Any) -> None:
        distributed: Any = importlib.import_module("distributed")  # partly typed: kept as Any

        t = time.perf_counter()
        self.cluster: Any = distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        try:
            self.client: Any = distributed.Client(self.cluster, set_as_default=False)
        except BaseException:
            self.cluster.close()
            raise
        self.cluster_start = time.perf_counter() - t

    def stop(self) -> None:
        try:
            self.client.close()
        finally:
            self.cluster.close()

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return iter(self.map(fn, list(items), chunksize))


class DaskPool(DaskCluster):
    """procqueue's Dask backend on the running cluster: `Pool(backend="dask", client=...)`."""

    name = "procqueue (dask)"

    def start(self, workers: int, **options: Any) -> None:
        import procqueue as pq

        super().start(workers)
        try:
            self.pool = pq.Pool(backend="dask", client=self.client, **options)
        except BaseException:
            super().stop()
            raise

    def stop(self) -> None:
        try:
            self.pool.shutdown()
        finally:
            super().stop()

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=chunksize or "auto"))

    def imap(self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return self.pool.map(fn, items, chunksize=chunksize or "auto")

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return self.pool.options(priority=priority).submit(fn, *args)


class DaskSubmit(DaskCluster):
    """Raw Dask: a future per item (`pure=False`: equal items are distinct tasks), then gather."""

    name = "dask client.submit"
    per_item = True

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return self.client.gather([self.client.submit(fn, x, pure=False) for x in items])  # type: ignore[no-any-return]

    def submit(self, fn: Callable[..., Any], *args: Any, priority: int = 0) -> Any:
        return self.client.submit(fn, *args, pure=False, priority=priority)


class DaskMap(DaskCluster):
    """Raw Dask: `client.map` over the list (a task per item, `pure=False`), then gather."""

    name = "dask client.map"
    per_item = True

    def map(self, fn: Callable[[Any], Any], items: list[Any], chunksize: int | None) -> list[Any]:
        return self.client.gather(self.client.map(fn, items, pure=False))  # type: ignore[no-any-return]


class AioMultiprocess(Peer):
    """aiomultiprocess's Pool (async only): the async workload's peer."""

    name = "aiomultiprocess"
    package = "aiomultiprocess"
    general = False

    async def astart(self, workers: int) -> None:
        import aiomultiprocess

        self.pool = aiomultiprocess.Pool(processes=workers)

    async def acall(self, fn: Callable[[Any], Any], x: Any) -> Any:
        from . import workloads

        return await self.pool.apply(workloads.call_async, (fn, x))

    async def astop(self) -> None:
        self.pool.close()
        await self.pool.join()


class Chain(Peer):
    """The pipeline workload's peers: three stages, `per_stage` worker processes each.
    `open` starts them for the stage functions, `run` maps an iterable through all three
    lazily, `close` ends them. They run only the workload that names them."""

    general = False

    def open(self, fns: list[Callable[[Any], Any]], per_stage: int) -> None:
        raise NotImplementedError

    def run(self, items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PqPipeline(Chain):
    """`pq.Pipeline(pq.Stage(f1, workers=k), ..., capacity=1024)` and its `map`."""

    name = "procqueue Pipeline"
    package = "procqueue"

    def open(self, fns: list[Callable[[Any], Any]], per_stage: int) -> None:
        import procqueue as pq

        self.pipe = pq.Pipeline(*(pq.Stage(f, workers=per_stage) for f in fns), capacity=1024)

    def run(self, items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        return self.pipe.map(items)

    def stats(self) -> list[dict[str, Any]]:
        return [{"completed": s.completed, "failed": s.failed, "workers": len(s.workers)} for s in self.pipe.stats()]

    def close(self) -> None:
        self.pipe.shutdown()


class PqChained(Chain):
    """Three `pq.Pool(k)`, chained by hand: `p3.map(f3, p2.map(f2, p1.map(f1, xs)))`."""

    name = "procqueue pools chained"
    package = "procqueue"

    def open(self, fns: list[Callable[[Any], Any]], per_stage: int) -> None:
        import procqueue as pq

        self.fns, self.pools = fns, []
        for _ in fns:
            self.pools.append(pq.Pool(per_stage))

    def run(self, items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        for fn, pool in zip(self.fns, self.pools, strict=True):
            items = pool.map(fn, items, chunksize=chunksize or "auto")
        return iter(items)

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown()


class MpChained(Chain):
    """Three `multiprocessing.Pool(k)`, chained by hand: `p3.imap(f3, p2.imap(f2, p1.imap(f1, xs, cs), cs), cs)`."""

    name = "multiprocessing.Pool chained"

    def open(self, fns: list[Callable[[Any], Any]], per_stage: int) -> None:
        self.fns, self.pools = fns, []
        for _ in fns:
            self.pools.append(mp.Pool(per_stage))

    def run(self, items: Iterable[Any], chunksize: int | None) -> Iterator[Any]:
        for fn, pool in zip(self.fns, self.pools, strict=True):
            items = pool.imap(fn, items, chunksize or 1)
        return iter(items)

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
        for pool in self.pools:
            pool.join()


PEERS: list[Peer] = [
    Procqueue(), Serial(), Limit(), Executor(), MpPool(), Loky(), Mpire(), Joblib(), Pebble(),
    DaskPool(), DaskSubmit(), DaskMap(), AioMultiprocess(), PqPipeline(), PqChained(), MpChained(),
]  # fmt: skip


def by_name(name: str) -> Peer:
    for peer in PEERS:
        if peer.name == name:
            return peer
    raise KeyError(name)
