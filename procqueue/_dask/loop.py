"""The Dask backend's loop thread: scheduler instructions out as Dask tasks,
what Dask reports back in as scheduler events (picture: `__init__.py`).

Each round: under the pool's lock, the scheduler books batches to seats with
room; without it, each batch is pickled (user code) and submitted, pinned to
its seat's worker. Then the loop waits for the nearest deadline or an event:
a batch's future finished (its outcomes), failed with `KilledWorker` (its
worker died: one attempt, charged by the scheduler's rules), a batch started
(the clock of its timeout), or a wake-up. Dask calls back on its own event
loop thread; those callbacks only put an event in the queue.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from distributed.scheduler import KilledWorker

from procqueue._dask.plugin import START_TOPIC, kill_worker_process, worker_pids
from procqueue._dask.task import run_batch
from procqueue._protocol import layout
from procqueue._protocol.arguments import encode_batch
from procqueue._results import Later, Values, run_all
from procqueue._scheduler import instructions as ins
from procqueue._scheduler.books import Death
from procqueue._scheduler.tasks import Batch

if TYPE_CHECKING:
    from procqueue._core import Core
    from procqueue._dask.cluster import Cluster

POLL = 0.5  # seconds between looks at the cluster's workers (their metrics refresh as often)
RESULT_WAIT = 30.0  # seconds to fetch a finished batch's result from a live worker before taking it for lost
FETCH_SLICE = 0.25  # ... looking this often whether that worker is still there
NAME_WAIT = 1.0  # seconds to wait for Dask to say which batch a dead worker was running
NAME_POLL = 0.02
ERROR_WAIT = 5.0  # seconds to fetch a failed future's exception (timeout=0 always times out)


class Loop:
    """Runs on the backend's thread; `wake` and the Dask callbacks may come from any."""

    def __init__(self, cluster: Cluster, core: Core) -> None:
        self.b = cluster
        self.core = core
        self.s = core.scheduler
        self.client = cluster.client
        self.events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.futures: dict[int, Any] = {}  # batch id -> its Dask future
        self.seat_of: dict[int, int] = {}  # batch id -> the seat it went to
        self.ran_on: dict[int, str | None] = {}  # batch id -> the worker it was pinned to
        self.last_sent: dict[int, Any] = {}  # seat -> the future of the batch it got last
        self.started: dict[str, float] = {}  # key -> when it began (our clock)
        self.kill_reason: dict[int, ins.KillReason] = {}  # seat -> why we killed its worker
        self.kills: list[ins.Kill] = []  # to carry out without the lock
        self.cancel_due = False
        self.incarnation = 1  # makes up distinct ids for workers whose pid the scheduler would not tell
        self.dead: set[str] = set()  # addresses of workers seen dead (the scheduler may list them a while)
        self.next_look = 0.0
        self.client.subscribe_topic(START_TOPIC, self._on_start)

    # --- from other threads ------------------------------------------------------------------

    def wake(self) -> None:
        self.events.put(("wake",))

    def _on_start(self, event: tuple[float, dict[str, Any]]) -> None:
        self.events.put(("start", event[1].get("key"), time.monotonic()))

    def _on_done(self, batch: Batch, future: Any) -> None:
        # Its status now: "lost" (finished, then its worker died) is told apart here.
        self.events.put(("done", batch, future, future.status))

    def cancel_all(self) -> None:
        """The pool broke or was terminated: stop what runs (its outcomes no longer matter)."""
        self.cancel_due = True
        self.wake()

    def cancel_now(self) -> None:
        """Cancel every future of the pool; a worker already running one of its batches
        is killed through its nanny (Dask cannot stop a running task otherwise)."""
        self.cancel_due = False
        prefix = self.b.prefix
        running = [
            seat
            for batch_id, future in self.futures.items()
            if not future.done() and f"{prefix}{batch_id}" in self.started
            and (seat := self.seat_of.get(batch_id)) is not None
        ]  # fmt: skip
        with contextlib.suppress(Exception):
            self.client.cancel(list(self.futures.values()), force=True)
        for seat in running:
            self.kills.append(ins.Kill(seat, ins.KillReason.SHUTDOWN))
        self.carry_out_kills()

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        self.core.run_backend(self.serve, self.close, "Dask loop")

    def serve(self) -> None:
        core, s = self.core, self.s
        while True:
            later: Later = []
            with core.lock:
                sends = self.execute(core.apply(s.dispatch(time.monotonic()), later))
            run_all(later)
            self.submit(sends)
            self.carry_out_kills()
            if self.cancel_due:
                self.cancel_now()
            with core.lock:
                if s.closed and (s.idle() or s.broken is not None):
                    return
            # What came meanwhile first: a batch that finished must not be timed out.
            if self.drain():
                continue
            try:
                self.handle(self.events.get(timeout=self.timeout()))
            except queue.Empty:
                continue
            self.drain()

    def drain(self) -> bool:
        """Handle the events waiting; whether there were any."""
        n = 0
        with contextlib.suppress(queue.Empty):
            while True:
                self.handle(self.events.get_nowait())
                n += 1
        return n > 0

    def handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "done":
            self.on_done(event[1], event[2], event[3])
        elif kind == "start":
            self.started[event[1]] = event[2]

    def timeout(self) -> float | None:
        """Until the nearest backoff, task timeout or look at the workers. Workers past a
        limit are killed here; seats whose worker came back are opened here."""
        now = time.monotonic()
        if now >= self.next_look:
            self.refresh(now)
        with self.core.lock:
            kills, limit = self.s.check_limits(self._reading, now, now)
            self.execute(list(kills))
        self.carry_out_kills()
        due = self.s.next_due()
        waits = [self.next_look - now] + ([] if limit is None else [limit]) + ([] if due is None else [due - now])
        return max(0.0, min(waits))

    def _reading(self, seat: int) -> tuple[int, int, float] | None:
        for batch in self.s.seats[seat].batches.values():
            began = self.started.get(self.key(batch))
            if began is not None and not ran(self.futures.get(batch.batch_id)):
                return batch.batch_id, layout.LOADING, began
        return None

    def refresh(self, now: float) -> None:
        """Look at the cluster: metrics for `stats()`, pids, and seats whose worker is back."""
        self.next_look = now + POLL
        try:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        except Exception:  # the scheduler is gone; the futures will say so
            return
        by_name = {str(w.get("name")): addr for addr, w in workers.items() if addr not in self.dead}
        self.b.metrics = {
            addr: (float(w.get("metrics", {}).get("cpu", 0.0)), int(w.get("metrics", {}).get("memory", 0)))
            for addr, w in workers.items()
        }
        pids: dict[str, int] | None = None
        for i, name in enumerate(self.b.names):
            addr = by_name.get(name)
            with self.core.lock:
                seat = self.s.seats[i]
                gone = seat.open and addr != self.b.addr[i]
                started = any(self.key(b) in self.started for b in seat.batches.values())
            if gone and not started:
                # Its worker went away between batches (its batch, pinned to it, would wait forever).
                self.lost_worker(i, None, "its Dask worker left the cluster", pid=self.b.pid[i])
                continue
            if not seat.open and self.b.addr[i] is None and addr is not None and not self.s.stopping:
                if pids is None:
                    pids = worker_pid_map(self.client)
                with self.core.lock:
                    self.b.addr[i] = addr
                    self.b.pid[i] = pids.get(addr, -1 - i - 1000 * self.incarnation)
                    self.incarnation += 1
                    self.s.worker_started(i, self.b.pid[i])
                    self.wake()

    # --- instructions ---------------------------------------------------------------------------

    def execute(self, todo: list[ins.Instruction]) -> list[Batch]:
        """Carry out what the scheduler said (lock held); batches to submit come back."""
        sends: list[Batch] = []
        for i in todo:
            match i:
                case ins.Send(batch=batch):
                    sends.append(batch)
                case ins.Kill():
                    self.kill_reason.setdefault(i.seat, i.reason)
                    self.kills.append(i)
                case ins.Break():
                    self.cancel_due = True
                case ins.Retire() | ins.Start():
                    pass  # no task limit on Dask; a nanny restarts a dead worker by itself
                case _:
                    raise TypeError(f"the Dask backend got an instruction it does not know: {i!r}")
        return sends

    def key(self, batch: Batch) -> str:
        return f"{self.b.prefix}{batch.batch_id}"

    def submit(self, batches: list[Batch]) -> None:
        """Pickle each batch (user code: without the lock) and hand it to Dask."""
        core, s = self.core, self.s
        later: Later = []
        for batch in batches:
            run = batch.head
            blob, parts, rejected = encode_batch(run.handler.wire, batch.segments)
            addr = self.b.addr[batch.seat]
            with core.cv:
                if not s.holds(batch):
                    continue
                if rejected:
                    core.unsendable(batch, rejected, later)
                    continue
            body = b"".join(parts)
            # A second batch for the seat waits on the first inside Dask (not on a round trip
            # through this loop), so Dask never holds two of a seat's batches "processing":
            # when the worker dies, the one Dask fails for itself is the one that ran.
            before = self.last_sent.get(batch.seat)
            after = () if before is None or before.done() else (before,)
            future = self.client.submit(
                run_batch, batch.batch_id, batch.count, blob, body, int(run.call), run.attempt, run.packed, *after,
                key=self.key(batch), pure=False, retries=0, workers=[addr] if addr else None,
                allow_other_workers=False, priority=run.priority,
            )  # fmt: skip
            self.last_sent[batch.seat] = future
            self.futures[batch.batch_id] = future
            self.seat_of[batch.batch_id] = batch.seat
            self.ran_on[batch.batch_id] = addr
            future.add_done_callback(partial(self._on_done, batch))
            with core.cv:
                self.execute(core.apply(s.sent(batch), later))
        run_all(later)

    def carry_out_kills(self) -> None:
        kills, self.kills = self.kills, []
        for kill in kills:
            addr = self.b.addr[kill.seat]
            if addr is None:
                continue
            with contextlib.suppress(Exception):  # it may be dead already
                self.client.run(kill_worker_process, workers=[addr], nanny=True, on_error="return")

    # --- outcomes -------------------------------------------------------------------------------

    def on_done(self, batch: Batch, future: Any, status: str) -> None:
        self.futures.pop(batch.batch_id, None)
        self.seat_of.pop(batch.batch_id, None)
        self.started.pop(self.key(batch), None)
        try:
            self.outcome(batch, future, status)
        finally:
            self.ran_on.pop(batch.batch_id, None)

    def outcome(self, batch: Batch, future: Any, status: str) -> None:
        core, s = self.core, self.s
        if status == "cancelled" and s.broken is not None:
            future.release()
            return  # the pool broke: everything was settled already
        got = take_result(self.client, future, status, self.ran_on.get(batch.batch_id))
        if isinstance(got, Lost):
            if got.alive:  # its worker holds the result yet will not give it: end that worker
                self.kill_reason.setdefault(batch.seat, ins.KillReason.STALLED)
                self.kills.append(ins.Kill(batch.seat, ins.KillReason.STALLED))
                self.carry_out_kills()
            self.died(batch, got.why, got.ran, got.named)
            return
        msg, body = got
        values: Values | None = Values(memoryview(body), self._unloadable)
        if self.b.writer is not None:  # a FileOutput takes the values; none come back
            self.b.writer.values(body)
            values = None
        later: Later = []
        with core.cv:
            self.execute(core.apply(s.batch_done(msg, values, time.monotonic()), later))
        run_all(later)

    def died(self, batch: Batch, why: str, ran: bool = False, named: Any = None) -> None:
        """The worker of `batch`'s seat died: it was running one of the batches it held
        (not `batch`, if `ran`: that one had finished; the one keyed `named` if Dask said)."""
        with self.core.lock:
            if not self.s.holds(batch):
                return  # settled already (its other batch's failure came first, or the pool broke)
            held = list(self.s.seats[batch.seat].batches.values())
            pid = self.b.pid[batch.seat]
        running = next((b for b in held if named is not None and self.key(b) == named), None)
        if running is None:
            others = [b for b in held if not (ran and b is batch)]
            running = which_ran(others, self.futures, self.started, self.key)
        # Dask cannot say which item of a batch ran: see __init__.py.
        at = None if running is None else (running.batch_id, layout.LOADING)
        self.lost_worker(batch.seat, at, why, pid=pid)

    def lost_worker(self, seat: int, running: tuple[int, int] | None, why: str, pid: int) -> None:
        """A seat's worker `pid` is gone: one attempt of what it ran, by the scheduler's rules."""
        core, s = self.core, self.s
        later: Later = []
        with core.cv:
            if self.b.addr[seat] is None or self.b.pid[seat] != pid:
                return  # this death was handled already
            reason = self.kill_reason.pop(seat, None)
            held = [self.futures.get(b.batch_id) for b in s.seats[seat].batches.values()]
            self.execute(core.apply(s.worker_died(Death(seat, pid, None, running, reason, why)), later))
            core.apply(s.worker_gone(pid, False, time.monotonic()), later)
            if self.b.addr[seat] is not None:
                self.dead.add(self.b.addr[seat] or "")
            self.b.addr[seat] = None  # the nanny's replacement has a new address: `refresh` finds it
        run_all(later)
        stuck = [f for f in held if f is not None and not f.done()]
        if stuck:
            with contextlib.suppress(Exception):
                self.client.cancel(stuck, force=True)
        self.next_look = 0.0

    def _unloadable(self, n: int) -> None:
        with self.core.cv:
            self.s.values_unloadable(n)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.unsubscribe_topic(START_TOPIC)
        self.b.close()
        self.core.finished()


@dataclass
class Lost:
    """How a batch's worker's death took it."""

    why: str
    ran: bool = False  # it had finished: its result went with its worker
    named: Any = None  # the key of the task Dask says that worker was running
    alive: bool = False  # its worker is still there, but its result could not be fetched


def take_result(client: Any, future: Any, status: str, addr: str | None) -> tuple[Any, bytes] | Lost:
    """A done batch's result (`status`: its future's when its done callback ran), or how it was lost."""
    try:
        if status == "finished":
            try:
                return fetch(client, future, addr)
            except BaseException as exc:
                alive = isinstance(exc, TimeoutError) and addr in known_workers(client)
                return Lost(f"its result could not be fetched ({type(exc).__name__}: {exc})", ran=True, alive=alive)
        if status not in ("error", "cancelled"):  # it finished, then its worker died
            return Lost("its result was lost with its worker", ran=True)
        error: BaseException | None = None
        with contextlib.suppress(BaseException):
            error = future.exception(timeout=ERROR_WAIT)
        # KilledWorker names the task Dask had running on the dead worker: this one, or
        # the one it was chained after.
        named = error.task if isinstance(error, KilledWorker) else None
        return Lost("" if error is None else f"{type(error).__name__}: {error}", named=named)
    finally:
        future.release()  # a held result is recomputed if its worker dies


def fetch(client: Any, future: Any, addr: str | None) -> tuple[Any, bytes]:
    """A finished batch's result. It waits on the worker that ran it (`addr`); if that
    worker has died since, Dask would run the batch again (pinned to the dead worker:
    never), so the wait ends as soon as the worker is seen gone."""
    deadline = time.monotonic() + RESULT_WAIT
    while True:
        try:
            result: tuple[Any, bytes] = future.result(timeout=FETCH_SLICE)
            return result
        except TimeoutError:  # noqa: PERF203 - a slice of the wait, a few times at most
            if time.monotonic() > deadline or addr not in known_workers(client):
                raise


def known_workers(client: Any) -> dict[str, Any]:
    """The cluster's workers by address (none if the scheduler cannot be asked)."""
    try:
        workers: dict[str, Any] = client.scheduler_info(n_workers=-1)["workers"]
    except Exception:
        return {}
    return workers


def worker_pid_map(client: Any) -> dict[str, int]:
    """Each worker's pid, by address (empty if the scheduler will not say)."""
    try:
        return dict(client.run_on_scheduler(worker_pids))
    except Exception:
        return {}


def ran(future: Any) -> bool:
    """Whether a batch's future says it ran to its end ("lost": and then its worker died)."""
    return future is not None and future.status in ("finished", "lost")


def which_ran(held: list[Batch], futures: dict[int, Any], started: dict[str, float], key: Any) -> Batch | None:
    """Which of a seat's `held` batches its dead worker was running. Dask fails the one it had
    running with a KilledWorker naming it (a batch chained after it, with the same); one
    only waiting gets nothing. Those errors may trail the news of the death: wait a moment
    for them. Without a name, only a batch whose start was seen is charged; no guessing."""
    deadline = time.monotonic() + NAME_WAIT
    while True:
        waiting = False
        for b in held:
            future = futures.get(b.batch_id)
            if future is None or ran(future):
                continue
            if future.status == "error":
                error = None
                with contextlib.suppress(BaseException):
                    error = future.exception(timeout=ERROR_WAIT)
                if isinstance(error, KilledWorker):
                    return next((c for c in held if key(c) == error.task), None)
            elif future.status == "pending":
                waiting = True
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(NAME_POLL)
    return next((b for b in held if key(b) in started and not ran(futures.get(b.batch_id))), None)
