"""The Dask backend as the core sees it (`procqueue/_backend.py`): the cluster
(`cluster.py`) and the loop thread (`loop.py`). The picture is in
`procqueue/_dask/__init__.py`."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from procqueue._backend import WorkerRow
from procqueue._dask.cluster import DASK_SIZING, Cluster
from procqueue._dask.loop import Loop
from procqueue._dask.output import ParentWriter
from procqueue._output import OutputStatus

if TYPE_CHECKING:
    from procqueue._core import Core


class DaskBackend:
    """A pool's tasks on a Dask cluster: owned (a LocalCluster on loopback), at an
    `address`, or through a `client` the caller holds (never closed here)."""

    sizing = DASK_SIZING

    def __init__(self, core: Core, address: str | None, client: Any, security: Any, dashboard: bool) -> None:
        self.core = core
        self.cluster = Cluster(core.cfg, address, client, security, dashboard)
        self.seats = len(self.cluster.names)
        self.output: ParentWriter | None = None
        if core.cfg.output is not None:
            try:
                self.output = ParentWriter(core.cfg.output, core.break_pool)
            except BaseException:
                self.cluster.close()
                raise
            self.cluster.writer = self.output
        self.loop: Loop | None = None
        self.thread = threading.Thread(target=self._main, name="procqueue-dask", daemon=True)

    def start(self) -> None:
        self.cluster.install()  # closes what it owns if it fails
        try:
            self.loop = Loop(self.cluster, self.core)
            self.loop.refresh(time.monotonic())
        except BaseException:
            self.cluster.close()
            raise
        self.thread.start()

    def _main(self) -> None:
        assert self.loop is not None
        self.loop.run()

    def wake(self) -> None:
        if self.loop is not None:
            self.loop.wake()

    def may_join(self) -> bool:
        return self.core.may_wait_for(self.thread)

    def join(self) -> None:
        self.thread.join()

    def kill_all(self) -> None:
        if self.loop is not None:
            self.loop.cancel_all()

    def recycle(self, seat: int, pid: int) -> None:
        """Not on Dask: a worker's memory limit is its nanny's (`memory_limit`)."""

    def pids(self) -> list[int]:
        return []  # workers may be on other machines: their readings come from the scheduler

    def worker_rows(self) -> list[WorkerRow]:
        s = self.core.scheduler
        c = self.cluster
        rows = []
        for i, seat in enumerate(s.seats):
            state = "dead" if not seat.open else "running" if seat.batches else "idle"
            cpu, rss = c.metrics.get(c.addr[i] or "", (0.0, 0))
            rows.append(WorkerRow(c.pid[i], seat.tasks_done, state, i, seat.recycled, None, cpu, rss, seat.deaths))
        return rows

    def helper(self) -> tuple[int, int] | None:
        return None

    def write_output(self, records: list[tuple[int, int, bytes]]) -> None:
        """The parent's own records for the FileOutput, from any thread."""
        if self.output is not None and records:
            self.output.records(records)

    def output_status(self) -> OutputStatus:
        return self.output.status() if self.output is not None else OutputStatus(0)
