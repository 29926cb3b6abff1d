"""The manager's side of the collector: what it forwards, and its death.

What the collector forwards (a batch's outcomes, a dead worker's `WorkerGone`)
becomes a scheduler event. A collector that dies (killed from outside, the
OOM killer) is replaced with fresh workers: what it had forwarded is settled,
what it had not is lost with it and runs again, uncharged. The books are the
parent's, so nothing is counted twice. One frozen by SIGSTOP forwards nothing
and never dies: while work is out and it has been silent a while, the manager
asks the kernel, and kills a stopped one (then it is replaced the same way).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import Any

from procqueue._errors import InitializerFailed, PoolBroken, describe_exitcode
from procqueue._local.shm import ShmLost
from procqueue._local.wiring import Phase, Tag, Wiring
from procqueue._protocol import framing, layout
from procqueue._protocol import messages as m
from procqueue._protocol.pickling import shm_refs
from procqueue._results import Later, Values, run_all
from procqueue._scheduler.deaths import UNGUARDED
from procqueue._scheduler.instructions import Instruction, KillReason

COLLECTOR_RESTARTS = 5  # collector deaths in a row with nothing forwarded between them: the pool is broken
COLLECTOR_SILENCE = 2.0  # seconds without a result, while work is out, before we look whether it is stopped

log = logging.getLogger("procqueue")


class CollectorWatch:
    """Reads the collector's results pipe; restarts a dead collector."""

    silence = COLLECTOR_SILENCE

    def __init__(
        self, wiring: Wiring, execute: Callable[[list[Instruction]], object], finish: Callable[[], None]
    ) -> None:
        self.b = wiring
        self.core = wiring.core
        self.s = wiring.core.scheduler
        self.sup = wiring.supervisor
        self.execute = execute  # carry out instructions (the manager's)
        self.finish = finish  # the collector is gone for good: the manager's loop ends
        self.deaths = 0  # in a row, with nothing forwarded between them
        self.heard = self.asked = time.monotonic()  # its last result; the last look at it

    def on_results(self) -> None:
        b, core, s = self.b, self.core, self.s
        frames, ended = b.collector.read()
        later: Later = []
        for frame in frames:
            try:
                msg, body = framing.decode(frame)
            except Exception as exc:  # only the collector writes here: a bug, not an attack
                log.error("procqueue: a message from the collector did not decode: %r", exc)
                continue
            match msg:
                case m.BatchResult():
                    self.deaths = 0
                    self.heard = time.monotonic()
                    # empty: a FileOutput took them
                    values = (
                        Values(body, self.unloadable, self.mapped_shm(msg.pid, body), msg.count) if len(body) else None
                    )
                    with core.cv:
                        self.forget_handler_if_unloaded(msg)
                        self.execute(core.apply(s.batch_done(msg, values, time.monotonic()), later))
                case m.WorkerGone():
                    self.sup.forget_side(msg.pid)  # all it sent is read
                    with core.cv:
                        core.apply(s.worker_gone(msg.pid, msg.reported, time.monotonic()), later)
                case m.InitFailed():
                    core.break_pool(
                        InitializerFailed(
                            f"the worker initializer raised in worker pid {msg.pid}; no task can run. "
                            f"Fix the initializer.\n\nRemote traceback:\n{msg.traceback}",
                            remote_traceback=msg.traceback,
                        )
                    )
                case m.OutputFailed():
                    b.output_error = msg
                    core.break_pool(PoolBroken(f"the collector could not write the output: {msg.message}"))
                case m.CollectorDone():
                    self.finish()
                case _:
                    raise TypeError(f"parent got an unknown message {msg!r}")
        run_all(later)
        if ended and b.collector.reader.error is not None and b.phase is not Phase.DONE:
            log.error("procqueue: the collector's stream is corrupt (%s); restarting it", b.collector.reader.error)
            with contextlib.suppress(OSError, ValueError):
                b.collector.process.kill()

    def mapped_shm(self, pid: int, body: memoryview) -> list[Any] | BaseException:
        """The shared memory segments a result names, mapped (shared, writable: the
        values are built on them), from its worker's side socket: the worker posted
        them before it wrote the frame. Their loss fails the values, not the pool."""
        refs = shm_refs(body)
        if not refs:
            return []
        side = self.sup.sides.get(pid)
        try:
            if side is None:
                raise ShmLost(f"worker pid {pid} has no side socket")
            return [side.take(seq, size, private=False) for seq, size in refs]
        except ShmLost as exc:
            log.error("procqueue: a result from worker pid %d lost its shared memory: %s", pid, exc)
            return exc

    def forget_handler_if_unloaded(self, msg: m.BatchResult) -> None:
        """A worker whose handler did not unpickle does not hold it: send its bytes again next time (lock held)."""
        batch = self.s.batches.get(msg.batch_id)
        if batch is None or not any(e.fault == m.Fault.HANDLER_UNPICKLE for e in msg.errors):
            return
        slot = self.sup.slots[batch.seat]
        if slot.pid == msg.pid:
            slot.known.pop(batch.head.handler.id, None)

    def unloadable(self, n: int) -> None:
        """n values did not unpickle where they were read (a user's thread): they failed."""
        with self.core.cv:
            self.s.values_unloadable(n)

    def on_died(self) -> None:
        """The collector ended without being asked: start another, with fresh workers."""
        b, core, s = self.b, self.core, self.s
        old = b.collector
        b.sel.unregister(old.sentinel)
        with contextlib.suppress(KeyError, ValueError):
            b.sel.unregister(old.results)  # type: ignore[arg-type]
        self.on_results()  # what it wrote before dying
        if b.out_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                b.sel.unregister(b.out_fd)
            b.out_fd = None
        if old.process is not None:
            old.process.join(1.0)  # its exit code, not None: the sentinel fires before it is reaped
        exitcode = old.process.exitcode if old.process is not None else None
        if exitcode == layout.EXIT_UNGUARDED_MAIN:
            core.break_pool(
                PoolBroken(f"the pool's collector process re-ran the main script and reached Pool(): {UNGUARDED}")
            )
            self.finish()
            return
        if b.phase in (Phase.DRAINING, Phase.DONE):
            self.finish()  # every worker had ended and been settled
            return
        old.close(kill=True)
        self.deaths += 1
        why = f"the collector process (pid {old.pid}) died ({describe_exitcode(exitcode)})"
        if b.cfg.output is not None:
            # Records it held for the output are lost with it; `procqueue run --resume` redoes exactly those.
            core.break_pool(PoolBroken(f"{why}; the output is complete up to what it wrote: run again with --resume"))
            self.finish()
            return
        if self.deaths > COLLECTOR_RESTARTS:
            core.break_pool(PoolBroken(f"{why}, {self.deaths} times in a row; the pool stopped restarting it"))
            self.finish()
            return
        log.warning("procqueue: %s; starting another, and fresh workers", why)
        later: Later = []
        with core.cv:
            for pid in s.lost_pids():  # workers whose WorkerGone it never answered
                self.sup.forget_side(pid)
                core.apply(s.worker_gone(pid, False, time.monotonic()), later)
            for slot in self.sup.slots:
                if slot.alive:
                    self.sup.kill(slot, KillReason.COLLECTOR)
        run_all(later)
        try:
            b.collector.start(self.sup.pdeathsig_safe())
        except OSError as exc:
            core.break_pool(PoolBroken(f"{why}, and another could not be started: {exc}"))
            self.finish()
            return
        b.watch_collector()

    def watch_outbox(self) -> None:
        """Wait for room in the collector's pipe while the outbox holds something."""
        b = self.b
        fd = b.collector.waiting_fd()
        if fd == b.out_fd:
            return
        if b.out_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                b.sel.unregister(b.out_fd)
        b.out_fd = fd
        if fd is not None:
            b.sel.register(fd, selectors.EVENT_WRITE, (Tag.OUTBOX, None, 0))

    def check_stopped(self) -> None:
        """A collector stopped from outside (SIGSTOP) forwards nothing and never dies: while
        work is out and it has been silent a while, ask the kernel; if it is stopped, kill it
        (it is restarted like a killed one)."""
        now = time.monotonic()
        if not self.s.batches or now - self.heard < COLLECTOR_SILENCE or now - self.asked < COLLECTOR_SILENCE:
            return
        self.asked = now
        import psutil

        pid = self.b.collector.pid
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                log.warning("procqueue: the collector (pid %d) is stopped; killing it", pid)
                os.kill(pid, signal.SIGKILL)
