"""The local backend as the core sees it (`procqueue/_backend.py`): the
processes and channels (`wiring.py`) and the manager thread (`manager.py`).
The diagram is in `procqueue/_local/__init__.py`."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from procqueue._backend import WorkerRow
from procqueue._local.manager import Manager
from procqueue._local.wiring import Wiring
from procqueue._output import OutputStatus
from procqueue._scheduler.sizing import LOCAL

if TYPE_CHECKING:
    from procqueue._core import Core


class LocalBackend:
    """Worker processes on this machine, a collector, and the manager thread."""

    sizing = LOCAL

    def __init__(self, core: Core) -> None:
        self.core = core
        self.seats = core.cfg.workers
        self.wiring = Wiring(core)  # checks what can fail on bad input (the initializer pickles)
        self.thread = threading.Thread(target=self._main, name="procqueue-manager", daemon=True)

    def start(self) -> None:
        self.wiring.start()
        self.manager = Manager(self.wiring)
        self.wiring.supervisor.manager = self.thread  # the thread that starts workers from now on
        self.thread.start()

    def _main(self) -> None:
        self.manager.run()

    @property
    def collector(self) -> object:
        """The collector process's link (for tests that reach for its pid)."""
        return self.wiring.collector

    def wake(self) -> None:
        self.wiring.wake()

    def may_join(self) -> bool:
        """The manager ends by stopping the monitor: neither thread may wait for it."""
        return self.core.may_wait_for(self.thread)

    def join(self) -> None:
        self.thread.join()

    def kill_all(self) -> None:
        self.wiring.kill_all()

    def recycle(self, seat: int, pid: int) -> None:
        self.wiring.recycle(seat, pid)

    def pids(self) -> list[int]:
        return self.wiring.pids()

    def worker_rows(self) -> list[WorkerRow]:
        return self.wiring.worker_rows()

    def helper(self) -> tuple[int, int] | None:
        return self.wiring.helper()

    def write_output(self, records: list[tuple[int, int, bytes]]) -> None:
        """Records for the collector to write to the FileOutput, from any thread."""
        self.wiring.write_output(records)

    def output_status(self) -> OutputStatus:
        return self.wiring.output_status()
