"""The manager thread of the local backend: one selector loop that turns what
it reads into scheduler events and carries out the instructions that come back.

Each round: under the pool's lock, backoffs that ended rejoin the queue and
the scheduler books batches to workers with room; without the lock, the
batches are pickled (user code: `__reduce__`) and written to the workers'
pipes; then one `select()` until the nearest deadline (a backoff, a timeout,
a stall, a respawn) or something to read: results and dead workers' leftovers
from the collector (`collector_watch.py`), a worker's death (its pidfd), room
in a pipe, a wake-up. It never blocks on a pipe and runs no user code.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import time
import warnings

from procqueue._local.collector_watch import CollectorWatch
from procqueue._local.supervisor import Slot
from procqueue._local.wiring import Phase, Tag, Wiring
from procqueue._protocol import framing
from procqueue._protocol import messages as m
from procqueue._protocol.arguments import encode_batch
from procqueue._protocol.relay import forwarded
from procqueue._results import Later, run_all
from procqueue._scheduler import instructions as ins
from procqueue._scheduler import sizing
from procqueue._scheduler.books import Death
from procqueue._scheduler.tasks import Batch

STOP_GRACE = 5.0  # seconds an idle worker gets to exit after Stop
IDLE_LET_GO = 2.0  # seconds with no batch out before the argument segments kept for reuse go


class Manager:
    """The loop, and how it carries out instructions."""

    def __init__(self, wiring: Wiring) -> None:
        self.b = wiring
        self.core = wiring.core
        self.s = wiring.core.scheduler
        self.sup = wiring.supervisor
        self.collector = CollectorWatch(wiring, self.execute, self.finish)
        self.stop_deadline = float("inf")
        self.idle_since: float | None = None  # when the pool last had no batch out

    def run(self) -> None:
        self.core.run_backend(self.serve, self.close, "manager thread")

    def serve(self) -> None:
        b, core, sel = self.b, self.core, self.b.sel
        while b.phase is not Phase.DONE:
            later: Later = []
            with core.lock:
                b.woken = False
                if b.recycle_due:
                    self.retire_over_memory()
                now = time.monotonic()
                self.respawn_due(now)
                sends = self.execute(core.apply(self.s.dispatch(now), later))
            run_all(later)
            self.send_batches(sends)
            with core.lock:
                self.advance_phase()
                self.idle_check(now)
            if self.done():
                break
            self.collector.watch_outbox()
            for key, _mask in sel.select(self.timeout()):
                tag, slot, generation = key.data
                if tag is Tag.RESULTS:
                    self.collector.on_results()
                elif tag is Tag.WAKE:
                    with contextlib.suppress(BlockingIOError):
                        os.read(b.wake_r, 4096)
                elif tag is Tag.OUTBOX:
                    b.collector.flush()
                elif tag is Tag.COLLECTOR:
                    if generation == b.collector.generation:
                        self.collector.on_died()
                elif generation != slot.generation:
                    pass  # stale: that worker died earlier in this same batch of events
                elif tag is Tag.DEAD:
                    self.on_dead(slot)
                elif not self.sup.flush(slot):
                    sel.unregister(slot.fd)
            self.collector.check_stopped()

    def done(self) -> bool:
        return self.b.phase is Phase.DONE

    # --- carrying out instructions (lock held) --------------------------------------------------

    def execute(self, todo: list[ins.Instruction]) -> list[Batch]:
        """Do what the scheduler said; the batches to send are returned, to be
        pickled and sent without the lock."""
        sends: list[Batch] = []
        for i in todo:
            match i:
                case ins.Send(batch=batch):
                    sends.append(batch)
                case ins.Retire(seat=seat):
                    self.send(self.sup.slots[seat], framing.frame_parts(m.Stop()))
                case ins.Kill(seat=seat, reason=reason):
                    self.sup.kill(self.sup.slots[seat], reason)
                case ins.Start(seat=seat):
                    if self.b.phase is Phase.RUNNING:
                        self.b.spawn(self.sup.slots[seat])
                case ins.Break():
                    for slot in self.sup.slots:
                        self.sup.kill(slot)
                case _:
                    raise TypeError(f"the local backend got an instruction it does not know: {i!r}")
        return sends

    def send(self, slot: Slot, parts: list[bytes | memoryview]) -> None:
        if self.sup.send(slot, parts):
            with contextlib.suppress(KeyError):
                self.b.sel.register(slot.fd, selectors.EVENT_WRITE, (Tag.WRITABLE, slot, slot.generation))

    def send_batches(self, batches: list[Batch]) -> None:
        """Pickle and send the batches the scheduler booked. Pickling runs user code
        (`__reduce__`, `__getstate__`), so it happens without the lock; an item that
        does not pickle fails alone, naming the argument, and its batch goes back."""
        core, s = self.core, self.s
        later: Later = []
        for batch in batches:
            run = batch.head
            side = self.sup.slots[batch.seat].side  # the manager's own thread is the only one that changes it
            lent_from = 0 if side is None else side.next_seq
            blob, payload, rejected = encode_batch(
                run.handler.wire, batch.segments, None if side is None else side.lend
            )
            with core.cv:
                if not s.holds(batch) or rejected:
                    if side is not None:
                        side.unlend(lent_from)  # its frame is not written: no worker maps them
                    if rejected and s.holds(batch):
                        core.unsendable(batch, rejected, later)
                    continue  # settled meanwhile (the pool broke, the worker died), or turned back
                slot = self.sup.slots[batch.seat]
                timed = any(r.receiver.timed_each for r, _, _ in batch.segments)
                relay = forwarded(batch.segments)
                pick = None
                # A body the worker holds goes as its key. Safe because a live worker is never sent,
                # at attempt 1 and not careful, a value it handed out before: every path that runs
                # values again (retries, requeues after a death) raises the attempt or sets careful.
                if relay is not None:
                    held = 0 if run.attempt > 1 or run.careful else slot.held_body
                    bodies, pick = relay.wire(held)
                    payload = list(bodies)
                    batch.loads = relay.loads(held)
                    slot.held_body = relay.last_key
                msg = m.RunBatch(
                    batch.batch_id, batch.count, run.handler.id, None if slot.knows(run.handler.id) else blob,
                    run.call, run.attempt, run.retries, sizing.careful(run), run.by_value, run.packed, timed, pick,
                )  # fmt: skip
                self.send(slot, framing.frame_parts(msg, payload))
                self.execute(core.apply(s.sent(batch), later))
        run_all(later)

    # --- workers --------------------------------------------------------------------------------

    def on_dead(self, slot: Slot) -> None:
        """A worker ended: the scheduler books its work as lost and says whether to
        start another; the collector then reads what it sent before dying."""
        b, core, s = self.b, self.core, self.s
        b.sel.unregister(slot.death_fd)
        with contextlib.suppress(KeyError, ValueError):  # registered only while bytes wait for it
            b.sel.unregister(slot.fd)
        with core.lock:
            running = self.sup.running(slot)
            reason, pid = slot.kill_reason, slot.pid
            ours = slot.collector_generation == b.collector.generation  # its socket went to this collector
        exitcode, fault_text = self.sup.reap(slot)
        later: Later = []
        with core.cv:
            at = None if running is None else (running[0], running[1])
            self.execute(core.apply(s.worker_died(Death(slot.index, pid, exitcode, at, reason, fault_text)), later))
            charged_at = s.lost_running(pid)
            if not ours:  # its collector is gone, and with it whatever the worker had sent: settle it here
                core.apply(s.worker_gone(pid, False, time.monotonic()), later)
        if not ours:
            self.sup.forget_side(pid)  # no result of it will come: what it posted is freed
        run_all(later)
        if ours:
            timed_out = reason is ins.KillReason.TIMEOUT
            running_msg = None if charged_at is None else m.Running(*charged_at)
            b.send_control(m.WorkerLost(slot.index, pid, exitcode, timed_out, running_msg))

    def idle_check(self, now: float) -> None:
        """After `IDLE_LET_GO` seconds with no batch out, the workers' argument segments
        kept for reuse are let go (lock held): a burst of large arrays leaves nothing."""
        if self.s.batches:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= IDLE_LET_GO:
            for slot in self.sup.slots:
                if slot.side is not None and slot.side.holds_segments():
                    slot.side.let_go()

    def _segments_due(self) -> float | None:
        """When `idle_check` lets the segments go, if any are kept."""
        if self.idle_since is None or not any(
            sl.side is not None and sl.side.holds_segments() for sl in self.sup.slots
        ):
            return None
        return self.idle_since + IDLE_LET_GO

    def retire_over_memory(self) -> None:
        for index, pid in self.b.recycle_due:
            slot = self.sup.slots[index]
            if slot.pid == pid and slot.alive and self.b.phase is Phase.RUNNING and self.s.retire(index, recycle=True):
                self.send(slot, framing.frame_parts(m.Stop()))
        self.b.recycle_due.clear()

    def respawn_due(self, now: float) -> None:
        for slot in self.sup.slots:
            if slot.respawn_at is not None and slot.respawn_at <= now and not slot.alive:
                if self.b.phase is Phase.RUNNING and self.s.broken is None:
                    self.b.spawn(slot)
                else:
                    slot.respawn_at = None

    def timeout(self) -> float | None:
        """Seconds `select()` may sleep: until the nearest backoff, task timeout, stall,
        respawn or shutdown deadline. Workers already past a limit are killed here."""
        now = time.monotonic()
        with self.core.lock:
            kills, limit = self.s.check_limits(self._reading, now, time.perf_counter())
            self.execute(list(kills))
        due = self.s.next_due()
        if self.s.batches:  # the collector's silence is checked this often while work is out
            due = min(due, now + self.collector.silence) if due is not None else now + self.collector.silence
        if self.b.phase is Phase.STOPPING and self.stop_deadline != float("inf"):
            due = self.stop_deadline if due is None else min(due, self.stop_deadline)
        for slot in self.sup.slots:
            if slot.respawn_at is not None:
                due = slot.respawn_at if due is None else min(due, slot.respawn_at)
        let_go = self._segments_due()
        if let_go is not None:
            due = let_go if due is None else min(due, let_go)
        wait = None if due is None else max(0.0, due - now)
        return limit if wait is None else wait if limit is None else min(wait, limit)

    def _reading(self, seat: int) -> tuple[int, int, float] | None:
        now = self.sup.running(self.sup.slots[seat])
        return None if now is None else (now[0], now[1], now[2] / 1e9)

    # --- ending ---------------------------------------------------------------------------------

    def advance_phase(self) -> None:
        """Once the pool is closed and idle (or broken): Stop to every worker; once
        all have ended and been settled: Shutdown to the collector (lock held)."""
        b, s = self.b, self.s
        if b.phase is Phase.RUNNING and s.closed and (s.idle() or s.broken is not None):
            b.phase = Phase.STOPPING
            s.stopping = True
            self.stop_deadline = time.monotonic() + STOP_GRACE
            for slot in self.sup.slots:
                if slot.alive and s.retire(slot.index, recycle=False):
                    self.send(slot, framing.frame_parts(m.Stop()))
        if b.phase is Phase.STOPPING and time.monotonic() > self.stop_deadline:
            # Idle workers exit within milliseconds of Stop; one that does not is killed.
            stuck = [(sl.index, sl.pid) for sl in self.sup.slots if sl.alive]
            warnings.warn(
                f"procqueue: workers {stuck} did not exit within {STOP_GRACE} s of being stopped; killing them "
                f"(lost={s.lost_pids()}, batches={list(s.batches)})",
                RuntimeWarning,
                stacklevel=1,
            )
            for slot in self.sup.slots:
                self.sup.kill(slot, ins.KillReason.SHUTDOWN)
            self.stop_deadline = float("inf")
        if b.phase is Phase.STOPPING and not any(sl.alive for sl in self.sup.slots) and not s.lost_pids():
            b.phase = Phase.DRAINING
            b.send_control(m.Shutdown())

    def close(self) -> None:
        b = self.b
        for slot in self.sup.slots:
            if slot.alive:
                self.sup.kill(slot)
                self.sup.reap(slot)
        b.collector.close(kill=False)
        self.sup.close_sides()
        with self.core.lock:
            b.close_wake()
        b.sel.close()
        with self.core.lock:
            b.phase = Phase.DONE
        self.core.finished()

    def finish(self) -> None:
        """The collector is gone for good: the manager's loop ends."""
        with self.core.lock:
            self.b.phase = Phase.DONE
