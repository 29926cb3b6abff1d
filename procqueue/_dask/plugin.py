"""Code the pool installs on Dask workers: a start notifier, its initializer,
and how a hung worker is killed through its nanny. Importable on the workers
(they unpickle these by reference); needs `distributed`."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

START_TOPIC = "pq-start"


class StartNotifier(WorkerPlugin):  # type: ignore[misc]
    """Tells the pool when one of its batches starts executing (for timeouts)."""

    idempotent = True

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # the pool's key prefix: other clients' tasks are not ours to report
        self.name = f"procqueue-start-{prefix}"
        self.worker: Any = None

    def setup(self, worker: Any) -> None:
        self.worker = worker

    def teardown(self, worker: Any) -> None:
        self.worker = None

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish == "executing" and isinstance(key, str) and key.startswith(self.prefix) and self.worker is not None:
            self.worker.log_event(START_TOPIC, {"key": key, "t": time.time()})


class Initializer(WorkerPlugin):  # type: ignore[misc]
    """Runs the pool's initializer once in each worker process (a restarted one too)."""

    idempotent = True

    def __init__(self, prefix: str, blob: bytes) -> None:
        self.name = f"procqueue-init-{prefix}"
        self.blob = blob

    def setup(self, worker: Any) -> None:
        from procqueue._protocol.pickling import loads_callable

        fn, args = loads_callable(self.blob)
        fn(*args)


def kill_worker_process(dask_worker: Any) -> int:
    """Run on a worker's nanny (`client.run(..., nanny=True)`): SIGKILL the worker
    process it watches, which may be stuck in a task; the nanny starts another."""
    pid = int(dask_worker.pid)
    os.kill(pid, signal.SIGKILL)
    return pid


def no_dask_retries(dask_scheduler: Any) -> int:
    """Run on the scheduler: a worker's death fails its tasks at once (procqueue
    retries). Counted per pool, so the last pool to leave restores the setting."""
    pools = getattr(dask_scheduler, "_procqueue_pools", 0)
    if pools == 0:
        dask_scheduler._procqueue_allowed_failures = int(dask_scheduler.allowed_failures)
    dask_scheduler._procqueue_pools = pools + 1
    dask_scheduler.allowed_failures = 0
    return pools + 1


def dask_retries_back(dask_scheduler: Any) -> int:
    """Run on the scheduler when a pool leaves: the last one restores Dask's retries."""
    pools = max(0, getattr(dask_scheduler, "_procqueue_pools", 1) - 1)
    dask_scheduler._procqueue_pools = pools
    if pools == 0:
        dask_scheduler.allowed_failures = getattr(dask_scheduler, "_procqueue_allowed_failures", 3)
    return pools


def worker_pids(dask_scheduler: Any) -> dict[str, int]:
    """Run on the scheduler: each worker's pid, by address."""
    return {addr: int(ws.pid) for addr, ws in dask_scheduler.workers.items()}
