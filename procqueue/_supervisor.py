"""The supervisor: worker processes, their task pipes, and their ends.

Wiring is drawn in `_engine.py`. What the supervisor owns, per worker slot:
the process and its sentinel; the write end of the task pipe, written
non-blocking through a buffer so a busy or dead worker never stalls the
manager thread; the worker's marker (which item it runs, since when) in a
shared array; the read end of its faulthandler pipe; and the mirror of the
worker's handler cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing import connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from . import _messages as m
from . import _worker
from ._dispatcher import Batch

PIPE_SIZE = 1 << 20  # bytes: a big batch crosses in one write, not in 16 wake-ups of the manager
WRITEV_MAX = 512  # buffers per writev (IOV_MAX is at least 1024)
POLL_UNSTARTED = 0.05  # a timed task its worker has not started yet: look again this soon


@dataclass(eq=False)
class Slot:
    """One worker position; a replacement worker takes over the slot of a dead one."""

    index: int
    process: BaseProcess | None = None
    pid: int = -1
    task_w: connection.Connection | None = None
    fault_r: connection.Connection | None = None
    out: list[bytes | memoryview] = field(default_factory=list)  # frames the pipe has not taken yet
    batches: dict[int, Batch] = field(default_factory=dict)  # in dispatch order
    tasks_sent: int = 0
    known: OrderedDict[int, None] = field(default_factory=OrderedDict)
    retiring: bool = False  # no more work: Stop was sent (task limit, memory, shutdown)
    recycled: int = 0  # how many workers this slot has replaced for a limit
    kill_reason: str | None = None  # "timeout" when the supervisor killed it
    productive: bool = False  # this worker has reported at least one outcome
    generation: int = 0  # bumped per worker: selector events of a dead predecessor are stale

    @property
    def alive(self) -> bool:
        return self.process is not None

    @property
    def sentinel(self) -> int:
        assert self.process is not None
        return self.process.sentinel

    @property
    def fd(self) -> int:
        assert self.task_w is not None
        return self.task_w.fileno()

    def knows(self, handler_id: int) -> bool:
        """Mirror of the worker's LRU of handlers, updated exactly as the worker will."""
        known = self.known
        if handler_id in known:
            known.move_to_end(handler_id)
            return True
        known[handler_id] = None
        if len(known) > _worker.HANDLER_CACHE:
            known.popitem(last=False)
        return False


class Supervisor:
    """Starts, feeds, watches and ends the worker processes."""

    def __init__(
        self,
        ctx: BaseContext,
        workers: int,
        address: str | bytes,
        token: bytes,
        init: bytes | None,
    ) -> None:
        self.ctx = ctx
        self.address = address
        self.token = token
        self.init = init
        self._markers: Any = ctx.RawArray("q", 2 * workers)  # type: ignore[attr-defined]
        self.marks = memoryview(self._markers).cast("B").cast("q")
        self.slots = [Slot(i) for i in range(workers)]

    def spawn(self, slot: Slot) -> None:
        task_r, task_w = self.ctx.Pipe(duplex=False)
        widen_pipe(task_w.fileno())
        fault_r, fault_w = self.ctx.Pipe(duplex=False)
        self.marks[2 * slot.index] = 0
        proc = self.ctx.Process(  # type: ignore[attr-defined]
            target=_worker.main,
            args=(slot.index, task_r, self.address, self.token, self._markers, fault_w, self.init),
            name=f"procqueue-worker-{slot.index}",
        )
        proc.start()
        task_r.close()
        fault_w.close()
        os.set_blocking(task_w.fileno(), False)
        os.set_blocking(fault_r.fileno(), False)
        slot.process, slot.pid, slot.task_w, slot.fault_r = proc, proc.pid or -1, task_w, fault_r
        slot.generation += 1
        slot.out = []
        slot.batches = {}
        slot.tasks_sent = 0
        slot.known.clear()
        slot.retiring = False
        slot.kill_reason = None
        slot.productive = False

    def send(self, slot: Slot, parts: list[bytes | memoryview]) -> bool:
        """Queue a frame (its buffers, uncopied) for the worker and write what the
        pipe takes now. True when some are left over (wait for the pipe to be writable)."""
        if slot.task_w is None:
            return False
        if slot.out:
            slot.out.extend(parts)
            return True
        slot.out = parts
        return self.flush(slot)

    def flush(self, slot: Slot) -> bool:
        """Write queued buffers; True while some remain."""
        if not slot.out or slot.task_w is None:
            return False
        try:
            n = os.writev(slot.fd, slot.out[:WRITEV_MAX])
        except BlockingIOError:
            return True
        except OSError:  # the worker is gone; its sentinel will tell
            slot.out = []
            return False
        slot.out = m.drop_written(slot.out, n)
        return bool(slot.out)

    def running(self, slot: Slot) -> tuple[int, int, int] | None:
        """`(batch_id, index, started_ns)` of the item the worker is in, if any;
        index -1 inside an unmarked batch. Read twice around the start time:
        the worker writes them without a lock."""
        marks, k = self.marks, 2 * slot.index
        for _ in range(3):
            tag = marks[k]
            if tag == 0:
                return None
            started = marks[k + 1]
            if marks[k] == tag:
                batch_id, index = _worker.untag(abs(tag))
                return batch_id, index if tag > 0 else -1, started
        return None

    def deadline_in(self, slot: Slot) -> float | None:
        """Seconds until the item this worker runs passes its timeout (0: now);
        None when nothing it holds has a timeout."""
        if not any(b.head.timeout is not None for b in slot.batches.values()):
            return None
        now = self.running(slot)
        if now is None:
            return POLL_UNSTARTED
        batch_id, _, started = now
        batch = slot.batches.get(batch_id)
        if batch is None or batch.head.timeout is None:
            return POLL_UNSTARTED
        return max(0.0, started / 1e9 + batch.head.timeout - time.perf_counter())

    def next_deadline(self) -> float | None:
        """Seconds until the nearest task timeout of any worker."""
        times = [self.deadline_in(s) for s in self.slots if s.batches and s.kill_reason is None]
        return min((t for t in times if t is not None), default=None)

    def enforce_timeouts(self) -> None:
        """Kill each worker whose running task is past its timeout (its death is charged as a timeout)."""
        for slot in self.slots:
            if slot.batches and slot.kill_reason is None:
                left = self.deadline_in(slot)
                if left is not None and left <= 0 and self.running(slot) is not None:
                    self.kill(slot, "timeout")

    def kill(self, slot: Slot, reason: str | None = None) -> None:
        if slot.kill_reason is None:
            slot.kill_reason = reason
        if slot.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGKILL)

    def reap(self, slot: Slot) -> tuple[int | None, str]:
        """After the sentinel fired: exit code, what faulthandler wrote; close the slot's ends."""
        proc = slot.process
        exitcode = None
        if proc is not None:
            proc.join(5.0)
            exitcode = proc.exitcode
            proc.close() if exitcode is not None else None
        text = b""
        if slot.fault_r is not None:
            try:
                while chunk := os.read(slot.fault_r.fileno(), 65536):
                    text += chunk
            except OSError:
                pass
            slot.fault_r.close()
        if slot.task_w is not None:
            slot.task_w.close()
        slot.process, slot.task_w, slot.fault_r = None, None, None
        slot.pid = -1
        return exitcode, text.decode("utf-8", "replace")


def widen_pipe(fd: int) -> None:
    """Grow a pipe's buffer where the OS allows it (Linux); elsewhere keep the default."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is not None:
        with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size: keep what it has
            fcntl.fcntl(fd, setsize, PIPE_SIZE)
