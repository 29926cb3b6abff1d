"""One `Pipeline.map` call in motion: a reader thread, a pump per stage, bounded
room between them.

    input ──► [reader] ──► stage 0 ──► [pump 0] ──► stage 1 ──► [pump 1] ──► outbox ──► your loop

The reader pulls the input (user code, on its own thread) only while stage 0
has room; pump k takes stage k's finished chunks in the order its map gives
them, sends the errors to the outbox and pushes the values on to stage k + 1
once that stage has room. Values go on still pickled, as the body they came
in (`procqueue/_protocol/relay.py`): the parent neither unpickles nor pickles
them; where it must (values in shared memory, values for a stage that recycles
its workers, the last stage's for your loop), the pump unpickles them on
its own thread, never a pool's manager thread. So a slow stage stops the ones
before it, back to the input, and at most the capacities' sum of items is
inside at any time.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from procqueue._errors import PoolClosed, StageFailed
from procqueue._map import Feeder, Pushed
from procqueue._pipeline.routes import Indices, Outbox, Positions
from procqueue._protocol import messages as m
from procqueue._protocol.relay import Forwarded

if TYPE_CHECKING:
    from procqueue._pipeline.stage import Stage
    from procqueue._pool import Pool

SAFETY_WAKE = 1.0  # seconds: a pump blocked on a stage re-checks that its map is still read
BYTES = 32 << 20  # the stages hold more than their `capacity` only while it takes less than this in all
LEAVE_WITHIN = 5.0  # seconds a pump may take to leave once its map ended (it may be in user code)


class Lane:
    """One stage as one map sees it: its feeder and the items it holds."""

    def __init__(
        self, index: int, stage: Stage, pool: Pool, capacity: int, ordered: bool, budget: int, relay: bool
    ) -> None:
        self.index = index
        self.stage = stage
        core = pool._core
        core.check_open()
        with core.lock:
            handler = core.scheduler.handlers.get(stage.fn)
        size = None if stage.chunksize == "auto" else stage.chunksize
        self.relay = relay  # it takes the stage before's values still pickled
        self.feeder = Feeder(core, pool.options(), handler, Pushed(), m.Call.ONE, size, ordered, True, relay)
        self.positions = Positions()
        self.capacity = capacity
        self.span = capacity  # the room it gets: capacity, or a batch in hand and one ready per worker
        self.held = 0  # pushed to this stage and not yet taken out by its pump
        self.item_bytes = 0.0  # pickled bytes an item of it takes, in or out, as last seen
        self.sized = False  # item_bytes was measured (a chunk of errors only measures 0)
        self.budget = budget  # bytes its items may take beyond `capacity`

    def measure(self) -> None:
        """Bring `span` up to date (takes the stage pool's lock: never call it under the flow's).
        Tiny items travel in batches of thousands; a room of `capacity` alone would starve
        them. Beyond `capacity` it grows only while the items it holds stay under its share
        of BYTES, and only once both the items' size and the stage's pace are measured
        (before that, an untimed stage would ask for a huge batch)."""
        if not self.sized or self.feeder.handler.est_ns is None:
            self.span = self.capacity
            return
        core = self.feeder.core
        with core.lock:
            busy = core.feed_span(self.feeder)
        self.span = max(self.capacity, min(busy, int(self.budget / max(self.item_bytes, 1.0))))

    def saw(self, nbytes: float) -> None:
        """Items of about `nbytes` pickled bytes each came into or out of this stage."""
        self.item_bytes = max(nbytes, 0.5 * self.item_bytes)  # a jump up counts at once
        self.sized = True

    def room(self) -> int:
        return self.span - self.held

    @property
    def relays(self) -> bool:
        """It takes the stage before's values still pickled. Not where it recycles workers
        (`max_tasks_per_worker`): each new worker would unpickle a whole body again."""
        return self.relay and self.stage.max_tasks_per_worker is None


class Flow:
    """The threads and books of one `Pipeline.map`."""

    def __init__(
        self,
        stages: list[tuple[Stage, Pool, int]],
        capacity: int,
        ordered: bool,
        return_exceptions: bool,
        relay: bool = True,
    ) -> None:
        lock = threading.RLock()  # reentrant: close() may run in a finalizer
        self.cv = threading.Condition(lock)  # the reader of the results waits here
        budget = BYTES // len(stages)
        self.lanes = [
            Lane(i, stage, pool, cap, ordered, budget, relay and i > 0) for i, (stage, pool, cap) in enumerate(stages)
        ]
        # room[k]: lane k (the outbox for k == len(lanes)) has room: only who pushes there waits
        # on it, so a change wakes one thread, not every thread of the map.
        self.room = [threading.Condition(lock) for _ in range(len(self.lanes) + 1)]
        self.outbox = Outbox(ordered)
        self.out_capacity = capacity
        self.return_exceptions = return_exceptions
        self.admitted = 0  # items read from the input
        self.handed = 0  # results handed to the reader
        self.closed = False  # the reader went away, or the map ended
        self.ended = False  # the last stage is through
        self.failure: BaseException | None = None  # a stage's pool broke
        self.input_error: BaseException | None = None  # the input raised: after what came before
        self.threads: list[threading.Thread] = []

    def start(self, items: Iterator[Any]) -> None:
        try:
            for lane in self.lanes:
                lane.feeder.start()
        except BaseException:  # a stage was shut down meanwhile: release the others
            for lane in self.lanes:
                lane.feeder.push([], True)
            self.close()
            raise
        targets: list[tuple[Callable[..., None], tuple[Any, ...], str]] = [
            (self._read, (items,), "procqueue-pipe-input")
        ]
        targets += [(self._pump, (lane,), f"procqueue-pipe-{lane.index}") for lane in self.lanes]
        for target, args, name in targets:
            t = threading.Thread(target=target, args=args, name=name, daemon=True)
            self.threads.append(t)
            t.start()

    # --- the reader of the input -------------------------------------------------------

    def _room_in(self) -> int:
        """How many items the input may bring now: room at the first stage, and at most
        every stage's room and the outbox's inside the pipeline at once."""
        limit = sum(lane.span for lane in self.lanes) + self.out_capacity
        return min(self.lanes[0].room(), limit - (self.admitted - self.handed))

    def _read(self, items: Iterator[Any]) -> None:
        lane = self.lanes[0]
        try:
            while True:
                for each in self.lanes:
                    each.measure()
                with self.cv:
                    while not self.closed and self._room_in() <= 0:
                        self.room[0].wait()
                    if self.closed:
                        return
                    room = self._room_in()
                batch: list[Any] = []
                error: BaseException | None = None
                try:
                    batch.extend(itertools.islice(items, room))  # user code, on this thread only
                except BaseException as exc:  # the input failed: what it gave before still runs
                    error = exc
                with self.cv:
                    first = self.admitted
                    self.admitted += len(batch)
                    lane.held += len(batch)
                    lane.positions.add(range(first, first + len(batch)))
                    self.input_error = error
                done = len(batch) < room or error is not None
                if not lane.feeder.push(batch, done) or done:
                    return
        except BaseException as exc:  # procqueue's own failure: the map ends with it
            self._fail(exc)

    # --- a stage's pump --------------------------------------------------------------------

    def _room_after(self, lane: Lane) -> bool:
        if lane.index + 1 < len(self.lanes):
            return self.lanes[lane.index + 1].room() > 0
        return self.outbox.ready < self.out_capacity  # not errors waiting for their turn

    def _pump(self, lane: Lane) -> None:
        try:
            while self._pump_one(lane):
                pass
        except BaseException as exc:  # a stage's pool broke, or was shut down under the map
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """A thread of the map failed: the map ends, its reader gets `exc` (the first such)."""
        with self.cv:
            self.failure = self.failure or exc
            self.cv.notify_all()
        self.close()

    def _pump_one(self, lane: Lane) -> bool:
        """Move one finished chunk of `lane` on; False once the stage is through."""
        if lane.index + 1 < len(self.lanes):
            self.lanes[lane.index + 1].measure()
        with self.cv:  # first room after it: holding a chunk the next stage cannot take helps no one
            while not self.closed and not self._room_after(lane):
                self.room[lane.index + 1].wait()
            if self.closed:
                return False
        feeder = lane.feeder
        core = feeder.core
        with core.cv:
            while True:
                if self.closed:
                    return False
                chunk = feeder.take_done()
                if chunk is not None or feeder.finished:
                    break
                if core.scheduler.broken is not None:
                    raise core.scheduler.broken
                core.cv.wait(SAFETY_WAKE)
        after = self.lanes[lane.index + 1] if lane.index + 1 < len(self.lanes) else None
        if chunk is None:  # through: tell the next stage no more will come
            if feeder.error is not None:  # the stage's pool was shut down under the map
                raise feeder.error
            if after is not None:
                after.feeder.push([], True)
            else:
                with self.cv:
                    self.ended = True
                    self.cv.notify_all()
            return False
        if chunk.size:
            per_item = chunk.body_bytes() / chunk.size
            lane.saw(per_item)
            if after is not None:
                after.saw(per_item)
        # On to the next stage still pickled (relay.py); else unpickled here, not on the
        # pool's manager thread.
        relayed = chunk.forward() if after is not None and after.relays else None
        if relayed is None:
            chunk.materialize()
        values = chunk.values
        errors = chunk.errors
        pushes: list[list[Any] | Forwarded] = []
        with self.cv:
            indices: Indices = lane.positions.take(chunk.start, chunk.size)
            lane.held -= chunk.size
            if errors:
                for j, exc in errors.items():
                    self.outbox.fail(indices[j], _tag(exc, lane, indices[j]))
            if relayed is not None:
                assert after is not None
                for places, items in relayed:
                    after.positions.add(_at(indices, places))
                    after.held += len(items)
                    pushes.append(items)
            else:
                if errors:
                    keep = [j for j in range(chunk.size) if j not in errors]
                    values = [values[j] for j in keep]
                    indices = [indices[j] for j in keep]
                if after is None:
                    self.outbox.put(indices, values)
                elif values:
                    after.positions.add(indices)
                    after.held += len(indices)
                    pushes.append(values)
            self.room[lane.index].notify()  # who pushes into this stage: it has room again
            if after is None or errors:
                self.cv.notify()  # the reader of the results: something to hand out
        # False: the next stage takes no more, the map is ending
        return after is None or all(after.feeder.push(items, False) for items in pushes)

    # --- the reader's side -------------------------------------------------------------

    def pieces(self) -> Generator[Iterable[Any], None, None]:
        """The results, a run at a time."""
        try:
            while True:
                with self.cv:
                    while True:
                        got = self.outbox.take()
                        if got is not None:
                            self.handed += len(got[0])
                            self.room[-1].notify()  # the last pump: the outbox has room
                            self.room[0].notify()  # the input's reader: fewer items inside
                            break
                        if self.failure is not None:
                            raise self.failure
                        if self.closed:  # ended from outside (shutdown, terminate)
                            raise PoolClosed("the pipeline was shut down while this map was being read")
                        if self.ended:
                            if self.input_error is not None:
                                raise self.input_error
                            return
                        self.cv.wait()
                values, errors = got
                if errors is None or self.return_exceptions:
                    yield values
                else:
                    first = min(errors)
                    yield values[:first]
                    raise errors[first]
        finally:
            self.close()

    def join(self) -> None:
        """Wait for the pumps to leave, a while: one may be stuck in a value's own unpickling
        code, and the input's reader in the input's (both are daemon threads)."""
        for t in self.threads[1:]:
            if t is not threading.current_thread():
                t.join(LEAVE_WITHIN)

    def close(self, why: BaseException | None = None) -> None:
        """End the map: what did not start is cancelled, the threads leave; its reader, if
        still reading, gets `why`. Safe from a finalizer on any thread: a flag, lock-free
        wakes of the pools, this map's own lock."""
        if why is not None and self.failure is None:
            self.failure = why
        self.closed = True
        for lane in self.lanes:
            if not lane.feeder.finished:
                lane.feeder.core.abandon(lane.feeder.stream)
        self._wake_all()

    def _wake_all(self) -> None:
        with self.cv:
            self.cv.notify_all()
            for room in self.room:
                room.notify_all()


def _at(indices: Indices, places: list[range]) -> Indices:
    """The item indices at `places` of a chunk (a range stays a range where it can)."""
    if len(places) == 1:
        return indices[places[0].start : places[0].stop]
    return [i for r in places for i in indices[r.start : r.stop]]


def _tag(exc: BaseException, lane: Lane, index: int) -> BaseException:
    """Name the stage in the error's chain: `exc` <- StageFailed <- what caused `exc`."""
    name = lane.stage.name
    note = StageFailed(
        f"item {index} failed at stage {lane.index} ({name}) of the pipeline; the other items went on",
        stage=lane.index,
        function=name,
        item=index,
    )
    try:
        note.__cause__ = exc.__cause__
        exc.__cause__ = note
    except BaseException:  # an exception type that refuses: it goes out as it is
        pass
    return exc
