"""The Dask backend's cluster: owned (a LocalCluster on loopback), at an
address, or through a client the caller holds; its seats (a worker thread
each, by worker name), their workers now, and what the pool installs there.
The picture is in `procqueue/_dask/__init__.py`."""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from procqueue._errors import InitializerFailed, PoolStartError
from procqueue._protocol.pickling import dumps_callable
from procqueue._scheduler.sizing import Sizing

if TYPE_CHECKING:
    from procqueue._dask.output import ParentWriter
    from procqueue._settings import Config

INSTALL = "pip install 'procqueue[dask]'"
# A cluster's round trip costs milliseconds (a batch chained after another starts ~5 ms
# after it ends): longer batches than on local processes, none under 25 ms of work, and
# a second batch always waiting on each worker (chained after the first: loop.py).
DASK_SIZING = Sizing(
    target_ns=100_000_000, long_ns=200_000_000, max_held=2, prefetch_ns=400_000_000, marks_items=False,
    min_ns=25_000_000,
)  # fmt: skip
WORKERS_WAIT = 30.0  # seconds to wait for an existing cluster to have a worker at all

log = logging.getLogger("procqueue")


def import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(f"Pool(backend='dask') needs Dask distributed: {INSTALL}") from exc
    return distributed


class Cluster:
    """The cluster a pool runs on, and what the pool knows of its workers."""

    def __init__(self, cfg: Config, address: str | None, client: Any, security: Any, dashboard: bool) -> None:
        distributed = import_distributed()
        self.prefix = f"pq-{secrets.token_hex(8)}-"  # procqueue's own, unguessable keys
        self.cluster: Any = None
        self.owns_client = client is None
        self.retries_off = False  # the scheduler's allowed-failures is ours to give back
        try:
            if client is None:
                if address is None:
                    # Invariant 7: a scheduler on a loopback port would take any local user's client
                    # (and run its code); with a throwaway certificate only this pool's processes get in.
                    security = security if security is not None else _private_security(distributed)
                    self.cluster = _local_cluster(distributed, cfg.workers, security, dashboard)
                    address = self.cluster.scheduler_address
                client = distributed.Client(address, security=security, set_as_default=False)
            self.client = client
            self._no_dask_retries()
            self.names = self._wait_for_workers()
        except BaseException as exc:
            self._close_owned()
            if isinstance(exc, TypeError) and str(address).startswith("tls://") and security is None:
                raise PoolStartError(
                    f"{address} speaks TLS: pass security=distributed.security.Security(...) with its certificates"
                ) from exc
            if isinstance(exc, OSError | TimeoutError):
                raise PoolStartError(
                    f"the Dask cluster could not be reached or started ({exc}); check the address"
                ) from exc
            raise
        self.seats = len(self.names)
        self.addr: list[str | None] = [None] * self.seats  # each seat's worker now
        self.pid: list[int] = [-1] * self.seats
        self.metrics: dict[str, tuple[float, int]] = {}  # by address: cpu %, rss
        self.writer: ParentWriter | None = None  # a FileOutput's, written in the parent
        self.init = None if cfg.initializer is None else dumps_callable((cfg.initializer, cfg.initargs))

    def _no_dask_retries(self) -> None:
        from procqueue._dask.plugin import no_dask_retries

        try:
            self.client.run_on_scheduler(no_dask_retries)
            self.retries_off = True
        except Exception as exc:  # a scheduler that refuses run_on_scheduler
            log.warning(
                "procqueue: could not turn off the Dask scheduler's retries (%s); set "
                "distributed.scheduler.allowed-failures to 0 there, or a worker's death may cost "
                "tasks that were only queued on it",
                exc,
            )

    def _wait_for_workers(self) -> list[str]:
        """One seat per worker thread, by worker name (stable across a nanny's restart)."""
        deadline = time.monotonic() + WORKERS_WAIT
        while True:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
            if workers:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Dask cluster had no worker after {WORKERS_WAIT:.0f} s")
            time.sleep(0.1)
        names = []
        for info in sorted(workers.values(), key=lambda w: str(w.get("name"))):
            names += [str(info.get("name"))] * int(info.get("nthreads", 1))
        return names

    def install(self) -> None:
        """Run the initializer on every worker (a restarted one too) and have each
        report when one of the pool's batches starts."""
        from procqueue._dask.plugin import Initializer, StartNotifier

        try:
            if self.init is not None:
                replies = self.client.register_plugin(Initializer(self.prefix, self.init))
                bad = {a: r for a, r in (replies or {}).items() if isinstance(r, dict) and r.get("status") == "error"}
                if bad:
                    addr, reply = next(iter(bad.items()))
                    raise InitializerFailed(
                        f"the worker initializer raised on Dask worker {addr}: {reply.get('exception_text', reply)}; "
                        "no task can run. Fix the initializer.",
                        remote_traceback=str(reply.get("traceback_text", "")),
                    )
            self.client.register_plugin(StartNotifier(self.prefix))
        except BaseException:
            self._close_owned()
            raise

    def close(self) -> None:
        """The pool has ended: write what the output holds, let go of what it
        installed, close what it owns."""
        if self.writer is not None:
            self.writer.close()
        if self.cluster is None and self.retries_off:  # a cluster that outlives the pool keeps nothing of it
            from procqueue._dask.plugin import dask_retries_back

            with contextlib.suppress(Exception):
                self.client.run_on_scheduler(dask_retries_back)
        if self.cluster is None:
            names = [f"procqueue-start-{self.prefix}"] + ([f"procqueue-init-{self.prefix}"] if self.init else [])
            for name in names:
                with contextlib.suppress(Exception):
                    self.client.unregister_worker_plugin(name)
        self._close_owned()

    def _close_owned(self) -> None:
        # Closing logs, and may raise, once the other side is gone: neither matters then.
        if self.owns_client and getattr(self, "client", None) is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()
            self.cluster = None


def _private_security(distributed: Any) -> Any:
    try:
        return distributed.security.Security.temporary()
    except ImportError as exc:  # cryptography is missing
        raise ImportError(f"Pool(backend='dask') needs cryptography for its own cluster's TLS: {INSTALL}") from exc


def _local_cluster(distributed: Any, workers: int, security: Any, dashboard: bool) -> Any:
    """The pool's own cluster: `workers` processes of one thread on 127.0.0.1."""
    import dask

    settings = {
        "distributed.scheduler.allowed-failures": 0,  # a death is one attempt, procqueue's to retry
        "distributed.scheduler.worker-saturation": 1.0,
    }
    with dask.config.set(settings):
        return distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            # The scheduler serves HTTP (health, metrics) even without a dashboard: on a free
            # loopback port, not 8787, which another cluster may hold.
            dashboard_address="127.0.0.1:8787" if dashboard else "127.0.0.1:0",
            scheduler_kwargs={"dashboard": dashboard},
            memory_limit=0,  # the pool decides about memory, not the nanny
            security=security,
            silence_logs=logging.CRITICAL,  # a worker's death is the pool's to report, not Dask's
        )
